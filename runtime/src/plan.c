/* plan.c: the arena plan. Persistent buffers first (the trained layers' parameters, their
 * gradients unless updated in place or gathered in the momentum buffer, optimizer state); then the transient buffers of one
 * training step, each placed by its lifetime where it overlaps no buffer alive at the same
 * time, so that memory is reused once a buffer's last reader (often its backward) has run.
 *
 * Time steps of a training step with L layers: the forward of layer i is step i, the loss is
 * step L, the backward of layer i is step 2L - i (the backward stops at the first trained
 * layer F). Transient buffers, created in this order (the order breaks ties in placement):
 *   for each layer i: its output (unless it aliases its input: Flatten, or a ReLU in place),
 *     alive from step i to its last reader (the next layers' forward, the loss, the backward
 *     of a trained layer (not bias-only), a pool or a SiLU-like activation (one with an output
 *     of its own, its derivative from its input) that reads it as input, the backward of a
 *     ReLU whose output it is, unless that ReLU keeps a mask); a conv's forward scratch (one
 *     group's padded input, tap offsets), alive at step i; from F on, a ReLU right before a
 *     bias-only layer: the bit mask of its output (ceil(N / 32) words), steps i to 2L - i;
 *   the loss error dloss/dlogits (class_count), from step L to its reader;
 *   for each layer j from L-1 down to F: the error of its input, written by a pool or a
 *     trained layer above F, from step 2L - j to the backward of the next layer below that is
 *     not a ReLU or Flatten (those work on it in place); a trained conv's backward scratch,
 *     the selection scratch of a trained layer (sparse policies: N values and N indices, or
 *     with selection_in_place TP_RADIX_COUNTS counts) and,
 *     with sgd_in_place a trained conv's gradient (adam_in_place: any trained layer's, its
 *     trained parameters), all alive at step 2L - j; with recompute_layers, for a layer j
 *     whose input is recomputed: that input (the largest output of the layers before j), alive
 *     from step 2L - j to the backward of a ReLU working in place on it; a partner of the same
 *     size where the recomputed outputs alternate (unless j writes an input error at least
 *     that large, which serves instead), and the largest forward scratch of the convs before
 *     j, both alive at step 2L - j.
 * Placement (greedy by size): buffers by decreasing size (ties: creation order), each at the
 * lowest offset (0 or the end of a placed buffer alive at an overlapping time) where it
 * overlaps no placed buffer alive at an overlapping time. The Python mirror
 * (tinyprop.export.arena) computes the same plan. */
#include "tp_internal.h"

/* the steps 0 .. 2L of a buffer's lifetime are int16 (tp_buffer): a larger build would wrap
 * them and overlap buffers that are alive together */
#if TP_MAX_LAYERS > 16383
#error "TP_MAX_LAYERS is at most 16383 (the arena plan's steps 0 .. 2 x layers are int16)"
#endif

/* one buffer at most 2^26 floats, all of them at most 2^30 (offsets are uint32); the whole
 * arena at most TP_ARENA_MAX_FLOATS (2 GiB - 4 bytes: its bytes fit an int32 and a 32-bit
 * size_t). Sums are taken in uint64_t or checked as they grow, so nothing wraps around a
 * 32-bit size_t. */
#define TP_PLAN_MAX_FLOATS ((size_t)1 << 26)
#define TP_ARENA_MAX_FLOATS (((uint64_t)1 << 29) - 1)

static size_t layer_parameters(const tp_layer *layer) {
    return (size_t)layer->out_c * (size_t)layer->fan_in + (layer->has_bias ? (size_t)layer->out_c : 0);
}

/* The parameters a trained layer keeps in the arena: a bias-only layer's bias. */
static size_t trained_parameters(const tp_layer *layer) {
    return layer->bias_only ? (size_t)layer->out_c : layer_parameters(layer);
}

size_t tp_moment_blocks(const tp_layer *layer) {
    const size_t block = TP_MOMENT_BLOCK;
    const size_t weights = (size_t)layer->out_c * (size_t)layer->fan_in;
    return (layer->bias_only ? 0 : (weights + block - 1) / block) +
           (layer->has_bias ? ((size_t)layer->out_c + block - 1) / block : 0);
}

int tp_layer_aliases(const tp_layer *layer) {
    return layer->kind == TP_LAYER_FLATTEN ||
           (tp_is_activation(layer->kind) && !tp_activation_reads_input(layer->kind) &&
            !layer->input_is_sample);
}

/* A layer whose backward works on the error in place: an activation or Flatten. */
static int passes_error_in_place(tp_layer_kind kind) {
    return tp_is_activation(kind) || kind == TP_LAYER_FLATTEN;
}

