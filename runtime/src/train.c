/* train.c: the training step: per sample forward, loss, skip decision and sparse backward;
 * one optimizer update per batch. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "tp_internal.h"

static const float *layer_input(const tp_model *model, int32_t i, const float *x) {
    return model->layers[i].input_is_sample ? x : model->layers[i - 1].output;
}

/* recompute_layers: the input of layer `upto` computed again from the sample x by the forward
 * of the layers before it (the same functions on the same floats as tp_forward_sample, ReLU
 * masks not written again); their outputs alternate between the layer's partner and its
 * recomputed input, where the last one lands. Returns that input. */
static const float *recompute_input(tp_model *model, const float *x, int32_t upto) {
    tp_layer *const target = &model->layers[upto];
    float *const buffers[2] = {target->recomputed_input, target->recompute_partner};
    const float *current = x;
    int32_t i, outputs = 0, written = 0;
    for (i = 0; i < upto; i++) outputs += !tp_layer_aliases(&model->layers[i]);
    for (i = 0; i < upto; i++) {
        const tp_layer *layer = &model->layers[i];
        float *out;
        if (layer->kind == TP_LAYER_FLATTEN) continue;
        if (tp_layer_aliases(layer)) { /* an activation in place */
            tp_activation_forward(layer, current, (float *)(uintptr_t)current,
                                  tp_layer_output_size(layer));
            continue;
        }
        out = buffers[(outputs - 1 - written++) % 2];
        switch (layer->kind) {
        case TP_LAYER_DENSE: tp_dense_forward(layer, current, out); break;
        case TP_LAYER_CONV2D: {
            const int relu = i + 1 < upto && model->layers[i + 1].kind == TP_LAYER_RELU &&
                             !model->layers[i + 1].input_is_sample;
            tp_conv_forward(layer, current, out, target->recompute_scratch, relu);
            i += relu;
            break;
        }
        case TP_LAYER_MAXPOOL: tp_maxpool_forward(layer, current, out); break;
        case TP_LAYER_AVGPOOL: tp_avgpool_forward(layer, current, out); break;
        default: /* an activation on the sample itself */
            tp_activation_forward(layer, current, out, tp_layer_output_size(layer));
            break;
        }
        current = out;
    }
    return current;
}

/* The output of activation i for its backward: where the next layer recomputed it, else
 * kept. */
static const float *activation_output(const tp_model *model, int32_t i) {
    const int32_t consumer = tp_recompute_consumer(model->layers, i, model->layer_count);
    return consumer >= 0 ? model->layers[consumer].recomputed_input : model->layers[i].output;
}

/* max |v[i]|, or infinity when some v[i] is NaN */
static float max_abs(const float *v, size_t n) {
    float largest = 0.0f;
    size_t i;
    for (i = 0; i < n; i++) {
        const float a = fabsf(v[i]);
        if (!(a <= largest)) {
            if (a != a) return INFINITY;
            largest = a;
        }
    }
    return largest;
}

/* max |input| of layer i: x_max when its input is the sample and x_max is known (>= 0) */
static float input_max(const tp_model *model, int32_t i, const float *x, float x_max) {
    const float *input = layer_input(model, i, x);
    if (input == x && x_max >= 0.0f) return x_max;
    return max_abs(input, (size_t)tp_layer_input_size(&model->layers[i]));
}

static int steps_in_place(const tp_model *model) {
    return model->memory.sgd_in_place || model->memory.adam_in_place;
}

