/* conv.c: conv2d forward and (sparse) backward of one sample, (C, H, W) layout, groups,
 * stride, padding and dilation.
 *
 * Both directions work on the zero-padded input (copied into the conv scratch when the layer
 * pads; a grouped conv, e.g. depthwise, one group at a time, so that the scratch holds one
 * group's channels), so no kernel tap needs a bounds check, and on the patch of an output position: the
 * fan_in input values it reads, in the weight's (input channel, kh, kw) order, found through a
 * table of offsets.
 *
 * Forward (output-stationary, register-blocked): 4 output channels x 8 consecutive output
 * columns accumulate in registers over the whole patch, one load of the 8 inputs serving the 4
 * channels (stride 1 along the width; other strides use the weight-stationary tap loop).
 *
 * Backward (position-major): for each output position, the patch is gathered once into a
 * contiguous buffer and serves every channel processed at that position: the weight-gradient
 * row of channel c gets delta * patch and the patch's input gradient gets delta * W[c], both
 * contiguous vector updates over fan_in (two channels per pass); the patch gradient is then
 * scattered back once. `full` runs every channel at every position (the dense backward, an
 * im2col outer-product form); the sparse policies run exactly their kept entries, grouped by
 * position with a counting sort. */
#include <string.h>

#include "tp_internal.h"

#ifndef TP_SKIP_ZERO_ERRORS
#define TP_SKIP_ZERO_ERRORS 0
#endif

#define BLOCK_CHANNELS 4
#define BLOCK_COLUMNS 8

/* The forward blocks must vectorise across their 8 columns (gcc's SLP vectoriser), not
 * across the patch (which would gather through the offset table): no loop vectorisation. */
#if defined(__GNUC__) && !defined(__clang__)
#define TP_VECTORISE_COLUMNS __attribute__((optimize("no-tree-loop-vectorize")))
#define TP_NO_LIBRARY_CALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define TP_VECTORISE_COLUMNS
#define TP_NO_LIBRARY_CALLS
#endif

/* Geometry of the padded input and where each scratch buffer lives. */
typedef struct {
    int32_t in_per_group, out_per_group, padded_h, padded_w, plane, pads;
    size_t padded_plane, padded_size;
    float *x_padded, *delta_in_padded, *patch, *patch_delta;
    int32_t *offset, *position_start, *position_order;
    int32_t *run_offset, runs, run_length; /* the patch as runs of contiguous inputs */
} tp_conv_plan;

/* The scratch layout (tp_conv_forward_scratch_floats / tp_conv_backward_scratch_floats in
 * plan.c): the padded input (when the layer pads), the tap and run offsets; then, for the
 * backward only, the padded input error (when the layer pads and passes an error on), the
 * patch and its error, the position starts and the channel order of a dense backward.
 * with_input: 0 leaves the padded input out (a bias-only layer's backward never reads it).
 * with_offsets: also the per-tap offset table (the forward's; the backward reads the
 * kernel-row runs only); with_delta_in: the backward writes the input's error. */
