/* model.c: validate a model description, plan the arena, initialise the model. */
#include <math.h>
#include <string.h>

#include "tp_internal.h"

const char *tp_status_string(tp_status status) {
    switch (status) {
    case TP_OK: return "ok";
    case TP_ERR_NULL: return "a required pointer is NULL";
    case TP_ERR_ARGUMENT: return "a setting or count is out of range";
    case TP_ERR_SHAPE: return "layer shapes do not fit together";
    case TP_ERR_ARENA: return "the arena is too small or not 4-byte aligned";
    case TP_ERR_LABEL: return "a label is outside [0, classes)";
    case TP_ERR_NONFINITE:
        return "a loss, input, gradient, weight or logit is NaN or infinite; nothing changed";
    case TP_ERR_STATE: return "the model was not initialised by tp_init";
    case TP_ERR_UNSUPPORTED: return "a layer or setting this runtime does not offer";
    case TP_ERR_BUILD:
        return "the program was compiled with another TP_MAX_LAYERS than the runtime (their "
               "tp_model differ): build both with the same -DTP_MAX_LAYERS";
    case TP_ERR_ALIGNMENT:
        return "a float or int32 buffer is not at a 4-byte aligned address (a Cortex-M4 "
               "faults there): copy it into a float / int32_t array; nothing changed";
    }
    return "unknown status";
}

tp_policy_config tp_policy_defaults(tp_policy policy) {
    tp_policy_config config;
    config.policy = policy;
    config.s_min = 0.1;
    config.s_max = 0.9;
    config.zeta = 0.5;
    config.ratio = 0.1;
    config.d_min = 0.0;
    config.d_max = 1.0;
    config.beta = 1.0;
    config.skip_threshold = 0.5;
    return config;
}

tp_optimizer_config tp_sgd(double lr, double momentum, double weight_decay) {
    tp_optimizer_config config;
    memset(&config, 0, sizeof config);
    config.kind = TP_OPTIMIZER_SGD;
    config.lr = lr;
    config.momentum = momentum;
    config.weight_decay = weight_decay;
    config.beta1 = 0.9;
    config.beta2 = 0.999;
    config.eps = 1e-8;
    return config;
}

tp_optimizer_config tp_adam(double lr, double weight_decay) {
    tp_optimizer_config config = tp_sgd(lr, 0.0, weight_decay);
    config.kind = TP_OPTIMIZER_ADAM;
    return config;
}

static int finite_in(double value, double low, double high) {
    return isfinite(value) && value >= low && value <= high;
}

tp_status tp_check_policy(const tp_policy_config *policy) {
    if (policy == NULL) return TP_ERR_NULL;
    if ((int)policy->policy < (int)TP_POLICY_FULL || (int)policy->policy > (int)TP_POLICY_TINYPROPV2)
        return TP_ERR_UNSUPPORTED;
    if (!finite_in(policy->s_min, 0.0, 1.0) || !finite_in(policy->s_max, 0.0, 1.0) ||
        policy->s_min > policy->s_max)
        return TP_ERR_ARGUMENT;
    if (!finite_in(policy->zeta, 0.0, 1.0) || policy->zeta <= 0.0) return TP_ERR_ARGUMENT;
    if (!finite_in(policy->ratio, 0.0, 1.0) || policy->ratio <= 0.0) return TP_ERR_ARGUMENT;
    if (!isfinite(policy->d_min) || !isfinite(policy->d_max) || policy->d_min > policy->d_max)
        return TP_ERR_ARGUMENT;
    if (!finite_in(policy->beta, 0.0, 1e30) || policy->beta <= 0.0) return TP_ERR_ARGUMENT;
    if (!finite_in(policy->skip_threshold, 0.0, 1e30)) return TP_ERR_ARGUMENT;
    return TP_OK;
}

tp_status tp_check_optimizer(const tp_optimizer_config *optimizer) {
    if (optimizer == NULL) return TP_ERR_NULL;
    if (optimizer->kind != TP_OPTIMIZER_SGD && optimizer->kind != TP_OPTIMIZER_ADAM)
        return TP_ERR_UNSUPPORTED;
    if (!finite_in(optimizer->lr, 0.0, 1e30)) return TP_ERR_ARGUMENT;
    if (!finite_in(optimizer->weight_decay, 0.0, 1e30)) return TP_ERR_ARGUMENT;
    if (optimizer->kind == TP_OPTIMIZER_SGD) {
        if (!finite_in(optimizer->momentum, 0.0, 1e30)) return TP_ERR_ARGUMENT;
        if (optimizer->nesterov != 0 && (optimizer->nesterov != 1 || optimizer->momentum <= 0.0))
            return TP_ERR_ARGUMENT;
    } else {
        if (!(optimizer->beta1 >= 0.0 && optimizer->beta1 < 1.0)) return TP_ERR_ARGUMENT;
        if (!(optimizer->beta2 >= 0.0 && optimizer->beta2 < 1.0)) return TP_ERR_ARGUMENT;
        if (!finite_in(optimizer->eps, 0.0, 1e30)) return TP_ERR_ARGUMENT;
    }
    return TP_OK;
}

