/* fuzz_train.c: libFuzzer harness for the training step (make -C runtime fuzz).
 *
 * The fuzz input chooses a small model (layer kinds, activations among them, sizes, kernels,
 * strides, paddings, groups),
 * a policy and its settings (including out-of-range ones), an optimizer, a batch size, the
 * inputs (any float bit patterns: NaN, inf, huge) and the labels (also out of range), fed as
 * whole batches or one sample at a time (tp_batch_add, sometimes too few or too many, sometimes
 * shortened), and now and then one initial weight replaced by any float (NaN, inf). The
 * arena is exactly tp_arena_bytes long, so AddressSanitizer catches any write past it;
 * every function must return a status instead of crashing.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tinyprop.h"

typedef struct {
    const uint8_t *data;
    size_t size, at;
} reader;

static uint8_t byte(reader *r) { return r->at < r->size ? r->data[r->at++] : 0; }
static float any_float(reader *r) {
    uint32_t bits = 0;
    int i;
    for (i = 0; i < 4; i++) bits = bits << 8 | byte(r);
    {
        float value;
        memcpy(&value, &bits, sizeof value);
        return value;
    }
}
static double setting(reader *r) { /* mostly sensible, sometimes out of range */
    const uint8_t b = byte(r);
    return b < 240 ? (double)b / 200.0 : (double)any_float(r);
}

/* sgd_in_place: a trained layer's kept bound on max |W| (activation[0], 0 when not known) is
 * at least its weights' max |W| after every sample, trained, skipped or refused */
