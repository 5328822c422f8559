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

/* p[0..n) = 0 as a plain vectorisable loop (gcc would otherwise call memset, whose
 * `rep stos` valgrind counts once per byte) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-distribute-patterns")))
#endif
void tp_zero(float *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) p[i] = 0.0f;
}

int tp_aligned(const void *p) { return ((uintptr_t)p & 3u) == 0; }

int tp_all_finite(const float *values, size_t n) {
    size_t i;
    for (i = 0; i < n; i++)
        if (!isfinite(values[i])) return 0;
    return 1;
}

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
    if ((TP_SKIP_ZERO_ERRORS || layer->skip_zero_errors) && d == 0.0f) return;
    if (!layer->bias_only) axpy(layer->grad_weight + offset, d, x, layer->fan_in);
    if (delta_in != NULL) axpy(delta_in, d, layer->weight + offset, layer->fan_in);
}

void tp_dense_backward(tp_layer *layer, const float *x, const float *delta, const int32_t *kept,
                       int32_t k, float *delta_in, int bias_done) {
    int32_t n;
    if (delta_in != NULL) tp_zero(delta_in, (size_t)layer->fan_in);
    if (kept == NULL) {
        for (n = 0; n < layer->out_c; n++) dense_backward_row(layer, x, delta[n], n, delta_in);
    } else {
        for (n = 0; n < k; n++) dense_backward_row(layer, x, delta[kept[n]], kept[n], delta_in);
    }
    if (layer->has_bias && !bias_done)
        for (n = 0; n < layer->out_c; n++) layer->grad_bias[n] += delta[n];
}

void tp_bias_gradient(tp_layer *layer, const float *delta) {
    const int32_t plane = layer->out_h * layer->out_w;
    int32_t c, p;
    for (c = 0; c < layer->out_c; c++) {
        float sum = 0.0f;
        for (p = 0; p < plane; p++) sum += delta[(size_t)c * (size_t)plane + (size_t)p];
        layer->grad_bias[c] += sum;
    }
}

/* ---------------------------------------------------------------- ReLU */

void tp_relu_forward(const float *x, float *y, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = x[i] < 0.0f ? 0.0f : x[i]; /* NaN passes, as in PyTorch */
}

void tp_relu_backward(const float *y, float *delta, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) delta[i] = y[i] > 0.0f ? delta[i] : 0.0f; /* branchless */
}

void tp_relu_mask(const float *y, uint32_t *mask, int32_t n) {
    int32_t i;
    for (i = 0; i < (n + 31) / 32; i++) mask[i] = 0u;
    for (i = 0; i < n; i++) mask[i >> 5] |= (uint32_t)(y[i] > 0.0f) << (i & 31);
}

void tp_relu_backward_mask(const uint32_t *mask, float *delta, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) delta[i] = (mask[i >> 5] >> (i & 31)) & 1u ? delta[i] : 0.0f;
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

/* Window geometry of a max pool, copied out of the layer (no reloads through aliasing). */
typedef struct {
    int32_t in_w, kernel_h, kernel_w, stride_h, stride_w, inside;
} tp_pool_shape;

static tp_pool_shape pool_shape(const tp_layer *layer) {
    tp_pool_shape shape;
    shape.in_w = layer->in_w;
    shape.kernel_h = layer->kernel_h;
    shape.kernel_w = layer->kernel_w;
    shape.stride_h = layer->stride_h;
    shape.stride_w = layer->stride_w;
    shape.inside = layer->padding_h == 0 && layer->padding_w == 0; /* no window is clipped */
    return shape;
}

/* Index within the channel plane of the maximum that output (oh, ow) takes: the first
 * maximum, a NaN wins (window_argmax's rule); without padding no window needs clipping. */
static inline int32_t pool_argmax(const tp_layer *layer, tp_pool_shape shape,
                                  const float *x_c, int32_t oh, int32_t ow) {
    tp_window win;
    if (shape.inside) {
        const int32_t h_start = oh * shape.stride_h, w_start = ow * shape.stride_w;
        int32_t ih, iw, best = h_start * shape.in_w + w_start;
        float best_value = x_c[best];
        if (shape.kernel_h == 1 && shape.kernel_w == 2) { /* the 1-D pool of two */
            const float second = x_c[best + 1];
            return second > best_value || second != second ? best + 1 : best;
        }
        for (ih = 0; ih < shape.kernel_h; ih++) {
            const int32_t row = (h_start + ih) * shape.in_w + w_start;
            for (iw = ih == 0 ? 1 : 0; iw < shape.kernel_w; iw++) {
                const float value = x_c[row + iw];
                if (value > best_value || value != value) {
                    best_value = value;
                    best = row + iw;
                }
            }
        }
        return best;
    }
    win = pool_window(layer, oh, ow);
    return window_argmax(layer, x_c, &win);
}

/* The 1-D pool of two (kernel 1x2, stride 2, no padding): the second of a pair wins when
 * larger or NaN (window_argmax's rule); branch-free, a row at a time. */