int tp_layer_is_trainable(tp_layer_kind kind) {
    return kind == TP_LAYER_DENSE || kind == TP_LAYER_CONV2D;
}

int32_t tp_layer_output_size(const tp_layer *layer) {
    return layer->out_c * layer->out_h * layer->out_w;
}

int32_t tp_layer_input_size(const tp_layer *layer) {
    return layer->in_c * layer->in_h * layer->in_w;
}

/* Shapes stay far below 2^31 elements; this bound keeps every product in int32 and size_t.
 * The checks multiply in int64_t: a long has 32 bits on a Cortex-M4, where 65536 x 65536
 * wrapped to 0 and passed. */
#define TP_MAX_DIMENSION 65536
#define TP_MAX_ELEMENTS ((int64_t)1 << 26)

static int product_fits(int64_t a, int64_t b, int64_t c) {
    return a > 0 && b > 0 && c > 0 && a <= TP_MAX_ELEMENTS && b <= TP_MAX_ELEMENTS &&
           c <= TP_MAX_ELEMENTS && a * b <= TP_MAX_ELEMENTS && a * b * c <= TP_MAX_ELEMENTS;
}

static int window_output(int32_t in, int32_t kernel, int32_t stride, int32_t padding,
                         int32_t dilation, int32_t *out) {
    const int64_t span = (int64_t)dilation * (kernel - 1) + 1;
    const int64_t padded = (int64_t)in + 2 * (int64_t)padding;
    if (kernel < 1 || stride < 1 || padding < 0 || dilation < 1 || kernel > TP_MAX_DIMENSION ||
        stride > TP_MAX_DIMENSION || padding > TP_MAX_DIMENSION || dilation > TP_MAX_DIMENSION)
        return 0;
    if (padded < span) return 0;
    *out = (int32_t)((padded - span) / stride + 1);
    return 1;
}

/* The settings of an activation that has some (spec->weight points at them; NULL: PyTorch's
 * defaults), copied into the layer. Its derivative is taken from its output, which must tell
 * the side of the input's break: y > 0 exactly where x > 0 for LeakyReLU (slope >= 0), ELU
 * (alpha >= 0) and CELU (alpha and its reciprocal of one sign, as PyTorch's 1 / alpha is);
 * Hardtanh's min_val <= max_val (nn.Hardtanh's own condition, min_val < max_val, but equal
 * ones are a constant). */
static tp_status activation_settings(const tp_layer_spec *spec, tp_layer *layer) {
    const float *settings = spec->weight;
    float first, second = 0.0f;
    switch (spec->kind) {
    case TP_LAYER_LEAKY_RELU: first = settings != NULL ? settings[0] : 0.01f; break;
    case TP_LAYER_ELU: first = settings != NULL ? settings[0] : 1.0f; break;
    case TP_LAYER_CELU:
        first = settings != NULL ? settings[0] : 1.0f;
        second = settings != NULL ? settings[1] : 1.0f;
        break;
    default: /* Hardtanh */
        first = settings != NULL ? settings[0] : -1.0f;
        second = settings != NULL ? settings[1] : 1.0f;
        break;
    }
    if (!isfinite(first) || !isfinite(second)) return TP_ERR_ARGUMENT;
    if ((spec->kind == TP_LAYER_LEAKY_RELU || spec->kind == TP_LAYER_ELU) && first < 0.0f)
        return TP_ERR_UNSUPPORTED;
    if (spec->kind == TP_LAYER_CELU && !(first * second > 0.0f)) return TP_ERR_ARGUMENT;
    if (spec->kind == TP_LAYER_HARDTANH && first > second) return TP_ERR_ARGUMENT;
    layer->activation[0] = first;
    layer->activation[1] = second;
    return TP_OK;
}