tp_status tp_forward_sample(tp_model *model, const float *x, const float **logits) {
    const float *current = x;
    const int in_place = steps_in_place(model);
    int32_t i;
    for (i = 0; i < model->layer_count; i++) {
        tp_layer *layer = &model->layers[i];
        /* its input is gone when its backward runs: the bound before the backward needs it */
        if (layer->recompute_input && in_place)
            layer->input_max = max_abs(current, (size_t)tp_layer_input_size(layer));
        switch (layer->kind) {
        case TP_LAYER_DENSE: tp_dense_forward(layer, current, layer->output); break;
        case TP_LAYER_CONV2D: {
            /* a ReLU right after it that works in place is applied in the conv's last pass */
            const int relu = i + 1 < model->layer_count &&
                             model->layers[i + 1].kind == TP_LAYER_RELU &&
                             model->layers[i + 1].output == layer->output;
            tp_conv_forward(layer, current, layer->output, layer->forward_scratch, relu);
            i += relu;
            if (relu && model->layers[i].relu_mask != NULL)
                tp_relu_mask(layer->output, model->layers[i].relu_mask,
                             tp_layer_output_size(layer));
            break;
        }
        case TP_LAYER_RELU:
            tp_relu_forward(current, layer->output, tp_layer_output_size(layer));
            if (layer->relu_mask != NULL)
                tp_relu_mask(layer->output, layer->relu_mask, tp_layer_output_size(layer));
            break;
        case TP_LAYER_MAXPOOL: tp_maxpool_forward(layer, current, layer->output); break;
        case TP_LAYER_AVGPOOL: tp_avgpool_forward(layer, current, layer->output); break;
        case TP_LAYER_RELU6:
        case TP_LAYER_LEAKY_RELU:
        case TP_LAYER_SIGMOID:
        case TP_LAYER_TANH:
        case TP_LAYER_SILU:
        case TP_LAYER_GELU:
        case TP_LAYER_GELU_TANH:
        case TP_LAYER_HARDSWISH:
        case TP_LAYER_HARDSIGMOID:
        case TP_LAYER_MISH:
        case TP_LAYER_ELU:
        case TP_LAYER_CELU:
        case TP_LAYER_SELU:
        case TP_LAYER_HARDTANH:
            tp_activation_forward(layer, current, layer->output, tp_layer_output_size(layer));
            break;
        case TP_LAYER_FLATTEN: break;
        default: return TP_ERR_UNSUPPORTED;
        }
        if (layer->output != NULL) current = layer->output;
    }
    *logits = current;
    return TP_OK;
}

static int any_nonzero(const float *delta, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++)
        if (delta[i] != 0.0f) return 1;
    return 0;
}

/* selection_in_place: Y and the bias gradient from delta, then the entries top-k does not keep
 * set to zero in delta (the backward then skips zeros). Returns k, 0 when delta is all zero. */
static int32_t select_in_place(tp_model *model, tp_layer *layer, float *delta, int dry) {
    const int32_t n = tp_layer_output_size(layer);
    const int32_t plane = layer->kind == TP_LAYER_CONV2D ? layer->out_h * layer->out_w : 1;
    float *const grad_bias = layer->has_bias ? layer->grad_bias : NULL;
    const int adaptive = model->policy.policy == TP_POLICY_TINYPROP ||
                         model->policy.policy == TP_POLICY_TINYPROPV2;
    float local_error = 0.0f;
    const int32_t nonzero = tp_error_sums(delta, n, adaptive ? &local_error : NULL, plane,
                                          grad_bias);
    int32_t k;
    if (nonzero == 0) return 0;
    if (adaptive) {
        const float running_max = local_error > layer->running_max ? local_error
                                                                   : layer->running_max;
        if (!dry) layer->running_max = running_max;
        k = tp_keep_count(&model->policy, local_error, running_max, layer->depth_scale, n);
    } else {
        k = tp_keep_count(&model->policy, 0.0f, 0.0f, 1.0, n);
    }
    tp_keep_topk_in_place(delta, n, k, nonzero, (uint32_t *)(void *)layer->selection);
    return k;
}

/* The in-place modes step a layer as soon as its backward is done, so its gradient is checked
 * first (the batch modes check the whole gradient before their update): a NaN or infinite one
 * (finite inputs and loss, values near the float range) would be written into every weight. */
#define TP_NOT_FINITE (-1)

/* A dense layer's gradient d_j x_i, formed where it is applied (sgd_in_place): every product
 * is finite iff delta and x are and the largest |d_j| |x_i| is (max_abs is infinite when a
 * value is NaN or infinite, and 0 x infinity is NaN: one pass over each). */
static int dense_products_finite(const float *delta, int32_t n, const float *x, int32_t fan_in) {
    return isfinite(max_abs(delta, (size_t)n) * max_abs(x, (size_t)fan_in));
}

/* sgd_in_place, a dry run: a dense layer's input error alone, with the same floats as
 * tp_dense_backward_sgd's (kept rows in ascending order, each added to a zeroed delta_in). */
static void dense_input_error(const tp_layer *layer, const float *delta, const int32_t *kept,
                              int32_t k, float *delta_in) {
    int32_t r, i;
    tp_zero(delta_in, (size_t)layer->fan_in);
    for (r = 0; r < (kept == NULL ? layer->out_c : k); r++) {
        const int32_t j = kept == NULL ? r : kept[r];
        const float d = delta[j], *row = layer->weight + (size_t)j * (size_t)layer->fan_in;
        for (i = 0; i < layer->fan_in; i++) delta_in[i] += d * row[i];
    }
}