static int pool_of_two(const tp_layer *layer) {
    return layer->kernel_h == 1 && layer->kernel_w == 2 && layer->stride_h == 1 &&
           layer->stride_w == 2 && layer->padding_h == 0 && layer->padding_w == 0;
}

static void pool_of_two_forward(const tp_layer *layer, const float *x, float *y) {
    const int32_t rows = layer->in_c * layer->in_h, in_w = layer->in_w, out_w = layer->out_w;
    int32_t r, ow;
    for (r = 0; r < rows; r++) {
        const float *restrict x_row = x + (size_t)r * (size_t)in_w;
        float *restrict y_row = y + (size_t)r * (size_t)out_w;
        for (ow = 0; ow < out_w; ow++) {
            const float first = x_row[2 * ow], second = x_row[2 * ow + 1];
            y_row[ow] = second > first || second != second ? second : first;
        }
    }
}

#if !TP_SKIP_ZERO_ERRORS /* (the zero-skipping build keeps the general loop) */
static void pool_of_two_backward(const tp_layer *layer, const float *x, const float *delta_out,
                                 float *delta_in) {
    const int32_t rows = layer->in_c * layer->in_h, in_w = layer->in_w, out_w = layer->out_w;
    int32_t r, ow, iw;
    for (r = 0; r < rows; r++) {
        const float *restrict x_row = x + (size_t)r * (size_t)in_w;
        const float *restrict d_row = delta_out + (size_t)r * (size_t)out_w;
        float *restrict din_row = delta_in + (size_t)r * (size_t)in_w;
        for (ow = 0; ow < out_w; ow++) {
            const float first = x_row[2 * ow], second = x_row[2 * ow + 1], d = d_row[ow];
            const int second_wins = second > first || second != second;
            din_row[2 * ow] = second_wins ? 0.0f : d;
            din_row[2 * ow + 1] = second_wins ? d : 0.0f;
        }
        for (iw = 2 * out_w; iw < in_w; iw++) din_row[iw] = 0.0f; /* an odd last column */
    }
}
#endif

/* The pool of two's backward and, in the same pass, the derivative of the ReLU whose output x
 * is (delta_in = relu'(x) * routed delta: the routed entry keeps d where x > 0, the same floats
 * as tp_maxpool_backward followed by tp_relu_backward). Returns 0, doing nothing, for other
 * pools (and in the zero-skipping build). */
int tp_maxpool_relu_backward(const tp_layer *layer, const float *x, const float *delta_out,
                             float *delta_in) {
#if TP_SKIP_ZERO_ERRORS
    (void)layer;
    (void)x;
    (void)delta_out;
    (void)delta_in;
    return 0;
#else
    const int32_t rows = layer->in_c * layer->in_h, in_w = layer->in_w, out_w = layer->out_w;
    int32_t r, ow, iw;
    if (!pool_of_two(layer)) return 0;
    for (r = 0; r < rows; r++) {
        const float *restrict x_row = x + (size_t)r * (size_t)in_w;
        const float *restrict d_row = delta_out + (size_t)r * (size_t)out_w;
        float *restrict din_row = delta_in + (size_t)r * (size_t)in_w;
        for (ow = 0; ow < out_w; ow++) {
            const float first = x_row[2 * ow], second = x_row[2 * ow + 1], d = d_row[ow];
            /* branch-free: d's bits or those of +0.0f through integer masks */
            const int second_wins = (second > first) | (second != second);
            const uint32_t mask_first = 0u - (uint32_t)(!second_wins & (first > 0.0f));
            const uint32_t mask_second = 0u - (uint32_t)(second_wins & (second > 0.0f));
            uint32_t bits, out;
            float value;
            memcpy(&bits, &d, sizeof bits);
            out = bits & mask_first;
            memcpy(&value, &out, sizeof value);
            din_row[2 * ow] = value;
            out = bits & mask_second;
            memcpy(&value, &out, sizeof value);
            din_row[2 * ow + 1] = value;
        }
        for (iw = 2 * out_w; iw < in_w; iw++) din_row[iw] = 0.0f; /* an odd last column */
    }
    return 1;
#endif
}

void tp_maxpool_forward(const tp_layer *layer, const float *x, float *y) {
    const tp_pool_shape shape = pool_shape(layer);
    const size_t in_plane = (size_t)layer->in_h * layer->in_w;
    const int32_t out_h = layer->out_h, out_w = layer->out_w;
    int32_t c, oh, ow;
    if (pool_of_two(layer)) {
        pool_of_two_forward(layer, x, y);
        return;
    }
    for (c = 0; c < layer->in_c; c++) {
        const float *x_c = x + (size_t)c * in_plane;
        for (oh = 0; oh < out_h; oh++) {
            float *y_row = y + ((size_t)c * out_h + oh) * out_w;
            for (ow = 0; ow < out_w; ow++)
                y_row[ow] = x_c[pool_argmax(layer, shape, x_c, oh, ow)];
        }
    }
}