static tp_conv_plan conv_plan(const tp_layer *layer, float *scratch, int with_offsets,
                              int with_delta_in, int with_input) {
    tp_conv_plan plan;
    int32_t ic, kh, kw, j = 0;
    plan.in_per_group = layer->in_c / layer->groups;
    plan.out_per_group = layer->out_c / layer->groups;
    plan.padded_h = layer->in_h + 2 * layer->padding_h;
    plan.padded_w = layer->in_w + 2 * layer->padding_w;
    plan.plane = layer->out_h * layer->out_w;
    plan.pads = layer->padding_h > 0 || layer->padding_w > 0;
    plan.padded_plane = (size_t)plan.padded_h * (size_t)plan.padded_w;
    plan.padded_size = (size_t)plan.in_per_group * plan.padded_plane; /* one group's */
    plan.x_padded = scratch;
    plan.offset =
        (int32_t *)(void *)(plan.x_padded + (plan.pads && with_input ? plan.padded_size : 0));
    plan.run_offset = plan.offset + layer->fan_in;
    plan.delta_in_padded = (float *)(void *)(plan.run_offset + layer->fan_in);
    plan.patch = plan.delta_in_padded + (plan.pads && with_delta_in ? plan.padded_size : 0);
    plan.patch_delta = plan.patch + layer->fan_in;
    plan.position_start = (int32_t *)(void *)(plan.patch_delta + layer->fan_in);
    plan.position_order = plan.position_start + plan.plane + 1;
    {
        /* locals: the int32_t stores below could alias the layer's fields */
        int32_t *restrict offset = plan.offset, *restrict run_offset = plan.run_offset;
        const int32_t kernel_h = layer->kernel_h, kernel_w = layer->kernel_w;
        const int32_t dilation_w = layer->dilation_w;
        const int32_t row_step = layer->dilation_h * plan.padded_w;
        const int32_t channel_step = (int32_t)plan.padded_plane;
        int32_t r = 0;
        /* a kernel row is one run of kernel_w inputs when the dilation along the width is 1 */
        plan.run_length = dilation_w == 1 ? kernel_w : 1;
        if (plan.run_length == 1) with_offsets = 1; /* the runs are the taps */
        for (ic = 0; ic < plan.in_per_group; ic++) {
            for (kh = 0; kh < kernel_h; kh++) {
                const int32_t row = ic * channel_step + kh * row_step;
                run_offset[r++] = row; /* used when the kernel rows are runs (below) */
                if (with_offsets)
                    for (kw = 0; kw < kernel_w; kw++) offset[j++] = row + kw * dilation_w;
            }
        }
        plan.runs = layer->fan_in / plan.run_length;
        if (plan.run_length == 1)
            for (j = 0; j < plan.runs; j++) run_offset[j] = offset[j];
    }
    return plan;
}

/* The input channels of one group as the kernels read them: x itself, or their zero-padded
 * copy. */
TP_NO_LIBRARY_CALLS static const float *padded_input(const tp_layer *layer,
                                                     const tp_conv_plan *plan,
                                                     const float *x, int32_t group) {
    const int32_t in_w = layer->in_w;
    int32_t c, ih, iw;
    x += (size_t)group * (size_t)plan->in_per_group * (size_t)layer->in_h * (size_t)in_w;
    if (!plan->pads) return x;
    tp_zero(plan->x_padded, plan->padded_size);
    for (c = 0; c < plan->in_per_group; c++) {
        for (ih = 0; ih < layer->in_h; ih++) {
            float *restrict to = plan->x_padded + (size_t)c * plan->padded_plane +
                                 (size_t)(ih + layer->padding_h) * (size_t)plan->padded_w +
                                 (size_t)layer->padding_w;
            const float *restrict from =
                x + ((size_t)c * (size_t)layer->in_h + (size_t)ih) * (size_t)in_w;
            for (iw = 0; iw < in_w; iw++) to[iw] = from[iw];
        }
    }
    return plan->x_padded;
}

/* ---------------------------------------------------------------- forward */

/* Eight accumulators per channel as plain scalars (gcc's SLP vectoriser turns each channel's
 * eight into two vector registers; arrays would stay in memory). */
#define DECLARE8(a) float a##0 = 0.0f, a##1 = 0.0f, a##2 = 0.0f, a##3 = 0.0f, a##4 = 0.0f, \
                          a##5 = 0.0f, a##6 = 0.0f, a##7 = 0.0f
#define ACCUMULATE8(a, v)                                                                   \
    do {                                                                                    \
        a##0 += (v) * x0;                                                                   \
        a##1 += (v) * x1;                                                                   \
        a##2 += (v) * x2;                                                                   \
        a##3 += (v) * x3;                                                                   \
        a##4 += (v) * x4;                                                                   \
        a##5 += (v) * x5;                                                                   \
        a##6 += (v) * x6;                                                                   \
        a##7 += (v) * x7;                                                                   \
    } while (0)
