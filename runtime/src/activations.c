/* activations.c: the elementwise activations besides ReLU (ReLU6, LeakyReLU, Sigmoid, Tanh),
 * forward and backward with PyTorch's formulas. Each works in place (like ReLU) and takes its
 * derivative from its output y, which determines it for these five: ReLU6 passes the error
 * where 0 < y < 6 (hardtanh_backward: 0 < x < 6), LeakyReLU (slope >= 0) multiplies it by 1
 * where y > 0 and by the slope elsewhere (x > 0 exactly where y > 0), Sigmoid by y (1 - y) and
 * Tanh by 1 - y^2, in the order of ATen's sigmoid_backward ((d (1 - y)) y) and tanh_backward
 * (d (1 - y y)). ReLU's own kernels, fused with convs and pools, are in layers.c and conv.c. */
#include <math.h>

#include "tp_internal.h"

int tp_is_activation(tp_layer_kind kind) {
    return kind == TP_LAYER_RELU || kind == TP_LAYER_RELU6 || kind == TP_LAYER_LEAKY_RELU ||
           kind == TP_LAYER_SIGMOID || kind == TP_LAYER_TANH;
}

void tp_activation_forward(const tp_layer *layer, const float *x, float *y, int32_t n) {
    const float slope = layer->negative_slope;
    int32_t i;
    switch (layer->kind) {
    case TP_LAYER_RELU: tp_relu_forward(x, y, n); break;
    case TP_LAYER_RELU6: /* hardtanh(x, 0, 6): min(max(x, 0), 6) */
        for (i = 0; i < n; i++) y[i] = x[i] < 0.0f ? 0.0f : (x[i] > 6.0f ? 6.0f : x[i]);
        break;
    case TP_LAYER_LEAKY_RELU:
        for (i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : x[i] * slope;
        break;
    case TP_LAYER_SIGMOID:
        for (i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i]));
        break;
    case TP_LAYER_TANH:
        for (i = 0; i < n; i++) y[i] = tanhf(x[i]);
        break;
    default: break;
    }
}

void tp_activation_backward(const tp_layer *layer, const float *y, float *delta, int32_t n) {
    const float slope = layer->negative_slope;
    int32_t i;
    switch (layer->kind) {
    case TP_LAYER_RELU: tp_relu_backward(y, delta, n); break;
    case TP_LAYER_RELU6:
        for (i = 0; i < n; i++) delta[i] = y[i] > 0.0f && y[i] < 6.0f ? delta[i] : 0.0f;
        break;
    case TP_LAYER_LEAKY_RELU:
        for (i = 0; i < n; i++) delta[i] = y[i] > 0.0f ? delta[i] : delta[i] * slope;
        break;
    case TP_LAYER_SIGMOID:
        for (i = 0; i < n; i++) delta[i] = delta[i] * (1.0f - y[i]) * y[i];
        break;
    case TP_LAYER_TANH:
        for (i = 0; i < n; i++) delta[i] = delta[i] * (1.0f - y[i] * y[i]);
        break;
    default: break;
    }
}
