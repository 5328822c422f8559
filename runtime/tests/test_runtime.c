/* test_runtime.c: unit tests of the C runtime, run plain and under AddressSanitizer + UBSan.
 *
 * Every arena is malloc'ed with exactly tp_arena_bytes bytes, so under ASan any write past
 * what the runtime said it needs aborts the test. Exit status 0 when all checks pass.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tinyprop.h"
#include "tp_internal.h"

#include "checks.h"

static unsigned long long rng_state = 88172645463325252ULL;
static float uniform(void) { /* xorshift64, in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static void fill(float *values, size_t n, float scale) {
    size_t i;
    for (i = 0; i < n; i++) values[i] = uniform() * scale;
}

/* ------------------------------------------------------------------ models under test */
static float mlp_w0[12 * 16], mlp_b0[12], mlp_w1[8 * 12], mlp_b1[8], mlp_w2[4 * 8], mlp_b2[4];
static tp_layer_spec mlp_layers[] = {
    TP_FLATTEN_SPEC(),
    TP_DENSE_SPEC(12, mlp_w0, mlp_b0), TP_RELU_SPEC(),
    TP_DENSE_SPEC(8, mlp_w1, mlp_b1), TP_RELU_SPEC(),
    TP_DENSE_SPEC(4, mlp_w2, mlp_b2),
};
static const tp_model_spec mlp_spec = {1, 4, 4, 6, mlp_layers};

/* conv (2->4, 3x3, pad 1), depthwise 3x3 stride 2, max pool, pointwise, avg pool, dense */
static float cnn_w0[4 * 2 * 9], cnn_b0[4], cnn_w1[4 * 9], cnn_b1[4], cnn_w2[6 * 4], cnn_w3[5 * 6];
static float cnn_b3[5];
static tp_layer_spec cnn_layers[] = {
    TP_CONV_SPEC(4, 3, 3, 1, 1, 1, 1, 1, cnn_w0, cnn_b0), TP_RELU_SPEC(),
    TP_CONV_SPEC(4, 3, 3, 2, 2, 1, 1, 4, cnn_w1, cnn_b1), TP_RELU_SPEC(),
    TP_MAXPOOL_SPEC(2, 2, 0, 0),
    {TP_LAYER_CONV2D, 6, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, cnn_w2, NULL}, TP_RELU_SPEC(),
    TP_AVGPOOL_SPEC(2, 2, 0, 0), TP_FLATTEN_SPEC(),
    TP_DENSE_SPEC(5, cnn_w3, cnn_b3),
};
static const tp_model_spec cnn_spec = {2, 8, 8, 10, cnn_layers};

/* 1-D CNN: conv1d k5 pad 2, relu, maxpool 2, conv1d, relu, avgpool, flatten, dense */
static float har_w0[8 * 3 * 5], har_b0[8], har_w1[8 * 8 * 5], har_b1[8], har_w2[3 * 8], har_b2[3];
static tp_layer_spec har_layers[] = {
    TP_CONV_SPEC(8, 1, 5, 1, 1, 0, 2, 1, har_w0, har_b0), TP_RELU_SPEC(),
    TP_MAXPOOL_SPEC(1, 2, 0, 0),
    TP_CONV_SPEC(8, 1, 5, 1, 1, 0, 2, 1, har_w1, har_b1), TP_RELU_SPEC(),
    TP_AVGPOOL_SPEC(1, 10, 0, 0), TP_FLATTEN_SPEC(),
    TP_DENSE_SPEC(3, har_w2, har_b2),
};
static const tp_model_spec har_spec = {3, 1, 20, 8, har_layers};

/* the other activations: Tanh on the sample itself, conv + ReLU6, max pool, pointwise conv +
 * LeakyReLU (slope 0.1), flatten, dense + Sigmoid, dense + Tanh, dense */
static float act_w0[4 * 2 * 9], act_b0[4], act_w1[3 * 4], act_b1[3], act_w2[6 * 27], act_b2[6];
static float act_w3[5 * 6], act_b3[5], act_w4[3 * 5], act_b4[3];
static const float act_slope = 0.1f;
static tp_layer_spec act_layers[] = {
    TP_ACTIVATION_SPEC(TP_LAYER_TANH),
    TP_CONV_SPEC(4, 3, 3, 1, 1, 1, 1, 1, act_w0, act_b0), TP_ACTIVATION_SPEC(TP_LAYER_RELU6),
    TP_MAXPOOL_SPEC(2, 2, 0, 0),
    TP_CONV_SPEC(3, 1, 1, 1, 1, 0, 0, 1, act_w1, act_b1), TP_LEAKY_RELU_SPEC(&act_slope),
    TP_FLATTEN_SPEC(),
    TP_DENSE_SPEC(6, act_w2, act_b2), TP_ACTIVATION_SPEC(TP_LAYER_SIGMOID),
    TP_DENSE_SPEC(5, act_w3, act_b3), TP_ACTIVATION_SPEC(TP_LAYER_TANH),
    TP_DENSE_SPEC(3, act_w4, act_b4),
};
static const tp_model_spec act_spec = {2, 6, 6, 12, act_layers};

/* the activations that take their derivative from their input (an output of their own): SiLU
 * on the sample itself, conv + Hardswish, max pool, pointwise conv + ReLU + GELU (after an
 * activation in place), flatten, dense + Mish + Tanh (in place after it), dense + GELU tanh,
 * dense + Hardsigmoid, dense */
static float sm_w0[4 * 2 * 9], sm_b0[4], sm_w1[3 * 4], sm_b1[3], sm_w2[6 * 27], sm_b2[6];
static float sm_w3[5 * 6], sm_b3[5], sm_w4[4 * 5], sm_b4[4], sm_w5[3 * 4], sm_b5[3];
static tp_layer_spec smooth_layers[] = {
    TP_ACTIVATION_SPEC(TP_LAYER_SILU),
    TP_CONV_SPEC(4, 3, 3, 1, 1, 1, 1, 1, sm_w0, sm_b0), TP_ACTIVATION_SPEC(TP_LAYER_HARDSWISH),
    TP_MAXPOOL_SPEC(2, 2, 0, 0),
    TP_CONV_SPEC(3, 1, 1, 1, 1, 0, 0, 1, sm_w1, sm_b1), TP_RELU_SPEC(),
    TP_ACTIVATION_SPEC(TP_LAYER_GELU), TP_FLATTEN_SPEC(),
    TP_DENSE_SPEC(6, sm_w2, sm_b2), TP_ACTIVATION_SPEC(TP_LAYER_MISH),
    TP_ACTIVATION_SPEC(TP_LAYER_TANH),
    TP_DENSE_SPEC(5, sm_w3, sm_b3), TP_ACTIVATION_SPEC(TP_LAYER_GELU_TANH),
    TP_DENSE_SPEC(4, sm_w4, sm_b4), TP_ACTIVATION_SPEC(TP_LAYER_HARDSIGMOID),
    TP_DENSE_SPEC(3, sm_w5, sm_b5),
};
static const tp_model_spec smooth_spec = {2, 6, 6, 16, smooth_layers};

/* the activations with settings that work in place (ELU, CELU, SELU, Hardtanh): ELU(0.5) on
 * the sample itself, conv + Hardtanh(-0.5, 0.8) (weights large enough to saturate it), max
 * pool, pointwise conv + CELU(0.7), flatten, dense + SELU, dense + ELU, dense */
static float el_w0[4 * 2 * 9], el_b0[4], el_w1[3 * 4], el_b1[3], el_w2[6 * 27], el_b2[6];
static float el_w3[5 * 6], el_b3[5], el_w4[3 * 5], el_b4[3];
static float el_alpha[1] = {0.5f}, el_celu[2] = {0.7f, (float)(1.0 / 0.7)};
static float el_hardtanh[2] = {-0.5f, 0.8f};
static tp_layer_spec elu_layers[] = {
    TP_ACTIVATION_SETTINGS_SPEC(TP_LAYER_ELU, el_alpha),
    TP_CONV_SPEC(4, 3, 3, 1, 1, 1, 1, 1, el_w0, el_b0),
    TP_ACTIVATION_SETTINGS_SPEC(TP_LAYER_HARDTANH, el_hardtanh),
    TP_MAXPOOL_SPEC(2, 2, 0, 0),
    TP_CONV_SPEC(3, 1, 1, 1, 1, 0, 0, 1, el_w1, el_b1),
    TP_ACTIVATION_SETTINGS_SPEC(TP_LAYER_CELU, el_celu), TP_FLATTEN_SPEC(),
    TP_DENSE_SPEC(6, el_w2, el_b2), TP_ACTIVATION_SPEC(TP_LAYER_SELU),
    TP_DENSE_SPEC(5, el_w3, el_b3), TP_ACTIVATION_SPEC(TP_LAYER_ELU),
    TP_DENSE_SPEC(3, el_w4, el_b4),
};
static const tp_model_spec elu_spec = {2, 6, 6, 12, elu_layers};