tp_status tp_layer_shape(const tp_layer_spec *spec, int32_t in_c, int32_t in_h, int32_t in_w,
                         tp_layer *layer) {
    memset(layer, 0, sizeof *layer);
    if (!product_fits(in_c, in_h, in_w)) return TP_ERR_SHAPE;
    layer->kind = spec->kind;
    layer->in_c = in_c;
    layer->in_h = in_h;
    layer->in_w = in_w;
    layer->trainable_index = -1;
    layer->dilation_h = layer->dilation_w = 1;
    layer->groups = 1;
    switch (spec->kind) {
    case TP_LAYER_DENSE:
        if (in_h != 1 || in_w != 1) return TP_ERR_SHAPE; /* flatten first */
        if (spec->out_channels < 1 || spec->out_channels > TP_MAX_ELEMENTS) return TP_ERR_ARGUMENT;
        if (spec->has_bias != 0 && spec->has_bias != 1) return TP_ERR_ARGUMENT;
        if (!product_fits(spec->out_channels, in_c, 1)) return TP_ERR_SHAPE;
        layer->out_c = spec->out_channels;
        layer->out_h = layer->out_w = 1;
        layer->has_bias = spec->has_bias;
        layer->fan_in = in_c;
        return TP_OK;
    case TP_LAYER_CONV2D: {
        int32_t groups = spec->groups == 0 ? 1 : spec->groups;
        int32_t sh = spec->stride_h == 0 ? 1 : spec->stride_h;
        int32_t sw = spec->stride_w == 0 ? 1 : spec->stride_w;
        int32_t dh = spec->dilation_h == 0 ? 1 : spec->dilation_h;
        int32_t dw = spec->dilation_w == 0 ? 1 : spec->dilation_w;
        if (spec->out_channels < 1 || spec->out_channels > TP_MAX_ELEMENTS) return TP_ERR_ARGUMENT;
        if (groups < 1 || spec->has_bias < 0 || spec->has_bias > 1) return TP_ERR_ARGUMENT;
        if (in_c % groups != 0 || spec->out_channels % groups != 0) return TP_ERR_SHAPE;
        if (!window_output(in_h, spec->kernel_h, sh, spec->padding_h, dh, &layer->out_h) ||
            !window_output(in_w, spec->kernel_w, sw, spec->padding_w, dw, &layer->out_w))
            return TP_ERR_SHAPE;
        layer->out_c = spec->out_channels;
        layer->kernel_h = spec->kernel_h;
        layer->kernel_w = spec->kernel_w;
        layer->stride_h = sh;
        layer->stride_w = sw;
        layer->padding_h = spec->padding_h;
        layer->padding_w = spec->padding_w;
        layer->dilation_h = dh;
        layer->dilation_w = dw;
        layer->groups = groups;
        layer->has_bias = spec->has_bias;
        if (!product_fits(in_c / groups, spec->kernel_h, spec->kernel_w)) return TP_ERR_SHAPE;
        /* the zero-padded input lives in the conv scratch */
        if (!product_fits(in_c, (int64_t)in_h + 2 * (int64_t)spec->padding_h,
                          (int64_t)in_w + 2 * (int64_t)spec->padding_w))
            return TP_ERR_SHAPE;
        layer->fan_in = in_c / groups * spec->kernel_h * spec->kernel_w;
        if (!product_fits(layer->out_c, layer->fan_in, 1) ||
            !product_fits(layer->out_c, layer->out_h, layer->out_w))
            return TP_ERR_SHAPE;
        return TP_OK;
    }
    case TP_LAYER_LEAKY_RELU:
    case TP_LAYER_ELU:
    case TP_LAYER_CELU:
    case TP_LAYER_HARDTANH: {
        const tp_status status = activation_settings(spec, layer);
        if (status != TP_OK) return status;
    }
        /* fall through */
    case TP_LAYER_RELU:
    case TP_LAYER_SELU:
    case TP_LAYER_RELU6:
    case TP_LAYER_SIGMOID:
    case TP_LAYER_TANH:
    case TP_LAYER_SILU:
    case TP_LAYER_GELU:
    case TP_LAYER_GELU_TANH:
    case TP_LAYER_HARDSWISH:
    case TP_LAYER_HARDSIGMOID:
    case TP_LAYER_MISH:
    case TP_LAYER_FLATTEN:
        layer->out_c = spec->kind == TP_LAYER_FLATTEN ? in_c * in_h * in_w : in_c;
        layer->out_h = spec->kind == TP_LAYER_FLATTEN ? 1 : in_h;
        layer->out_w = spec->kind == TP_LAYER_FLATTEN ? 1 : in_w;
        return TP_OK;
    case TP_LAYER_MAXPOOL:
    case TP_LAYER_AVGPOOL: {
        int32_t sh = spec->stride_h == 0 ? spec->kernel_h : spec->stride_h;
        int32_t sw = spec->stride_w == 0 ? spec->kernel_w : spec->stride_w;
        /* PyTorch: padding at most half the kernel */
        if (spec->padding_h * 2 > spec->kernel_h || spec->padding_w * 2 > spec->kernel_w)
            return TP_ERR_ARGUMENT;
        if (!window_output(in_h, spec->kernel_h, sh, spec->padding_h, 1, &layer->out_h) ||
            !window_output(in_w, spec->kernel_w, sw, spec->padding_w, 1, &layer->out_w))
            return TP_ERR_SHAPE;
        layer->out_c = in_c;
        layer->kernel_h = spec->kernel_h;
        layer->kernel_w = spec->kernel_w;
        layer->stride_h = sh;
        layer->stride_w = sw;
        layer->padding_h = spec->padding_h;
        layer->padding_w = spec->padding_w;
        return TP_OK;
    }
    }
    return TP_ERR_UNSUPPORTED;
}

