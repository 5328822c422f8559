/* layers.c: forward and (sparse) backward kernels of one sample, (C, H, W) layout. */
#include <math.h>
#include <string.h>

#include "tp_internal.h"

/* Build with -DTP_SKIP_ZERO_ERRORS=1 to skip, in every policy, the output entries whose error
 * is exactly zero (many, behind a ReLU or a max pool): less work than the dense backward that
 * the MAC ledger counts. Off by default: `full` is then the dense reference (every one of the
 * N entries, as a standard framework computes it) and the sparse policies process exactly
 * their k kept entries. */
#ifndef TP_SKIP_ZERO_ERRORS
#define TP_SKIP_ZERO_ERRORS 0
#endif

/* ---------------------------------------------------------------- vector helpers */

/* sum_i a[i] b[i] with four partial sums (independent chains the compiler can vectorise) */
static float dot(const float *restrict a, const float *restrict b, int32_t n) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int32_t i;
    for (i = 0; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/* y[i] += a x[i] */
static void axpy(float *restrict y, float a, const float *restrict x, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] += a * x[i];
}

/* ---------------------------------------------------------------- dense */

void tp_dense_forward(const tp_layer *layer, const float *x, float *y) {
    const int32_t in = layer->fan_in, out = layer->out_c;
    int32_t j;
    for (j = 0; j < out; j++) {
        const float sum = dot(layer->weight + (size_t)j * (size_t)in, x, in);
        y[j] = layer->has_bias ? sum + layer->bias[j] : sum;
    }
}

static void dense_backward_row(tp_layer *layer, const float *x, float d, int32_t j,
                               float *delta_in) {
    const size_t offset = (size_t)j * (size_t)layer->fan_in;
#if TP_SKIP_ZERO_ERRORS
    if (d == 0.0f) return;
#endif
    axpy(layer->grad_weight + offset, d, x, layer->fan_in);
    if (delta_in != NULL) axpy(delta_in, d, layer->weight + offset, layer->fan_in);
}