static void init_weights(void) {
    fill(mlp_w0, 12 * 16, 0.3f); fill(mlp_b0, 12, 0.1f);
    fill(mlp_w1, 8 * 12, 0.3f); fill(mlp_b1, 8, 0.1f);
    fill(mlp_w2, 4 * 8, 0.3f); fill(mlp_b2, 4, 0.1f);
    fill(cnn_w0, 4 * 2 * 9, 0.3f); fill(cnn_b0, 4, 0.1f);
    fill(cnn_w1, 4 * 9, 0.3f); fill(cnn_b1, 4, 0.1f);
    fill(cnn_w2, 6 * 4, 0.5f); fill(cnn_w3, 5 * 6, 0.4f); fill(cnn_b3, 5, 0.1f);
    fill(har_w0, 8 * 3 * 5, 0.3f); fill(har_b0, 8, 0.1f);
    fill(har_w1, 8 * 8 * 5, 0.2f); fill(har_b1, 8, 0.1f);
    fill(har_w2, 3 * 8, 0.4f); fill(har_b2, 3, 0.1f);
    fill(act_w0, 4 * 2 * 9, 0.5f); fill(act_b0, 4, 0.1f);
    fill(act_w1, 3 * 4, 0.5f); fill(act_b1, 3, 0.1f);
    fill(act_w2, 6 * 27, 0.4f); fill(act_b2, 6, 0.1f);
    fill(act_w3, 5 * 6, 0.6f); fill(act_b3, 5, 0.1f);
    fill(act_w4, 3 * 5, 0.6f); fill(act_b4, 3, 0.1f);
    fill(sm_w0, 4 * 2 * 9, 0.8f); fill(sm_b0, 4, 0.1f);
    fill(sm_w1, 3 * 4, 0.6f); fill(sm_b1, 3, 0.1f);
    fill(sm_w2, 6 * 27, 0.5f); fill(sm_b2, 6, 0.1f);
    fill(sm_w3, 5 * 6, 0.6f); fill(sm_b3, 5, 0.1f);
    fill(sm_w4, 4 * 5, 0.6f); fill(sm_b4, 4, 0.1f);
    fill(sm_w5, 3 * 4, 0.6f); fill(sm_b5, 3, 0.1f);
    fill(el_w0, 4 * 2 * 9, 0.5f); fill(el_b0, 4, 0.1f);
    fill(el_w1, 3 * 4, 0.6f); fill(el_b1, 3, 0.1f);
    fill(el_w2, 6 * 27, 0.4f); fill(el_b2, 6, 0.1f);
    fill(el_w3, 5 * 6, 0.6f); fill(el_b3, 5, 0.1f);
    fill(el_w4, 3 * 5, 0.6f); fill(el_b4, 3, 0.1f);
}

/* A model with a malloc'ed arena of exactly the advertised size. */
typedef struct {
    tp_model model;
    void *arena;
    size_t bytes;
} owned_model;

static tp_status make_model(owned_model *m, const tp_model_spec *spec, tp_policy policy,
                            tp_optimizer_kind optimizer) {
    tp_policy_config config = tp_policy_defaults(policy);
    tp_optimizer_config opt = optimizer == TP_OPTIMIZER_ADAM ? tp_adam(0.01, 0.0)
                                                             : tp_sgd(0.05, 0.9, 1e-4);
    tp_status status = tp_arena_bytes(spec, &config, &opt, &m->bytes);
    if (status != TP_OK) return status;
    m->arena = malloc(m->bytes);
    if (m->arena == NULL) return TP_ERR_ARENA;
    return tp_init(&m->model, spec, &config, &opt, m->arena, m->bytes);
}

/* ------------------------------------------------------------------ tests */

static void test_arena_exact_for_every_model_and_policy(void) {
    const tp_model_spec *specs[] = {&mlp_spec,  &cnn_spec,    &har_spec,
                                    &act_spec,  &smooth_spec, &elu_spec};
    int s, p, o, step;
    for (s = 0; s < 6; s++) {
        for (p = 0; p <= (int)TP_POLICY_TINYPROPV2; p++) {
            for (o = 0; o <= 1; o++) {
                owned_model m;
                const int input = specs[s]->input_channels * specs[s]->input_height *
                                  specs[s]->input_width;
                float x[6 * 160];
                int32_t labels[6], keep[6 * 8];
                uint8_t mask[6];
                tp_step_stats stats;
                CHECK(make_model(&m, specs[s], (tp_policy)p, (tp_optimizer_kind)o) == TP_OK);
                CHECK(m.model.arena_bytes_used == m.bytes);
                for (step = 0; step < 4; step++) {
                    int b;
                    fill(x, (size_t)(6 * input), 1.0f);
                    for (b = 0; b < 6; b++) labels[b] = (int32_t)(b % m.model.class_count);
                    CHECK(tp_train_batch(&m.model, x, labels, 6, &stats, keep, mask) == TP_OK);
                    CHECK(stats.trained + stats.skipped == 6);
                    CHECK(isfinite(stats.loss));
                    CHECK(stats.macs.forward > 0 && stats.macs.backward_dense > 0);
                    if (p == TP_POLICY_FULL) CHECK(stats.macs.backward == stats.macs.backward_dense);
                    if (p != TP_POLICY_FULL) CHECK(stats.macs.backward < stats.macs.backward_dense);
                }
                free(m.arena);
            }
        }
    }
}

static void test_arguments_are_checked(void) {
    owned_model m;
    tp_policy_config policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    tp_optimizer_config opt = tp_sgd(0.1, 0.0, 0.0);
    tp_step_stats stats;
    size_t bytes = 0;
    float x[16] = {0};
    int32_t labels[1] = {0}, predicted = -1;
    static tp_model fresh;
    tp_layer_spec bad_layers[2] = {TP_CONV_SPEC(2, 3, 3, 1, 1, 0, 0, 1, NULL, NULL),
                                   TP_DENSE_SPEC(3, NULL, NULL)};
    tp_model_spec bad = {1, 4, 4, 2, bad_layers};
    CHECK(tp_arena_bytes(NULL, &policy, &opt, &bytes) == TP_ERR_NULL);
    CHECK(tp_arena_bytes(&mlp_spec, &policy, &opt, NULL) == TP_ERR_NULL);
    CHECK(tp_arena_bytes(&bad, &policy, &opt, &bytes) == TP_ERR_SHAPE); /* dense needs flatten */
    policy.s_min = 0.95; /* s_min > s_max */
    CHECK(tp_arena_bytes(&mlp_spec, &policy, &opt, &bytes) == TP_ERR_ARGUMENT);
    policy = tp_policy_defaults(TP_POLICY_TOPK);
    policy.ratio = 0.0;
    CHECK(tp_arena_bytes(&mlp_spec, &policy, &opt, &bytes) == TP_ERR_ARGUMENT);
    policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    policy.skip_threshold = NAN;
    CHECK(tp_arena_bytes(&mlp_spec, &policy, &opt, &bytes) == TP_ERR_ARGUMENT);
    policy = tp_policy_defaults((tp_policy)7);
    CHECK(tp_arena_bytes(&mlp_spec, &policy, &opt, &bytes) == TP_ERR_UNSUPPORTED);
    policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    opt.lr = -1.0;
    CHECK(tp_arena_bytes(&mlp_spec, &policy, &opt, &bytes) == TP_ERR_ARGUMENT);
    opt = tp_sgd(0.1, 0.0, 0.0);
    /* arena one float short, and misaligned */
    CHECK(tp_arena_bytes(&mlp_spec, &policy, &opt, &bytes) == TP_OK);
    m.arena = malloc(bytes + 8);
    CHECK(tp_init(&m.model, &mlp_spec, &policy, &opt, m.arena, bytes - 4) == TP_ERR_ARENA);
    CHECK(tp_init(&m.model, &mlp_spec, &policy, &opt, (char *)m.arena + 2, bytes) == TP_ERR_ARENA);
    CHECK(tp_train_batch(&m.model, x, labels, 1, &stats, NULL, NULL) == TP_ERR_STATE);
    CHECK(tp_train_batch(&fresh, x, labels, 1, &stats, NULL, NULL) == TP_ERR_STATE);
    CHECK(tp_init(&m.model, &mlp_spec, &policy, &opt, m.arena, bytes) == TP_OK);
    CHECK(tp_train_batch(&m.model, NULL, labels, 1, &stats, NULL, NULL) == TP_ERR_NULL);
    CHECK(tp_train_batch(&m.model, x, labels, 0, &stats, NULL, NULL) == TP_ERR_ARGUMENT);
    labels[0] = 4;
    CHECK(tp_train_batch(&m.model, x, labels, 1, &stats, NULL, NULL) == TP_ERR_LABEL);
    labels[0] = -1;
    CHECK(tp_train_batch(&m.model, x, labels, 1, &stats, NULL, NULL) == TP_ERR_LABEL);
    CHECK(tp_read_parameters(&m.model, x, 3) == TP_ERR_ARGUMENT);
    CHECK(tp_predict(&m.model, NULL, NULL, NULL) == TP_ERR_NULL);
    x[0] = 0.5f; /* the rest stays 0 */
    predicted = -1;
    CHECK(tp_predict(&m.model, x, NULL, &predicted) == TP_OK && predicted >= 0);
    x[5] = NAN;
    predicted = -1;
    CHECK(tp_predict(&m.model, x, NULL, &predicted) == TP_ERR_NONFINITE && predicted == -1);
    x[5] = -INFINITY;
    CHECK(tp_predict(&m.model, x, NULL, &predicted) == TP_ERR_NONFINITE);
    CHECK(strcmp(tp_status_string(TP_ERR_ARENA), "ok") != 0);
    free(m.arena);
}

static void test_nonfinite_loss_changes_nothing(void) {
    owned_model m;
    float before[400], after[400], x[2 * 16];
    int32_t labels[2] = {0, 1};
    tp_step_stats stats;
    size_t count;
    CHECK(make_model(&m, &mlp_spec, TP_POLICY_TINYPROPV2, TP_OPTIMIZER_ADAM) == TP_OK);
    CHECK(tp_parameter_count(&m.model, &count) == TP_OK && count <= 400);
    fill(x, 32, 1.0f);
    CHECK(tp_train_batch(&m.model, x, labels, 2, &stats, NULL, NULL) == TP_OK);
    tp_read_parameters(&m.model, before, count);
    x[16 + 3] = NAN; /* second sample */
    CHECK(tp_train_batch(&m.model, x, labels, 2, &stats, NULL, NULL) == TP_ERR_NONFINITE);
    tp_read_parameters(&m.model, after, count);
    CHECK(memcmp(before, after, count * sizeof(float)) == 0);
    CHECK(m.model.optimizer_steps == 1);
    free(m.arena);
}

