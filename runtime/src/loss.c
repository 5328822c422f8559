/* loss.c: softmax cross-entropy of one sample. */
#include <math.h>

#include "tp_internal.h"

/* loss = logsumexp(z) - z[label]; grad = softmax(z) - onehot(label) (dloss/dlogits). */
float tp_cross_entropy(const float *logits, int32_t classes, int32_t label, float *grad) {
    float max_logit = logits[0], sum = 0.0f, log_sum;
    int32_t i;
    for (i = 1; i < classes; i++)
        if (logits[i] > max_logit) max_logit = logits[i];
    for (i = 0; i < classes; i++) sum += expf(logits[i] - max_logit);
    log_sum = logf(sum);
    for (i = 0; i < classes; i++) grad[i] = expf(logits[i] - max_logit - log_sum);
    grad[label] -= 1.0f;
    return log_sum - (logits[label] - max_logit);
}