/* The gradient a layer gathered in its own buffer for this sample (weights, then bias). */
static int gathered_gradient_finite(const tp_layer *layer) {
    const size_t weights = layer->bias_only ? 0 : (size_t)layer->out_c * (size_t)layer->fan_in;
    return tp_all_finite(layer->grad_weight, weights) &&
           (!layer->has_bias || tp_all_finite(layer->grad_bias, (size_t)layer->out_c));
}

/* Sparse backward of one trained layer: choose k, select, accumulate gradients (or, in place,
 * update the weights), and write the input gradient (unless it is the first trained layer).
 * Returns k; 0 when a sparse policy finds this sample's delta all zero: as in the library, the
 * sample then has no backward here or below (nothing to add, nothing counted); TP_NOT_FINITE
 * in place when this sample's gradient of the layer is NaN or infinite (nothing stepped). */
static int32_t backward_trainable(tp_model *model, tp_layer *layer, const float *x,
                                  float *delta, float *delta_in, tp_ledger *macs, int dry) {
    const int32_t n = tp_layer_output_size(layer);
    const int first = layer == &model->layers[model->first_trained_layer];
    const int in_place = model->memory.sgd_in_place;
    const int adam_in_place = model->memory.adam_in_place;
    float *const values = layer->selection;
    /* no selection scratch under full (no offset on a NULL pointer) */
    int32_t *const indices =
        values != NULL ? (int32_t *)(void *)(layer->selection + n) : NULL;
    const tp_policy policy = model->policy.policy;
    const int32_t *kept = NULL;
    int32_t k = n;
    /* a conv's bias gradient (the sum of each channel's delta) comes from the selection's
     * pass over delta: the same floats, zeros left out */
    float *const grad_bias =
        layer->kind == TP_LAYER_CONV2D && layer->has_bias ? layer->grad_bias : NULL;
    const int32_t plane = layer->out_h * layer->out_w;
    int bias_done = 0;
    /* in place, a conv gathers this sample's gradient in its own buffer */
    if ((in_place && layer->kind == TP_LAYER_CONV2D) || adam_in_place)
        tp_zero(layer->grad_bias != NULL && layer->grad_weight == NULL ? layer->grad_bias
                                                                       : layer->grad_weight,
                (layer->bias_only ? 0 : (size_t)layer->out_c * (size_t)layer->fan_in) +
                    (layer->has_bias ? (size_t)layer->out_c : 0));
    if ((in_place || adam_in_place) && !tp_all_finite(delta, (size_t)n)) return TP_NOT_FINITE;
    if (first && layer->bias_only) {
        /* nothing of it needs a selection (no weight gradient, no input error): the dense
         * bias gradient, as the library's backward of a layer whose input and weight need no
         * gradient */
        tp_bias_gradient(layer, delta);
        if (adam_in_place && !gathered_gradient_finite(layer)) return TP_NOT_FINITE;
        if (adam_in_place && !dry) tp_adam_step_layer(model, layer, 1, 0);
        macs->backward += tp_macs_backward(layer, n, first);
        return n;
    }
    if (layer->skip_zero_errors) { /* selection_in_place under a sparse policy */
        k = select_in_place(model, layer, delta, dry);
        if (k == 0) return 0;
        bias_done = layer->has_bias;
    } else if (policy == TP_POLICY_TINYPROP || policy == TP_POLICY_TINYPROPV2) {
        /* one pass over delta: its non-zero magnitudes serve both Y (zeros add nothing to it)
         * and the selection */
        float local_error;
        const int32_t nonzero =
            tp_gather_nonzero_sum(delta, n, values, indices, &local_error, plane, grad_bias);
        bias_done = grad_bias != NULL;
        float running_max;
        if (nonzero == 0) return 0;
        running_max = local_error > layer->running_max ? local_error : layer->running_max;
        if (!dry) layer->running_max = running_max;
        k = tp_keep_count(&model->policy, local_error, running_max, layer->depth_scale, n);
        if (k < n) {
            tp_select_topk_gathered(delta, n, k, values, indices, nonzero);
            kept = indices;
        }
    } else if (policy == TP_POLICY_TOPK) {
        k = tp_keep_count(&model->policy, 0.0f, 0.0f, 1.0, n);
        if (k < n) {
            const int32_t nonzero =
                tp_gather_nonzero_bias(delta, n, values, indices, plane, grad_bias);
            if (nonzero == 0) return 0;
            tp_select_topk_gathered(delta, n, k, values, indices, nonzero);
            kept = indices;
            bias_done = grad_bias != NULL;
        } else if (!any_nonzero(delta, n)) {
            return 0;
        }
    }
    if (layer->kind == TP_LAYER_DENSE && in_place) {
        if (!dense_products_finite(delta, n, x, layer->fan_in)) return TP_NOT_FINITE;
        if (dry && !first) dense_input_error(layer, delta, kept, k, delta_in);
        if (!dry)
            tp_dense_backward_sgd(layer, &model->optimizer, x, delta, kept, k,
                                  first ? NULL : delta_in);
    } else if (layer->kind == TP_LAYER_DENSE) {
        tp_dense_backward(layer, x, delta, kept, k, first ? NULL : delta_in, bias_done);
    } else {
        /* the kept entries' position sort goes where the selection's values were */
        tp_conv_backward(layer, x, delta, kept, k, first ? NULL : delta_in,
                         layer->backward_scratch, (int32_t *)(void *)values, bias_done);
        if (in_place && !gathered_gradient_finite(layer)) return TP_NOT_FINITE;
        if (in_place && !dry) tp_sgd_step_layer(&model->optimizer, layer);
    }
    if (adam_in_place && !gathered_gradient_finite(layer)) return TP_NOT_FINITE;
    if (adam_in_place && !dry) tp_adam_step_layer(model, layer, 1, 0);
    macs->backward += tp_macs_backward(layer, k, first);
    macs->selection += tp_macs_selection(layer, policy);
    return k;
}