/* momentum_in_place: a non-finite loss after a trained sample leaves the weights as they were
 * and the momentum buffer, which held part of the batch's gradient, at zero (a fresh start) */
static void test_nonfinite_loss_with_momentum_in_place(void) {
    tp_policy_config config = tp_policy_defaults(TP_POLICY_FULL);
    tp_optimizer_config opt = tp_sgd(0.05, 0.9, 0.0);
    tp_memory_config memory = tp_memory_defaults();
    tp_model model;
    float before[400], after[400], x[2 * 16];
    int32_t labels[2] = {0, 1};
    tp_step_stats stats;
    size_t bytes, count, i;
    void *arena;
    int nonzero = 0;
    memory.momentum_in_place = 1;
    CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &opt, &memory, &bytes) == TP_OK);
    arena = malloc(bytes);
    CHECK(tp_init_mode(&model, &mlp_spec, &config, &opt, &memory, arena, bytes) == TP_OK);
    CHECK(tp_parameter_count(&model, &count) == TP_OK && count <= 400);
    fill(x, 32, 1.0f);
    CHECK(tp_train_batch(&model, x, labels, 2, &stats, NULL, NULL) == TP_OK);
    for (i = 0; i < model.parameter_count; i++) nonzero |= model.moment1[i] != 0.0f;
    CHECK(nonzero && model.optimizer_steps == 1);
    tp_read_parameters(&model, before, count);
    x[16 + 3] = NAN; /* refused before anything runs: the momentum buffer is kept */
    CHECK(tp_train_batch(&model, x, labels, 2, &stats, NULL, NULL) == TP_ERR_NONFINITE);
    tp_read_parameters(&model, after, count);
    CHECK(memcmp(before, after, count * sizeof(float)) == 0);
    CHECK(model.optimizer_steps == 1);
    /* second sample: finite values whose forward overflows; the first one's gradient is in
     * the buffer by then */
    for (i = 16; i < 32; i++) x[i] = 3e38f;
    CHECK(tp_train_batch(&model, x, labels, 2, &stats, NULL, NULL) == TP_ERR_NONFINITE);
    tp_read_parameters(&model, after, count);
    CHECK(memcmp(before, after, count * sizeof(float)) == 0);
    for (i = 0; i < model.parameter_count; i++) CHECK(model.moment1[i] == 0.0f);
    CHECK(model.optimizer_steps == 0);
    free(arena);
}

/* The in-place modes step a layer as soon as its backward is done: a gradient that is NaN or
 * infinite from finite inputs and loss (values near the float range) was written into the
 * weights with status ok (-inf and NaN weights; every later step then failed). Now
 * TP_ERR_NONFINITE before the step: the layer whose gradient is not finite and those below
 * it are left as they were, and the model trains on afterwards. */
static void test_nonfinite_gradient_in_place(void) {
    /* A: the top (only) layer, a 1x1 conv whose two output positions are the logits: the
     * gradient 1 x 2e38 + (-1) x (-2e38) overflows; no step at all */
    static float conv_w[1], conv_b[1];
    static tp_layer_spec conv_layers[] = {TP_CONV_SPEC(1, 1, 1, 1, 1, 0, 0, 1, conv_w, conv_b)};
    static const tp_model_spec conv_spec = {1, 1, 2, 1, conv_layers};
    /* B: two dense layers; the top one's huge weights give the lower one an infinite error */
    static float w0[2 * 4], b0[2], w1[2 * 2], b1[2];
    static tp_layer_spec dense_layers[] = {
        TP_FLATTEN_SPEC(), TP_DENSE_SPEC(2, w0, b0), TP_RELU_SPEC(), TP_DENSE_SPEC(2, w1, b1),
    };
    static const tp_model_spec dense_spec = {1, 1, 4, 4, dense_layers};
    const tp_policy_config full = tp_policy_defaults(TP_POLICY_FULL);
    float huge[2] = {2e38f, -2e38f}, ones[4] = {1.0f, 1.0f, 1.0f, 1.0f}, small[4] = {0.5f};
    float before[16], after[16];
    int32_t label = 1, zero = 0;
    int mode, i;
    conv_w[0] = 1e-30f;
    for (i = 0; i < 8; i++) w0[i] = 1e-31f;
    for (i = 0; i < 4; i++) w1[i] = i < 2 ? 3e38f : -3e38f; /* error below: 6e38 */
    for (mode = 0; mode < 2; mode++) { /* sgd_in_place, adam_in_place */
        tp_memory_config memory = tp_memory_defaults();
        const tp_optimizer_config opt = mode == 0 ? tp_sgd(0.1, 0.0, 0.0) : tp_adam(0.1, 0.0);
        tp_model model;
        tp_step_stats stats;
        size_t bytes;
        void *arena;
        if (mode == 0) memory.sgd_in_place = 1;
        else memory.adam_in_place = 1;
        CHECK(tp_arena_bytes_mode(&conv_spec, &full, &opt, &memory, &bytes) == TP_OK);
        arena = malloc(bytes);
        CHECK(tp_init_mode(&model, &conv_spec, &full, &opt, &memory, arena, bytes) == TP_OK);
        tp_read_parameters(&model, before, 2);
        CHECK(tp_train_batch(&model, huge, &label, 1, &stats, NULL, NULL) == TP_ERR_NONFINITE);
        tp_read_parameters(&model, after, 2);
        CHECK(memcmp(before, after, 2 * sizeof(float)) == 0);
        CHECK(model.optimizer_steps == 0);
        CHECK(tp_train_batch(&model, small, &zero, 1, &stats, NULL, NULL) == TP_OK);
        CHECK(model.optimizer_steps == 1);
        free(arena);

        CHECK(tp_arena_bytes_mode(&dense_spec, &full, &opt, &memory, &bytes) == TP_OK);
        arena = malloc(bytes);
        CHECK(tp_init_mode(&model, &dense_spec, &full, &opt, &memory, arena, bytes) == TP_OK);
        CHECK(tp_read_parameters(&model, before, 16) == TP_OK);
        CHECK(tp_train_batch(&model, ones, &label, 1, &stats, NULL, NULL) == TP_ERR_NONFINITE);
        CHECK(tp_read_parameters(&model, after, 16) == TP_OK);
        /* the whole model as it was: the top layer's bias took no step either (it did before
         * the check came ahead of every step) */
        CHECK(memcmp(before, after, sizeof before) == 0);
        CHECK(model.optimizer_steps == 0);
        free(arena);
    }
}

/* In place, a sample the bound cannot prove finite (inputs near the float range, where the
 * bound exceeds FLT_MAX / 64 though every gradient is finite) goes through the dry run, the
 * forward again and the real backward: the same floats as plain SGD on batches of one, which
 * sgd_in_place equals for dense layers. Under tinypropv2 the running maxima move once. */
static void test_in_place_dry_run_trains_as_plain_sgd(void) {
    static float w0[3 * 4], b0[3], w1[2 * 3], b1[2];
    static tp_layer_spec layers[] = {
        TP_FLATTEN_SPEC(), TP_DENSE_SPEC(3, w0, b0), TP_ACTIVATION_SPEC(TP_LAYER_TANH), TP_DENSE_SPEC(2, w1, b1),
    };
    static const tp_model_spec spec = {1, 1, 4, 4, layers};
    const tp_optimizer_config sgd = tp_sgd(0.1, 0.0, 0.0);
    float x[4] = {3e37f, -1e37f, 2e37f, 0.5f}, small[4] = {0.3f, -0.2f, 0.1f, 0.4f};
    float plain[23], in_place[23], plain_max[3], in_place_max[3], out_plain, out_in_place;
    int32_t label = 1, other = 0;
    int policy, i;
    for (i = 0; i < 12; i++) w0[i] = (float)(i % 5) * 1e-38f - 2e-38f;
    for (i = 0; i < 6; i++) w1[i] = i % 2 ? 0.9f : -0.7f;
    for (policy = 0; policy < 2; policy++) { /* full, tinypropv2 */
        const tp_policy_config config =
            tp_policy_defaults(policy ? TP_POLICY_TINYPROPV2 : TP_POLICY_FULL);
        tp_memory_config memory = tp_memory_defaults();
        tp_model a, b;
        tp_step_stats stats;
        size_t bytes_a, bytes_b;
        void *arena_a, *arena_b;
        int step;
        CHECK(tp_arena_bytes(&spec, &config, &sgd, &bytes_a) == TP_OK);
        memory.sgd_in_place = 1;
        CHECK(tp_arena_bytes_mode(&spec, &config, &sgd, &memory, &bytes_b) == TP_OK);
        arena_a = malloc(bytes_a);
        arena_b = malloc(bytes_b);
        CHECK(tp_init(&a, &spec, &config, &sgd, arena_a, bytes_a) == TP_OK);
        CHECK(tp_init_mode(&b, &spec, &config, &sgd, &memory, arena_b, bytes_b) == TP_OK);
        for (step = 0; step < 4; step++) {
            const float *sample = step == 0 ? x : small;
            const int32_t *y = step % 2 ? &other : &label;
            CHECK(tp_train_batch(&a, sample, y, 1, &stats, NULL, NULL) == TP_OK);
            CHECK(tp_train_batch(&b, sample, y, 1, &stats, NULL, NULL) == TP_OK);
        }
        CHECK(tp_read_parameters(&a, plain, 23) == TP_OK);
        CHECK(tp_read_parameters(&b, in_place, 23) == TP_OK);
        CHECK(tp_all_finite(in_place, 23));
        CHECK(memcmp(plain, in_place, sizeof plain) == 0);
        for (i = 0, step = 0; i < 12; i++) step += fabsf(in_place[i]) > 1e30f;
        CHECK(step > 0); /* the huge inputs' gradient was applied */
        tp_read_running_max(&a, plain_max, 2, &out_plain);
        tp_read_running_max(&b, in_place_max, 2, &out_in_place);
        CHECK(memcmp(plain_max, in_place_max, 2 * sizeof(float)) == 0);
        CHECK(out_plain == out_in_place);
        free(arena_a);
        free(arena_b);
    }
}