#define STORE8(y, a)                                                                        \
    do {                                                                                    \
        (y)[0] = a##0;                                                                      \
        (y)[1] = a##1;                                                                      \
        (y)[2] = a##2;                                                                      \
        (y)[3] = a##3;                                                                      \
        (y)[4] = a##4;                                                                      \
        (y)[5] = a##5;                                                                      \
        (y)[6] = a##6;                                                                      \
        (y)[7] = a##7;                                                                      \
    } while (0)
#define LOAD8(xs)                                                                           \
    const float x0 = (xs)[0], x1 = (xs)[1], x2 = (xs)[2], x3 = (xs)[3], x4 = (xs)[4],       \
                x5 = (xs)[5], x6 = (xs)[6], x7 = (xs)[7]

/* 4 channels x 8 columns: y_c[t] = sum_j w_c[j] x[offset[j] + t] */
TP_VECTORISE_COLUMNS static void forward_block(const float *restrict w, int32_t fan_in,
                                               const int32_t *restrict offset,
                                               const float *restrict x, float *restrict y,
                                               size_t y_channel) {
    const float *restrict w0 = w;
    const float *restrict w1 = w0 + fan_in;
    const float *restrict w2 = w1 + fan_in;
    const float *restrict w3 = w2 + fan_in;
    DECLARE8(a);
    DECLARE8(b);
    DECLARE8(c);
    DECLARE8(d);
    int32_t j;
    for (j = 0; j < fan_in; j++) {
        LOAD8(x + offset[j]);
        const float v0 = w0[j], v1 = w1[j], v2 = w2[j], v3 = w3[j];
        ACCUMULATE8(a, v0);
        ACCUMULATE8(b, v1);
        ACCUMULATE8(c, v2);
        ACCUMULATE8(d, v3);
    }
    STORE8(y, a);
    STORE8(y + y_channel, b);
    STORE8(y + 2 * y_channel, c);
    STORE8(y + 3 * y_channel, d);
}

/* 1 channel x 8 columns */
TP_VECTORISE_COLUMNS static void forward_block_channel(const float *restrict w, int32_t fan_in,
                                                       const int32_t *restrict offset,
                                                       const float *restrict x,
                                                       float *restrict y) {
    DECLARE8(a);
    int32_t j;
    for (j = 0; j < fan_in; j++) {
        LOAD8(x + offset[j]);
        const float v = w[j];
        ACCUMULATE8(a, v);
    }
    STORE8(y, a);
}

#define DECLARE4(a) float a##0 = 0.0f, a##1 = 0.0f, a##2 = 0.0f, a##3 = 0.0f
#define ACCUMULATE4(a, v)                                                                   \
    do {                                                                                    \
        a##0 += (v) * x0;                                                                   \
        a##1 += (v) * x1;                                                                   \
        a##2 += (v) * x2;                                                                   \
        a##3 += (v) * x3;                                                                   \
    } while (0)
#define STORE4(y, a)                                                                        \
    do {                                                                                    \
        (y)[0] = a##0;                                                                      \
        (y)[1] = a##1;                                                                      \
        (y)[2] = a##2;                                                                      \
        (y)[3] = a##3;                                                                      \
    } while (0)

/* `block` (4 or 1) channels x 4 columns, for the columns after the blocks of 8 */
TP_VECTORISE_COLUMNS static void forward_block_narrow(const float *restrict w, int32_t block,
                                                      int32_t fan_in,
                                                      const int32_t *restrict offset,
                                                      const float *restrict x,
                                                      float *restrict y, size_t y_channel) {
    int32_t j, b;
    if (block == BLOCK_CHANNELS) {
        const float *restrict w0 = w;
        const float *restrict w1 = w0 + fan_in;
        const float *restrict w2 = w1 + fan_in;
        const float *restrict w3 = w2 + fan_in;
        DECLARE4(a);
        DECLARE4(b);
        DECLARE4(c);
        DECLARE4(d);
        for (j = 0; j < fan_in; j++) {
            const float *restrict xs = x + offset[j];
            const float x0 = xs[0], x1 = xs[1], x2 = xs[2], x3 = xs[3];
            const float v0 = w0[j], v1 = w1[j], v2 = w2[j], v3 = w3[j];
            ACCUMULATE4(a, v0);
            ACCUMULATE4(b, v1);
            ACCUMULATE4(c, v2);
            ACCUMULATE4(d, v3);
        }
        STORE4(y, a);
        STORE4(y + y_channel, b);
        STORE4(y + 2 * y_channel, c);
        STORE4(y + 3 * y_channel, d);
        return;
    }
    for (b = 0; b < block; b++) {
        const float *restrict wb = w + (size_t)b * (size_t)fan_in;
        DECLARE4(a);
        for (j = 0; j < fan_in; j++) {
            const float *restrict xs = x + offset[j];
            const float x0 = xs[0], x1 = xs[1], x2 = xs[2], x3 = xs[3];
            const float v = wb[j];
            ACCUMULATE4(a, v);
        }
        STORE4(y + (size_t)b * y_channel, a);
    }
}