/* In place, a sample whose error is zero from layer `from` down still steps those layers as
 * the library's optimizer does with a zero gradient: weight decay only. */
static void decay_layers_in_place(tp_model *model, int32_t from) {
    int32_t i;
    if (model->memory.adam_in_place) { /* Adam steps them with a zero gradient */
        for (i = from; i >= model->first_trained_layer; i--)
            if (model->layers[i].trained) tp_adam_step_layer(model, &model->layers[i], 1, 1);
        return;
    }
    if (model->optimizer.weight_decay == 0.0) return;
    for (i = from; i >= model->first_trained_layer; i--)
        if (model->layers[i].trained) tp_sgd_decay_layer(&model->optimizer, &model->layers[i]);
}

/* The backward of one trained sample, from the loss error down to the first trained layer (a
 * function of its own so that instruction counts can tell trained from skipped steps). `dry`
 * (in place): every error and gradient formed and checked, no layer stepped, no running
 * maximum moved; the buffers it writes are those of a backward, which overwrite some that
 * the next backward reads. */
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static tp_status tp_backward_sample(tp_model *model, const float *x, int32_t *keep_row,
                                    tp_ledger *macs, int dry) {
    float *delta = model->loss_delta;
    int32_t i;
    int stepped = 0; /* a layer above took this sample's step (in place) */
    for (i = model->layer_count - 1; i >= model->first_trained_layer; i--) {
        tp_layer *layer = &model->layers[i];
        const float *input = layer_input(model, i, x);
        float *const spare = layer->input_delta; /* this layer's input error (NULL for F) */
        switch (layer->kind) {
        case TP_LAYER_RELU:
            if (layer->relu_mask != NULL)
                tp_relu_backward_mask(layer->relu_mask, delta, tp_layer_output_size(layer));
            else
                tp_relu_backward(activation_output(model, i), delta, tp_layer_output_size(layer));
            continue;
        case TP_LAYER_RELU6:
        case TP_LAYER_LEAKY_RELU:
        case TP_LAYER_SIGMOID:
        case TP_LAYER_TANH:
        case TP_LAYER_ELU:
        case TP_LAYER_CELU:
        case TP_LAYER_SELU:
        case TP_LAYER_HARDTANH:
            tp_activation_backward(layer, activation_output(model, i), delta,
                                   tp_layer_output_size(layer));
            continue;
        case TP_LAYER_SILU: /* the derivative from its input, kept for this */
        case TP_LAYER_GELU:
        case TP_LAYER_GELU_TANH:
        case TP_LAYER_HARDSWISH:
        case TP_LAYER_HARDSIGMOID:
        case TP_LAYER_MISH:
            tp_activation_backward_input(layer, input, delta, tp_layer_output_size(layer));
            continue;
        case TP_LAYER_FLATTEN: continue;
        /* a pool right after a ReLU takes the ReLU's derivative in the same pass where it can
         * (the ReLU's output is the pool's input); the ReLU is then passed over */
        case TP_LAYER_MAXPOOL:
            if (i > 0 && model->layers[i - 1].kind == TP_LAYER_RELU &&
                tp_maxpool_relu_backward(layer, input, delta, spare))
                i--;
            else
                tp_maxpool_backward(layer, input, delta, spare);
            break;
        case TP_LAYER_AVGPOOL:
            if (i > 0 && model->layers[i - 1].kind == TP_LAYER_RELU &&
                tp_avgpool_relu_backward(layer, model->layers[i - 1].output, delta, spare))
                i--;
            else
                tp_avgpool_backward(layer, delta, spare);
            break;
        case TP_LAYER_DENSE:
        case TP_LAYER_CONV2D: {
            const float *kept_input = layer->recompute_input ? recompute_input(model, x, i) : input;
            const int32_t k =
                backward_trainable(model, layer, kept_input, delta, spare, macs, dry);
            if (k == TP_NOT_FINITE) {
                /* adam_in_place: no layer took step t when this was the top trained one */
                if (model->memory.adam_in_place && !stepped && !dry) model->optimizer_steps--;
                return TP_ERR_NONFINITE;
            }
            stepped = 1;
            if (keep_row != NULL) keep_row[layer->trainable_index] = k;
            if (k == 0) { /* a zero error here and below: in place, only the decay steps */
                if (steps_in_place(model) && !dry) decay_layers_in_place(model, i);
                return TP_OK;
            }
            if (i == model->first_trained_layer) return TP_OK;
            break;
        }
        default: return TP_ERR_UNSUPPORTED;
        }
        delta = spare;
    }
    return TP_OK;
}