/* sgd_in_place: the bound before a sample's backward takes max |W| of each trained layer from
 * a bound the layer follows from step to step instead of reading its weights. After every
 * sample, of every policy and model, with or without weight decay, with frozen
 * first layers, that kept bound is at least the weights' max |W|; a kept bound so loose that the
 * bound fails is read again from the weights (no dry run), with the same floats. */
static float largest_weight(const tp_layer *layer) {
    float largest = 0.0f;
    size_t i;
    for (i = 0; i < (size_t)layer->out_c * (size_t)layer->fan_in; i++)
        if (fabsf(layer->weight[i]) > largest) largest = fabsf(layer->weight[i]);
    return largest;
}

static void test_in_place_weight_bound_follows_the_weights(void) {
    const tp_model_spec *specs[] = {&mlp_spec, &cnn_spec, &har_spec};
    int s, p, variant, step, i;
    fill(mlp_w0, 12 * 16, 0.5f), fill(mlp_w1, 8 * 12, 0.5f), fill(mlp_w2, 4 * 8, 0.5f);
    fill(cnn_w0, 72, 0.5f), fill(cnn_w1, 36, 0.5f), fill(cnn_w2, 24, 0.5f), fill(cnn_w3, 30, 0.5f);
    fill(har_w0, 120, 0.5f), fill(har_w1, 320, 0.5f), fill(har_w2, 24, 0.5f);
    for (s = 0; s < 3; s++) {
        const tp_model_spec *spec = specs[s];
        const int input = spec->input_channels * spec->input_height * spec->input_width;
        for (p = 0; p <= (int)TP_POLICY_TINYPROPV2; p++) {
            for (variant = 0; variant < 3; variant++) { /* all trained, first frozen, no decay */
                const tp_optimizer_config sgd = variant == 2 ? tp_sgd(0.2, 0.0, 0.0)
                                                             : tp_sgd(0.5, 0.0, 0.01);
                const tp_policy_config config = tp_policy_defaults((tp_policy)p);
                tp_memory_config memory = tp_memory_defaults();
                tp_model model;
                tp_step_stats stats;
                float x[160], before[1000], after[1000];
                int32_t label;
                size_t bytes, count;
                void *arena;
                int followed = 0;
                memory.sgd_in_place = 1;
                if (variant == 1) memory.first_trained_layer = 1;
                CHECK(tp_arena_bytes_mode(spec, &config, &sgd, &memory, &bytes) == TP_OK);
                arena = malloc(bytes);
                CHECK(tp_init_mode(&model, spec, &config, &sgd, &memory, arena, bytes) == TP_OK);
                for (step = 0; step < 40; step++) {
                    fill(x, (size_t)input, step % 7 == 3 ? 10.0f : 2.0f);
                    label = step % model.class_count;
                    CHECK(tp_train_batch(&model, x, &label, 1, &stats, NULL, NULL) == TP_OK);
                    for (i = model.first_trained_layer + 1; i < model.layer_count; i++) {
                        const tp_layer *layer = &model.layers[i];
                        if (layer->kind != TP_LAYER_DENSE && layer->kind != TP_LAYER_CONV2D)
                            continue;
                        if (stats.trained == 1) CHECK(layer->activation[0] > 0.0f);
                        CHECK(largest_weight(layer) <= layer->activation[0] ||
                              layer->activation[0] == 0.0f);
                        followed += layer->activation[0] > 0.0f;
                    }
                }
                CHECK(followed > 0);
                /* a kept bound far above the weights: the bound fails on it, reads them */
                tp_parameter_count(&model, &count);
                tp_read_parameters(&model, before, count);
                for (i = model.first_trained_layer + 1; i < model.layer_count; i++)
                    if (model.layers[i].kind == TP_LAYER_DENSE) model.layers[i].activation[0] = 1e37f;
                fill(x, (size_t)input, 1.0f);
                label = 0;
                CHECK(tp_train_batch(&model, x, &label, 1, &stats, NULL, NULL) == TP_OK);
                tp_read_parameters(&model, after, count);
                if (stats.trained == 1) {
                    CHECK(memcmp(before, after, count * sizeof(float)) != 0);
                    CHECK(model.layers[model.layer_count - 1].activation[0] < 1e30f);
                }
                free(arena);
            }
        }
    }
}

static void test_all_skipped_batch_makes_no_update(void) {
    owned_model m;
    float before[400], after[400], x[4 * 16];
    int32_t labels[4] = {0, 1, 2, 3};
    uint8_t mask[4];
    tp_step_stats stats;
    size_t count;
    CHECK(make_model(&m, &mlp_spec, TP_POLICY_TINYPROPV2, TP_OPTIMIZER_ADAM) == TP_OK);
    tp_parameter_count(&m.model, &count);
    m.model.policy.skip_threshold = 2.0; /* D <= 1 < 2: every sample is skipped */
    fill(x, 64, 1.0f);
    tp_read_parameters(&m.model, before, count);
    CHECK(tp_train_batch(&m.model, x, labels, 4, &stats, NULL, mask) == TP_OK);
    tp_read_parameters(&m.model, after, count);
    CHECK(stats.skipped == 4 && stats.trained == 0 && mask[0] == 0 && mask[3] == 0);
    CHECK(memcmp(before, after, count * sizeof(float)) == 0);
    CHECK(m.model.optimizer_steps == 0);
    CHECK(stats.macs.backward == 0 && stats.macs.backward_dense > 0);
    free(m.arena);
}

static void test_keep_count_formula(void) {
    tp_policy_config v1 = tp_policy_defaults(TP_POLICY_TINYPROP);
    tp_policy_config topk = tp_policy_defaults(TP_POLICY_TOPK);
    /* Ymax = 0: k = 1 */
    CHECK(tp_keep_count(&v1, 0.0f, 0.0f, 1.0, 100) == 1);
    /* Y = Ymax, d = 0: bpr = s_max = 0.9 -> 90 of 100 */
    CHECK(tp_keep_count(&v1, 2.0f, 2.0f, 1.0, 100) == 90);
    /* Y = Ymax / 2, d = 1: (0.1 + 0.5 * 0.8) * 0.5 = 0.25 -> 25 */
    CHECK(tp_keep_count(&v1, 1.0f, 2.0f, 0.5, 100) == 25);
    /* round half up: 0.25 * 10 = 2.5 -> 3; clamp to at least 1 */
    CHECK(tp_keep_count(&v1, 1.0f, 2.0f, 0.5, 10) == 3);
    CHECK(tp_keep_count(&v1, 0.0f, 2.0f, 0.0625, 3) == 1);
    CHECK(tp_keep_count(&topk, 0.0f, 0.0f, 1.0, 25) == 3);
    topk.ratio = 1.0;
    CHECK(tp_keep_count(&topk, 0.0f, 0.0f, 1.0, 25) == 25);
}

static void test_topk_selection(void) {
    const float delta[8] = {0.5f, -3.0f, 1.0f, -1.0f, 0.0f, 1.0f, 2.0f, -0.25f};
    float scratch[8];
    int32_t kept[8];
    tp_select_topk(delta, 8, 2, scratch, kept);
    CHECK(kept[0] == 1 && kept[1] == 6);
    /* |1| appears three times (2, 3, 5): ties go to the lower index */
    tp_select_topk(delta, 8, 4, scratch, kept);
    CHECK(kept[0] == 1 && kept[1] == 2 && kept[2] == 3 && kept[3] == 6);
    tp_select_topk(delta, 8, 8, scratch, kept);
    CHECK(kept[0] == 0 && kept[7] == 7);
}

static void test_selection_against_sort(void) {
    float delta[300], scratch[300];
    int32_t kept[300];
    int trial;
    for (trial = 0; trial < 200; trial++) {
        const int32_t n = 1 + (int32_t)((uniform() + 1.0f) * 149.0f);
        const int32_t k = 1 + (int32_t)((uniform() + 1.0f) * 0.5f * (float)(n - 1));
        int32_t i, j, ok = 1;
        for (i = 0; i < n; i++) delta[i] = (float)(int)(uniform() * 4.0f); /* many ties */
        tp_select_topk(delta, n, k, scratch, kept);
        /* every kept entry beats (or ties with a higher index than) every other entry */
        for (i = 0; i < k && ok; i++) {
            if (i > 0 && kept[i] <= kept[i - 1]) ok = 0;
            for (j = 0; j < n && ok; j++) {
                int32_t t, is_kept = 0;
                const float a = fabsf(delta[kept[i]]), b = fabsf(delta[j]);
                for (t = 0; t < k; t++) is_kept |= kept[t] == j;
                if (!is_kept && (b > a || (b == a && j < kept[i]))) ok = 0;
            }
        }
        CHECK(ok);
    }
}