/* ... and that works on its input in place too (an activation with an output of its own,
 * SiLU and the like, ends a chain of layers sharing one buffer) */
static int works_in_place(tp_layer_kind kind) {
    return passes_error_in_place(kind) && !tp_activation_reads_input(kind);
}

int32_t tp_recompute_consumer(const tp_layer *layers, int32_t i, int32_t layer_count) {
    int32_t k = i + 1;
    if (!tp_layer_aliases(&layers[i])) return -1;
    while (k < layer_count && works_in_place(layers[k].kind)) k++;
    return k < layer_count && layers[k].recompute_input ? k : -1;
}

/* The last step that reads layer i's recomputed input: its backward, or the backward of an
 * activation working in place on it (among the layers right before i that alias their input). */
static int32_t recompute_reader(const tp_layer *layers, int32_t i, int32_t layer_count) {
    int32_t last = 2 * layer_count - i, k = i - 1;
    while (k > 0 && works_in_place(layers[k].kind)) {
        if (tp_is_activation(layers[k].kind)) last = 2 * layer_count - k;
        k--;
    }
    return last;
}

/* A ReLU (with its own output buffer or in place) right before a bias-only layer keeps a bit
 * mask of its output for its backward instead of the output. */
static int keeps_mask(const tp_layer *layers, int32_t i, int32_t layer_count) {
    return layers[i].kind == TP_LAYER_RELU && i + 1 < layer_count && layers[i + 1].bias_only;
}

/* One group's zero-padded input (a grouped conv pads one group at a time). */
static size_t padded_group_floats(const tp_layer *layer) {
    return (size_t)(layer->in_c / layer->groups) * (size_t)(layer->in_h + 2 * layer->padding_h) *
           (size_t)(layer->in_w + 2 * layer->padding_w);
}

/* A conv's forward scratch: its zero-padded input (one group's, when it pads) and two tables
 * of fan_in. */
size_t tp_conv_forward_scratch_floats(const tp_layer *layer) {
    const size_t padded = padded_group_floats(layer);
    const int pads = layer->padding_h > 0 || layer->padding_w > 0;
    return (pads ? padded : 0) + 2 * (size_t)layer->fan_in;
}

/* Its backward scratch: the same (without the padded input when it does not read its input:
 * a bias-only layer), the padded input error (when it pads and passes an error on), two patch
 * buffers of fan_in and the position sort (plane + 1 starts, out_c channels; a sparse policy
 * sorts its kept entries in the selection scratch instead). */
size_t tp_conv_backward_scratch_floats(const tp_layer *layer, int writes_input_delta,
                                       int reads_input) {
    const size_t padded = padded_group_floats(layer);
    const int pads = layer->padding_h > 0 || layer->padding_w > 0;
    return (pads && reads_input ? padded : 0) + 2 * (size_t)layer->fan_in +
           (pads && writes_input_delta ? padded : 0) +
           2 * (size_t)layer->fan_in + (size_t)layer->out_h * (size_t)layer->out_w + 1 +
           (size_t)layer->out_c;
}

static int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

static tp_status add_buffer(tp_arena_plan *plan, size_t floats, int32_t first, int32_t last,
                            tp_buffer_use use) {
    tp_buffer *buffer;
    if (floats == 0) return TP_OK;
    if (plan->count >= TP_MAX_BUFFERS) return TP_ERR_ARGUMENT;
    if (floats > TP_PLAN_MAX_FLOATS) return TP_ERR_SHAPE;
    buffer = &plan->buffers[plan->count++];
    buffer->size_use = (uint32_t)floats | (uint32_t)use << 28;
    buffer->first = (int16_t)first;
    buffer->last = (int16_t)last;
    buffer->offset = 0;
    return TP_OK;
}

/* The step of the backward that reads the error of layer j's input, which the layers below
 * with an in-place backward (ReLU, Flatten) pass on: the next layer below that is neither. */
static int32_t error_reader(const tp_layer *layers, int32_t j, int32_t layer_count) {
    int32_t k = j - 1;
    while (k > 0 && passes_error_in_place(layers[k].kind)) k--;
    return 2 * layer_count - k;
}

static int overlaps(const tp_buffer *a, const tp_buffer *b) {
    return a->first <= b->last && b->first <= a->last;
}

/* Sorts the buffers themselves into placement order (no index array: the plan's records are
 * the deepest stack on a device) and places them. */