/* 1 channel x 1 column (the columns left over after the blocks of 8) */
static float forward_point(const float *restrict w, int32_t fan_in,
                           const int32_t *restrict offset, const float *restrict x) {
    float a = 0.0f;
    int32_t j;
    for (j = 0; j < fan_in; j++) a += w[j] * x[offset[j]];
    return a;
}

/* 4 channels x 1 column (a row's one column left after the blocks of 8): y_c = sum_j w_c[j]
 * x[offset[j]], in the same order as every other kernel */
static void forward_point4(const float *restrict w, int32_t fan_in,
                           const int32_t *restrict offset, const float *restrict x,
                           float *restrict y, size_t y_channel) {
    const float *restrict w1 = w + fan_in;
    const float *restrict w2 = w1 + fan_in;
    const float *restrict w3 = w2 + fan_in;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    int32_t j;
    for (j = 0; j < fan_in; j++) {
        const float v = x[offset[j]];
        a0 += w[j] * v;
        a1 += w1[j] * v;
        a2 += w2[j] * v;
        a3 += w3[j] * v;
    }
    y[0] = a0;
    y[y_channel] = a1;
    y[2 * y_channel] = a2;
    y[3 * y_channel] = a3;
}

/* stride_w > 1: one output at a time, each a dot product of its weights with its patch */
static void forward_points(const tp_layer *layer, const tp_conv_plan *plan, const float *x,
                           float *y) {
    const size_t row_width = (size_t)(plan->pads ? plan->padded_w : layer->in_w);
    int32_t group, oc, oh, ow;
    for (group = 0; group < layer->groups; group++) {
        const float *x_group = padded_input(layer, plan, x, group);
        for (oc = group * plan->out_per_group; oc < (group + 1) * plan->out_per_group; oc++) {
            const float *w = layer->weight + (size_t)oc * (size_t)layer->fan_in;
            float *y_c = y + (size_t)oc * (size_t)plan->plane;
            for (oh = 0; oh < layer->out_h; oh++) {
                const float *x_row = x_group + (size_t)(oh * layer->stride_h) * row_width;
                for (ow = 0; ow < layer->out_w; ow++)
                    y_c[oh * layer->out_w + ow] = forward_point(
                        w, layer->fan_in, plan->offset, x_row + (size_t)(ow * layer->stride_w));
            }
        }
    }
}