/* Large inputs take the sampled path of the selection (two pivots from a sample, then the
 * values between them): the kept set equals the first k of a sort by (|delta| descending,
 * index ascending), with many zeros, many ties or distinct values, for small and large k. */
static const float *sort_delta;
static int by_magnitude_then_index(const void *a, const void *b) {
    const int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    const float x = fabsf(sort_delta[i]), y = fabsf(sort_delta[j]);
    if (x != y) return x > y ? -1 : 1;
    return i < j ? -1 : (i > j);
}
static int by_index(const void *a, const void *b) {
    const int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    return i < j ? -1 : (i > j);
}

static void test_large_selection_against_sort(void) {
    static float delta[3000], scratch[3000];
    static int32_t kept[3000], order[3000];
    const unsigned long long saved_state = rng_state; /* the later tests see the same draws */
    int trial;
    for (trial = 0; trial < 120; trial++) {
        const int32_t n = 256 + (int32_t)((uniform() + 1.0f) * 0.5f * 2700.0f);
        const int kind = trial % 4;
        int32_t i, k, ok = 1;
        for (i = 0; i < n; i++) {
            const float u = uniform();
            if (kind == 0) delta[i] = u; /* distinct values */
            else if (kind == 1) delta[i] = (float)(int)(u * 6.0f); /* many ties and zeros */
            else if (kind == 2) delta[i] = uniform() < 0.0f ? 0.0f : u * u * u; /* half zeros */
            else delta[i] = i % 7 == 0 ? 1.0f : (i % 3 == 0 ? -0.5f : u * 0.01f);
        }
        k = trial % 5 == 0 ? 1 + trial % 3 : 1 + (int32_t)((uniform() + 1.0f) * 0.5f * (float)(n - 1));
        tp_select_topk(delta, n, k, scratch, kept);
        for (i = 0; i < n; i++) order[i] = i;
        sort_delta = delta;
        qsort(order, (size_t)n, sizeof order[0], by_magnitude_then_index);
        qsort(order, (size_t)k, sizeof order[0], by_index);
        for (i = 0; i < k; i++) ok &= kept[i] == order[i];
        CHECK(ok);
    }
    rng_state = saved_state;
}

static void test_skip_decision(void) {
    tp_policy_config v2 = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    CHECK(tp_skip_decision_trains(&v2, 1.0f, 2.0f) == 1);  /* D = 0.5 >= 0.5 */
    CHECK(tp_skip_decision_trains(&v2, 0.9f, 2.0f) == 0);  /* D = 0.45 */
    CHECK(tp_skip_decision_trains(&v2, 0.0f, 0.0f) == 0);  /* alpha = 0 before any error */
    v2.d_min = 0.5;
    CHECK(tp_skip_decision_trains(&v2, 0.0f, 2.0f) == 1);
}

/* Full training, batch 1, SGD lr 1: the update equals minus the gradient; compare with central
 * differences of the loss computed through tp_predict. */
static void test_gradient_matches_finite_differences(void) {
    const tp_model_spec *specs[] = {&mlp_spec,  &cnn_spec,    &har_spec,
                                    &act_spec,  &smooth_spec, &elu_spec};
    int s;
    for (s = 0; s < 6; s++) {
        tp_policy_config full = tp_policy_defaults(TP_POLICY_FULL);
        tp_optimizer_config sgd = tp_sgd(1.0, 0.0, 0.0);
        static float before[2000], after[2000], x[160], logits[8], grad[8];
        tp_model model;
        void *arena;
        size_t bytes, count, i;
        int32_t label = 1;
        tp_step_stats stats;
        int worst_ok = 1;
        tp_arena_bytes(specs[s], &full, &sgd, &bytes);
        arena = malloc(bytes);
        CHECK(tp_init(&model, specs[s], &full, &sgd, arena, bytes) == TP_OK);
        tp_parameter_count(&model, &count);
        CHECK(count <= 2000);
        fill(x, (size_t)model.input_size, 1.0f);
        tp_read_parameters(&model, before, count);
        CHECK(tp_train_batch(&model, x, &label, 1, &stats, NULL, NULL) == TP_OK);
        tp_read_parameters(&model, after, count);
        memcpy(model.parameters, before, count * sizeof(float));
        for (i = 0; i < count; i += 7) {
            const float h = 1e-3f, saved = model.parameters[i]; /* 1e-2 crossed kinks */
            float up, down, numeric, analytic;
            model.parameters[i] = saved + h;
            tp_predict(&model, x, logits, NULL);
            up = tp_cross_entropy(logits, model.class_count, label, grad);
            model.parameters[i] = saved - h;
            tp_predict(&model, x, logits, NULL);
            down = tp_cross_entropy(logits, model.class_count, label, grad);
            model.parameters[i] = saved;
            numeric = (up - down) / (2.0f * h);
            analytic = before[i] - after[i];
            if (fabsf(numeric - analytic) > 2e-3f + 2e-2f * fabsf(analytic)) {
                worst_ok = 0;
                fprintf(stderr, "model %d parameter %zu: numeric %g analytic %g\n", s, i,
                        (double)numeric, (double)analytic);
            }
        }
        CHECK(worst_ok);
        free(arena);
    }
}

/* Every memory mode of every model: the arena exactly as said (malloc'ed to the byte, so ASan
 * sees any write past it), frozen weights never written, training runs. in_place 2: the
 * layers after the first trained one train their biases only (bias_only_layers); in_place 3:
 * the same with SGD momentum gathered in its buffer (momentum_in_place, no gradients);
 * in_place 4: every layer from the first trained one bias-only but the last, top-k chosen in
 * delta itself (selection_in_place), Adam; in_place 5: every layer after the first trained one
 * recomputes its input, Adam in place with 8-bit moments, selection_in_place; in_place 6: the
 * same recompute with one Adam step per batch, 8-bit moments. */