/* Sums of floats round: a computed sum of n terms exceeds the sum of their magnitudes by at
 * most (1 + 2^-24)^n, under 2 for the sizes a model here has (n < 2^23 along the backward);
 * a bound at most FLT_MAX / 64 leaves room for that. */
#define TP_BOUND_LIMIT ((double)FLT_MAX / 64.0)

/* sgd_in_place: a step moves a weight w to w - lr (g + weight_decay w), so |w| grows by at
 * most |w| lr |weight_decay| + lr |g| per sample, with |g| <= positions x max |delta| x
 * max |input|, the bound's own terms. A trained layer keeps a bound on max |W| followed that
 * way from sample to sample (4 x the gradient's bound for the rounding of the sums, x 1.001 for
 * the step's own), so the bound below reads no weights; it is kept in the layer's activation
 * settings, which a dense or conv layer has no use for (0: not known, read the weights). */
static int follows_weights(const tp_model *model, const tp_layer *layer) {
    return model->memory.sgd_in_place && layer->trained;
}

static void forget_weight_bounds(tp_model *model) {
    int32_t i;
    for (i = 0; i < model->layer_count; i++)
        if (model->layers[i].kind == TP_LAYER_DENSE || model->layers[i].kind == TP_LAYER_CONV2D)
            model->layers[i].activation[0] = 0.0f;
}

/* max |W| of a layer before this sample's step: its kept bound, or read (`exact`, or none
 * kept); then, when it follows its weights, the bound after the step is kept. */
static double weight_bound(const tp_model *model, tp_layer *layer, double gradient, int exact) {
    const int follow = follows_weights(model, layer);
    const double weights = follow && !exact && layer->activation[0] > 0.0f
                               ? (double)layer->activation[0]
                               : max_abs(layer->weight, (size_t)layer->out_c * layer->fan_in);
    if (follow) {
        const double lr = fabs((double)(float)model->optimizer.lr);
        const double decay = fabs((double)(float)model->optimizer.weight_decay);
        const double after = (weights * (1.0 + lr * decay) + lr * 4.0 * gradient) * 1.001;
        layer->activation[0] = after <= (double)FLT_MAX / 2.0 ? (float)after : 0.0f;
    }
    return weights;
}

/* In place, a layer steps as soon as its backward is done, so a NaN or infinite error or
 * gradient found in a layer below would come after the layers above took the sample's step.
 * This bound proves before any step that none will be: max |delta| of the loss error is 1
 * (softmax minus one-hot), a layer's backward multiplies it by at most its gain (dense: out
 * features x max |W|; conv: out channels per group x kh x kw x max |W|, as each input entry
 * meets every weight of its group at most once; pools: kh x kw windows; activations:
 * tp_activation_gain, given the values their backward reads), and a weight gradient is at
 * most positions x max |delta| x max |input|. max |W| is the kept bound (sgd_in_place), or
 * read (`exact`); max |x| is x_max when the caller's finiteness check took it (>= 0), else
 * read. 1 when every error and gradient is finite, 0 when the bound cannot show it;
 * *read_weights: 1 when it used only weights it read. */
