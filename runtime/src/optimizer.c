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
        const double t = (double)model->optimizer_steps;
        const double correction1 = 1.0 - pow(opt->beta1, t);
        const double correction2 = 1.0 - pow(opt->beta2, t);
        const float step_size = (float)(opt->lr / correction1);
        const float correction2_sqrt = (float)sqrt(correction2);
        const float lerp_weight = (float)(1.0 - opt->beta1);
        const float beta2 = (float)opt->beta2, one_minus_beta2 = (float)(1.0 - opt->beta2);
        const float eps = (float)opt->eps;
        for (i = 0; i < count; i++) {
            float grad = grads[i] / batch_size;
            float *m = &model->moment1[i], *v = &model->moment2[i];
            float denominator;
            if (weight_decay != 0.0f) grad = grad + weight_decay * param[i];
            /* torch.lerp(m, grad, w): m + w (grad - m) for w < 0.5, else grad - (grad - m)(1 - w) */
            if (lerp_weight < 0.5f)
                *m = *m + lerp_weight * (grad - *m);
            else
                *m = grad - (grad - *m) * (1.0f - lerp_weight);
            *v = *v * beta2 + one_minus_beta2 * grad * grad;
            denominator = sqrtf(*v) / correction2_sqrt + eps;
            param[i] = param[i] + -step_size * (*m / denominator);
        }
    }
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