static void test_memory_modes(void) {
    const tp_model_spec *specs[] = {&mlp_spec,  &cnn_spec,    &har_spec,
                                    &act_spec,  &smooth_spec, &elu_spec};
    const int trainable[] = {3, 4, 3, 5, 6, 5};
    int s, first, in_place, p, step;
    for (s = 0; s < 6; s++) {
        for (first = 0; first < trainable[s]; first++) {
            for (in_place = 0; in_place <= 6; in_place++) {
                for (p = 0; p <= (int)TP_POLICY_TINYPROPV2; p += 3) {
                    tp_policy_config config = tp_policy_defaults((tp_policy)p);
                    tp_optimizer_config opt = in_place == 1   ? tp_sgd(0.05, 0.0, 1e-3)
                                              : in_place == 3 ? tp_sgd(0.05, 0.9, 1e-3)
                                                              : tp_adam(0.01, 0.0);
                    tp_memory_config memory = tp_memory_defaults();
                    tp_model model;
                    size_t bytes = 0, full_bytes = 0;
                    float x[6 * 160];
                    int32_t labels[6], b;
                    tp_step_stats stats;
                    void *arena;
                    /* the layers after the first trained one that have a bias (the CNN's
                     * pointwise conv, trainable layer 2, has none) */
                    const uint32_t later = ((1u << trainable[s]) - 1u) & ~((2u << first) - 1u) &
                                           (s == 1 ? ~(1u << 2) : ~0u);
                    memory.first_trained_layer = first;
                    memory.sgd_in_place = in_place == 1;
                    memory.bias_only_layers = in_place == 2 || in_place == 3 ? later
                                              : in_place == 4
                                                  ? (later | (1u << first)) &
                                                        ~(1u << (trainable[s] - 1)) &
                                                        (s == 1 ? ~(1u << 2) : ~0u)
                                                  : 0u;
                    memory.momentum_in_place = in_place == 3;
                    memory.selection_in_place = in_place == 4 || in_place == 5;
                    memory.adam_in_place = in_place == 5;
                    memory.moment_bits = in_place >= 5 ? 8 : 32;
                    memory.recompute_layers =
                        in_place >= 5 ? ((1u << trainable[s]) - 1u) & ~((2u << first) - 1u) : 0u;
                    CHECK(tp_arena_bytes_mode(specs[s], &config, &opt, &memory, &bytes) == TP_OK);
                    CHECK(tp_arena_bytes(specs[s], &config, &opt, &full_bytes) == TP_OK);
                    /* (recomputing may cost more than it saves on these small models) */
                    if (in_place < 5) CHECK(bytes <= full_bytes);
                    arena = malloc(bytes);
                    CHECK(tp_init_mode(&model, specs[s], &config, &opt, &memory, arena,
                                       bytes - 4) == TP_ERR_ARENA);
                    CHECK(tp_init_mode(&model, specs[s], &config, &opt, &memory, arena, bytes) ==
                          TP_OK);
                    CHECK(model.arena_bytes_used == bytes);
                    CHECK((model.gradients == NULL) ==
                          (in_place == 1 || in_place == 3 || in_place == 5));
                    CHECK((model.first_codes != NULL) == (in_place >= 5));
                    for (step = 0; step < 3; step++) {
                        const int32_t input = model.input_size;
                        fill(x, (size_t)(6 * input), 1.0f);
                        for (b = 0; b < 6; b++) labels[b] = b % model.class_count;
                        CHECK(tp_train_batch(&model, x, labels, 6, &stats, NULL, NULL) == TP_OK);
                        CHECK(isfinite(stats.loss));
                    }
                    for (b = 0; b < model.layer_count; b++) {
                        const tp_layer *layer = &model.layers[b];
                        if (layer->trainable_index < 0) continue;
                        CHECK(layer->trained == (layer->trainable_index >= first));
                        /* frozen: the spec's own arrays, untouched */
                        const int frozen = !layer->trained || layer->bias_only;
                        CHECK(layer->bias_only == (int32_t)((memory.bias_only_layers >>
                                                             layer->trainable_index) & 1u));
                        if (frozen) CHECK(layer->weight == specs[s]->layers[b].weight);
                        if (!frozen) CHECK(layer->weight != specs[s]->layers[b].weight);
                    }
                    free(arena);
                }
            }
        }
    }
    {
        tp_policy_config config = tp_policy_defaults(TP_POLICY_FULL);
        tp_optimizer_config adam = tp_adam(0.01, 0.0), momentum = tp_sgd(0.1, 0.9, 0.0);
        tp_memory_config memory = tp_memory_defaults();
        tp_layer_spec layers[6];
        tp_model_spec no_weights = mlp_spec;
        size_t bytes;
        memory.sgd_in_place = 1; /* in place needs plain SGD */
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) ==
              TP_ERR_ARGUMENT);
        memory.sgd_in_place = 2;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        /* momentum in place: SGD with momentum, no Nesterov, not with sgd_in_place */
        memory = tp_memory_defaults();
        memory.momentum_in_place = 1;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) == TP_OK);
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        momentum.nesterov = 1;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) ==
              TP_ERR_ARGUMENT);
        momentum.nesterov = 0;
        momentum.momentum = 0.0;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) ==
              TP_ERR_ARGUMENT);
        momentum.momentum = 0.9;
        memory.sgd_in_place = 1;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) ==
              TP_ERR_ARGUMENT);
        memory.sgd_in_place = 0;
        memory.momentum_in_place = 2;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) ==
              TP_ERR_ARGUMENT);
        memory = tp_memory_defaults();
        memory.first_trained_layer = 3; /* the MLP has three dense layers */
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        memory.first_trained_layer = -1;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, NULL, &bytes) == TP_ERR_NULL);
        /* bias-only layers: from the first trained one on, within the model, not in place */
        memory.first_trained_layer = 1;
        memory.bias_only_layers = 1u << 0;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        memory.bias_only_layers = 1u << 1; /* the first trained layer itself: its bias */
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_OK);
        memory.bias_only_layers = 1u << 3;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        memory.bias_only_layers = 1u << 2;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_OK);
        CHECK(tp_arena_bytes_mode(&cnn_spec, &config, &adam, &memory, &bytes) ==
              TP_ERR_ARGUMENT); /* the pointwise conv has no bias to train */
        memory.sgd_in_place = 1;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) ==
              TP_ERR_ARGUMENT);
        /* Adam in place and 8-bit moments: Adam only; moment_bits 32, 0 or 8 */
        memory = tp_memory_defaults();
        memory.adam_in_place = 1;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_OK);
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) ==
              TP_ERR_ARGUMENT);
        memory.momentum_in_place = 1;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        memory = tp_memory_defaults();
        memory.moment_bits = 8;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_OK);
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &momentum, &memory, &bytes) ==
              TP_ERR_ARGUMENT);
        memory.moment_bits = 16;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        /* recompute: after the first trained layer, not bias-only, within the model */
        memory = tp_memory_defaults();
        memory.recompute_layers = 1u << 2;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_OK);
        memory.recompute_layers = 1u << 0; /* the first trained layer (it reads the sample) */
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        memory.recompute_layers = 1u << 3;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        memory.recompute_layers = 1u << 2;
        memory.bias_only_layers = 1u << 2;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &config, &adam, &memory, &bytes) == TP_ERR_ARGUMENT);
        memory = tp_memory_defaults();
        /* a frozen layer needs its weights in the spec */
        memcpy(layers, mlp_layers, sizeof layers);
        layers[1].weight = NULL;
        no_weights.layers = layers;
        memory.first_trained_layer = 1;
        CHECK(tp_arena_bytes_mode(&no_weights, &config, &adam, &memory, &bytes) == TP_OK);
        {
            tp_model model;
            void *arena = malloc(bytes);
            CHECK(tp_init_mode(&model, &no_weights, &config, &adam, &memory, arena, bytes) ==
                  TP_ERR_NULL);
            free(arena);
        }
    }
}

/* tp_batch_begin / tp_batch_add / tp_batch_end, one sample at a time, give the same floats as
 * tp_train_batch with the whole batch; errors leave the model as tp_train_batch does */
static void test_samples_one_at_a_time_equal_the_whole_batch(void) {
    const tp_model_spec *specs[] = {&mlp_spec, &cnn_spec, &har_spec};
    float x[6 * 160], whole[2000], streamed[2000];
    int32_t labels[6], keep[6 * 8], keep_streamed[6 * 8];
    uint8_t mask[6], mask_streamed[6];
    int s, p, o, step, b;
    for (s = 0; s < 3; s++) {
        for (p = 0; p <= 3; p += 3) { /* full, tinypropv2 */
            for (o = 0; o <= 1; o++) {
                owned_model a, c;
                const int input = specs[s]->input_channels * specs[s]->input_height *
                                  specs[s]->input_width;
                size_t count;
                CHECK(make_model(&a, specs[s], (tp_policy)p, (tp_optimizer_kind)o) == TP_OK);
                CHECK(make_model(&c, specs[s], (tp_policy)p, (tp_optimizer_kind)o) == TP_OK);
                CHECK(tp_parameter_count(&a.model, &count) == TP_OK && count <= 2000);
                for (step = 0; step < 4; step++) {
                    tp_step_stats one, other;
                    tp_batch batch;
                    fill(x, (size_t)(6 * input), 1.0f);
                    for (b = 0; b < 6; b++) labels[b] = (int32_t)((b + step) % a.model.class_count);
                    CHECK(tp_train_batch(&a.model, x, labels, 6, &one, keep, mask) == TP_OK);
                    CHECK(tp_batch_begin(&c.model, &batch, 6) == TP_OK);
                    for (b = 0; b < 6; b++)
                        CHECK(tp_batch_add(&c.model, &batch, x + b * input, labels[b],
                                           keep_streamed + b * c.model.trainable_count,
                                           mask_streamed + b) == TP_OK);
                    CHECK(tp_batch_end(&c.model, &batch, &other) == TP_OK);
                    CHECK(one.loss == other.loss && one.trained == other.trained);
                    CHECK(memcmp(&one.macs, &other.macs, sizeof one.macs) == 0);
                    CHECK(memcmp(keep, keep_streamed,
                                 (size_t)(6 * a.model.trainable_count) * sizeof(int32_t)) == 0);
                    CHECK(memcmp(mask, mask_streamed, 6) == 0);
                    tp_read_parameters(&a.model, whole, count);
                    tp_read_parameters(&c.model, streamed, count);
                    CHECK(memcmp(whole, streamed, count * sizeof(float)) == 0);
                }
                free(a.arena);
                free(c.arena);
            }
        }
    }
}

static void test_batch_api_errors(void) {
    owned_model m;
    static tp_model fresh;
    float x[16], before[400], after[400];
    tp_step_stats stats;
    tp_batch batch;
    size_t count;
    int i;
    CHECK(make_model(&m, &mlp_spec, TP_POLICY_TINYPROPV2, TP_OPTIMIZER_SGD) == TP_OK);
    CHECK(tp_parameter_count(&m.model, &count) == TP_OK && count <= 400);
    fill(x, 16, 1.0f);
    memset(&batch, 0, sizeof batch);
    CHECK(tp_batch_add(&m.model, &batch, x, 0, NULL, NULL) == TP_ERR_STATE); /* no begin */
    CHECK(tp_batch_begin(&fresh, &batch, 2) == TP_ERR_STATE);
    CHECK(tp_batch_begin(&m.model, &batch, 0) == TP_ERR_ARGUMENT);
    CHECK(tp_batch_begin(&m.model, NULL, 2) == TP_ERR_NULL);
    CHECK(tp_batch_begin(&m.model, &batch, 2) == TP_OK);
    CHECK(tp_batch_add(&m.model, &batch, NULL, 0, NULL, NULL) == TP_ERR_NULL);
    CHECK(tp_batch_add(&m.model, &batch, x, 4, NULL, NULL) == TP_ERR_LABEL); /* not added */
    CHECK(tp_batch_add(&m.model, &batch, x, 1, NULL, NULL) == TP_OK);
    CHECK(tp_batch_end(&m.model, &batch, &stats) == TP_ERR_ARGUMENT); /* one of two */
    CHECK(tp_batch_add(&m.model, &batch, x, 2, NULL, NULL) == TP_OK);
    CHECK(tp_batch_add(&m.model, &batch, x, 3, NULL, NULL) == TP_ERR_STATE); /* a third */
    CHECK(tp_batch_end(&m.model, &batch, &stats) == TP_OK && stats.trained + stats.skipped == 2);
    CHECK(tp_batch_end(&m.model, &batch, &stats) == TP_ERR_STATE); /* ended */
    tp_read_parameters(&m.model, before, count);
    CHECK(tp_batch_begin(&m.model, &batch, 2) == TP_OK);
    CHECK(tp_batch_add(&m.model, &batch, x, 0, NULL, NULL) == TP_OK);
    x[3] = NAN; /* an input value: refused, nothing changed, the batch goes on */
    CHECK(tp_batch_add(&m.model, &batch, x, 1, NULL, NULL) == TP_ERR_NONFINITE);
    x[3] = -INFINITY;
    CHECK(tp_batch_add(&m.model, &batch, x, 1, NULL, NULL) == TP_ERR_NONFINITE);
    CHECK(batch.added == 1 && batch.magic != 0);
    for (i = 0; i < 16; i++) x[i] = 3e38f; /* finite, but the loss is not */
    CHECK(tp_batch_add(&m.model, &batch, x, 1, NULL, NULL) == TP_ERR_NONFINITE);
    tp_read_parameters(&m.model, after, count);
    CHECK(memcmp(before, after, count * sizeof(float)) == 0);
    fill(x, 16, 1.0f);
    CHECK(tp_batch_add(&m.model, &batch, x, 1, NULL, NULL) == TP_ERR_STATE); /* cancelled */
    CHECK(tp_batch_end(&m.model, &batch, &stats) == TP_ERR_STATE);
    /* a short last batch: the samples added so far, averaged over their count */
    CHECK(tp_batch_shorten(&m.model, &batch) == TP_ERR_STATE); /* cancelled */
    CHECK(tp_batch_begin(&m.model, &batch, 3) == TP_OK);
    CHECK(tp_batch_shorten(&m.model, &batch) == TP_ERR_ARGUMENT); /* none added */
    CHECK(tp_batch_add(&m.model, &batch, x, 1, NULL, NULL) == TP_OK);
    CHECK(tp_batch_shorten(&m.model, &batch) == TP_OK);
    CHECK(tp_batch_end(&m.model, &batch, &stats) == TP_OK && stats.trained + stats.skipped == 1);
    free(m.arena);
}