void tp_conv_forward(const tp_layer *layer, const float *x, float *y, float *scratch, int relu) {
    const tp_conv_plan plan = conv_plan(layer, scratch, 1, 0, 1);
    const size_t out_plane = (size_t)plan.plane;
    const int32_t fan_in = layer->fan_in, out_w = layer->out_w;
    int32_t group, oc, oh, ow;
    /* a 1x1 conv with stride 1 and no padding reads its input plane as one long row */
    const int flat = layer->kernel_h == 1 && layer->kernel_w == 1 && layer->stride_h == 1 &&
                     layer->stride_w == 1 && !plan.pads;
    const int32_t rows = flat ? 1 : layer->out_h, row_width = flat ? plan.plane : out_w;
    if (layer->stride_w != 1) {
        forward_points(layer, &plan, x, y);
    } else {
        const size_t padded_w = (size_t)(plan.pads ? plan.padded_w : layer->in_w);
        for (group = 0; group < layer->groups; group++) {
            const float *x_group = padded_input(layer, &plan, x, group);
            const int32_t oc_end = (group + 1) * plan.out_per_group;
            for (oc = group * plan.out_per_group; oc < oc_end;) {
                const int32_t block = oc_end - oc >= BLOCK_CHANNELS ? BLOCK_CHANNELS : 1;
                const float *w = layer->weight + (size_t)oc * (size_t)fan_in;
                for (oh = 0; oh < rows; oh++) {
                    const float *x_row = x_group + (size_t)(oh * layer->stride_h) * padded_w;
                    float *y_row = y + (size_t)oc * out_plane + (size_t)oh * (size_t)row_width;
                    for (ow = 0; ow + BLOCK_COLUMNS <= row_width; ow += BLOCK_COLUMNS) {
                        if (block == BLOCK_CHANNELS)
                            forward_block(w, fan_in, plan.offset, x_row + ow, y_row + ow,
                                          out_plane);
                        else
                            forward_block_channel(w, fan_in, plan.offset, x_row + ow,
                                                  y_row + ow);
                    }
                    /* the columns left: blocks of 4, the last one ending at the row's end
                     * (a column computed twice gets the same value, summed in the same
                     * order) */
                    if (ow == row_width - 1 && block == BLOCK_CHANNELS) {
                        /* one column left: computing 4 to use 1 would cost more */
                        forward_point4(w, fan_in, plan.offset, x_row + ow, y_row + ow,
                                       out_plane);
                        ow++;
                    }
                    if (ow < row_width && row_width >= 4) {
                        for (; ow < row_width; ow += 4) {
                            if (ow + 4 > row_width) ow = row_width - 4;
                            forward_block_narrow(w, block, fan_in, plan.offset, x_row + ow,
                                                 y_row + ow, out_plane);
                        }
                    }
                    for (; ow < row_width; ow++) {
                        int32_t b;
                        for (b = 0; b < block; b++)
                            y_row[(size_t)b * out_plane + (size_t)ow] = forward_point(
                                w + (size_t)b * (size_t)fan_in, fan_in, plan.offset, x_row + ow);
                    }
                }
                oc += block;
            }
        }
    }
    if (layer->has_bias || relu) {
        /* the bias, and the ReLU (tp_relu_forward's expression) in the same pass */
        for (oc = 0; oc < layer->out_c; oc++) {
            float *restrict y_c = y + (size_t)oc * out_plane;
            const float b = layer->has_bias ? layer->bias[oc] : 0.0f;
            size_t p;
            if (!relu) {
                for (p = 0; p < out_plane; p++) y_c[p] += b;
            } else if (layer->has_bias) {
                for (p = 0; p < out_plane; p++) {
                    const float v = y_c[p] + b;
                    y_c[p] = v < 0.0f ? 0.0f : v;
                }
            } else {
                for (p = 0; p < out_plane; p++) y_c[p] = y_c[p] < 0.0f ? 0.0f : y_c[p];
            }
        }
    }
}

/* ---------------------------------------------------------------- backward */

/* two channels at one position: g0 += d0 patch, g1 += d1 patch, patch_delta += d0 w0 + d1 w1
 * (patch_delta = d0 w0 + d1 w1 for the position's first channels, `first`: the same floats as
 * zeroing it first, but for the sign of a zero, which the scatter's addition loses) */
static void backward_pair(const float *restrict patch, float *restrict patch_delta,
                          float *restrict g0, float *restrict g1, const float *restrict w0,
                          const float *restrict w1, float d0, float d1, int32_t n, int first) {
    int32_t j;
    if (patch_delta != NULL && first) {
        for (j = 0; j < n; j++) {
            const float p = patch[j];
            g0[j] += d0 * p;
            g1[j] += d1 * p;
            patch_delta[j] = d0 * w0[j] + d1 * w1[j];
        }
    } else if (patch_delta != NULL) {
        for (j = 0; j < n; j++) {
            const float p = patch[j];
            g0[j] += d0 * p;
            g1[j] += d1 * p;
            patch_delta[j] += d0 * w0[j] + d1 * w1[j];
        }
    } else {
        for (j = 0; j < n; j++) {
            const float p = patch[j];
            g0[j] += d0 * p;
            g1[j] += d1 * p;
        }
    }
}