static int backward_bounded(tp_model *model, const float *x, float x_max, int exact,
                            int *read_weights) {
    double error = 1.0;
    int32_t i;
    *read_weights = 1;
    for (i = model->layer_count - 1; i >= model->first_trained_layer; i--) {
        tp_layer *layer = &model->layers[i];
        const size_t out = (size_t)tp_layer_output_size(layer);
        switch (layer->kind) {
        case TP_LAYER_DENSE:
        case TP_LAYER_CONV2D: {
            const int conv = layer->kind == TP_LAYER_CONV2D;
            const double positions = conv ? (double)layer->out_h * layer->out_w : 1.0;
            const double input =
                layer->bias_only ? 0.0
                : layer->recompute_input ? layer->input_max
                                         : input_max(model, i, x, x_max);
            const double fan_out =
                conv ? (double)(layer->out_c / layer->groups) * layer->kernel_h * layer->kernel_w
                     : (double)layer->out_c;
            const double gradient = positions * error * input;
            if (!(positions * error * fmax(input, 1.0) <= TP_BOUND_LIMIT)) return 0;
            if (i == model->first_trained_layer) return 1;
            if (!exact && follows_weights(model, layer) && layer->activation[0] > 0.0f)
                *read_weights = 0;
            error *= fan_out * weight_bound(model, layer, gradient, exact);
            break;
        }
        case TP_LAYER_MAXPOOL:
        case TP_LAYER_AVGPOOL: error *= (double)layer->kernel_h * layer->kernel_w; break;
        case TP_LAYER_FLATTEN:
        case TP_LAYER_RELU: break; /* a NaN output passes no error: y > 0 is false */
        default:
            if (tp_activation_reads_input(layer->kind)) {
                if (!(input_max(model, i, x, x_max) <= TP_GAIN_INPUT_LIMIT)) return 0;
            } else {
                const int32_t consumer = tp_recompute_consumer(model->layers, i, model->layer_count);
                const float largest = consumer >= 0 ? model->layers[consumer].input_max
                                                    : max_abs(layer->output, out);
                if (!(largest <= FLT_MAX)) return 0;
            }
            error *= tp_activation_gain(layer);
            break;
        }
        if (!(error <= TP_BOUND_LIMIT)) return 0;
    }
    return 1;
}

/* The bound with the kept bounds on max |W|; when it fails on them, with the weights read.
 * Not static: instruction counts time it on its own (benchmarks/cortex_m4.py). */
int tp_in_place_bounded(tp_model *model, const float *x, float x_max) {
    int read_weights;
    if (backward_bounded(model, x, x_max, 0, &read_weights)) return 1;
    return !read_weights && backward_bounded(model, x, x_max, 1, &read_weights);
}

tp_status tp_sample_step(tp_model *model, const float *x, float x_max, int32_t label,
                         float *loss, int *trained, int32_t *keep_row, tp_ledger *macs) {
    const float *logits;
    float *const delta = model->loss_delta;
    int32_t i;
    tp_status status = tp_forward_sample(model, x, &logits);
    if (status != TP_OK) return status;
    for (i = 0; i < model->layer_count; i++) {
        const tp_layer *layer = &model->layers[i];
        if (layer->trainable_index < 0) continue;
        macs->forward += tp_macs_forward(layer);
        /* full training (of the same trained layers) would backpropagate every sample */
        if (layer->trained)
            macs->backward_dense +=
                tp_macs_backward_dense(layer, i == model->first_trained_layer);
    }
    *loss = tp_cross_entropy(logits, model->class_count, label, delta);
    if (!isfinite(*loss)) return TP_ERR_NONFINITE;
    *trained = 1;
    if (model->policy.policy == TP_POLICY_TINYPROPV2) {
        const float output_error = tp_local_error(delta, model->class_count);
        if (output_error > model->running_max_output) model->running_max_output = output_error;
        *trained = tp_skip_decision_trains(&model->policy, output_error,
                                           model->running_max_output);
        macs->selection += (uint64_t)model->class_count; /* Y_L of every sample */
    }
    if (!*trained) return TP_OK;
    if (model->memory.adam_in_place) model->optimizer_steps++; /* this sample's step */
    if (model->memory.momentum_in_place && model->momentum_batch > 0) {
        tp_momentum_begin_batch(model, model->momentum_batch);
        model->momentum_batch = 0;
    }
    if (steps_in_place(model) && !tp_in_place_bounded(model, x, x_max)) {
        /* the bound does not show it: a dry run checks every error and gradient before any
         * step, then the forward and the loss error again (the dry run overwrote buffers the
         * backward reads; the same weights give the same floats) */
        tp_ledger unused = {0, 0, 0, 0};
        forget_weight_bounds(model); /* the step below is not bounded: read them next time */
        status = tp_backward_sample(model, x, NULL, &unused, 1);
        if (status != TP_OK) {
            if (model->memory.adam_in_place) model->optimizer_steps--; /* no step taken */
            return status;
        }
        status = tp_forward_sample(model, x, &logits);
        if (status != TP_OK) return status;
        tp_cross_entropy(logits, model->class_count, label, delta);
    }
    return tp_backward_sample(model, x, keep_row, macs, 0);
}