/* Hostile values: an infinite input value that a ReLU turns into a finite loss (it gave an
 * infinite gradient and NaN weights with status ok), finite inputs whose gradients sum to
 * infinity, a NaN weight in the spec; and a short last batch equals tp_train_batch of it. */
static void test_hostile_values(void) {
    static float w0[2 * 4], b0[2], w1[2 * 2];
    static tp_layer_spec layers[] = {
        TP_FLATTEN_SPEC(), TP_DENSE_SPEC(2, w0, b0), TP_RELU_SPEC(),
        {TP_LAYER_DENSE, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, w1, NULL},
    };
    static const tp_model_spec spec = {1, 1, 4, 4, layers};
    const tp_policy_config full = tp_policy_defaults(TP_POLICY_FULL);
    const tp_optimizer_config sgd = tp_sgd(0.1, 0.0, 0.0);
    float x[3 * 4] = {INFINITY, 0.0f, 0.0f, 0.0f}, before[14], after[14], one[14];
    int32_t labels[3] = {0, 1, 0}, same_labels[2] = {0, 0};
    tp_model model, copy;
    tp_step_stats stats;
    tp_batch batch;
    size_t bytes;
    void *arena, *copy_arena;
    int i;
    for (i = 0; i < 8; i++) w0[i] = i % 4 == 0 ? -0.5f : 0.1f; /* -inf into the ReLU */
    for (i = 0; i < 4; i++) w1[i] = i % 2 ? 0.2f : -0.1f;
    CHECK(tp_arena_bytes(&spec, &full, &sgd, &bytes) == TP_OK);
    arena = malloc(bytes);
    copy_arena = malloc(bytes);
    CHECK(tp_init(&model, &spec, &full, &sgd, arena, bytes) == TP_OK);
    tp_read_parameters(&model, before, 14);
    CHECK(tp_train_batch(&model, x, labels, 1, &stats, NULL, NULL) == TP_ERR_NONFINITE);
    tp_read_parameters(&model, after, 14);
    CHECK(memcmp(before, after, sizeof before) == 0);
    /* finite inputs near FLT_MAX with tiny weights: finite losses, gradients 3e38 each, whose
     * sum over the batch is infinite */
    for (i = 0; i < 8; i++) w0[i] = 1e-30f;
    for (i = 0; i < 4; i++) w1[i] = i == 0 || i == 3 ? 1.0f : -1.0f; /* |input error| 1 */
    CHECK(tp_init(&model, &spec, &full, &sgd, arena, bytes) == TP_OK);
    for (i = 0; i < 8; i++) x[i] = 2e38f;
    tp_read_parameters(&model, before, 14);
    CHECK(tp_train_batch(&model, x, same_labels, 2, &stats, NULL, NULL) == TP_ERR_NONFINITE);
    tp_read_parameters(&model, after, 14);
    CHECK(memcmp(before, after, sizeof before) == 0);
    CHECK(model.optimizer_steps == 0);
    /* a NaN (or infinite) weight or bias in the spec */
    w0[5] = NAN;
    CHECK(tp_init(&model, &spec, &full, &sgd, arena, bytes) == TP_ERR_NONFINITE);
    w0[5] = 0.1f;
    b0[1] = -INFINITY;
    CHECK(tp_init(&model, &spec, &full, &sgd, arena, bytes) == TP_ERR_NONFINITE);
    b0[1] = 0.0f;
    /* a batch of 3 shortened after 2 samples = tp_train_batch of those 2 */
    for (i = 0; i < 8; i++) w0[i] = 0.1f * (float)(i % 3) - 0.1f;
    fill(x, 12, 1.0f);
    CHECK(tp_init(&model, &spec, &full, &sgd, arena, bytes) == TP_OK);
    CHECK(tp_init(&copy, &spec, &full, &sgd, copy_arena, bytes) == TP_OK);
    CHECK(tp_train_batch(&model, x, labels, 2, &stats, NULL, NULL) == TP_OK);
    CHECK(tp_batch_begin(&copy, &batch, 3) == TP_OK);
    CHECK(tp_batch_add(&copy, &batch, x, labels[0], NULL, NULL) == TP_OK);
    CHECK(tp_batch_add(&copy, &batch, x + 4, labels[1], NULL, NULL) == TP_OK);
    CHECK(tp_batch_shorten(&copy, &batch) == TP_OK);
    CHECK(tp_batch_end(&copy, &batch, &stats) == TP_OK && stats.trained == 2);
    tp_read_parameters(&model, after, 14);
    tp_read_parameters(&copy, one, 14);
    CHECK(memcmp(after, one, sizeof one) == 0);
    free(arena);
    free(copy_arena);
}

/* What the activations cannot run: a negative or NaN LeakyReLU slope (the backward tells
 * x > 0 by y > 0), two activations in a row but ReLU after ReLU (each works in place and
 * needs its output for its backward). */
static void test_activations_refused(void) {
    static float w0[4 * 4], b0[4], w1[2 * 4], b1[2];
    static float slope, settings[2];
    static tp_layer_spec layers[] = {
        TP_DENSE_SPEC(4, w0, b0), TP_LEAKY_RELU_SPEC(&slope), TP_RELU_SPEC(),
        TP_DENSE_SPEC(2, w1, b1),
    };
    tp_model_spec spec = {4, 1, 1, 4, layers};
    const tp_policy_config policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    const tp_optimizer_config sgd = tp_sgd(0.1, 0.0, 0.0);
    size_t bytes;
    slope = 0.2f;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_UNSUPPORTED); /* leaky, relu */
    layers[2] = layers[1];
    layers[1] = (tp_layer_spec)TP_RELU_SPEC();
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_UNSUPPORTED); /* relu, leaky */
    layers[2] = (tp_layer_spec)TP_FLATTEN_SPEC();
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_SIGMOID);
    layers[0] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_TANH);
    spec.layers = layers;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_UNSUPPORTED); /* through F */
    layers[0] = (tp_layer_spec)TP_DENSE_SPEC(4, w0, b0);
    layers[1] = (tp_layer_spec)TP_LEAKY_RELU_SPEC(&slope);
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK);
    slope = -0.1f;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_UNSUPPORTED);
    slope = NAN;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_ARGUMENT);
    layers[1] = (tp_layer_spec)TP_LEAKY_RELU_SPEC(NULL); /* PyTorch's 0.01 */
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK);
    layers[2] = (tp_layer_spec)TP_RELU_SPEC();
    layers[1] = (tp_layer_spec)TP_RELU_SPEC();
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK); /* ReLU after ReLU */
    /* SiLU and the like keep an output of their own and take the derivative from their
     * input: next to any activation, in either order */
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_SILU);
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK); /* SiLU, ReLU */
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_SIGMOID);
    layers[2] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_GELU);
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK); /* Sigmoid, GELU */
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_MISH);
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK); /* Mish, GELU */
    /* ELU, CELU, SELU and Hardtanh work in place, their derivative from their output: not
     * right after another in-place activation, and with settings under which the output still
     * tells it */
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_ELU);
    layers[2] = (tp_layer_spec)TP_RELU_SPEC();
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_UNSUPPORTED); /* ELU, ReLU */
    layers[2] = (tp_layer_spec)TP_FLATTEN_SPEC();
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK); /* PyTorch's alpha 1 */
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SETTINGS_SPEC(TP_LAYER_ELU, settings);
    settings[0] = 0.0f;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK);
    settings[0] = -0.5f; /* y > 0 for some x < 0 */
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_UNSUPPORTED);
    settings[0] = NAN;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_ARGUMENT);
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SETTINGS_SPEC(TP_LAYER_CELU, settings);
    settings[0] = -0.7f; /* alpha < 0 with its reciprocal: monotonic, y <= 0 for x <= 0 */
    settings[1] = (float)(1.0 / -0.7);
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK);
    settings[1] = -settings[1]; /* a reciprocal of the other sign */
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_ARGUMENT);
    settings[0] = settings[1] = 0.0f; /* PyTorch refuses alpha 0 */
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_ARGUMENT);
    settings[0] = 1.0f;
    settings[1] = INFINITY;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_ARGUMENT);
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SETTINGS_SPEC(TP_LAYER_HARDTANH, settings);
    settings[0] = 1.0f; /* min_val > max_val */
    settings[1] = -1.0f;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_ARGUMENT);
    settings[0] = -2.0f;
    settings[1] = 2.0f;
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK);
    layers[2] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_SELU); /* Hardtanh, SELU */
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_UNSUPPORTED);
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SPEC(TP_LAYER_GELU); /* GELU, SELU */
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_OK);
    layers[1] = (tp_layer_spec)TP_ACTIVATION_SPEC((tp_layer_kind)20); /* not a kind */
    CHECK(tp_arena_bytes(&spec, &policy, &sgd, &bytes) == TP_ERR_UNSUPPORTED);
}