void tp_dense_backward(tp_layer *layer, const float *x, const float *delta, const int32_t *kept,
                       int32_t k, float *delta_in) {
    int32_t n;
    if (delta_in != NULL) memset(delta_in, 0, (size_t)layer->fan_in * sizeof(float));
    if (kept == NULL) {
        for (n = 0; n < layer->out_c; n++) dense_backward_row(layer, x, delta[n], n, delta_in);
    } else {
        for (n = 0; n < k; n++) dense_backward_row(layer, x, delta[kept[n]], kept[n], delta_in);
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

/* The outputs one kernel tap (kh, kw) touches: rows [oh_first, oh_last), columns [ow_first,
 * ow_last); output (oh, ow) reads input (oh * stride_h + row_shift, ow * stride_w + col_shift).
 * `span` > 0 when those outputs and inputs are both one contiguous run (stride 1, whole rows of
 * equal width, e.g. a 1x1 kernel or a 1-D conv): the tap is then a single vector operation. */
typedef struct {
    int32_t oh_first, oh_last, ow_first, ow_last, row_shift, col_shift, span;
} tp_tap;

static tp_tap conv_tap(const tp_layer *layer, int32_t kh, int32_t kw) {
    tp_tap tap;
    valid_outputs(layer->out_h, layer->in_h, layer->stride_h, layer->padding_h,
                  kh * layer->dilation_h, &tap.oh_first, &tap.oh_last);
    valid_outputs(layer->out_w, layer->in_w, layer->stride_w, layer->padding_w,
                  kw * layer->dilation_w, &tap.ow_first, &tap.ow_last);
    tap.row_shift = kh * layer->dilation_h - layer->padding_h;
    tap.col_shift = kw * layer->dilation_w - layer->padding_w;
    tap.span = 0;
    if (tap.oh_first < tap.oh_last && tap.ow_first < tap.ow_last &&
        (tap.oh_last - tap.oh_first == 1 ||
         (layer->stride_h == 1 && layer->stride_w == 1 && tap.col_shift == 0 &&
          tap.ow_first == 0 && tap.ow_last == layer->out_w && layer->out_w == layer->in_w)) &&
        layer->stride_w == 1)
        tap.span = (tap.oh_last - tap.oh_first - 1) * layer->out_w + tap.ow_last - tap.ow_first;
    return tap;
}

/* Offsets of output (oh, tap.ow_first) and of the input it reads, within their planes. */
static size_t tap_output_offset(const tp_layer *layer, const tp_tap *tap, int32_t oh) {
    return (size_t)oh * (size_t)layer->out_w + (size_t)tap->ow_first;
}
static size_t tap_input_offset(const tp_layer *layer, const tp_tap *tap, int32_t oh) {
    return (size_t)(oh * layer->stride_h + tap->row_shift) * (size_t)layer->in_w +
           (size_t)(tap->ow_first * layer->stride_w + tap->col_shift);
}

/* Weight-stationary order: for each kernel tap and weight, add its product to every output it
 * touches (one contiguous run per row when the stride is 1, one for the whole tap when
 * conv_tap finds a span). Each output sums its terms in the order (kh, kw, input channel),
 * then adds the bias. */
void tp_conv_forward(const tp_layer *layer, const float *x, float *y) {
    const int32_t in_per_group = layer->in_c / layer->groups;
    const int32_t out_per_group = layer->out_c / layer->groups;
    const int32_t kh_n = layer->kernel_h, kw_n = layer->kernel_w, stride_w = layer->stride_w;
    const size_t in_plane = (size_t)layer->in_h * (size_t)layer->in_w;
    const size_t out_plane = (size_t)layer->out_h * (size_t)layer->out_w;
    int32_t oc, ic, kh, kw, oh, ow;
    memset(y, 0, (size_t)layer->out_c * out_plane * sizeof(float));
    for (kh = 0; kh < kh_n; kh++) {
        for (kw = 0; kw < kw_n; kw++) {
            const tp_tap tap = conv_tap(layer, kh, kw);
            const int32_t count = tap.ow_last - tap.ow_first;
            const size_t out_at = tap_output_offset(layer, &tap, tap.oh_first);
            const size_t in_at = tap_input_offset(layer, &tap, tap.oh_first);
            if (count <= 0 || tap.oh_first >= tap.oh_last) continue;
            for (oc = 0; oc < layer->out_c; oc++) {
                const int32_t first_in = (oc / out_per_group) * in_per_group;
                const float *w_oc = layer->weight + (size_t)oc * (size_t)layer->fan_in +
                                    (size_t)(kh * kw_n + kw);
                float *y_c = y + (size_t)oc * out_plane;
                for (ic = 0; ic < in_per_group; ic++) {
                    const float w = w_oc[(size_t)ic * (size_t)(kh_n * kw_n)];
                    const float *x_c = x + (size_t)(first_in + ic) * in_plane;
                    if (tap.span > 0) {
                        axpy(y_c + out_at, w, x_c + in_at, tap.span);
                        continue;
                    }
                    for (oh = tap.oh_first; oh < tap.oh_last; oh++) {
                        float *y_run = y_c + tap_output_offset(layer, &tap, oh);
                        const float *x_run = x_c + tap_input_offset(layer, &tap, oh);
                        if (stride_w == 1) {
                            axpy(y_run, w, x_run, count);
                        } else {
                            for (ow = 0; ow < count; ow++) y_run[ow] += w * x_run[ow * stride_w];
                        }
                    }
                }
            }
        }
    }
    if (layer->has_bias) {
        for (oc = 0; oc < layer->out_c; oc++) {
            float *y_c = y + (size_t)oc * out_plane;
            const float b = layer->bias[oc];
            size_t p;
            for (p = 0; p < out_plane; p++) y_c[p] += b;
        }
    }
}

#if !TP_SKIP_ZERO_ERRORS
/* The dense backward of a conv (every output entry), in the forward's weight-stationary
 * order: each weight's gradient is one dot product of the output error with the input it
 * saw, and its input-gradient term one vector update. */
static void conv_backward_dense(tp_layer *layer, const float *x, const float *delta,
                                float *delta_in) {
    const int32_t in_per_group = layer->in_c / layer->groups;
    const int32_t out_per_group = layer->out_c / layer->groups;
    const int32_t kh_n = layer->kernel_h, kw_n = layer->kernel_w, stride_w = layer->stride_w;
    const size_t in_plane = (size_t)layer->in_h * (size_t)layer->in_w;
    const size_t out_plane = (size_t)layer->out_h * (size_t)layer->out_w;
    int32_t oc, ic, kh, kw, oh, ow;
    for (kh = 0; kh < kh_n; kh++) {
        for (kw = 0; kw < kw_n; kw++) {
            const tp_tap tap = conv_tap(layer, kh, kw);
            const int32_t count = tap.ow_last - tap.ow_first;
            const size_t out_at = tap_output_offset(layer, &tap, tap.oh_first);
            const size_t in_at = tap_input_offset(layer, &tap, tap.oh_first);
            if (count <= 0 || tap.oh_first >= tap.oh_last) continue;
            for (oc = 0; oc < layer->out_c; oc++) {
                const int32_t first_in = (oc / out_per_group) * in_per_group;
                const size_t w_at = (size_t)oc * (size_t)layer->fan_in + (size_t)(kh * kw_n + kw);
                const float *d_c = delta + (size_t)oc * out_plane;
                for (ic = 0; ic < in_per_group; ic++) {
                    const size_t w_index = w_at + (size_t)ic * (size_t)(kh_n * kw_n);
                    const float w = layer->weight[w_index];
                    const size_t x_offset = (size_t)(first_in + ic) * in_plane;
                    const float *x_c = x + x_offset;
                    float *din_c = delta_in != NULL ? delta_in + x_offset : NULL;
                    float g = 0.0f;
                    if (tap.span > 0) {
                        g = dot(d_c + out_at, x_c + in_at, tap.span);
                        if (din_c != NULL) axpy(din_c + in_at, w, d_c + out_at, tap.span);
                        layer->grad_weight[w_index] += g;
                        continue;
                    }
                    for (oh = tap.oh_first; oh < tap.oh_last; oh++) {
                        const float *d_run = d_c + tap_output_offset(layer, &tap, oh);
                        const size_t in_row = tap_input_offset(layer, &tap, oh);
                        if (stride_w == 1) {
                            g += dot(d_run, x_c + in_row, count);
                            if (din_c != NULL) axpy(din_c + in_row, w, d_run, count);
                            continue;
                        }
                        for (ow = 0; ow < count; ow++)
                            g += d_run[ow] * x_c[in_row + (size_t)(ow * stride_w)];
                        if (din_c != NULL)
                            for (ow = 0; ow < count; ow++)
                                din_c[in_row + (size_t)(ow * stride_w)] += w * d_run[ow];
                    }
                    layer->grad_weight[w_index] += g;
                }
            }
        }
    }
}
#endif

/* The weight and input gradient of one output element (oc, oh, ow) = index `j`: for each
 * kernel tap whose input lies inside the image, one pass over the input channels of its group
 * (both products of a channel in the same iteration). */
static void conv_backward_element(tp_layer *layer, const float *x, float d, int32_t j,
                                  float *delta_in) {
    const int32_t plane = layer->out_h * layer->out_w;
    const int32_t oc = j / plane, within = j - oc * plane;
    const int32_t oh = within / layer->out_w, ow = within - oh * layer->out_w;
    const int32_t in_per_group = layer->in_c / layer->groups;
    const int32_t first_in = (oc / (layer->out_c / layer->groups)) * in_per_group;
    const int32_t kh_n = layer->kernel_h, kw_n = layer->kernel_w, taps = kh_n * kw_n;
    const int32_t dh = layer->dilation_h, dw = layer->dilation_w, in_w = layer->in_w;
    const int32_t h0 = oh * layer->stride_h - layer->padding_h;
    const int32_t w0 = ow * layer->stride_w - layer->padding_w;
    const size_t in_plane = (size_t)layer->in_h * (size_t)in_w;
    float *restrict g_oc = layer->grad_weight + (size_t)oc * (size_t)layer->fan_in;
    const float *restrict w_oc = layer->weight + (size_t)oc * (size_t)layer->fan_in;
    const float *restrict x_group = x + (size_t)first_in * in_plane;
    float *restrict din_group = delta_in != NULL ? delta_in + (size_t)first_in * in_plane : NULL;
    /* the taps whose input lies inside the image */
    int32_t kh_first = h0 < 0 ? (-h0 + dh - 1) / dh : 0;
    int32_t kh_last = (layer->in_h - 1 - h0) >= 0 ? (layer->in_h - 1 - h0) / dh + 1 : 0;
    int32_t kw_first = w0 < 0 ? (-w0 + dw - 1) / dw : 0;
    int32_t kw_last = (in_w - 1 - w0) >= 0 ? (in_w - 1 - w0) / dw + 1 : 0;
    int32_t ic, kh, kw;
    if (kh_last > kh_n) kh_last = kh_n;
    if (kw_last > kw_n) kw_last = kw_n;
    for (kh = kh_first; kh < kh_last; kh++) {
        for (kw = kw_first; kw < kw_last; kw++) {
            const size_t at = (size_t)(h0 + kh * dh) * (size_t)in_w + (size_t)(w0 + kw * dw);
            const int32_t tap = kh * kw_n + kw;
            float *restrict g = g_oc + tap;
            const float *restrict xs = x_group + at;
            if (din_group != NULL) {
                const float *restrict w = w_oc + tap;
                float *restrict din = din_group + at;
                for (ic = 0; ic < in_per_group; ic++) {
                    g[(size_t)ic * (size_t)taps] += d * xs[(size_t)ic * in_plane];
                    din[(size_t)ic * in_plane] += w[(size_t)ic * (size_t)taps] * d;
                }
            } else {
                for (ic = 0; ic < in_per_group; ic++)
                    g[(size_t)ic * (size_t)taps] += d * xs[(size_t)ic * in_plane];
            }
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
#if TP_SKIP_ZERO_ERRORS
        for (n = 0; n < n_out; n++)
            if (delta[n] != 0.0f) conv_backward_element(layer, x, delta[n], n, delta_in);
#else
        (void)n_out;
        conv_backward_dense(layer, x, delta, delta_in);
#endif
    } else {
        for (n = 0; n < k; n++) {
#if TP_SKIP_ZERO_ERRORS
            if (delta[kept[n]] == 0.0f) continue;
#endif
            conv_backward_element(layer, x, delta[kept[n]], kept[n], delta_in);
        }
    }
    if (layer->has_bias) {
        int32_t oc;
        for (oc = 0; oc < layer->out_c; oc++) {
            const float *d_c = delta + (size_t)oc * (size_t)plane;
            float sum = 0.0f;
            int32_t p;
            for (p = 0; p < plane; p++) sum += d_c[p];
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
#if TP_SKIP_ZERO_ERRORS
                if (d == 0.0f) continue;
#endif
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