tp_memory_config tp_memory_defaults(void) {
    tp_memory_config memory;
    memory.first_trained_layer = 0;
    memory.sgd_in_place = 0;
    memory.bias_only_layers = 0u;
    memory.momentum_in_place = 0;
    memory.selection_in_place = 0;
    memory.adam_in_place = 0;
    memory.moment_bits = 32;
    memory.recompute_layers = 0u;
    return memory;
}

static tp_status check_memory(const tp_memory_config *memory, const tp_optimizer_config *optimizer,
                              int32_t trainable_count) {
    if (memory->first_trained_layer < 0 || memory->first_trained_layer >= trainable_count)
        return TP_ERR_ARGUMENT;
    if (memory->sgd_in_place != 0 && memory->sgd_in_place != 1) return TP_ERR_ARGUMENT;
    if (memory->sgd_in_place && (optimizer->kind != TP_OPTIMIZER_SGD ||
                                 optimizer->momentum != 0.0 || optimizer->nesterov != 0))
        return TP_ERR_ARGUMENT; /* in place needs plain SGD: no state between samples */
    if (memory->momentum_in_place != 0 && memory->momentum_in_place != 1) return TP_ERR_ARGUMENT;
    if (memory->momentum_in_place &&
        (memory->sgd_in_place || optimizer->kind != TP_OPTIMIZER_SGD ||
         optimizer->momentum == 0.0 || optimizer->nesterov != 0))
        return TP_ERR_ARGUMENT; /* the gradient is gathered in the momentum buffer */
    if (memory->selection_in_place != 0 && memory->selection_in_place != 1)
        return TP_ERR_ARGUMENT;
    if (memory->selection_in_place && memory->sgd_in_place) return TP_ERR_UNSUPPORTED;
    if (memory->adam_in_place != 0 && memory->adam_in_place != 1) return TP_ERR_ARGUMENT;
    if (memory->adam_in_place && (optimizer->kind != TP_OPTIMIZER_ADAM || memory->sgd_in_place ||
                                  memory->momentum_in_place))
        return TP_ERR_ARGUMENT; /* one step per sample of Adam */
    if (memory->moment_bits != 0 && memory->moment_bits != 32 && memory->moment_bits != 8)
        return TP_ERR_ARGUMENT;
    if (memory->moment_bits == 8 && optimizer->kind != TP_OPTIMIZER_ADAM) return TP_ERR_ARGUMENT;
    if (memory->recompute_layers != 0u) {
        const uint32_t up_to_first = memory->first_trained_layer >= 31
                                         ? 0xFFFFFFFFu
                                         : (1u << (memory->first_trained_layer + 1)) - 1u;
        if ((memory->recompute_layers & up_to_first) != 0u) return TP_ERR_ARGUMENT;
        if ((memory->recompute_layers & memory->bias_only_layers) != 0u) return TP_ERR_ARGUMENT;
        if (trainable_count < 32 && (memory->recompute_layers >> trainable_count) != 0u)
            return TP_ERR_ARGUMENT;
    }
    if (memory->bias_only_layers != 0u) {
        /* bits from the first trained layer on and below the count */
        const uint32_t below_first = memory->first_trained_layer >= 32
                                         ? 0xFFFFFFFFu
                                         : (1u << memory->first_trained_layer) - 1u;
        if ((memory->bias_only_layers & below_first) != 0u) return TP_ERR_ARGUMENT;
        if (trainable_count < 32 && (memory->bias_only_layers >> trainable_count) != 0u)
            return TP_ERR_ARGUMENT;
        if (memory->sgd_in_place) return TP_ERR_UNSUPPORTED;
    }
    return TP_OK;
}