static void backward_single(const float *restrict patch, float *restrict patch_delta,
                            float *restrict g, const float *restrict w, float d, int32_t n,
                            int first) {
    int32_t j;
    if (patch_delta != NULL && first) {
        for (j = 0; j < n; j++) {
            g[j] += d * patch[j];
            patch_delta[j] = d * w[j];
        }
    } else if (patch_delta != NULL) {
        for (j = 0; j < n; j++) {
            g[j] += d * patch[j];
            patch_delta[j] += d * w[j];
        }
    } else {
        for (j = 0; j < n; j++) g[j] += d * patch[j];
    }
}

/* patch[j] = x[offset[j]], copied run by run (kernel widths 3 and 5 unrolled; no memcpy
 * call for a few floats) */
TP_NO_LIBRARY_CALLS static void gather_patch(const tp_conv_plan *plan, const float *restrict x,
                                             float *restrict patch) {
    const int32_t runs = plan->runs, length = plan->run_length;
    const int32_t *restrict run_offset = plan->run_offset;
    int32_t r, t;
    if (length == 5) {
        for (r = 0; r < runs; r++, patch += 5) {
            const float *restrict from = x + run_offset[r];
            patch[0] = from[0];
            patch[1] = from[1];
            patch[2] = from[2];
            patch[3] = from[3];
            patch[4] = from[4];
        }
    } else if (length == 3) {
        for (r = 0; r < runs; r++, patch += 3) {
            const float *restrict from = x + run_offset[r];
            patch[0] = from[0];
            patch[1] = from[1];
            patch[2] = from[2];
        }
    } else {
        for (r = 0; r < runs; r++, patch += length) {
            const float *restrict from = x + run_offset[r];
            for (t = 0; t < length; t++) patch[t] = from[t];
        }
    }
}

/* target[offset[j]] += patch_delta[j], run by run */
TP_NO_LIBRARY_CALLS static void scatter_patch(const tp_conv_plan *plan,
                                              const float *restrict patch_delta,
                                              float *restrict target) {
    const int32_t runs = plan->runs, length = plan->run_length;
    const int32_t *restrict run_offset = plan->run_offset;
    int32_t r, t;
    if (length == 5) {
        for (r = 0; r < runs; r++, patch_delta += 5) {
            float *restrict to = target + run_offset[r];
            to[0] += patch_delta[0];
            to[1] += patch_delta[1];
            to[2] += patch_delta[2];
            to[3] += patch_delta[3];
            to[4] += patch_delta[4];
        }
    } else if (length == 3) {
        for (r = 0; r < runs; r++, patch_delta += 3) {
            float *restrict to = target + run_offset[r];
            to[0] += patch_delta[0];
            to[1] += patch_delta[1];
            to[2] += patch_delta[2];
        }
    } else {
        for (r = 0; r < runs; r++, patch_delta += length) {
            float *restrict to = target + run_offset[r];
            for (t = 0; t < length; t++) to[t] += patch_delta[t];
        }
    }
}

/* Where the patch of output position p starts in one group's (padded) input. */
static size_t position_base(const tp_layer *layer, const tp_conv_plan *plan, int32_t p) {
    const int32_t oh = p / layer->out_w, ow = p - oh * layer->out_w;
    return (size_t)(oh * layer->stride_h) *
               (size_t)(plan->pads ? plan->padded_w : layer->in_w) +
           (size_t)(ow * layer->stride_w);
}

/* A bias-only layer (frozen weight) at output position p: only the patch gradient of the
 * channels channels[0..count) (two per pass, as below), scattered back; the input is not
 * read. */