static void check_weight_bounds(const tp_model *model) {
    int32_t i;
    size_t j;
    if (!model->memory.sgd_in_place) return;
    for (i = 0; i < model->layer_count; i++) {
        const tp_layer *layer = &model->layers[i];
        if (!layer->trained || !(layer->activation[0] > 0.0f)) continue;
        for (j = 0; j < (size_t)layer->out_c * (size_t)layer->fan_in; j++)
            if (!(fabsf(layer->weight[j]) <= layer->activation[0])) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    reader r = {data, size, 0};
    tp_layer_spec layers[8];
    tp_model_spec spec;
    tp_policy_config policy;
    tp_optimizer_config optimizer;
    static tp_model model;
    tp_step_stats stats;
    size_t bytes = 0;
    int32_t count = 1 + byte(&r) % 8, i, batch, step;
    void *arena;
    float *x;
    int32_t labels[6], keep[6 * 8];
    uint8_t mask[6];
    static float weights[1 << 20]; /* every layer's initial weights (frozen layers read them) */
    /* LeakyReLU's, ELU's slope or alpha (-0.2 refused); CELU's, Hardtanh's pair from there */
    static const float slopes[5] = {0.01f, 0.0f, 0.3f, -0.2f, 0.5f};
    tp_memory_config memory;
    int32_t poke;
    float saved = 0.0f;
    memset(layers, 0, sizeof layers);
    if (weights[0] == 0.0f)
        for (i = 0; i < (1 << 20); i++) /* (i * 7919) % 201 without overflowing int32 */
            weights[i] = (float)((int32_t)(((int64_t)i * 7919) % 201) - 100) / 400.0f;
    spec.input_channels = 1 + byte(&r) % 4;
    spec.input_height = 1 + byte(&r) % 8;
    spec.input_width = 1 + byte(&r) % 8;
    spec.layer_count = count;
    spec.layers = layers;
    for (i = 0; i < count; i++) {
        tp_layer_spec *l = &layers[i];
        l->kind = (tp_layer_kind)(byte(&r) % 21); /* 20 is not a kind */
        l->out_channels = (int32_t)(byte(&r) % 10) - 1;
        l->kernel_h = byte(&r) % 4;
        l->kernel_w = byte(&r) % 4;
        l->stride_h = byte(&r) % 3;
        l->stride_w = byte(&r) % 3;
        l->padding_h = byte(&r) % 3;
        l->padding_w = byte(&r) % 3;
        l->dilation_h = byte(&r) % 3;
        l->dilation_w = byte(&r) % 3;
        l->groups = byte(&r) % 4;
        l->has_bias = byte(&r) % 3;
        l->weight = byte(&r) % 4 ? weights : NULL; /* NULL: zeros, or an error when frozen */
        l->bias = weights;
        if (l->kind == TP_LAYER_LEAKY_RELU || l->kind == TP_LAYER_ELU || /* default, 0, a */
            l->kind == TP_LAYER_CELU || l->kind == TP_LAYER_HARDTANH)     /* fraction, or */
            l->weight = byte(&r) % 4 ? &slopes[byte(&r) % 4] : NULL;    /* refused */
    }
    policy.policy = (tp_policy)(byte(&r) % 5);
    policy.s_min = setting(&r);
    policy.s_max = setting(&r);
    policy.zeta = setting(&r);
    policy.ratio = setting(&r);
    policy.d_min = setting(&r);
    policy.d_max = setting(&r);
    policy.beta = setting(&r);
    policy.skip_threshold = setting(&r);
    optimizer = byte(&r) % 2 ? tp_adam(setting(&r), setting(&r) / 10.0)
                             : tp_sgd(setting(&r), setting(&r), setting(&r) / 10.0);
    batch = (int32_t)(byte(&r) % 7); /* 0 is invalid */
    memory.first_trained_layer = (int32_t)(byte(&r) % 4); /* may be past the last one */
    memory.sgd_in_place = byte(&r) % 3 == 0;            /* an error with Adam or momentum */
    memory.bias_only_layers = byte(&r) % 2 ? 0u : (uint32_t)(byte(&r) % 16); /* may be invalid */
    memory.momentum_in_place = byte(&r) % 4 == 0;  /* an error without SGD momentum */
    memory.selection_in_place = byte(&r) % 2 == 0; /* an error with sgd_in_place */
    memory.adam_in_place = byte(&r) % 4 == 0;      /* an error without Adam */
    memory.moment_bits = byte(&r) % 3 == 0 ? 8 : 32; /* 8: an error without Adam */
    memory.recompute_layers = byte(&r) % 2 ? 0u : (uint32_t)(byte(&r) % 16); /* may be invalid */
    poke = byte(&r) % 8 == 0 ? (int32_t)(byte(&r) % 64) : -1; /* a hostile initial weight */
    if (tp_arena_bytes_mode(&spec, &policy, &optimizer, &memory, &bytes) != TP_OK) return 0;
    if (bytes > (1u << 22)) return 0;
    arena = malloc(bytes);
    x = malloc(sizeof(float) * 6 * (size_t)(spec.input_channels * spec.input_height *
                                           spec.input_width));
    if (arena == NULL || x == NULL) abort();
    if (poke >= 0) {
        saved = weights[poke];
        weights[poke] = any_float(&r); /* NaN, inf or huge: TP_ERR_NONFINITE or trained */
    }
    if (tp_init_mode(&model, &spec, &policy, &optimizer, &memory, arena, bytes) == TP_OK &&
        model.total_parameter_count <= (1u << 20)) { /* frozen weights within `weights` */
        const int32_t n = spec.input_channels * spec.input_height * spec.input_width;
        const int in_place = memory.sgd_in_place || memory.adam_in_place;
        if (model.arena_bytes_used != bytes) abort(); /* the size said is the size used */
        for (step = 0; step < 3; step++) {
            for (i = 0; i < 6 * n; i++) x[i] = byte(&r) < 250 ? (float)(int8_t)byte(&r) / 16.0f
                                                               : any_float(&r);
            for (i = 0; i < 6; i++) labels[i] = (int32_t)(byte(&r) % 16) - 1;
            if (byte(&r) % 2) {
                (void)tp_train_batch(&model, x, labels, batch, &stats, keep, mask);
                check_weight_bounds(&model);
            } else { /* one sample at a time: sometimes too few or too many before the end */
                tp_batch pending;
                const int32_t adds = (int32_t)(byte(&r) % 7);
                if (tp_batch_begin(&model, &pending, batch) == TP_OK) {
                    for (i = 0; i < adds; i++) {
                        /* in place, a refused sample leaves every layer as it was */
                        const size_t count = model.total_parameter_count;
                        float *before = in_place ? malloc(2 * count * sizeof(float) + 4) : NULL;
                        if (in_place && before == NULL) abort();
                        if (in_place) (void)tp_read_parameters(&model, before, count);
                        if (tp_batch_add(&model, &pending, x + (size_t)i * (size_t)n, labels[i],
                                         keep + (size_t)i * (size_t)model.trainable_count,
                                         mask + i) == TP_ERR_NONFINITE &&
                            in_place) {
                            (void)tp_read_parameters(&model, before + count, count);
                            if (memcmp(before, before + count, count * sizeof(float)) != 0)
                                abort();
                        }
                        free(before);
                        check_weight_bounds(&model);
                    }
                    if (adds < batch && byte(&r) % 2) /* the input ended early */
                        (void)tp_batch_shorten(&model, &pending);
                    (void)tp_batch_end(&model, &pending, &stats);
                }
            }
        }
        {
            float logits[64];
            int32_t predicted;
            if (model.class_count <= 64) (void)tp_predict(&model, x, logits, &predicted);
        }
    }
    if (poke >= 0) weights[poke] = saved;
    free(x);
    free(arena);
    return 0;
}