/* Shapes of every layer (into layers), which ones train, and the arena plan. */
static tp_status plan_model(const tp_model_spec *spec, const tp_policy_config *policy,
                            const tp_optimizer_config *optimizer, const tp_memory_config *memory,
                            tp_layer *layers, tp_arena_plan *plan) {
    int32_t c, h, w, i, trainable = 0, current_is_sample = 1;
    tp_layer_kind previous = TP_LAYER_DENSE; /* the last layer that is not a Flatten */
    tp_status status;
    if (spec == NULL || policy == NULL || optimizer == NULL || memory == NULL) return TP_ERR_NULL;
    if ((status = tp_check_policy(policy)) != TP_OK) return status;
    if ((status = tp_check_optimizer(optimizer)) != TP_OK) return status;
    if (spec->layer_count < 1 || spec->layer_count > TP_MAX_LAYERS) return TP_ERR_ARGUMENT;
    if (spec->layers == NULL) return TP_ERR_NULL;
    c = spec->input_channels;
    h = spec->input_height;
    w = spec->input_width;
    if (!product_fits(c, h, w)) return TP_ERR_SHAPE;
    for (i = 0; i < spec->layer_count; i++) {
        const tp_layer_spec *s = &spec->layers[i];
        tp_layer *layer = &layers[i];
        status = tp_layer_shape(s, c, h, w, layer);
        if (status != TP_OK) return status;
        if (tp_layer_is_trainable(s->kind)) layer->trainable_index = trainable++;
        /* ReLU ... Tanh, ELU ... Hardtanh work in place: a second one right after another
         * would overwrite the output whose backward the first needs (ReLU after ReLU changes
         * nothing); SiLU and the like write an output of their own and take the derivative
         * from their input */
        if (i > 0 && tp_is_activation(s->kind) && !tp_activation_reads_input(s->kind) &&
            tp_is_activation(previous) && !tp_activation_reads_input(previous) &&
            !(s->kind == TP_LAYER_RELU && previous == TP_LAYER_RELU))
            return TP_ERR_UNSUPPORTED;
        if (s->kind != TP_LAYER_FLATTEN) previous = s->kind;
        /* activations work in place and Flatten aliases its input, except on the sample */
        layer->input_is_sample = current_is_sample;
        if (s->kind != TP_LAYER_FLATTEN && !(tp_is_activation(s->kind) && !current_is_sample))
            current_is_sample = 0;
        c = layer->out_c;
        h = layer->out_h;
        w = layer->out_w;
    }
    if (trainable == 0) return TP_ERR_ARGUMENT;
    if (c * h * w < 2) return TP_ERR_SHAPE; /* at least two classes */
    if ((status = check_memory(memory, optimizer, trainable)) != TP_OK) return status;
    for (i = 0; i < spec->layer_count; i++) {
        const int32_t index = layers[i].trainable_index;
        layers[i].trained = index >= memory->first_trained_layer;
        layers[i].bias_only = index >= 0 && index < 32 && ((memory->bias_only_layers >> index) & 1u);
        if (layers[i].bias_only && !layers[i].has_bias) return TP_ERR_ARGUMENT; /* no bias */
        layers[i].skip_zero_errors =
            layers[i].trained && memory->selection_in_place && policy->policy != TP_POLICY_FULL;
        /* (after the first trained layer: never the layer that reads the sample) */
        layers[i].recompute_input =
            index >= 0 && index < 32 && ((memory->recompute_layers >> index) & 1u);
    }
    for (i = 0; i < spec->layer_count; i++) { /* the first trained layer, if bias-only, selects
                                                 nothing (train.c) */
        if (layers[i].trained) {
            if (layers[i].bias_only) layers[i].skip_zero_errors = 0;
            break;
        }
    }
    return tp_plan_arena(layers, spec->layer_count, c * h * w, policy, optimizer, memory, plan);
}

tp_status tp_arena_bytes_mode(const tp_model_spec *spec, const tp_policy_config *policy,
                              const tp_optimizer_config *optimizer, const tp_memory_config *memory,
                              size_t *bytes) {
    tp_layer layers[TP_MAX_LAYERS];
    tp_arena_plan plan;
    tp_status status;
    if (bytes == NULL) return TP_ERR_NULL;
    status = plan_model(spec, policy, optimizer, memory, layers, &plan);
    if (status != TP_OK) return status;
    *bytes = tp_plan_floats(&plan) * sizeof(float);
    return TP_OK;
}

tp_status tp_arena_bytes(const tp_model_spec *spec, const tp_policy_config *policy,
                         const tp_optimizer_config *optimizer, size_t *bytes) {
    const tp_memory_config memory = tp_memory_defaults();
    return tp_arena_bytes_mode(spec, policy, optimizer, &memory, bytes);
}