static void input_error_position(const tp_layer *layer, const tp_conv_plan *plan,
                                 float *delta_in_target, const float *delta, int32_t p,
                                 const int32_t *channels, int32_t count) {
    const int32_t fan_in = layer->fan_in;
    float *restrict patch_delta = plan->patch_delta;
    int32_t i, j, pending = -1;
    float pending_delta = 0.0f;
    int first = 1;
    for (i = 0; i < count; i++) {
        const int32_t c = channels[i];
        const float d = delta[(size_t)c * (size_t)plan->plane + (size_t)p];
        const float *restrict w0, *restrict w1;
        if ((TP_SKIP_ZERO_ERRORS || layer->skip_zero_errors) && d == 0.0f) continue;
        if (pending < 0) {
            pending = c;
            pending_delta = d;
            continue;
        }
        w0 = layer->weight + (size_t)pending * (size_t)fan_in;
        w1 = layer->weight + (size_t)c * (size_t)fan_in;
        if (first)
            for (j = 0; j < fan_in; j++) patch_delta[j] = pending_delta * w0[j] + d * w1[j];
        else
            for (j = 0; j < fan_in; j++) patch_delta[j] += pending_delta * w0[j] + d * w1[j];
        pending = -1;
        first = 0;
    }
    if (pending >= 0) {
        const float *restrict w = layer->weight + (size_t)pending * (size_t)fan_in;
        if (first)
            for (j = 0; j < fan_in; j++) patch_delta[j] = pending_delta * w[j];
        else
            for (j = 0; j < fan_in; j++) patch_delta[j] += pending_delta * w[j];
        first = 0;
    }
    if (!first) scatter_patch(plan, patch_delta, delta_in_target + position_base(layer, plan, p));
}

/* The channels channels[0..count) (ascending, all of one group, whose input and input error
 * `source` and `delta_in_target` hold) at output position p: gather the patch once, update
 * every channel's weight-gradient row and the patch gradient, scatter it back (a bias-only
 * layer: the patch gradient only). */
static void backward_position(tp_layer *layer, const tp_conv_plan *plan, const float *source,
                              float *delta_in_target, const float *delta, int32_t p,
                              const int32_t *channels, int32_t count) {
    const int32_t fan_in = layer->fan_in;
    const size_t at = position_base(layer, plan, p);
    float *restrict patch = plan->patch;
    float *restrict patch_delta = delta_in_target != NULL ? plan->patch_delta : NULL;
    int32_t i, pending = -1;
    float pending_delta = 0.0f;
    int first = 1; /* patch_delta not written yet at this position */
    if (layer->bias_only) {
        if (delta_in_target != NULL)
            input_error_position(layer, plan, delta_in_target, delta, p, channels, count);
        return;
    }
    gather_patch(plan, source + at, patch);
    for (i = 0; i < count; i++) {
        const int32_t c = channels[i];
        const float d = delta[(size_t)c * (size_t)plan->plane + (size_t)p];
        if ((TP_SKIP_ZERO_ERRORS || layer->skip_zero_errors) && d == 0.0f) continue;
        if (pending < 0) {
            pending = c;
            pending_delta = d;
            continue;
        }
        backward_pair(patch, patch_delta, layer->grad_weight + (size_t)pending * (size_t)fan_in,
                      layer->grad_weight + (size_t)c * (size_t)fan_in,
                      layer->weight + (size_t)pending * (size_t)fan_in,
                      layer->weight + (size_t)c * (size_t)fan_in, pending_delta, d, fan_in,
                      first);
        pending = -1;
        first = 0;
    }
    if (pending >= 0) {
        backward_single(patch, patch_delta, layer->grad_weight + (size_t)pending * (size_t)fan_in,
                        layer->weight + (size_t)pending * (size_t)fan_in, pending_delta, fan_in,
                        first);
        first = 0;
    }
    if (patch_delta != NULL && !first) scatter_patch(plan, patch_delta, delta_in_target + at);
}

