/* tp_internal.h: declarations shared by the runtime's source files (not part of the API). */
#ifndef TP_INTERNAL_H
#define TP_INTERNAL_H

#include "tinyprop.h"

/* -ffast-math (-Ofast, -ffinite-math-only) lets the compiler assume no NaN or infinity: every
 * isfinite() check is compiled away, and a NaN input or an overflowing gradient is trained
 * into the weights with status ok. */
#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__
#error "the tinyprop runtime checks for NaN and infinity: build it without -ffast-math / -Ofast, or add -fno-finite-math-only"
#endif

#define TP_MAGIC 0x54505632u /* "TPV2" */

/* ---- model.c */
/* Fill `layer` (shapes, fan_in) from its spec and the input shape; no pointers. */
tp_status tp_layer_shape(const tp_layer_spec *spec, int32_t in_c, int32_t in_h, int32_t in_w,
                         tp_layer *layer);
tp_status tp_check_policy(const tp_policy_config *policy);
tp_status tp_check_optimizer(const tp_optimizer_config *optimizer);
int32_t tp_layer_output_size(const tp_layer *layer);
int32_t tp_layer_input_size(const tp_layer *layer);
int tp_layer_is_trainable(tp_layer_kind kind);

/* ---- activations.c: elementwise activations. ReLU, ReLU6, LeakyReLU, Sigmoid, Tanh, ELU,
 * CELU, SELU, Hardtanh work in place, their derivative from their output; SiLU, GELU,
 * Hardswish, Hardsigmoid, Mish write
 * an output of their own, their derivative from their input (tp_activation_reads_input) */
int tp_is_activation(tp_layer_kind kind);
/* inline, not a call: the arena plan's frame (the deepest stack on a device) stays as it was */
static inline int tp_activation_reads_input(tp_layer_kind kind) {
    return kind >= TP_LAYER_SILU && kind <= TP_LAYER_MISH;
}
/* y may be x (in place) for the first family */
void tp_activation_forward(const tp_layer *layer, const float *x, float *y, int32_t n);
/* delta *= the derivative, from the activation's output y (first family) */
void tp_activation_backward(const tp_layer *layer, const float *y, float *delta, int32_t n);
/* delta *= the derivative, from the activation's input x (second family) */
void tp_activation_backward_input(const tp_layer *layer, const float *x, float *delta,
                                  int32_t n);
/* The largest |derivative| the backward above multiplies delta by, given a finite output
 * (first family) or an input of at most TP_GAIN_INPUT_LIMIT in magnitude (second family; GELU
 * tanh's x^3 overflows beyond it) */
#define TP_GAIN_INPUT_LIMIT 1e15
double tp_activation_gain(const tp_layer *layer);

/* ---- plan.c: the arena plan (see plan.c for the lifetimes and the placement) */
/* at most 9 transient buffers per layer (output, forward and backward scratch, input error,
 * selection, in-place gradient, recomputed input, its partner and scratch) and the loss error */
#define TP_MAX_BUFFERS (9 * TP_MAX_LAYERS + 1)
typedef enum {
    TP_BUFFER_OUTPUT = 0,
    TP_BUFFER_FORWARD_SCRATCH = 1,
    TP_BUFFER_LOSS_DELTA = 2,
    TP_BUFFER_INPUT_DELTA = 3,
    TP_BUFFER_BACKWARD_SCRATCH = 4,
    TP_BUFFER_SELECTION = 5,
    TP_BUFFER_GRADIENT = 6,
    TP_BUFFER_RELU_MASK = 7,
    TP_BUFFER_RECOMPUTED_INPUT = 8,
    TP_BUFFER_RECOMPUTE_PARTNER = 9,
    TP_BUFFER_RECOMPUTE_SCRATCH = 10
} tp_buffer_use;
/* 12 bytes a record (the plan holds TP_MAX_BUFFERS of them on the stack of tp_init_mode and
 * tp_arena_bytes_mode): the size and the use packed in one word, the layer not stored (its
 * first step tells it, tp_buffer_layer) */
typedef struct {
    uint32_t size_use;   /* floats (bits 0-27: a buffer holds at most 2^26) | use << 28 */
    uint32_t offset;     /* in floats (every buffer holds 4-byte floats or int32s) */
    int16_t first, last; /* the steps it is alive */
} tp_buffer;
#define TP_BUFFER_SIZE_MASK ((1u << 28) - 1u)
static inline uint32_t tp_buffer_floats(const tp_buffer *buffer) {
    return buffer->size_use & TP_BUFFER_SIZE_MASK;
}
static inline tp_buffer_use tp_buffer_use_of(const tp_buffer *buffer) {
    return (tp_buffer_use)(buffer->size_use >> 28);
}
/* The layer a buffer belongs to (-1: the loss error): a forward-time buffer (an output, a
 * forward scratch, a ReLU mask) starts at its layer's forward, step i; every other one at its
 * layer's backward, step 2L - i. */
