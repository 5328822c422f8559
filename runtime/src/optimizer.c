/* optimizer.c: SGD (momentum, Nesterov, weight decay) and Adam, as torch.optim does them
 * (single-tensor path on the CPU): settings combined in double, then applied in float32. */
#include <math.h>

#include "tp_internal.h"

/* momentum_in_place, a batch's first trained sample: momentum * batch * buffer, so that adding
 * the samples' gradients and dividing by batch gives momentum * buffer + gradient / batch. */
void tp_momentum_begin_batch(tp_model *model, int32_t batch) {
    const float momentum = (float)model->optimizer.momentum, batch_size = (float)batch;
    float *buffer = model->moment1;
    size_t i;
    for (i = 0; i < model->parameter_count; i++) buffer[i] = buffer[i] * momentum * batch_size;
}

/* momentum_in_place: the update from the buffer that gathered momentum * batch * buffer plus
 * the batch's gradient (torch.optim.SGD: buffer = momentum buffer + gradient / batch + weight
 * decay, then the step). */
static void momentum_in_place_update(tp_model *model, int32_t batch) {
    const float batch_size = (float)batch, lr = (float)model->optimizer.lr;
    const float weight_decay = (float)model->optimizer.weight_decay;
    float *param = model->parameters, *buffer = model->moment1;
    size_t i;
    for (i = 0; i < model->parameter_count; i++) {
        float value = buffer[i] / batch_size;
        if (weight_decay != 0.0f) value = value + weight_decay * param[i];
        buffer[i] = value;
        param[i] = param[i] + -lr * value;
    }
}

/* One update of every parameter with the batch-mean gradient model->gradients / batch. */
void tp_optimizer_update(tp_model *model, int32_t batch) {
    const tp_optimizer_config *opt = &model->optimizer;
    const size_t count = model->parameter_count;
    const float batch_size = (float)batch;
    const float weight_decay = (float)opt->weight_decay;
    float *param = model->parameters, *grads = model->gradients;
    size_t i;
    model->optimizer_steps++;
    if (model->memory.momentum_in_place) {
        momentum_in_place_update(model, batch);
    } else if (opt->kind == TP_OPTIMIZER_SGD) {
        const int first = model->optimizer_steps == 1;
        const float momentum = (float)opt->momentum, lr = (float)opt->lr;
        for (i = 0; i < count; i++) {
            float grad = grads[i] / batch_size;
            if (weight_decay != 0.0f) grad = grad + weight_decay * param[i];
            if (momentum != 0.0f) {
                float *buffer = &model->moment1[i];
                *buffer = first ? grad : *buffer * momentum + grad;
                grad = opt->nesterov ? grad + momentum * *buffer : *buffer;
            }
            param[i] = param[i] + -lr * grad;
        }
    } else {
        int32_t l;
        for (l = 0; l < model->layer_count; l++)
            if (model->layers[l].trained) tp_adam_step_layer(model, &model->layers[l], batch, 0);
    }
}

/* Adam's settings for step t = model->optimizer_steps, combined in double as torch does. */
typedef struct {
    float step_size, correction2_sqrt, lerp_weight, beta2, one_minus_beta2, eps, weight_decay;
    float batch;
} adam_constants;

static adam_constants adam_for_step(const tp_model *model, int32_t batch) {
    const tp_optimizer_config *opt = &model->optimizer;
    const double t = (double)model->optimizer_steps;
    adam_constants c;
    c.step_size = (float)(opt->lr / (1.0 - pow(opt->beta1, t)));
    c.correction2_sqrt = (float)sqrt(1.0 - pow(opt->beta2, t));
    c.lerp_weight = (float)(1.0 - opt->beta1);
    c.beta2 = (float)opt->beta2;
    c.one_minus_beta2 = (float)(1.0 - opt->beta2);
    c.eps = (float)opt->eps;
    c.weight_decay = (float)opt->weight_decay;
    c.batch = (float)batch;
    return c;
}

/* One entry of torch.optim.Adam's single-tensor step in float32: m and v in place, returns the
 * new parameter. */