/* The batch's state before its first sample (or, in the in-place modes, before the current
 * one: the samples before it stay applied), to go back to when a loss is not finite. */
static void save_maxima(const tp_model *model, tp_batch *batch) {
    int32_t i;
    for (i = 0; i < model->layer_count; i++) batch->saved_max[i] = model->layers[i].running_max;
    batch->saved_output_max = model->running_max_output;
}

static void restore_and_cancel(tp_model *model, tp_batch *batch) {
    int32_t i;
    for (i = 0; i < model->layer_count; i++) model->layers[i].running_max = batch->saved_max[i];
    model->running_max_output = batch->saved_output_max;
    if (model->gradients != NULL) tp_zero(model->gradients, model->parameter_count);
    if (model->memory.momentum_in_place && model->momentum_batch == 0) {
        /* the buffer holds part of this batch's gradient: start afresh */
        tp_zero(model->moment1, model->parameter_count);
        model->optimizer_steps = 0;
    }
    model->momentum_batch = 0;
    batch->magic = 0; /* cancelled: tp_batch_add and tp_batch_end refuse it */
}

tp_status tp_batch_begin(tp_model *model, tp_batch *batch, int32_t size) {
    if (model == NULL || batch == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC) return TP_ERR_STATE;
    if (size < 1 || size > (1 << 24)) return TP_ERR_ARGUMENT;
    memset(batch, 0, sizeof *batch);
    batch->model = model;
    batch->size = size;
    save_maxima(model, batch);
    if (model->gradients != NULL) tp_zero(model->gradients, model->parameter_count);
    model->momentum_batch = size;
    batch->magic = TP_MAGIC;
    return TP_OK;
}

tp_status tp_batch_add(tp_model *model, tp_batch *batch, const float *x, int32_t label,
                       int32_t *keep_row, uint8_t *trained_out) {
    float loss = 0.0f, x_max;
    int trained = 0;
    tp_status status;
    if (model == NULL || batch == NULL || x == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC || batch->magic != TP_MAGIC || batch->model != model ||
        batch->added >= batch->size)
        return TP_ERR_STATE;
    if (!tp_aligned(x) || !tp_aligned(keep_row)) return TP_ERR_ALIGNMENT; /* nothing changed */
    if (label < 0 || label >= model->class_count) return TP_ERR_LABEL; /* likewise */
    x_max = max_abs(x, (size_t)model->input_size); /* the bound's max |x| in the same pass */
    if (!(x_max <= FLT_MAX)) return TP_ERR_NONFINITE; /* NaN or infinite: likewise */
    if (keep_row != NULL) memset(keep_row, 0, (size_t)model->trainable_count * sizeof(int32_t));
    if (model->memory.sgd_in_place || model->memory.adam_in_place) save_maxima(model, batch);
    status = tp_sample_step(model, x, x_max, label, &loss, &trained, keep_row, &batch->macs);
    if (status != TP_OK) {
        restore_and_cancel(model, batch); /* leave the model as it was before the batch */
        return status;
    }
    if (trained_out != NULL) *trained_out = (uint8_t)trained;
    if (trained && model->memory.sgd_in_place) model->optimizer_steps++; /* applied */
    batch->trained += trained;
    batch->loss_sum += loss;
    batch->added++;
    return TP_OK;
}

