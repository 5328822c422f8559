/* layers.c: forward and (sparse) backward kernels of one sample, (C, H, W) layout. */
#include <math.h>
#include <string.h>

#include "tp_internal.h"

/* ---------------------------------------------------------------- dense */

void tp_dense_forward(const tp_layer *layer, const float *x, float *y) {
    const int32_t in = layer->fan_in, out = layer->out_c;
    int32_t j, i;
    for (j = 0; j < out; j++) {
        const float *row = layer->weight + (size_t)j * (size_t)in;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, sum;
        /* four partial sums: independent chains the compiler can pipeline or vectorise */
        for (i = 0; i + 4 <= in; i += 4) {
            s0 += row[i] * x[i];
            s1 += row[i + 1] * x[i + 1];
            s2 += row[i + 2] * x[i + 2];
            s3 += row[i + 3] * x[i + 3];
        }
        for (; i < in; i++) s0 += row[i] * x[i];
        sum = (s0 + s1) + (s2 + s3);
        y[j] = layer->has_bias ? sum + layer->bias[j] : sum;
    }
}

static void dense_backward_row(tp_layer *layer, const float *x, float d, int32_t j,
                               float *delta_in) {
    const int32_t in = layer->fan_in;
    float *grad_row = layer->grad_weight + (size_t)j * (size_t)in;
    const float *row = layer->weight + (size_t)j * (size_t)in;
    int32_t i;
    for (i = 0; i < in; i++) grad_row[i] += d * x[i];
    if (delta_in != NULL)
        for (i = 0; i < in; i++) delta_in[i] += row[i] * d;
}

void tp_dense_backward(tp_layer *layer, const float *x, const float *delta, const int32_t *kept,
                       int32_t k, float *delta_in) {
    int32_t n;
    if (delta_in != NULL) memset(delta_in, 0, (size_t)layer->fan_in * sizeof(float));
    /* rows with a zero error (e.g. behind an inactive ReLU) add nothing: skip them */
    if (kept == NULL) {
        for (n = 0; n < layer->out_c; n++)
            if (delta[n] != 0.0f) dense_backward_row(layer, x, delta[n], n, delta_in);
    } else {
        for (n = 0; n < k; n++)
            if (delta[kept[n]] != 0.0f)
                dense_backward_row(layer, x, delta[kept[n]], kept[n], delta_in);
    }
    if (layer->has_bias)
        for (n = 0; n < layer->out_c; n++) layer->grad_bias[n] += delta[n];
}

/* ---------------------------------------------------------------- conv2d (groups, dilation) */

/* First and one-past-last output index o whose input o * stride - padding + offset lies in
 * [0, size), for a kernel tap at `offset` = k * dilation. */
static void valid_outputs(int32_t out_size, int32_t in_size, int32_t stride, int32_t padding,
                          int32_t offset, int32_t *first, int32_t *last) {
    const int32_t shift = padding - offset; /* input = o * stride - shift */
    int32_t lo = shift > 0 ? (shift + stride - 1) / stride : 0;
    int32_t hi = (in_size - 1 + shift) >= 0 ? (in_size - 1 + shift) / stride + 1 : 0;
    if (hi > out_size) hi = out_size;
    if (lo > hi) lo = hi;
    *first = lo;
    *last = hi;
}

/* Weight-stationary order: for each weight, add its product to every output it touches (a
 * contiguous row update when the stride is 1). Each output still sums its terms in the order
 * (input channel, kh, kw), then adds the bias. */
void tp_conv_forward(const tp_layer *layer, const float *x, float *y) {
    const int32_t in_per_group = layer->in_c / layer->groups;
    const int32_t out_per_group = layer->out_c / layer->groups;
    const int32_t kh_n = layer->kernel_h, kw_n = layer->kernel_w;
    const int32_t out_h = layer->out_h, out_w = layer->out_w, in_w = layer->in_w;
    const size_t in_plane = (size_t)layer->in_h * in_w, out_plane = (size_t)out_h * out_w;
    int32_t oc, ic, kh, kw, oh, ow;
    memset(y, 0, (size_t)layer->out_c * out_plane * sizeof(float));
    for (oc = 0; oc < layer->out_c; oc++) {
        const int32_t first_in = (oc / out_per_group) * in_per_group;
        float *y_c = y + (size_t)oc * out_plane;
        for (ic = 0; ic < in_per_group; ic++) {
            const float *x_c = x + (size_t)(first_in + ic) * in_plane;
            const float *w_c = layer->weight + (size_t)oc * layer->fan_in + (size_t)ic * kh_n * kw_n;
            for (kh = 0; kh < kh_n; kh++) {
                int32_t oh_first, oh_last;
                valid_outputs(out_h, layer->in_h, layer->stride_h, layer->padding_h,
                              kh * layer->dilation_h, &oh_first, &oh_last);
                for (kw = 0; kw < kw_n; kw++) {
                    const float w = w_c[kh * kw_n + kw];
                    const int32_t offset_w = kw * layer->dilation_w - layer->padding_w;
                    int32_t ow_first, ow_last;
                    valid_outputs(out_w, in_w, layer->stride_w, layer->padding_w,
                                  kw * layer->dilation_w, &ow_first, &ow_last);
                    for (oh = oh_first; oh < oh_last; oh++) {
                        const int32_t ih = oh * layer->stride_h - layer->padding_h +
                                           kh * layer->dilation_h;
                        const float *x_row = x_c + (size_t)ih * in_w;
                        float *y_row = y_c + (size_t)oh * out_w;
                        if (layer->stride_w == 1) {
                            const float *x_shift = x_row + offset_w;
                            for (ow = ow_first; ow < ow_last; ow++) y_row[ow] += w * x_shift[ow];
                        } else {
                            for (ow = ow_first; ow < ow_last; ow++)
                                y_row[ow] += w * x_row[ow * layer->stride_w + offset_w];
                        }
                    }
                }
            }
        }
        if (layer->has_bias) {
            const float b = layer->bias[oc];
            size_t p;
            for (p = 0; p < out_plane; p++) y_c[p] += b;
        }
    }
}