static tp_status place(tp_arena_plan *plan) {
    tp_buffer *const buffers = plan->buffers;
    int32_t i, j, placed;
    uint64_t total = 0;
    for (i = 0; i < plan->count; i++) total += tp_buffer_floats(&buffers[i]);
    if (total > ((uint64_t)1 << 30)) return TP_ERR_SHAPE; /* offsets + sizes within uint32 */
    for (i = 1; i < plan->count; i++) { /* insertion sort (stable): larger first, then creation
                                           order */
        const tp_buffer current = buffers[i];
        const uint32_t floats = tp_buffer_floats(&current);
        for (j = i; j > 0 && tp_buffer_floats(&buffers[j - 1]) < floats; j--)
            buffers[j] = buffers[j - 1];
        buffers[j] = current;
    }
    plan->transient = 0;
    for (placed = 0; placed < plan->count; placed++) {
        tp_buffer *buffer = &buffers[placed];
        const uint32_t floats = tp_buffer_floats(buffer);
        uint32_t best = UINT32_MAX;
        int32_t c;
        for (c = -1; c < placed; c++) { /* candidates: 0 and the ends of placed buffers */
            uint32_t candidate;
            int fits = 1;
            if (c >= 0) {
                const tp_buffer *other = &buffers[c];
                if (!overlaps(buffer, other)) continue;
                candidate = other->offset + tp_buffer_floats(other);
            } else {
                candidate = 0;
            }
            if (candidate >= best) continue;
            for (j = 0; j < placed && fits; j++) {
                const tp_buffer *other = &buffers[j];
                fits = !overlaps(buffer, other) ||
                       candidate >= other->offset + tp_buffer_floats(other) ||
                       other->offset >= candidate + floats;
            }
            if (fits) best = candidate;
        }
        buffer->offset = best;
        if ((size_t)best + floats > plan->transient) plan->transient = (size_t)best + floats;
    }
    return TP_OK;
}

/* The buffers of layer i's recomputed input (see the top of this file). */
static tp_status add_recompute(tp_arena_plan *plan, const tp_layer *layers, int32_t i,
                               int32_t layer_count, int writes_input_delta) {
    const int32_t step = 2 * layer_count - i;
    size_t largest = 0, scratch = 0;
    int32_t j, outputs = 0;
    tp_status status;
    for (j = 0; j < i; j++) {
        if (!tp_layer_aliases(&layers[j])) {
            const size_t size = (size_t)tp_layer_output_size(&layers[j]);
            if (size > largest) largest = size;
            outputs++;
        }
        if (layers[j].kind == TP_LAYER_CONV2D && tp_conv_forward_scratch_floats(&layers[j]) > scratch)
            scratch = tp_conv_forward_scratch_floats(&layers[j]);
    }
    status = add_buffer(plan, largest, step, recompute_reader(layers, i, layer_count),
                        TP_BUFFER_RECOMPUTED_INPUT);
    if (status != TP_OK) return status;
    if (outputs > 1 && !(writes_input_delta && (size_t)tp_layer_input_size(&layers[i]) >= largest)) {
        status = add_buffer(plan, largest, step, step, TP_BUFFER_RECOMPUTE_PARTNER);
        if (status != TP_OK) return status;
    }
    return add_buffer(plan, scratch, step, step, TP_BUFFER_RECOMPUTE_SCRATCH);
}