/* An activation's settings are copied by tp_init: the spec's array may change or go. */
static void test_activation_settings_are_copied(void) {
    float settings[2] = {-0.5f, 0.8f}, x[72], before[3], after[3];
    tp_layer_spec layers[12];
    tp_model_spec spec = elu_spec;
    owned_model m;
    memcpy(layers, elu_layers, sizeof layers);
    layers[2].weight = settings;
    spec.layers = layers;
    fill(x, 72, 1.0f);
    CHECK(make_model(&m, &spec, TP_POLICY_FULL, TP_OPTIMIZER_SGD) == TP_OK);
    CHECK(tp_predict(&m.model, x, before, NULL) == TP_OK);
    settings[0] = -0.1f;
    settings[1] = 0.1f;
    CHECK(tp_predict(&m.model, x, after, NULL) == TP_OK);
    CHECK(memcmp(before, after, sizeof before) == 0);
    free(m.arena);
}

/* A program compiled with another TP_MAX_LAYERS (or enum size) than the runtime holds a
 * tp_model of another layout: tp_init refuses it before writing a byte (its memset of the
 * runtime's sizeof(tp_model) wrote past a smaller struct). */
static void test_another_build_is_refused(void) {
    const tp_policy_config policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    const tp_optimizer_config opt = tp_sgd(0.1, 0.0, 0.0);
    const tp_memory_config memory = tp_memory_defaults();
    static tp_model model;
    static unsigned char untouched[sizeof(tp_model)];
    size_t bytes = 0;
    void *arena;
    CHECK(tp_arena_bytes(&mlp_spec, &policy, &opt, &bytes) == TP_OK);
    arena = malloc(bytes);
    memset(&model, 0xA5, sizeof model);
    memcpy(untouched, &model, sizeof model);
    /* the sizes of a tp_model of one layer record fewer, or more, and of another enum size */
    CHECK(tp_init_checked(&model, &mlp_spec, &policy, &opt, arena, bytes,
                          TP_BUILD_SIZES - 16 * sizeof(tp_layer)) == TP_ERR_BUILD);
    CHECK(tp_init_mode_checked(&model, &mlp_spec, &policy, &opt, &memory, arena, bytes,
                               TP_BUILD_SIZES + 16 * sizeof(tp_layer)) == TP_ERR_BUILD);
    CHECK(tp_init_checked(&model, &mlp_spec, &policy, &opt, arena, bytes,
                          sizeof(tp_model) * 16 + (sizeof(tp_layer_kind) == 1 ? 4 : 1)) ==
          TP_ERR_BUILD); /* arm-none-eabi-gcc makes enums short: 1 byte */
    CHECK(memcmp(untouched, &model, sizeof model) == 0);
    CHECK(strstr(tp_status_string(TP_ERR_BUILD), "-DTP_MAX_LAYERS") != NULL);
    /* the macros pass this file's sizes: the same build initialises */
    CHECK(tp_init(&model, &mlp_spec, &policy, &opt, arena, bytes) == TP_OK);
    CHECK(tp_init_mode(&model, &mlp_spec, &policy, &opt, &memory, arena, bytes) == TP_OK);
    free(arena);
}

/* A float or int32 buffer at an address that is not a multiple of 4 (a record read into a byte
 * buffer at an odd offset): the Cortex-M4's float loads (VLDR) fault there, a HardFault, and C
 * leaves such an access undefined (UBSan stops it on the host). Refused with
 * TP_ERR_ALIGNMENT before anything is read or written. */
static void test_unaligned_buffers_are_refused(void) {
    static float storage[2 * 16 + 2];
    static int32_t label_storage[3], keep_storage[2 * 3 + 1];
    const tp_policy_config policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    const tp_optimizer_config opt = tp_sgd(0.05, 0.0, 0.0);
    float before[600], after[600], logits[4], output_max, maxima[3];
    unsigned char *const odd_x = (unsigned char *)storage + 1;
    unsigned char *const odd_labels = (unsigned char *)label_storage + 2;
    unsigned char *const odd_keep = (unsigned char *)keep_storage + 3;
    const float *const x = (const float *)(void *)storage;
    size_t count = 0;
    int32_t labels[2] = {1, 3}, predicted;
    tp_step_stats stats;
    tp_batch batch;
    int mode;
    fill(storage, 2 * 16 + 2, 1.0f);
    memcpy(label_storage, labels, sizeof labels);
    for (mode = 0; mode < 2; mode++) { /* the default mode, sgd_in_place */
        tp_memory_config memory = tp_memory_defaults();
        tp_model model;
        size_t bytes;
        void *arena;
        memory.sgd_in_place = mode;
        CHECK(tp_arena_bytes_mode(&mlp_spec, &policy, &opt, &memory, &bytes) == TP_OK);
        arena = malloc(bytes);
        CHECK(tp_init_mode(&model, &mlp_spec, &policy, &opt, &memory, arena, bytes) == TP_OK);
        CHECK(tp_parameter_count(&model, &count) == TP_OK && count <= 600);
        tp_read_parameters(&model, before, count);
        CHECK(tp_train_batch(&model, (const float *)(void *)odd_x, labels, 2, &stats, NULL,
                             NULL) == TP_ERR_ALIGNMENT);
        CHECK(tp_train_batch(&model, x, (const int32_t *)(void *)odd_labels, 2, &stats, NULL,
                             NULL) == TP_ERR_ALIGNMENT);
        CHECK(tp_train_batch(&model, x, labels, 2, &stats, (int32_t *)(void *)odd_keep, NULL) ==
              TP_ERR_ALIGNMENT);
        CHECK(tp_batch_begin(&model, &batch, 1) == TP_OK);
        CHECK(tp_batch_add(&model, &batch, (const float *)(void *)odd_x, 1, NULL, NULL) ==
              TP_ERR_ALIGNMENT);
        CHECK(tp_batch_add(&model, &batch, x, 1, (int32_t *)(void *)odd_keep, NULL) ==
              TP_ERR_ALIGNMENT);
        CHECK(tp_predict(&model, (const float *)(void *)odd_x, logits, &predicted) ==
              TP_ERR_ALIGNMENT);
        CHECK(tp_predict(&model, x, (float *)(void *)odd_x, &predicted) == TP_ERR_ALIGNMENT);
        CHECK(tp_read_running_max(&model, (float *)(void *)odd_x, 3, &output_max) ==
              TP_ERR_ALIGNMENT);
        CHECK(tp_read_running_max(&model, maxima, 3, (float *)(void *)odd_x) ==
              TP_ERR_ALIGNMENT);
        tp_read_parameters(&model, after, count);
        CHECK(memcmp(before, after, count * sizeof(float)) == 0); /* nothing trained */
        CHECK(model.optimizer_steps == 0);
        /* the refused sample left the batch pending: an aligned one completes it */
        CHECK(tp_batch_add(&model, &batch, x, 1, NULL, NULL) == TP_OK);
        CHECK(tp_batch_end(&model, &batch, &stats) == TP_OK);
        CHECK(strstr(tp_status_string(TP_ERR_ALIGNMENT), "4-byte") != NULL);
        free(arena);
    }
    { /* a model description whose weights start at an odd address (a hand-made header) */
        static tp_layer_spec odd_layers[] = {TP_FLATTEN_SPEC(), TP_DENSE_SPEC(2, NULL, NULL)};
        static const tp_model_spec odd_spec = {1, 1, 4, 2, odd_layers};
        const tp_policy_config full = tp_policy_defaults(TP_POLICY_FULL);
        tp_model model;
        size_t bytes;
        void *arena;
        CHECK(tp_arena_bytes(&odd_spec, &full, &opt, &bytes) == TP_OK);
        arena = malloc(bytes);
        odd_layers[1].weight = (const float *)(void *)odd_x;
        CHECK(tp_init(&model, &odd_spec, &full, &opt, arena, bytes) == TP_ERR_ALIGNMENT);
        odd_layers[1].weight = x;
        odd_layers[1].bias = (const float *)(void *)(odd_x + 1);
        CHECK(tp_init(&model, &odd_spec, &full, &opt, arena, bytes) == TP_ERR_ALIGNMENT);
        odd_layers[1].bias = x + 8;
        CHECK(tp_init(&model, &odd_spec, &full, &opt, arena, bytes) == TP_OK);
        free(arena);
    }
}

int main(void) {
    init_weights();
    test_arguments_are_checked();
    test_another_build_is_refused();
    test_arena_exact_for_every_model_and_policy();
    test_nonfinite_loss_changes_nothing();
    test_all_skipped_batch_makes_no_update();
    test_keep_count_formula();
    test_topk_selection();
    test_selection_against_sort();
    test_large_selection_against_sort();
    test_skip_decision();
    test_gradient_matches_finite_differences();
    test_memory_modes();
    test_nonfinite_loss_with_momentum_in_place(); /* fill() draws from one sequence */
    test_nonfinite_gradient_in_place();
    test_in_place_dry_run_trains_as_plain_sgd();
    test_samples_one_at_a_time_equal_the_whole_batch();
    test_batch_api_errors();
    test_hostile_values();
    test_activations_refused();
    test_activation_settings_are_copied();
    test_unaligned_buffers_are_refused();
    test_in_place_weight_bound_follows_the_weights(); /* last: it fills the specs' weights */
    printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