void tp_maxpool_backward(const tp_layer *layer, const float *x, const float *delta_out,
                         float *delta_in) {
    const tp_pool_shape shape = pool_shape(layer);
    const size_t in_plane = (size_t)layer->in_h * layer->in_w;
    const int32_t out_h = layer->out_h, out_w = layer->out_w;
    int32_t c, oh, ow;
#if !TP_SKIP_ZERO_ERRORS
    if (pool_of_two(layer)) {
        pool_of_two_backward(layer, x, delta_out, delta_in);
        return;
    }
#endif
    tp_zero(delta_in, (size_t)tp_layer_input_size(layer));
    for (c = 0; c < layer->in_c; c++) {
        const float *x_c = x + (size_t)c * in_plane;
        float *d_c = delta_in + (size_t)c * in_plane;
        for (oh = 0; oh < out_h; oh++) {
            const float *d_row = delta_out + ((size_t)c * out_h + oh) * out_w;
            for (ow = 0; ow < out_w; ow++) {
                const float d = d_row[ow];
#if TP_SKIP_ZERO_ERRORS
                if (d == 0.0f) continue;
#endif
                d_c[pool_argmax(layer, shape, x_c, oh, ow)] += d;
            }
        }
    }
}

void tp_avgpool_forward(const tp_layer *layer, const float *x, float *y) {
    const size_t in_plane = (size_t)layer->in_h * layer->in_w;
    const int32_t in_w = layer->in_w;
    int32_t c, oh, ow, ih, iw;
    for (c = 0; c < layer->in_c; c++) {
        const float *x_c = x + (size_t)c * in_plane;
        for (oh = 0; oh < layer->out_h; oh++) {
            for (ow = 0; ow < layer->out_w; ow++) {
                const tp_window win = pool_window(layer, oh, ow);
                float sum = 0.0f;
                for (ih = win.h_start; ih < win.h_end; ih++) {
                    const float *restrict row = x_c + (size_t)ih * (size_t)in_w;
                    for (iw = win.w_start; iw < win.w_end; iw++) sum += row[iw];
                }
                y[((size_t)c * layer->out_h + oh) * layer->out_w + ow] = sum / (float)win.divisor;
            }
        }
    }
}

/* relu_output == NULL: the average pool's backward; else also the derivative of the ReLU whose
 * output it is, in the same pass, when the windows do not overlap (stride >= kernel): each
 * input entry then gets 0 + d once, kept where relu_output > 0 (the same floats as the two
 * passes). Returns 0, doing nothing, for overlapping windows with a ReLU. */
static int avgpool_backward(const tp_layer *layer, const float *relu_output,
                            const float *delta_out, float *delta_in) {
    const size_t in_plane = (size_t)layer->in_h * layer->in_w;
    const int32_t in_w = layer->in_w;
    int32_t c, oh, ow, ih, iw;
    if (relu_output != NULL &&
        (layer->stride_h < layer->kernel_h || layer->stride_w < layer->kernel_w))
        return 0;
    tp_zero(delta_in, (size_t)tp_layer_input_size(layer));
    for (c = 0; c < layer->in_c; c++) {
        float *d_c = delta_in + (size_t)c * in_plane;
        const float *y_c = relu_output != NULL ? relu_output + (size_t)c * in_plane : NULL;
        for (oh = 0; oh < layer->out_h; oh++) {
            for (ow = 0; ow < layer->out_w; ow++) {
                const tp_window win = pool_window(layer, oh, ow);
                const float d = delta_out[((size_t)c * layer->out_h + oh) * layer->out_w + ow] /
                                (float)win.divisor;
                for (ih = win.h_start; ih < win.h_end; ih++) {
                    float *restrict row = d_c + (size_t)ih * (size_t)in_w;
                    if (y_c != NULL) {
                        /* the bits of 0 + d where the ReLU passed, of +0.0f elsewhere */
                        const float *restrict y_row = y_c + (size_t)ih * (size_t)in_w;
                        const float added = 0.0f + d;
                        uint32_t bits;
                        memcpy(&bits, &added, sizeof bits);
                        for (iw = win.w_start; iw < win.w_end; iw++) {
                            const uint32_t out = bits & (0u - (uint32_t)(y_row[iw] > 0.0f));
                            memcpy(&row[iw], &out, sizeof out);
                        }
                    } else {
                        for (iw = win.w_start; iw < win.w_end; iw++) row[iw] += d;
                    }
                }
            }
        }
    }
    return 1;
}

void tp_avgpool_backward(const tp_layer *layer, const float *delta_out, float *delta_in) {
    avgpool_backward(layer, NULL, delta_out, delta_in);
}

int tp_avgpool_relu_backward(const tp_layer *layer, const float *relu_output,
                             const float *delta_out, float *delta_in) {
    return avgpool_backward(layer, relu_output, delta_out, delta_in);
}
