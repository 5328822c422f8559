/* optimizer.c: SGD (momentum, Nesterov, weight decay) and Adam, as torch.optim does them
 * (single-tensor path on the CPU): settings combined in double, then applied in float32. */
#include <math.h>

#include "tp_internal.h"

/* One update of every parameter with the batch-mean gradient model->gradients / batch. */
void tp_optimizer_update(tp_model *model, int32_t batch) {
    const tp_optimizer_config *opt = &model->optimizer;
    const size_t count = model->parameter_count;
    const float batch_size = (float)batch;
    const float weight_decay = (float)opt->weight_decay;
    float *param = model->parameters, *grads = model->gradients;
    size_t i;
    model->optimizer_steps++;
    if (opt->kind == TP_OPTIMIZER_SGD) {
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