static float adam_entry(const adam_constants *c, float param, float grad, float *m, float *v) {
    float denominator;
    if (c->weight_decay != 0.0f) grad = grad + c->weight_decay * param;
    /* torch.lerp(m, grad, w): m + w (grad - m) for w < 0.5, else grad - (grad - m)(1 - w) */
    if (c->lerp_weight < 0.5f)
        *m = *m + c->lerp_weight * (grad - *m);
    else
        *m = grad - (grad - *m) * (1.0f - c->lerp_weight);
    *v = *v * c->beta2 + c->one_minus_beta2 * grad * grad;
    denominator = sqrtf(*v) / c->correction2_sqrt + c->eps;
    return param + -c->step_size * (*m / denominator);
}

/* One tensor (a weight or a bias) with float moments; grad NULL: a zero gradient. */
static void adam_tensor(const adam_constants *c, float *param, const float *grad, size_t count,
                        float *m, float *v) {
    size_t i;
    for (i = 0; i < count; i++)
        param[i] = adam_entry(c, param[i], grad != NULL ? grad[i] / c->batch : 0.0f, &m[i], &v[i]);
}

/* The same with 8-bit moments (tinyprop.moments): per block of TP_MOMENT_BLOCK entries, decode
 * m = code * (max|m| / 127) and w = code * (max w / 255), v = w * w; the float step; then the
 * block's new maxima and codes (rounded to nearest even; w = sqrt(v) > 0 at least code 1). */
static void adam_tensor_8bit(const adam_constants *c, float *param, const float *grad,
                             size_t count, int8_t *first, uint8_t *second, float *first_max,
                             float *second_max) {
    float m[TP_MOMENT_BLOCK], w[TP_MOMENT_BLOCK];
    size_t start, i;
    for (start = 0; start < count; start += TP_MOMENT_BLOCK) {
        const size_t n = count - start < TP_MOMENT_BLOCK ? count - start : TP_MOMENT_BLOCK;
        const size_t block = start / TP_MOMENT_BLOCK;
        const float first_scale = first_max[block] / 127.0f;
        const float second_scale = second_max[block] / 255.0f;
        float largest_m = 0.0f, largest_w = 0.0f, scale;
        for (i = 0; i < n; i++) {
            const float g = grad != NULL ? grad[start + i] / c->batch : 0.0f;
            const float decoded_w = (float)second[start + i] * second_scale;
            float mm = (float)first[start + i] * first_scale, vv = decoded_w * decoded_w;
            param[start + i] = adam_entry(c, param[start + i], g, &mm, &vv);
            m[i] = mm;
            w[i] = sqrtf(vv);
            if (fabsf(mm) > largest_m) largest_m = fabsf(mm); /* NaN left out */
            if (w[i] > largest_w) largest_w = w[i];
        }
        first_max[block] = largest_m;
        second_max[block] = largest_w;
        scale = largest_m / 127.0f;
        for (i = 0; i < n; i++) {
            float code = largest_m > 0.0f ? rintf(m[i] / scale) : 0.0f;
            if (code != code) code = 0.0f; /* NaN (a diverged run): code 0, as the mirror */
            first[start + i] = (int8_t)(code > 127.0f ? 127.0f : code < -127.0f ? -127.0f : code);
        }
        scale = largest_w / 255.0f;
        for (i = 0; i < n; i++) {
            float code = largest_w > 0.0f ? rintf(w[i] / scale) : 0.0f;
            if (code != code) code = 0.0f;
            if (code > 255.0f) code = 255.0f;
            if (w[i] > 0.0f && code < 1.0f) code = 1.0f;
            second[start + i] = (uint8_t)code;
        }
    }
}

void tp_adam_step_layer(tp_model *model, tp_layer *layer, int32_t batch, int zero_gradient) {
    const adam_constants c = adam_for_step(model, batch);
    const size_t weights = layer->bias_only ? 0 : (size_t)layer->out_c * (size_t)layer->fan_in;
    const size_t offset = layer->parameter_offset, bias_offset = offset + weights;
    const float *grad_weight = zero_gradient ? NULL : layer->grad_weight;
    const float *grad_bias = zero_gradient ? NULL : layer->grad_bias;
    if (model->memory.moment_bits == 8) {
        const size_t bias_block =
            layer->block_offset + (weights + TP_MOMENT_BLOCK - 1) / TP_MOMENT_BLOCK;
        if (weights > 0)
            adam_tensor_8bit(&c, layer->weight, grad_weight, weights, model->first_codes + offset,
                             model->second_codes + offset, model->first_max + layer->block_offset,
                             model->second_max + layer->block_offset);
        if (layer->has_bias)
            adam_tensor_8bit(&c, layer->bias, grad_bias, (size_t)layer->out_c,
                             model->first_codes + bias_offset, model->second_codes + bias_offset,
                             model->first_max + bias_block, model->second_max + bias_block);
        return;
    }
    if (weights > 0)
        adam_tensor(&c, layer->weight, grad_weight, weights, model->moment1 + offset,
                    model->moment2 + offset);
    if (layer->has_bias)
        adam_tensor(&c, layer->bias, grad_bias, (size_t)layer->out_c,
                    model->moment1 + bias_offset, model->moment2 + bias_offset);
}