static inline int32_t tp_buffer_layer(const tp_buffer *buffer, int32_t layer_count) {
    const tp_buffer_use use = tp_buffer_use_of(buffer);
    if (use == TP_BUFFER_LOSS_DELTA) return -1;
    if (use == TP_BUFFER_OUTPUT || use == TP_BUFFER_FORWARD_SCRATCH || use == TP_BUFFER_RELU_MASK)
        return buffer->first;
    return 2 * layer_count - buffer->first;
}
typedef struct {
    size_t parameters, gradients, moments; /* persistent, in floats */
    size_t transient;                      /* the placed buffers' extent, in floats */
    int32_t first_trained, count;
    tp_buffer buffers[TP_MAX_BUFFERS];
} tp_arena_plan;
/* layers: shapes, `trained` and `input_is_sample` set (no pointers needed) */
tp_status tp_plan_arena(const tp_layer *layers, int32_t layer_count, int32_t class_count,
                        const tp_policy_config *policy, const tp_optimizer_config *optimizer,
                        const tp_memory_config *memory, tp_arena_plan *plan);
size_t tp_plan_floats(const tp_arena_plan *plan); /* the whole arena, in floats */
/* trained layer's moment blocks (moment_bits 8): its weight's (unless bias-only), its bias's */
size_t tp_moment_blocks(const tp_layer *layer);
/* a layer that aliases its input (Flatten, or an activation in place): no output buffer of
 * its own */
int tp_layer_aliases(const tp_layer *layer);
/* the layer whose recomputed input is layer i's output (i aliases its input, and so do the
 * layers up to the next one, which recomputes its input), or -1 */
int32_t tp_recompute_consumer(const tp_layer *layers, int32_t i, int32_t layer_count);
size_t tp_conv_forward_scratch_floats(const tp_layer *layer);
/* reads_input: 0 for a bias-only layer (no weight gradient: its input is not read) */
size_t tp_conv_backward_scratch_floats(const tp_layer *layer, int writes_input_delta,
                                       int reads_input);

/* ---- layers.c: one sample, (C, H, W) layout */
void tp_zero(float *p, size_t n); /* p[0..n) = 0 */
int tp_all_finite(const float *values, size_t n); /* 1 when no entry is NaN or infinite */
/* 1 when p (NULL included) may hold a float or int32: a multiple of 4 bytes */
int tp_aligned(const void *p);
void tp_dense_forward(const tp_layer *layer, const float *x, float *y);
/* conv.c; scratch: tp_conv_forward_scratch_floats(layer) floats */
/* relu: also apply the ReLU that follows in place (y = max(y, 0) in the bias pass) */
void tp_conv_forward(const tp_layer *layer, const float *x, float *y, float *scratch, int relu);
void tp_relu_forward(const float *x, float *y, int32_t n);
void tp_maxpool_forward(const tp_layer *layer, const float *x, float *y);
void tp_avgpool_forward(const tp_layer *layer, const float *x, float *y);
void tp_relu_backward(const float *y, float *delta, int32_t n);
/* a ReLU's output as bits (bit j of word j / 32: y[j] > 0), and the backward from them: the
 * same floats as tp_relu_backward from y (a bias-only layer's input is not kept) */
void tp_relu_mask(const float *y, uint32_t *mask, int32_t n);
void tp_relu_backward_mask(const uint32_t *mask, float *delta, int32_t n);
void tp_maxpool_backward(const tp_layer *layer, const float *x, const float *delta_out,
                         float *delta_in);
void tp_avgpool_backward(const tp_layer *layer, const float *delta_out, float *delta_in);
/* The same fused with the derivative of the ReLU before the pool (relu'(x) * pool backward in
 * one pass, the same floats); 0 (nothing done) where that does not apply. */
int tp_maxpool_relu_backward(const tp_layer *layer, const float *x, const float *delta_out,
                             float *delta_in);
int tp_avgpool_relu_backward(const tp_layer *layer, const float *relu_output,
                             const float *delta_out, float *delta_in);
/* Gradients from the kept output entries `kept` (count k), or from all when kept == NULL.
 * Adds to grad_weight (not for a bias-only layer, whose x may then be NULL); writes delta_in
 * (zeroed first) unless delta_in == NULL; adds the bias gradient unless bias_done. */
void tp_dense_backward(tp_layer *layer, const float *x, const float *delta, const int32_t *kept,
                       int32_t k, float *delta_in, int bias_done);
/* A dense or conv layer's bias gradient alone: each channel's sum of delta added to it. */
void tp_bias_gradient(tp_layer *layer, const float *delta);
/* bias_done: the bias gradient was already added (by the selection's gather); scratch:
 * tp_conv_backward_scratch_floats(layer, delta_in != NULL) floats; order: k int32s for the
 * position sort of the kept entries (unused when kept == NULL) */
void tp_conv_backward(tp_layer *layer, const float *x, const float *delta, const int32_t *kept,
                      int32_t k, float *delta_in, float *scratch, int32_t *order, int bias_done);