tp_status tp_inference_bytes(const tp_model_spec *spec, size_t *bytes) {
    tp_layer layer;
    int32_t c, h, w, i;
    size_t largest;
    tp_status status;
    if (spec == NULL || bytes == NULL) return TP_ERR_NULL;
    if (spec->layer_count < 1 || spec->layer_count > TP_MAX_LAYERS) return TP_ERR_ARGUMENT;
    if (spec->layers == NULL) return TP_ERR_NULL;
    c = spec->input_channels;
    h = spec->input_height;
    w = spec->input_width;
    if (!product_fits(c, h, w)) return TP_ERR_SHAPE;
    largest = (size_t)c * (size_t)h * (size_t)w;
    for (i = 0; i < spec->layer_count; i++) {
        status = tp_layer_shape(&spec->layers[i], c, h, w, &layer);
        if (status != TP_OK) return status;
        if ((size_t)tp_layer_output_size(&layer) > largest)
            largest = (size_t)tp_layer_output_size(&layer);
        c = layer.out_c;
        h = layer.out_h;
        w = layer.out_w;
    }
    *bytes = 2 * largest * sizeof(float);
    return TP_OK;
}

static float *take(float **cursor, size_t count) {
    float *start = *cursor;
    *cursor += count;
    return start;
}

static void copy_or_zero(float *to, const float *from, size_t count) {
    if (from != NULL)
        memcpy(to, from, count * sizeof(float));
    else
        memset(to, 0, count * sizeof(float));
}

/* Weights of every trainable layer: a trained one's copied into the arena (with its gradient
 * unless in place), a frozen one's read where the spec keeps them. */
static tp_status place_parameters(tp_model *model, const tp_model_spec *spec) {
    /* momentum_in_place: each gradient is gathered in its momentum entry */
    float *weights = model->parameters,
          *grads = model->memory.momentum_in_place ? model->moment1 : model->gradients;
    size_t blocks = 0;
    int32_t i;
    for (i = 0; i < spec->layer_count; i++) {
        tp_layer *layer = &model->layers[i];
        const tp_layer_spec *s = &spec->layers[i];
        const size_t count = (size_t)layer->out_c * (size_t)layer->fan_in;
        if (!tp_layer_is_trainable(layer->kind)) continue;
        if (!tp_aligned(s->weight) || !tp_aligned(s->bias)) return TP_ERR_ALIGNMENT;
        /* a NaN or infinite initial weight (a corrupted header) would make every loss NaN */
        if ((s->weight != NULL && !tp_all_finite(s->weight, count)) ||
            (layer->has_bias && s->bias != NULL && !tp_all_finite(s->bias, (size_t)layer->out_c)))
            return TP_ERR_NONFINITE;
        model->total_parameter_count += count + (layer->has_bias ? (size_t)layer->out_c : 0);
        layer->depth = model->trainable_count - 1 - layer->trainable_index;
        layer->depth_scale = pow(model->policy.zeta, (double)layer->depth);
        if (!layer->trained) {
            if (s->weight == NULL || (layer->has_bias && s->bias == NULL)) return TP_ERR_NULL;
            layer->weight = (float *)(uintptr_t)s->weight; /* read only: frozen */
            layer->bias = layer->has_bias ? (float *)(uintptr_t)s->bias : NULL;
            continue;
        }
        layer->parameter_offset = (size_t)(weights - model->parameters);
        layer->block_offset = blocks;
        blocks += tp_moment_blocks(layer);
        if (layer->bias_only) {
            if (s->weight == NULL) return TP_ERR_NULL;
            layer->weight = (float *)(uintptr_t)s->weight; /* read only: frozen */
        } else {
            layer->weight = weights;
            copy_or_zero(weights, s->weight, count);
            weights += count;
            if (grads != NULL) {
                layer->grad_weight = grads;
                grads += count;
            }
        }
        if (layer->has_bias) {
            layer->bias = weights;
            copy_or_zero(weights, s->bias, (size_t)layer->out_c);
            weights += layer->out_c;
            if (grads != NULL) {
                layer->grad_bias = grads;
                grads += layer->out_c;
            }
        }
    }
    return TP_OK;
}