/* The weight and input gradient of one output element (oc, oh, ow) = index `j`. */
static void conv_backward_element(tp_layer *layer, const float *x, float d, int32_t j,
                                  float *delta_in) {
    const int32_t plane = layer->out_h * layer->out_w;
    const int32_t oc = j / plane, oh = (j % plane) / layer->out_w, ow = j % layer->out_w;
    const int32_t in_per_group = layer->in_c / layer->groups;
    const int32_t first_in = (oc / (layer->out_c / layer->groups)) * in_per_group;
    const int32_t kh_n = layer->kernel_h, kw_n = layer->kernel_w;
    const int32_t dh = layer->dilation_h, dw = layer->dilation_w, in_w = layer->in_w;
    const int32_t h0 = oh * layer->stride_h - layer->padding_h;
    const int32_t w0 = ow * layer->stride_w - layer->padding_w;
    const size_t in_plane = (size_t)layer->in_h * in_w;
    float *g_oc = layer->grad_weight + (size_t)oc * (size_t)layer->fan_in;
    const float *w_oc = layer->weight + (size_t)oc * (size_t)layer->fan_in;
    /* the taps whose input lies inside the image */
    int32_t kh_first = h0 < 0 ? (-h0 + dh - 1) / dh : 0;
    int32_t kh_last = (layer->in_h - 1 - h0) >= 0 ? (layer->in_h - 1 - h0) / dh + 1 : 0;
    int32_t kw_first = w0 < 0 ? (-w0 + dw - 1) / dw : 0;
    int32_t kw_last = (in_w - 1 - w0) >= 0 ? (in_w - 1 - w0) / dw + 1 : 0;
    int32_t ic, kh, kw;
    if (kh_last > kh_n) kh_last = kh_n;
    if (kw_last > kw_n) kw_last = kw_n;
    for (ic = 0; ic < in_per_group; ic++) {
        const size_t x_offset = (size_t)(first_in + ic) * in_plane;
        const int32_t w_offset = ic * kh_n * kw_n;
        for (kh = kh_first; kh < kh_last; kh++) {
            const long row = (long)x_offset + (long)(h0 + kh * dh) * in_w + w0;
            float *g_row = g_oc + w_offset + kh * kw_n;
            const float *w_row = w_oc + w_offset + kh * kw_n;
            for (kw = kw_first; kw < kw_last; kw++) g_row[kw] += d * x[row + kw * dw];
            if (delta_in != NULL)
                for (kw = kw_first; kw < kw_last; kw++) delta_in[row + kw * dw] += w_row[kw] * d;
        }
    }
}

void tp_conv_backward(tp_layer *layer, const float *x, const float *delta, const int32_t *kept,
                      int32_t k, float *delta_in) {
    const int32_t n_out = tp_layer_output_size(layer);
    const int32_t plane = layer->out_h * layer->out_w;
    int32_t n;
    if (delta_in != NULL) memset(delta_in, 0, (size_t)tp_layer_input_size(layer) * sizeof(float));
    if (kept == NULL) {
        for (n = 0; n < n_out; n++)
            if (delta[n] != 0.0f) conv_backward_element(layer, x, delta[n], n, delta_in);
    } else {
        for (n = 0; n < k; n++)
            if (delta[kept[n]] != 0.0f)
                conv_backward_element(layer, x, delta[kept[n]], kept[n], delta_in);
    }
    if (layer->has_bias) {
        int32_t oc, p;
        for (oc = 0; oc < layer->out_c; oc++) {
            float sum = 0.0f;
            for (p = 0; p < plane; p++) sum += delta[oc * plane + p];
            layer->grad_bias[oc] += sum;
        }
    }
}

/* ---------------------------------------------------------------- ReLU */

void tp_relu_forward(const float *x, float *y, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = x[i] < 0.0f ? 0.0f : x[i]; /* NaN passes, as in PyTorch */
}

void tp_relu_backward(const float *y, float *delta, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++)
        if (!(y[i] > 0.0f)) delta[i] = 0.0f;
}

/* ---------------------------------------------------------------- pooling (PyTorch rules) */