/* delta_in (one group's channels) = the interior of the padded input gradient */
TP_NO_LIBRARY_CALLS static void unpad_delta_in(const tp_layer *layer, const tp_conv_plan *plan,
                                               float *delta_in) {
    const int32_t in_w = layer->in_w;
    int32_t ic, ih, iw;
    for (ic = 0; ic < plan->in_per_group; ic++) {
        for (ih = 0; ih < layer->in_h; ih++) {
            float *restrict to =
                delta_in + ((size_t)ic * (size_t)layer->in_h + (size_t)ih) * (size_t)in_w;
            const float *restrict from = plan->delta_in_padded + (size_t)ic * plan->padded_plane +
                                         (size_t)(ih + layer->padding_h) * (size_t)plan->padded_w +
                                         (size_t)layer->padding_w;
            for (iw = 0; iw < in_w; iw++) to[iw] = from[iw];
        }
    }
}

/* Group by group (one group: the whole layer): its padded input and input error live in the
 * scratch while its channels run, position by position. Every input entry belongs to one
 * group, so it gets the same additions in the same order as position-major over all
 * channels. */
void tp_conv_backward(tp_layer *layer, const float *x, const float *delta, const int32_t *kept,
                      int32_t k, float *delta_in, float *scratch, int32_t *order, int bias_done) {
    const tp_conv_plan plan = conv_plan(layer, scratch, 0, delta_in != NULL, !layer->bias_only);
    const size_t group_inputs =
        (size_t)plan.in_per_group * (size_t)layer->in_h * (size_t)layer->in_w;
    const int32_t per_group = plan.out_per_group;
    int32_t p, n, group, next = 0;
    if (delta_in != NULL && !plan.pads) tp_zero(delta_in, (size_t)tp_layer_input_size(layer));
    for (n = 0; n < layer->out_c; n++) plan.position_order[n] = n;
    for (group = 0; group < layer->groups; group++) {
        const float *source = layer->bias_only ? NULL : padded_input(layer, &plan, x, group);
        float *target = NULL;
        if (delta_in != NULL) {
            target = plan.pads ? plan.delta_in_padded : delta_in + (size_t)group * group_inputs;
            if (plan.pads) tp_zero(target, plan.padded_size);
        }
        if (kept == NULL) {
            /* every channel of the group at every position */
            for (p = 0; p < plan.plane; p++)
                backward_position(layer, &plan, source, target, delta, p,
                                  plan.position_order + (size_t)group * (size_t)per_group,
                                  per_group);
        } else {
            /* the group's kept entries (c * plane + p ascending: a run of kept), sorted by
             * position (counting sort); each position's channels keep their order */
            int32_t *start = plan.position_start;
            const int32_t begin = next;
            const int32_t end_index = (group + 1) * per_group * plan.plane;
            while (next < k && kept[next] < end_index) next++;
            memset(start, 0, (size_t)(plan.plane + 1) * sizeof(int32_t));
            for (n = begin; n < next; n++) start[kept[n] % plan.plane + 1]++;
            for (p = 0; p < plan.plane; p++) start[p + 1] += start[p];
            for (n = begin; n < next; n++)
                order[begin + start[kept[n] % plan.plane]++] = kept[n] / plan.plane;
            /* start[p] now ends position p's run, which begins where p - 1's ended */
            for (p = 0; p < plan.plane; p++) {
                const int32_t first = p == 0 ? 0 : start[p - 1];
                if (start[p] > first)
                    backward_position(layer, &plan, source, target, delta, p,
                                      order + begin + first, start[p] - first);
            }
        }
        if (delta_in != NULL && plan.pads)
            unpad_delta_in(layer, &plan, delta_in + (size_t)group * group_inputs);
    }
    if (layer->has_bias && !bias_done) {
        int32_t oc;
        for (oc = 0; oc < layer->out_c; oc++) {
            const float *d_c = delta + (size_t)oc * (size_t)plan.plane;
            float sum = 0.0f;
            for (p = 0; p < plan.plane; p++) sum += d_c[p];
            layer->grad_bias[oc] += sum;
        }
    }
}