/* Point every layer at its transient buffers (placed by the plan). */
static void place_transient(tp_model *model, const tp_arena_plan *plan, float *base) {
    float *previous_output = NULL;
    int32_t i;
    for (i = 0; i < plan->count; i++) {
        const tp_buffer *buffer = &plan->buffers[i];
        float *at = base + buffer->offset;
        const int32_t owner = tp_buffer_layer(buffer, model->layer_count);
        tp_layer *layer = owner >= 0 ? &model->layers[owner] : NULL;
        switch (tp_buffer_use_of(buffer)) {
        case TP_BUFFER_OUTPUT: layer->output = at; break;
        case TP_BUFFER_FORWARD_SCRATCH: layer->forward_scratch = at; break;
        case TP_BUFFER_LOSS_DELTA: model->loss_delta = at; break;
        case TP_BUFFER_INPUT_DELTA: layer->input_delta = at; break;
        case TP_BUFFER_BACKWARD_SCRATCH: layer->backward_scratch = at; break;
        case TP_BUFFER_SELECTION: layer->selection = at; break;
        case TP_BUFFER_GRADIENT:
            layer->grad_weight = layer->bias_only ? NULL : at;
            layer->grad_bias = !layer->has_bias  ? NULL
                               : layer->bias_only ? at
                                                  : at + (size_t)layer->out_c * layer->fan_in;
            break;
        case TP_BUFFER_RELU_MASK: layer->relu_mask = (uint32_t *)(void *)at; break;
        case TP_BUFFER_RECOMPUTED_INPUT: layer->recomputed_input = at; break;
        case TP_BUFFER_RECOMPUTE_PARTNER: layer->recompute_partner = at; break;
        case TP_BUFFER_RECOMPUTE_SCRATCH: layer->recompute_scratch = at; break;
        }
    }
    for (i = 0; i < model->layer_count; i++) {
        tp_layer *layer = &model->layers[i];
        if (layer->kind == TP_LAYER_FLATTEN ||
            (tp_is_activation(layer->kind) && !tp_activation_reads_input(layer->kind) &&
             !layer->input_is_sample)) /* (tp_layer_aliases, inline: 8 bytes less stack) */
            layer->output = previous_output; /* NULL for a Flatten on the sample itself */
        previous_output = layer->output;
    }
    for (i = 0; i < model->layer_count; i++) { /* the partner: else the input error's buffer */
        tp_layer *layer = &model->layers[i];
        if (layer->recompute_input && layer->recompute_partner == NULL)
            layer->recompute_partner = layer->input_delta;
    }
}

/* tp_init_mode after comparing the caller's compile-time sizes (TP_BUILD_SIZES) with this
 * build's: another TP_MAX_LAYERS gives another tp_model (its layer records, then every field
 * after them), whose memset alone would write past a smaller struct. The checked function
 * holds the body, so that a program's deepest stack is the one it had before the check. */
tp_status tp_init_mode_checked(tp_model *model, const tp_model_spec *spec,
                               const tp_policy_config *policy,
                               const tp_optimizer_config *optimizer,
                               const tp_memory_config *memory, void *arena, size_t arena_bytes,
                               size_t build) {
    tp_arena_plan plan;
    tp_status status;
    float *cursor;
    if (build != TP_BUILD_SIZES) return TP_ERR_BUILD;
    if (model == NULL || spec == NULL || policy == NULL || optimizer == NULL || memory == NULL ||
        arena == NULL)
        return TP_ERR_NULL;
    memset(model, 0, sizeof *model);
    status = plan_model(spec, policy, optimizer, memory, model->layers, &plan);
    if (status == TP_OK && (((uintptr_t)arena % sizeof(float)) != 0 ||
                            arena_bytes < tp_plan_floats(&plan) * sizeof(float)))
        status = TP_ERR_ARENA;
    if (status != TP_OK) {
        memset(model, 0, sizeof *model);
        return status;
    }
    model->layer_count = spec->layer_count;
    {
        int32_t i;
        for (i = 0; i < spec->layer_count; i++)
            model->trainable_count += model->layers[i].trainable_index >= 0;
    }
    model->input_size = spec->input_channels * spec->input_height * spec->input_width;
    model->class_count = tp_layer_output_size(&model->layers[spec->layer_count - 1]);
    model->first_trained_layer = plan.first_trained;
    model->policy = *policy;
    model->optimizer = *optimizer;
    model->memory = *memory;
    model->parameter_count = plan.parameters;
    cursor = (float *)arena;
    model->parameters = take(&cursor, plan.parameters);
    if (plan.gradients > 0) {
        model->gradients = take(&cursor, plan.gradients);
        memset(model->gradients, 0, plan.gradients * sizeof(float));
    }
    if (plan.moments > 0 && memory->moment_bits == 8) {
        const size_t code_floats = (plan.parameters + 3) / 4;
        const size_t blocks = (plan.moments - 2 * code_floats) / 2;
        float *codes = take(&cursor, plan.moments);
        memset(codes, 0, plan.moments * sizeof(float));
        model->first_codes = (int8_t *)(void *)codes;
        model->second_codes = (uint8_t *)(void *)(codes + code_floats);
        model->first_max = codes + 2 * code_floats;
        model->second_max = model->first_max + blocks;
    } else if (plan.moments > 0) {
        model->moment1 = take(&cursor, plan.parameters);
        memset(model->moment1, 0, plan.parameters * sizeof(float));
        if (plan.moments > plan.parameters) {
            model->moment2 = take(&cursor, plan.parameters);
            memset(model->moment2, 0, plan.parameters * sizeof(float));
        }
    }
    status = place_parameters(model, spec);
    if (status != TP_OK) {
        memset(model, 0, sizeof *model);
        return status;
    }
    place_transient(model, &plan, cursor);
    model->arena_bytes_used = tp_plan_floats(&plan) * sizeof(float);
    model->magic = TP_MAGIC;
    return TP_OK;
}

