/* ledger.c: multiply-accumulate counts per layer and sample, exactly as the Python Ledger
 * (src/tinyprop/ledger.py) counts them. */
#include "tp_internal.h"

/* N_l * fan_in, for every sample (trained or skipped). */
uint64_t tp_macs_forward(const tp_layer *layer) {
    if (!tp_layer_is_trainable(layer->kind)) return 0;
    return (uint64_t)tp_layer_output_size(layer) * (uint64_t)layer->fan_in;
}

/* k fan_in (weight gradient; not for a bias-only layer) + k fan_in + input size (input
 * gradient and the previous activation's derivative; not for the first layer) + N_l (dense
 * bias gradient). */
uint64_t tp_macs_backward(const tp_layer *layer, int32_t k, int is_first_trainable) {
    const uint64_t products = (uint64_t)k * (uint64_t)layer->fan_in;
    uint64_t macs = layer->bias_only ? 0 : products;
    if (!is_first_trainable) macs += products + (uint64_t)tp_layer_input_size(layer);
    if (layer->has_bias) macs += (uint64_t)tp_layer_output_size(layer);
    return macs;
}

uint64_t tp_macs_backward_dense(const tp_layer *layer, int is_first_trainable) {
    return tp_macs_backward(layer, tp_layer_output_size(layer), is_first_trainable);
}

/* Y_l (N additions) and the selection (N comparisons) for TinyProp; N for top-k. */
uint64_t tp_macs_selection(const tp_layer *layer, tp_policy policy) {
    const uint64_t n = (uint64_t)tp_layer_output_size(layer);
    if (policy == TP_POLICY_FULL) return 0;
    if (policy == TP_POLICY_TOPK) return n;
    return 2 * n;
}

void tp_ledger_add(tp_ledger *total, const tp_ledger *part) {
    total->forward += part->forward;
    total->backward += part->backward;
    total->backward_dense += part->backward_dense;
    total->selection += part->selection;
}