/* ---- selection.c */
float tp_local_error(const float *delta, int32_t n);
int32_t tp_keep_count(const tp_policy_config *policy, float local_error, float running_max,
                      double depth_scale, int32_t n);
/* Indices (ascending) of the k entries of largest |delta|; ties go to the lower index.
 * scratch: n floats. Returns nothing; writes k indices to kept. */
void tp_select_topk(const float *delta, int32_t n, int32_t k, float *scratch, int32_t *kept);
/* The same in two steps: the non-zero |delta| (in index order) to scratch and their indices to
 * kept, returning their count; then the selection from them (kept: n ints, as above). */
int32_t tp_gather_nonzero(const float *delta, int32_t n, float *scratch, int32_t *kept);
/* selection_in_place: the count of non-zero entries of delta, and in the same pass (the
 * floats of tp_gather_nonzero_sum / _bias) Y into *local_error (unless NULL) and, with
 * grad_bias, each row of `plane` entries' sum added to grad_bias[row]. Stores nothing else. */
int32_t tp_error_sums(const float *delta, int32_t n, float *local_error, int32_t plane,
                      float *grad_bias);
/* selection_in_place: set to zero the entries of delta that top-k does not keep (the k
 * largest |delta|, ties to the lower index; nothing when k >= nonzero), by a radix select
 * over the magnitudes' bits in `counts` (TP_RADIX_COUNTS entries) */
#define TP_RADIX_COUNTS 256
void tp_keep_topk_in_place(float *delta, int32_t n, int32_t k, int32_t nonzero,
                           uint32_t *counts);
/* the same, also writing Y of delta (tp_local_error's float) to *local_error; with grad_bias,
 * also adding the sum of each row of `plane` entries of delta to grad_bias[row] (the floats
 * of the conv backward's bias loop, which then is left out) */
int32_t tp_gather_nonzero_sum(const float *delta, int32_t n, float *scratch, int32_t *kept,
                              float *local_error, int32_t plane, float *grad_bias);
int32_t tp_gather_nonzero_bias(const float *delta, int32_t n, float *scratch, int32_t *kept,
                               int32_t plane, float *grad_bias);
void tp_select_topk_gathered(const float *delta, int32_t n, int32_t k, float *scratch,
                             int32_t *kept, int32_t nonzero);
int tp_skip_decision_trains(const tp_policy_config *policy, float output_error,
                            float running_max_output);

/* ---- loss.c: softmax cross-entropy of one sample; writes dloss/dlogits, returns the loss */
float tp_cross_entropy(const float *logits, int32_t classes, int32_t label, float *grad);

/* ---- optimizer.c */
void tp_optimizer_update(tp_model *model, int32_t batch);
/* momentum_in_place: scale the momentum buffer by momentum * batch before a batch's first
 * trained sample adds its gradient */
void tp_momentum_begin_batch(tp_model *model, int32_t batch);
/* one Adam step of a trained layer with its gradient divided by `batch` (grad_weight and
 * grad_bias; zero when `zero_gradient`), t = model->optimizer_steps, float or 8-bit moments */
void tp_adam_step_layer(tp_model *model, tp_layer *layer, int32_t batch, int zero_gradient);
/* sgd_in_place: one SGD step of a conv layer with its gradient buffer (one sample) */
void tp_sgd_step_layer(const tp_optimizer_config *optimizer, tp_layer *layer);
/* sgd_in_place: the step of a layer whose gradient is zero (weight decay only) */
void tp_sgd_decay_layer(const tp_optimizer_config *optimizer, tp_layer *layer);
/* sgd_in_place: a dense layer's backward that updates each weight where its gradient is
 * formed (after its input error has used it); the same floats as the buffered step */
void tp_dense_backward_sgd(tp_layer *layer, const tp_optimizer_config *optimizer,
                           const float *x, const float *delta, const int32_t *kept, int32_t k,
                           float *delta_in);

/* ---- ledger.c */
uint64_t tp_macs_forward(const tp_layer *layer);
uint64_t tp_macs_backward_dense(const tp_layer *layer, int is_first_trainable);
uint64_t tp_macs_backward(const tp_layer *layer, int32_t k, int is_first_trainable);
uint64_t tp_macs_selection(const tp_layer *layer, tp_policy policy);
void tp_ledger_add(tp_ledger *total, const tp_ledger *part);

/* ---- train.c: one sample (exported for instruction counting); x_max: max |x| when the
 * caller took it (tp_batch_add's finiteness check), else negative (the in-place bound reads x) */
tp_status tp_sample_step(tp_model *model, const float *x, float x_max, int32_t label,
                         float *loss, int *trained, int32_t *keep_row, tp_ledger *macs);
int tp_in_place_bounded(tp_model *model, const float *x, float x_max);
tp_status tp_forward_sample(tp_model *model, const float *x, const float **logits);

#endif
