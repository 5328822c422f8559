/* activations.c: the elementwise activations besides ReLU, forward and backward with PyTorch's
 * formulas (ATen's CPU kernels, in their order of operations).
 *
 * Two families. ReLU6, LeakyReLU, Sigmoid, Tanh, ELU, CELU, SELU and Hardtanh work in place
 * (like ReLU) and take their derivative from their output y, which determines it: ReLU6 passes
 * the error where 0 < y < 6 (hardtanh_backward: 0 < x < 6), Hardtanh where min_val < y <
 * max_val (the same as min_val < x < max_val), LeakyReLU (slope >= 0) multiplies it by 1 where
 * y > 0 and by the slope elsewhere (x > 0 exactly where y > 0), Sigmoid by y (1 - y) and Tanh
 * by 1 - y^2 (sigmoid_backward: (d (1 - y)) y; tanh_backward: d (1 - y y)). ELU, CELU and SELU
 * are ATen's elu with (alpha, scale, input_scale) = (alpha, 1, 1), (alpha, 1, 1 / alpha) and
 * PyTorch's SELU constants (with s = scale, c = alpha scale, i = input_scale):
 *   y = x > 0 ? s x : c (e^(i x) - 1)            y' = y > 0 ? s : i (y + c)
 * which is elu_backward with is_result (PyTorch's in-place ELU); the out-of-place one takes
 * i c e^(i x) from the input instead: the same derivative, rounded differently.
 * SiLU, GELU (erf and tanh forms), Hardswish, Hardsigmoid and Mish are not monotonic or flat
 * in places, so their output does not tell their input: they write an output buffer of their
 * own and take their derivative from their input x (the previous layer's output, kept for
 * their backward: tp_activation_reads_input):
 *   SiLU       y = x / (1 + e^-x)                 y' = s (1 + x (1 - s)), s = 1 / (1 + e^-x)
 *   GELU       y = x / 2 (1 + erf(x / sqrt 2))    y' = cdf + x pdf
 *   GELU tanh  y = x / 2 (1 + tanh(b (x + k x^3))), b = sqrt(2 / pi), k = 0.044715
 *   Hardswish  y = x min(max(x + 3, 0), 6) / 6    y' = 0 (x <= -3), x / 3 + 1/2 (x < 3), 1
 *   Hardsigmoid y = min(max(x + 3, 0), 6) / 6     y' = 1/6 (-3 < x < 3), else 0
 *   Mish       y = x tanh(softplus(x))            y' = t + x s (1 - t^2), t = tanh(softplus x)
 * ReLU's own kernels, fused with convs and pools, are in layers.c and conv.c. */
#include <math.h>

#include "tp_internal.h"

/* M_SQRT1_2, M_2_SQRTPI and M_SQRT2 as ATen writes them (C99 has no M_ constants) */
#define TP_SQRT1_2 0.70710678118654752440
#define TP_2_SQRTPI 1.12837916709551257390
#define TP_SQRT2 1.41421356237309504880

int tp_is_activation(tp_layer_kind kind) {
    return kind == TP_LAYER_RELU || kind == TP_LAYER_RELU6 || kind == TP_LAYER_LEAKY_RELU ||
           kind == TP_LAYER_SIGMOID || kind == TP_LAYER_TANH || tp_activation_reads_input(kind) ||
           kind == TP_LAYER_ELU || kind == TP_LAYER_CELU || kind == TP_LAYER_SELU ||
           kind == TP_LAYER_HARDTANH;
}

/* SELU's alpha and scale as PyTorch writes them (torch.nn.functional.selu) */
#define TP_SELU_ALPHA 1.6732632423543772848170429916717
#define TP_SELU_SCALE 1.0507009873554804934193349852946

/* ATen's elu coefficients in float: negcoef = alpha scale (a float product), poscoef = scale,
 * negiptcoef = input_scale */
typedef struct {
    float negative, positive, input;
} elu_coefficients;

static elu_coefficients elu_of(const tp_layer *layer) {
    elu_coefficients c;
    c.positive = layer->kind == TP_LAYER_SELU ? (float)TP_SELU_SCALE : 1.0f;
    c.negative = layer->kind == TP_LAYER_SELU ? (float)TP_SELU_ALPHA * c.positive
                                              : layer->activation[0] * c.positive;
    c.input = layer->kind == TP_LAYER_CELU ? layer->activation[1] : 1.0f;
    return c;
}

/* softplus(x) = log1p(exp(x)) as Mish's forward takes it (ATen: beta 1, threshold 20) */
static float mish_tanh(float x) { return tanhf(x > 20.0f ? x : log1pf(expf(x))); }