tp_status(tp_init_mode)(tp_model *model, const tp_model_spec *spec,
                        const tp_policy_config *policy, const tp_optimizer_config *optimizer,
                        const tp_memory_config *memory, void *arena, size_t arena_bytes) {
    return tp_init_mode_checked(model, spec, policy, optimizer, memory, arena, arena_bytes,
                                TP_BUILD_SIZES);
}

tp_status tp_init_checked(tp_model *model, const tp_model_spec *spec,
                          const tp_policy_config *policy, const tp_optimizer_config *optimizer,
                          void *arena, size_t arena_bytes, size_t build) {
    const tp_memory_config memory = tp_memory_defaults();
    return tp_init_mode_checked(model, spec, policy, optimizer, &memory, arena, arena_bytes,
                                build);
}

tp_status(tp_init)(tp_model *model, const tp_model_spec *spec, const tp_policy_config *policy,
                   const tp_optimizer_config *optimizer, void *arena, size_t arena_bytes) {
    return tp_init_checked(model, spec, policy, optimizer, arena, arena_bytes, TP_BUILD_SIZES);
}

tp_status tp_parameter_count(const tp_model *model, size_t *count) {
    if (model == NULL || count == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC) return TP_ERR_STATE;
    *count = model->total_parameter_count;
    return TP_OK;
}

tp_status tp_trainable_count(const tp_model *model, int32_t *count) {
    if (model == NULL || count == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC) return TP_ERR_STATE;
    *count = model->trainable_count;
    return TP_OK;
}

tp_status tp_read_parameters(const tp_model *model, float *out, size_t count) {
    int32_t i;
    if (model == NULL || out == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC) return TP_ERR_STATE;
    if (count != model->total_parameter_count) return TP_ERR_ARGUMENT;
    for (i = 0; i < model->layer_count; i++) {
        const tp_layer *layer = &model->layers[i];
        const size_t weights = (size_t)layer->out_c * (size_t)layer->fan_in;
        if (!tp_layer_is_trainable(layer->kind)) continue;
        memcpy(out, layer->weight, weights * sizeof(float));
        out += weights;
        if (layer->has_bias) {
            memcpy(out, layer->bias, (size_t)layer->out_c * sizeof(float));
            out += layer->out_c;
        }
    }
    return TP_OK;
}

tp_status tp_read_running_max(const tp_model *model, float *layer_max, int32_t count,
                              float *output_max) {
    int32_t i;
    if (model == NULL || layer_max == NULL || output_max == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC) return TP_ERR_STATE;
    if (!tp_aligned(layer_max) || !tp_aligned(output_max)) return TP_ERR_ALIGNMENT;
    if (count != model->trainable_count) return TP_ERR_ARGUMENT;
    for (i = 0; i < model->layer_count; i++)
        if (model->layers[i].trainable_index >= 0)
            layer_max[model->layers[i].trainable_index] = model->layers[i].running_max;
    *output_max = model->running_max_output;
    return TP_OK;
}

size_t tp_model_struct_bytes(void) { return sizeof(tp_model); }

size_t tp_batch_struct_bytes(void) { return sizeof(tp_batch); }

tp_status tp_read_totals(const tp_model *model, tp_ledger *total, size_t *arena_bytes_used) {
    if (model == NULL || total == NULL || arena_bytes_used == NULL) return TP_ERR_NULL;
    if (model->magic != TP_MAGIC) return TP_ERR_STATE;
    *total = model->total;
    *arena_bytes_used = model->arena_bytes_used;
    return TP_OK;
}