/* The window of output (oh, ow) clipped to the input, and PyTorch's average divisor. */
typedef struct {
    int32_t h_start, h_end, w_start, w_end, divisor;
} tp_window;

static tp_window pool_window(const tp_layer *layer, int32_t oh, int32_t ow) {
    tp_window win;
    int32_t h_start = oh * layer->stride_h - layer->padding_h;
    int32_t w_start = ow * layer->stride_w - layer->padding_w;
    int32_t h_end = h_start + layer->kernel_h, w_end = w_start + layer->kernel_w;
    if (h_end > layer->in_h + layer->padding_h) h_end = layer->in_h + layer->padding_h;
    if (w_end > layer->in_w + layer->padding_w) w_end = layer->in_w + layer->padding_w;
    win.divisor = (h_end - h_start) * (w_end - w_start); /* count_include_pad=True */
    win.h_start = h_start < 0 ? 0 : h_start;
    win.w_start = w_start < 0 ? 0 : w_start;
    win.h_end = h_end > layer->in_h ? layer->in_h : h_end;
    win.w_end = w_end > layer->in_w ? layer->in_w : w_end;
    return win;
}

/* Index (within the channel plane) of the window's maximum: the first one, NaN wins. */
static int32_t window_argmax(const tp_layer *layer, const float *x_c, const tp_window *win) {
    int32_t ih, iw, best = win->h_start * layer->in_w + win->w_start;
    float best_value = -INFINITY;
    for (ih = win->h_start; ih < win->h_end; ih++) {
        for (iw = win->w_start; iw < win->w_end; iw++) {
            const float value = x_c[ih * layer->in_w + iw];
            if (value > best_value || isnan(value)) {
                best_value = value;
                best = ih * layer->in_w + iw;
            }
        }
    }
    return best;
}

void tp_maxpool_forward(const tp_layer *layer, const float *x, float *y) {
    const size_t in_plane = (size_t)layer->in_h * layer->in_w;
    int32_t c, oh, ow;
    for (c = 0; c < layer->in_c; c++) {
        const float *x_c = x + (size_t)c * in_plane;
        for (oh = 0; oh < layer->out_h; oh++) {
            for (ow = 0; ow < layer->out_w; ow++) {
                const tp_window win = pool_window(layer, oh, ow);
                y[((size_t)c * layer->out_h + oh) * layer->out_w + ow] =
                    x_c[window_argmax(layer, x_c, &win)];
            }
        }
    }
}

void tp_maxpool_backward(const tp_layer *layer, const float *x, const float *delta_out,
                         float *delta_in) {
    const size_t in_plane = (size_t)layer->in_h * layer->in_w;
    int32_t c, oh, ow;
    memset(delta_in, 0, (size_t)tp_layer_input_size(layer) * sizeof(float));
    for (c = 0; c < layer->in_c; c++) {
        const float *x_c = x + (size_t)c * in_plane;
        for (oh = 0; oh < layer->out_h; oh++) {
            for (ow = 0; ow < layer->out_w; ow++) {
                const float d = delta_out[((size_t)c * layer->out_h + oh) * layer->out_w + ow];
                tp_window win;
                if (d == 0.0f) continue;
                win = pool_window(layer, oh, ow);
                delta_in[(size_t)c * in_plane + window_argmax(layer, x_c, &win)] += d;
            }
        }
    }
}

void tp_avgpool_forward(const tp_layer *layer, const float *x, float *y) {
    const size_t in_plane = (size_t)layer->in_h * layer->in_w;
    int32_t c, oh, ow, ih, iw;
    for (c = 0; c < layer->in_c; c++) {
        const float *x_c = x + (size_t)c * in_plane;
        for (oh = 0; oh < layer->out_h; oh++) {
            for (ow = 0; ow < layer->out_w; ow++) {
                const tp_window win = pool_window(layer, oh, ow);
                float sum = 0.0f;
                for (ih = win.h_start; ih < win.h_end; ih++)
                    for (iw = win.w_start; iw < win.w_end; iw++) sum += x_c[ih * layer->in_w + iw];
                y[((size_t)c * layer->out_h + oh) * layer->out_w + ow] = sum / (float)win.divisor;
            }
        }
    }
}

void tp_avgpool_backward(const tp_layer *layer, const float *delta_out, float *delta_in) {
    const size_t in_plane = (size_t)layer->in_h * layer->in_w;
    int32_t c, oh, ow, ih, iw;
    memset(delta_in, 0, (size_t)tp_layer_input_size(layer) * sizeof(float));
    for (c = 0; c < layer->in_c; c++) {
        float *d_c = delta_in + (size_t)c * in_plane;
        for (oh = 0; oh < layer->out_h; oh++) {
            for (ow = 0; ow < layer->out_w; ow++) {
                const tp_window win = pool_window(layer, oh, ow);
                const float d = delta_out[((size_t)c * layer->out_h + oh) * layer->out_w + ow] /
                                (float)win.divisor;
                for (ih = win.h_start; ih < win.h_end; ih++)
                    for (iw = win.w_start; iw < win.w_end; iw++) d_c[ih * layer->in_w + iw] += d;
            }
        }
    }
}