void tp_activation_forward(const tp_layer *layer, const float *x, float *y, int32_t n) {
    const float slope = layer->activation[0];
    const float low = layer->activation[0], high = layer->activation[1];
    const elu_coefficients elu = elu_of(layer);
    const float alpha = (float)TP_SQRT1_2;
    const float beta = (float)(TP_SQRT2 * TP_2_SQRTPI * 0.5), kappa = 0.044715f;
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
    case TP_LAYER_SILU:
        for (i = 0; i < n; i++) y[i] = x[i] / (1.0f + expf(-x[i]));
        break;
    case TP_LAYER_GELU:
        for (i = 0; i < n; i++) y[i] = x[i] * 0.5f * (1.0f + erff(x[i] * alpha));
        break;
    case TP_LAYER_GELU_TANH:
        for (i = 0; i < n; i++) {
            const float inner = beta * (x[i] + kappa * x[i] * x[i] * x[i]);
            y[i] = 0.5f * x[i] * (1.0f + tanhf(inner));
        }
        break;
    case TP_LAYER_HARDSWISH:
        for (i = 0; i < n; i++) {
            const float shifted = x[i] + 3.0f;
            y[i] = x[i] * (shifted < 0.0f ? 0.0f : (shifted > 6.0f ? 6.0f : shifted)) / 6.0f;
        }
        break;
    case TP_LAYER_HARDSIGMOID:
        for (i = 0; i < n; i++) {
            const float shifted = x[i] + 3.0f;
            y[i] = (shifted < 0.0f ? 0.0f : (shifted > 6.0f ? 6.0f : shifted)) / 6.0f;
        }
        break;
    case TP_LAYER_MISH:
        for (i = 0; i < n; i++) y[i] = x[i] * mish_tanh(x[i]);
        break;
    case TP_LAYER_ELU:
    case TP_LAYER_CELU:
    case TP_LAYER_SELU:
        for (i = 0; i < n; i++)
            y[i] = x[i] <= 0.0f ? (expf(x[i] * elu.input) - 1.0f) * elu.negative
                                : x[i] * elu.positive;
        break;
    case TP_LAYER_HARDTANH: /* clamp: min(max(x, min_val), max_val) */
        for (i = 0; i < n; i++) {
            const float above = x[i] < low ? low : x[i];
            y[i] = above > high ? high : above;
        }
        break;
    default: break;
    }
}

void tp_activation_backward(const tp_layer *layer, const float *y, float *delta, int32_t n) {
    const float slope = layer->activation[0];
    const float low = layer->activation[0], high = layer->activation[1];
    const elu_coefficients elu = elu_of(layer);
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
    case TP_LAYER_ELU:
    case TP_LAYER_CELU:
    case TP_LAYER_SELU:
        for (i = 0; i < n; i++)
            delta[i] = y[i] <= 0.0f ? delta[i] * elu.input * (y[i] + elu.negative)
                                    : delta[i] * elu.positive;
        break;
    case TP_LAYER_HARDTANH:
        for (i = 0; i < n; i++) delta[i] = y[i] <= low || y[i] >= high ? 0.0f : delta[i];
        break;
    default: break;
    }
}

void tp_activation_backward_input(const tp_layer *layer, const float *x, float *delta,
                                  int32_t n) {
    const float alpha = (float)TP_SQRT1_2;
    const float pdf_scale = (float)(TP_2_SQRTPI * TP_SQRT1_2 * 0.5);
    const float beta = (float)(TP_SQRT2 * TP_2_SQRTPI * 0.5), kappa = 0.044715f;
    int32_t i;
    switch (layer->kind) {
    case TP_LAYER_SILU:
        for (i = 0; i < n; i++) {
            const float s = 1.0f / (1.0f + expf(-x[i]));
            delta[i] = delta[i] * s * (1.0f + x[i] * (1.0f - s));
        }
        break;
    case TP_LAYER_GELU:
        for (i = 0; i < n; i++) {
            const float cdf = 0.5f * (1.0f + erff(x[i] * alpha));
            const float pdf = expf(-0.5f * x[i] * x[i]) * pdf_scale;
            delta[i] = delta[i] * (cdf + x[i] * pdf);
        }
        break;
    case TP_LAYER_GELU_TANH:
        for (i = 0; i < n; i++) {
            const float x_sq = x[i] * x[i];
            const float x_cube = x_sq * x[i];
            const float inner = beta * (x[i] + kappa * x_cube);
            const float t = tanhf(inner);
            const float left = 0.5f * x[i];
            const float right = 1.0f + t;
            const float left_derivative = 0.5f * right;
            const float right_derivative = left * (1.0f - t * t) * (beta * (1.0f + 3.0f * kappa * x_sq));
            delta[i] = delta[i] * (left_derivative + right_derivative);
        }
        break;
    case TP_LAYER_HARDSWISH:
        for (i = 0; i < n; i++)
            delta[i] = x[i] <= -3.0f ? 0.0f : (x[i] < 3.0f ? delta[i] * (x[i] / 3.0f + 0.5f)
                                                            : delta[i]);
        break;
    case TP_LAYER_HARDSIGMOID:
        for (i = 0; i < n; i++)
            delta[i] = x[i] > -3.0f && x[i] < 3.0f ? delta[i] / 6.0f : 0.0f;
        break;
    case TP_LAYER_MISH:
        for (i = 0; i < n; i++) {
            const float s = 1.0f / (1.0f + expf(-x[i]));
            const float t = mish_tanh(x[i]);
            delta[i] = delta[i] * (t + x[i] * s * (1.0f - t * t));
        }
        break;
    default: break;
    }
}

double tp_activation_gain(const tp_layer *layer) {
    const elu_coefficients elu = elu_of(layer);
    switch (layer->kind) {
    case TP_LAYER_LEAKY_RELU: return fmax(1.0, fabs((double)layer->activation[0]));
    case TP_LAYER_ELU: /* y <= 0 only on the negative side, where |y| <= |alpha scale| */
    case TP_LAYER_CELU:
    case TP_LAYER_SELU:
        return fmax(fabs((double)elu.positive),
                    2.0 * fabs((double)elu.input) * fabs((double)elu.negative));
    case TP_LAYER_HARDSWISH: return 1.5;
    case TP_LAYER_SILU: /* at most 1.1; GELU 1.13, Mish 1.09; with room for rounding */
    case TP_LAYER_GELU:
    case TP_LAYER_GELU_TANH:
    case TP_LAYER_MISH: return 1.25;
    default: return 1.0; /* ReLU, ReLU6, Hardtanh, Hardsigmoid, Sigmoid, Tanh */
    }
}