/* One SGD step of one sample (batch 1: grad / 1 is grad), weight decay as above. */
static float sgd_step(float param, float grad, float lr, float weight_decay) {
    if (weight_decay != 0.0f) grad = grad + weight_decay * param;
    return param + -lr * grad;
}

void tp_sgd_step_layer(const tp_optimizer_config *optimizer, tp_layer *layer) {
    const size_t weights = (size_t)layer->out_c * (size_t)layer->fan_in;
    const float lr = (float)optimizer->lr, weight_decay = (float)optimizer->weight_decay;
    size_t i;
    for (i = 0; i < weights; i++)
        layer->weight[i] = sgd_step(layer->weight[i], layer->grad_weight[i] / 1.0f, lr,
                                    weight_decay);
    if (layer->has_bias)
        for (i = 0; i < (size_t)layer->out_c; i++)
            layer->bias[i] = sgd_step(layer->bias[i], layer->grad_bias[i] / 1.0f, lr,
                                      weight_decay);
}

void tp_sgd_decay_layer(const tp_optimizer_config *optimizer, tp_layer *layer) {
    const size_t weights = (size_t)layer->out_c * (size_t)layer->fan_in;
    const float lr = (float)optimizer->lr, weight_decay = (float)optimizer->weight_decay;
    size_t i;
    for (i = 0; i < weights; i++) layer->weight[i] = sgd_step(layer->weight[i], 0.0f, lr, weight_decay);
    if (layer->has_bias)
        for (i = 0; i < (size_t)layer->out_c; i++)
            layer->bias[i] = sgd_step(layer->bias[i], 0.0f, lr, weight_decay);
}

/* Row j of a dense layer, one sample: its input error from the weights before the step, then
 * each weight's step with its gradient d x[i] (0 + d x[i] in the buffered path: the same). */
static void dense_row_sgd(tp_layer *layer, const float *x, float d, int32_t j, float lr,
                          float weight_decay, float *delta_in) {
    float *row = layer->weight + (size_t)j * (size_t)layer->fan_in;
    int32_t i;
    if (delta_in != NULL)
        for (i = 0; i < layer->fan_in; i++) delta_in[i] += d * row[i];
    for (i = 0; i < layer->fan_in; i++) row[i] = sgd_step(row[i], 0.0f + d * x[i], lr, weight_decay);
}

void tp_dense_backward_sgd(tp_layer *layer, const tp_optimizer_config *optimizer,
                           const float *x, const float *delta, const int32_t *kept, int32_t k,
                           float *delta_in) {
    const float lr = (float)optimizer->lr, weight_decay = (float)optimizer->weight_decay;
    int32_t j, next = 0, i;
    if (delta_in != NULL) tp_zero(delta_in, (size_t)layer->fan_in);
    for (j = 0; j < layer->out_c; j++) {
        if (kept == NULL || (next < k && kept[next] == j)) { /* kept rows ascend */
            dense_row_sgd(layer, x, delta[j], j, lr, weight_decay, delta_in);
            next++;
        } else if (weight_decay != 0.0f) {
            /* a row without gradient: PyTorch still steps it (0 + weight decay) */
            float *row = layer->weight + (size_t)j * (size_t)layer->fan_in;
            for (i = 0; i < layer->fan_in; i++) row[i] = sgd_step(row[i], 0.0f, lr, weight_decay);
        }
    }
    if (layer->has_bias)
        for (j = 0; j < layer->out_c; j++)
            layer->bias[j] = sgd_step(layer->bias[j], 0.0f + delta[j], lr, weight_decay);
}