tp_status tp_plan_arena(const tp_layer *layers, int32_t layer_count, int32_t class_count,
                        const tp_policy_config *policy, const tp_optimizer_config *optimizer,
                        const tp_memory_config *memory, tp_arena_plan *plan) {
    int16_t storage[TP_MAX_LAYERS], last_use[TP_MAX_LAYERS]; /* -1 .. 2L: int16, as the steps */
    const int32_t L = layer_count;
    int32_t i, first = -1;
    size_t blocks = 0;
    tp_status status;
    plan->count = 0;
    plan->parameters = 0;
    for (i = 0; i < L; i++) {
        if (layers[i].trained) {
            if (first < 0) first = i;
            plan->parameters += trained_parameters(&layers[i]); /* each at most 2^27 */
            blocks += tp_moment_blocks(&layers[i]);
            if (plan->parameters > TP_ARENA_MAX_FLOATS) return TP_ERR_SHAPE;
        }
    }
    if (first < 0) return TP_ERR_ARGUMENT;
    plan->first_trained = first;
    plan->gradients = memory->sgd_in_place || memory->adam_in_place || memory->momentum_in_place
                          ? 0
                          : plan->parameters;
    if (optimizer->kind == TP_OPTIMIZER_ADAM && memory->moment_bits == 8)
        /* two arrays of one-byte codes (each rounded up to whole floats), two block maxima */
        plan->moments = 2 * ((plan->parameters + 3) / 4) + 2 * blocks;
    else
        plan->moments = optimizer->kind == TP_OPTIMIZER_ADAM ? 2 * plan->parameters
                        : optimizer->momentum != 0.0       ? plan->parameters
                                                           : 0;
    /* which layer's buffer holds each output (-1: the sample), and its last reader */
    for (i = 0; i < L; i++) {
        const int aliases = tp_layer_aliases(&layers[i]);
        storage[i] = (int16_t)(aliases ? (i > 0 ? storage[i - 1] : -1) : i);
        last_use[i] = (int16_t)i;
    }
    for (i = 0; i < L; i++) {
        const int32_t input = i > 0 ? storage[i - 1] : -1;
        const tp_layer_kind kind = layers[i].kind;
        if (input >= 0) last_use[input] = (int16_t)max_i32(last_use[input], i);
        if (i < first) continue;
        if (input >= 0 &&
            ((layers[i].trained && !layers[i].bias_only && !layers[i].recompute_input) ||
             kind == TP_LAYER_MAXPOOL || kind == TP_LAYER_AVGPOOL ||
             tp_activation_reads_input(kind)))
            last_use[input] = (int16_t)max_i32(last_use[input], 2 * L - i);
        if (tp_is_activation(kind) && !tp_activation_reads_input(kind) && storage[i] >= 0 &&
            !keeps_mask(layers, i, L) && tp_recompute_consumer(layers, i, L) < 0)
            last_use[storage[i]] = (int16_t)max_i32(last_use[storage[i]], 2 * L - i);
    }
    if (storage[L - 1] >= 0)
        last_use[storage[L - 1]] = (int16_t)max_i32(last_use[storage[L - 1]], L);
    for (i = 0; i < L; i++) {
        if (storage[i] == i) {
            status = add_buffer(plan, (size_t)tp_layer_output_size(&layers[i]), i, last_use[i],
                                TP_BUFFER_OUTPUT);
            if (status != TP_OK) return status;
        }
        if (layers[i].kind == TP_LAYER_CONV2D) {
            status = add_buffer(plan, tp_conv_forward_scratch_floats(&layers[i]), i, i,
                                TP_BUFFER_FORWARD_SCRATCH);
            if (status != TP_OK) return status;
        }
        if (i >= first && keeps_mask(layers, i, L)) {
            status = add_buffer(plan, (size_t)(tp_layer_output_size(&layers[i]) + 31) / 32, i,
                                2 * L - i, TP_BUFFER_RELU_MASK);
            if (status != TP_OK) return status;
        }
    }
    status = add_buffer(plan, (size_t)class_count, L, error_reader(layers, L, L),
                        TP_BUFFER_LOSS_DELTA);
    if (status != TP_OK) return status;
    for (i = L - 1; i >= first; i--) {
        const tp_layer *layer = &layers[i];
        const int32_t step = 2 * L - i;
        const int writer = i > first && (layer->trained || layer->kind == TP_LAYER_MAXPOOL ||
                                         layer->kind == TP_LAYER_AVGPOOL);
        if (writer) {
            status = add_buffer(plan, (size_t)tp_layer_input_size(layer), step,
                                error_reader(layers, i, L), TP_BUFFER_INPUT_DELTA);
            if (status != TP_OK) return status;
        }
        if (!layer->trained) continue;
        if (layer->kind == TP_LAYER_CONV2D) {
            status = add_buffer(plan, tp_conv_backward_scratch_floats(layer, i > first,
                                                                      !layer->bias_only),
                                step, step, TP_BUFFER_BACKWARD_SCRATCH);
            if (status != TP_OK) return status;
        }
        /* (a first trained layer that is bias-only selects nothing: its bias gradient is
         * dense, and it has no weight gradient or input error) */
        if (policy->policy != TP_POLICY_FULL && !(i == first && layer->bias_only)) {
            status = add_buffer(plan,
                                memory->selection_in_place
                                    ? TP_RADIX_COUNTS
                                    : 2 * (size_t)tp_layer_output_size(layer),
                                step, step, TP_BUFFER_SELECTION);
            if (status != TP_OK) return status;
        }
        if ((memory->sgd_in_place && layer->kind == TP_LAYER_CONV2D) || memory->adam_in_place) {
            status = add_buffer(plan, trained_parameters(layer), step, step, TP_BUFFER_GRADIENT);
            if (status != TP_OK) return status;
        }
        if (layer->recompute_input) {
            status = add_recompute(plan, layers, i, L, i > first);
            if (status != TP_OK) return status;
        }
    }
    status = place(plan);
    if (status != TP_OK) return status;
    if ((uint64_t)plan->parameters + plan->gradients + plan->moments + plan->transient >
        TP_ARENA_MAX_FLOATS)
        return TP_ERR_SHAPE;
    return TP_OK;
}

size_t tp_plan_floats(const tp_arena_plan *plan) {
    return plan->parameters + plan->gradients + plan->moments + plan->transient;
}