tp_status tp_batch_shorten(tp_model *model, tp_batch *batch) {
    if (model == NULL || batch == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC || batch->magic != TP_MAGIC || batch->model != model)
        return TP_ERR_STATE;
    if (batch->added < 1) return TP_ERR_ARGUMENT;
    /* momentum_in_place scaled its buffer by the declared size at the first trained sample */
    if (model->memory.momentum_in_place && batch->trained > 0 && batch->added != batch->size)
        return TP_ERR_UNSUPPORTED;
    batch->size = batch->added;
    model->momentum_batch = model->momentum_batch > 0 ? batch->size : 0;
    return TP_OK;
}

tp_status tp_batch_end(tp_model *model, tp_batch *batch, tp_step_stats *stats) {
    if (model == NULL || batch == NULL || stats == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC || batch->magic != TP_MAGIC || batch->model != model)
        return TP_ERR_STATE;
    if (batch->added != batch->size) return TP_ERR_ARGUMENT; /* the batch stays pending */
    /* finite inputs and losses can still sum to an infinite gradient (values near FLT_MAX):
     * refused before the update, which would have written it into every weight */
    if (batch->trained > 0 && !model->memory.sgd_in_place && !model->memory.adam_in_place &&
        !tp_all_finite(model->memory.momentum_in_place ? model->moment1 : model->gradients,
                       model->parameter_count)) {
        restore_and_cancel(model, batch);
        return TP_ERR_NONFINITE;
    }
    if (batch->trained > 0 && !model->memory.sgd_in_place && !model->memory.adam_in_place)
        tp_optimizer_update(model, batch->size);
    model->momentum_batch = 0;
    stats->loss = batch->loss_sum / (float)batch->size;
    stats->trained = batch->trained;
    stats->skipped = batch->size - batch->trained;
    stats->macs = batch->macs;
    tp_ledger_add(&model->total, &batch->macs);
    batch->magic = 0;
    return TP_OK;
}

tp_status tp_train_batch(tp_model *model, const float *x, const int32_t *labels, int32_t batch,
                         tp_step_stats *stats, int32_t *keep, uint8_t *trained_mask) {
    tp_batch pending;
    int32_t b;
    tp_status status;
    if (model == NULL || x == NULL || labels == NULL || stats == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC) return TP_ERR_STATE;
    if (batch < 1 || batch > (1 << 24)) return TP_ERR_ARGUMENT;
    if (!tp_aligned(x) || !tp_aligned(labels) || !tp_aligned(keep)) return TP_ERR_ALIGNMENT;
    for (b = 0; b < batch; b++) /* every label first: a bad one changes nothing */
        if (labels[b] < 0 || labels[b] >= model->class_count) return TP_ERR_LABEL;
    /* every input value too: an infinite one can give a finite loss (a ReLU zeroes -inf) and
     * an infinite gradient */
    if (!tp_all_finite(x, (size_t)batch * (size_t)model->input_size)) return TP_ERR_NONFINITE;
    status = tp_batch_begin(model, &pending, batch);
    for (b = 0; b < batch && status == TP_OK; b++)
        status = tp_batch_add(model, &pending, x + (size_t)b * (size_t)model->input_size,
                              labels[b],
                              keep != NULL ? keep + (size_t)b * model->trainable_count : NULL,
                              trained_mask != NULL ? trained_mask + b : NULL);
    return status == TP_OK ? tp_batch_end(model, &pending, stats) : status;
}

tp_status tp_predict(tp_model *model, const float *x, float *logits, int32_t *predicted) {
    const float *out;
    int32_t i, best = 0;
    tp_status status;
    if (model == NULL || x == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC) return TP_ERR_STATE;
    if (!tp_aligned(x) || !tp_aligned(logits)) return TP_ERR_ALIGNMENT;
    for (i = 0; i < model->input_size; i++) /* ReLU and max pooling would hide a NaN */
        if (!isfinite(x[i])) return TP_ERR_NONFINITE;
    status = tp_forward_sample(model, x, &out);
    if (status != TP_OK) return status;
    for (i = 0; i < model->class_count; i++) /* finite input, overflowing weights */
        if (!isfinite(out[i])) return TP_ERR_NONFINITE;
    for (i = 1; i < model->class_count; i++)
        if (out[i] > out[best]) best = i;
    if (logits != NULL) memcpy(logits, out, (size_t)model->class_count * sizeof(float));
    if (predicted != NULL) *predicted = best;
    return TP_OK;
}
