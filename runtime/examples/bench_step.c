/* bench_step.c: instruction counts of one training step under callgrind (driven by
 * benchmarks/runtime_bench.py; build against an exported tinyprop_model.h).
 *
 * 1. Warm up: train the model with tinypropv2 on a learnable synthetic task (class prototypes
 *    plus noise) so that errors spread out and some samples are skipped, as in real training.
 * 2. Find a fresh sample that tinypropv2 skips and one that it trains (with its true label if
 *    one of 200 is trained, else with a wrong label), each tried on a copy of the state, which
 *    is then restored.
 * 3. Measure, each between CALLGRIND_TOGGLE_COLLECT pairs and dumped under its own name:
 *    the per-sample step (forward, loss, skip decision, sparse backward with gradient
 *    accumulation) of the trained sample under full, topk (ratio 0.1) and tinypropv2, of the
 *    skipped sample under tinypropv2, and the per-batch update (zero gradients + SGD step).
 * 4. Measure a short training run from the warmed-up state under each policy: MEAN_SAMPLES
 *    fresh samples (the same for every policy) in batches of WARMUP_BATCH, whole
 *    tp_train_batch calls (forward, skip decisions, sparse backward, updates), dumped as
 *    "<policy>_mean"; the driver divides by MEAN_SAMPLES.
 * 5. Replay the tinypropv2 run sample by sample: each sample's step under tinypropv2 and, on a
 *    copy of the same state, under full ("v2_sample_<i>", "full_sample_<i>").
 * 6. Steps 3-5 for tinypropv2 at the setting the project's HAR benchmark chose on its
 *    validation split (s_max 0.5, skip_threshold 0.5, zeta 1.0; "chosen"), from the same
 *    warmed-up state: "tinypropv2_chosen_trained", "_skipped", "_mean", and the replay
 *    "v2c_sample_<i>" / "fullc_sample_<i>".
 * Build with -DTP_SKIP_ZERO_ERRORS=1 for the variant that skips zero output errors.
 * Run: valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no ./bench_step
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <valgrind/callgrind.h>

#include "tinyprop_model.h"
#include "tp_internal.h"

#ifndef WARMUP_SAMPLES
#define WARMUP_SAMPLES 48
#endif
#ifndef WARMUP_EPOCHS
#define WARMUP_EPOCHS 3
#endif
#ifndef WARMUP_LR
#define WARMUP_LR 0.05
#endif
#ifndef WARMUP_SHIFT
#define WARMUP_SHIFT 1.0f
#endif
#ifndef WARMUP_NOISE
#define WARMUP_NOISE 0.6f
#endif
#define WARMUP_BATCH 8
#ifndef MEAN_SAMPLES
#define MEAN_SAMPLES 64
#endif

static float arena[TP_MODEL_ARENA_BYTES / sizeof(float)];
static float arena_backup[TP_MODEL_ARENA_BYTES / sizeof(float)];
static float arena_full[TP_MODEL_ARENA_BYTES / sizeof(float)];
static tp_model model, model_backup, model_full;
static float prototypes[TP_MODEL_CLASSES][TP_MODEL_INPUT_SIZE];
static float warmup_x[WARMUP_SAMPLES][TP_MODEL_INPUT_SIZE];
static int32_t warmup_y[WARMUP_SAMPLES];
static float sample[TP_MODEL_INPUT_SIZE];
static float mean_x[MEAN_SAMPLES][TP_MODEL_INPUT_SIZE];
static int32_t mean_y[MEAN_SAMPLES];

static unsigned long long rng = 0x9E3779B97F4A7C15ULL;
static float uniform(void) { /* xorshift64 in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static float noise(void) { return uniform() + uniform() + uniform(); } /* roughly normal */

static int32_t draw(float *x) {
    int32_t label = (int32_t)((uniform() + 1.0f) * 0.5f * TP_MODEL_CLASSES), i;
    if (label >= TP_MODEL_CLASSES) label = TP_MODEL_CLASSES - 1;
    for (i = 0; i < TP_MODEL_INPUT_SIZE; i++) x[i] = prototypes[label][i] + WARMUP_NOISE * noise();
    return label;
}

static void save(void) {
    memcpy(arena_backup, arena, sizeof arena);
    model_backup = model;
}
static void restore(void) {
    memcpy(arena, arena_backup, sizeof arena);
    model = model_backup;
}

/* tinypropv2 at the HAR benchmark's chosen setting (benchmarks/results/small-finetune) */
static tp_policy_config chosen_setting(void) {
    tp_policy_config config = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    config.s_max = 0.5;
    config.skip_threshold = 0.5;
    config.zeta = 1.0;
    return config;
}

/* Switch the model's policy, with the per-layer zeta^depth that tp_init derives from it. */
static void set_policy(tp_policy_config config) {
    int32_t l;
    model.policy = config;
    for (l = 0; l < model.layer_count; l++)
        if (model.layers[l].trainable_index >= 0)
            model.layers[l].depth_scale = pow(config.zeta, (double)model.layers[l].depth);
}

/* One per-sample step on the current state; returns trained (1) or skipped (0). */
static int step(int32_t label, int32_t *keep, int measured, const char *name) {
    float loss;
    int trained = 0;
    tp_ledger macs = {0, 0, 0, 0};
    memset(model.gradients, 0, model.parameter_count * sizeof(float));
    if (measured) CALLGRIND_TOGGLE_COLLECT;
    tp_sample_step(&model, sample, -1.0f, label, &loss, &trained, keep, &macs);
    if (measured) {
        CALLGRIND_TOGGLE_COLLECT;
        CALLGRIND_DUMP_STATS_AT(name);
        printf("region %s trained %d macs %lu %lu %lu %lu keep", name, trained,
               (unsigned long)macs.forward, (unsigned long)macs.backward,
               (unsigned long)macs.backward_dense, (unsigned long)macs.selection);
        if (trained) {
            int32_t l;
            for (l = 0; l < model.trainable_count; l++) printf(" %ld", (long)keep[l]);
        }
        printf("\n");
    }
    return trained;
}

int main(void) {
    tp_policy_config v2 = tp_policy_defaults(TP_POLICY_TINYPROPV2);
#ifdef WARMUP_ADAM
    tp_optimizer_config sgd = tp_adam(WARMUP_LR, 0.0);
#else
    tp_optimizer_config sgd = tp_sgd(WARMUP_LR, 0.9, 0.0);
#endif
    tp_step_stats stats;
    int32_t keep[TP_MODEL_LAYERS], i, j, epoch, trained_label = -1, skipped_label = -1;
    static float trained_x[TP_MODEL_INPUT_SIZE], skipped_x[TP_MODEL_INPUT_SIZE];
    size_t bytes = 0;
    if (tp_arena_bytes(&tp_model_spec_exported, &v2, &sgd, &bytes) != TP_OK ||
        bytes > sizeof arena ||
        tp_init(&model, &tp_model_spec_exported, &v2, &sgd, arena, sizeof arena) != TP_OK) {
        printf("init failed\n");
        return 1;
    }
    /* a class shifts each input channel (and, for images, each column) by a constant */
    for (i = 0; i < TP_MODEL_CLASSES; i++) {
        float channel_shift[TP_MODEL_INPUT_CHANNELS], column_shift[TP_MODEL_INPUT_WIDTH];
        for (j = 0; j < TP_MODEL_INPUT_CHANNELS; j++) channel_shift[j] = WARMUP_SHIFT * noise();
        for (j = 0; j < TP_MODEL_INPUT_WIDTH; j++)
            column_shift[j] = TP_MODEL_INPUT_HEIGHT > 1 ? WARMUP_SHIFT * noise() : 0.0f;
        for (j = 0; j < TP_MODEL_INPUT_SIZE; j++)
            prototypes[i][j] = channel_shift[j / (TP_MODEL_INPUT_HEIGHT * TP_MODEL_INPUT_WIDTH)] +
                               column_shift[j % TP_MODEL_INPUT_WIDTH];
    }
    for (i = 0; i < WARMUP_SAMPLES; i++) warmup_y[i] = draw(warmup_x[i]);
    /* full training first (deep nets learn slowly with the sparse policies), then one epoch of
     * tinypropv2 so that its running maxima hold the errors of the task */
    model.policy = tp_policy_defaults(TP_POLICY_FULL);
    for (epoch = 0; epoch <= WARMUP_EPOCHS; epoch++) {
        if (epoch == WARMUP_EPOCHS) model.policy = v2;
        for (i = 0; i < WARMUP_SAMPLES; i += WARMUP_BATCH) {
            tp_train_batch(&model, warmup_x[i], &warmup_y[i], WARMUP_BATCH, &stats, NULL, NULL);
            printf("warmup epoch %ld loss %.4f trained %ld skipped %ld\n", (long)epoch,
                   (double)stats.loss, (long)stats.trained, (long)stats.skipped);
        }
    }
    /* fresh samples: the first that v2 skips, and the first that it trains, with its true
     * label (a typical trained sample); after 200 tries, with a wrong label (a hard one) */
    for (i = 0; i < 400 && (trained_label < 0 || skipped_label < 0); i++) {
        const int32_t label = draw(sample);
        const int32_t train_label = i < 200 ? label : (label + 1) % TP_MODEL_CLASSES;
        int trained;
        save();
        trained = step(label, keep, 0, "probe");
        restore();
        if (!trained && skipped_label < 0) {
            skipped_label = label;
            memcpy(skipped_x, sample, sizeof sample);
        }
        if (trained_label < 0 && train_label != label) {
            save();
            trained = step(train_label, keep, 0, "probe");
            restore();
        }
        if (trained && trained_label < 0) {
            trained_label = train_label;
            if (train_label != label) printf("trained sample has a wrong label (hard)\n");
            memcpy(trained_x, sample, sizeof sample);
        }
    }
    printf("found trained %d skipped %d after %ld samples\n", trained_label >= 0,
           skipped_label >= 0, (long)i);
    CALLGRIND_START_INSTRUMENTATION;
    if (trained_label >= 0) {
        const tp_policy policies[3] = {TP_POLICY_FULL, TP_POLICY_TOPK, TP_POLICY_TINYPROPV2};
        const char *names[4] = {"full_trained", "topk_trained", "tinypropv2_trained",
                                "tinypropv2_chosen_trained"};
        int p;
        memcpy(sample, trained_x, sizeof sample);
        for (p = 0; p < 4; p++) {
            save();
            set_policy(p < 3 ? tp_policy_defaults(policies[p]) : chosen_setting());
            step(trained_label, keep, 1, names[p]);
            restore();
        }
        /* the per-batch part of a step: zero the gradients, one SGD update */
        save();
        CALLGRIND_TOGGLE_COLLECT;
        tp_zero(model.gradients, model.parameter_count); /* as tp_train_batch does */
        tp_optimizer_update(&model, 1);
        CALLGRIND_TOGGLE_COLLECT;
        CALLGRIND_DUMP_STATS_AT("update");
        printf("region update\n");
        restore();
    }
    if (skipped_label >= 0) {
        memcpy(sample, skipped_x, sizeof sample);
        save();
        step(skipped_label, keep, 1, "tinypropv2_skipped");
        restore();
        save();
        set_policy(chosen_setting());
        step(skipped_label, keep, 1, "tinypropv2_chosen_skipped");
        restore();
    }
    /* a short training run from the warmed-up state, the same samples for every policy */
    for (i = 0; i < MEAN_SAMPLES; i++) mean_y[i] = draw(mean_x[i]);
    {
        const tp_policy policies[3] = {TP_POLICY_FULL, TP_POLICY_TOPK, TP_POLICY_TINYPROPV2};
        const char *names[4] = {"full_mean", "topk_mean", "tinypropv2_mean",
                                "tinypropv2_chosen_mean"};
        int p;
        for (p = 0; p < 4; p++) {
            tp_ledger macs = {0, 0, 0, 0};
            int32_t trained = 0;
            save();
            set_policy(p < 3 ? tp_policy_defaults(policies[p]) : chosen_setting());
            CALLGRIND_TOGGLE_COLLECT;
            for (i = 0; i + WARMUP_BATCH <= MEAN_SAMPLES; i += WARMUP_BATCH) {
                tp_train_batch(&model, mean_x[i], &mean_y[i], WARMUP_BATCH, &stats, NULL, NULL);
                tp_ledger_add(&macs, &stats.macs);
                trained += stats.trained;
            }
            CALLGRIND_TOGGLE_COLLECT;
            CALLGRIND_DUMP_STATS_AT(names[p]);
            printf("region %s trained %ld macs %lu %lu %lu %lu samples %ld\n", names[p],
                   (long)trained, (unsigned long)macs.forward, (unsigned long)macs.backward,
                   (unsigned long)macs.backward_dense, (unsigned long)macs.selection,
                   (long)MEAN_SAMPLES);
            restore();
        }
    }
    /* 5. the tinypropv2 run again, sample by sample (the same samples, batches and updates as
     *    tp_train_batch): each sample's step is measured under tinypropv2 ("v2_sample_<i>")
     *    and, on a copy of the same state, under full ("full_sample_<i>"), so that every
     *    trained sample has its own ratio to full (the driver reports the median). */
    for (epoch = 0; epoch < 2; epoch++) { /* the default setting, then the chosen one */
        const char *tag = epoch == 0 ? "" : "c";
        tp_ledger macs = {0, 0, 0, 0};
        char name[64];
        save();
        set_policy(epoch == 0 ? v2 : chosen_setting());
        for (i = 0; i + WARMUP_BATCH <= MEAN_SAMPLES; i += WARMUP_BATCH) {
            int32_t trained_count = 0;
            tp_zero(model.gradients, model.parameter_count);
            for (j = i; j < i + WARMUP_BATCH; j++) {
                float loss;
                int trained = 0;
                /* full on a copy of the state */
                memcpy(sample, mean_x[j], sizeof sample);
                memcpy(arena_full, arena, sizeof arena);
                model_full = model;
                model.policy = tp_policy_defaults(TP_POLICY_FULL);
                CALLGRIND_TOGGLE_COLLECT;
                tp_sample_step(&model, sample, -1.0f, mean_y[j], &loss, &trained, keep, &macs);
                CALLGRIND_TOGGLE_COLLECT;
                snprintf(name, sizeof name, "full%s_sample_%ld", tag, (long)j);
                CALLGRIND_DUMP_STATS_AT(name);
                memcpy(arena, arena_full, sizeof arena);
                model = model_full;
                CALLGRIND_TOGGLE_COLLECT;
                tp_sample_step(&model, sample, -1.0f, mean_y[j], &loss, &trained, keep, &macs);
                CALLGRIND_TOGGLE_COLLECT;
                snprintf(name, sizeof name, "v2%s_sample_%ld", tag, (long)j);
                CALLGRIND_DUMP_STATS_AT(name);
                printf("sample%s %ld trained %d keep", tag, (long)j, trained);
                if (trained) {
                    int32_t l;
                    for (l = 0; l < model.trainable_count; l++) printf(" %ld", (long)keep[l]);
                }
                printf("\n");
                trained_count += trained;
            }
            if (trained_count > 0) tp_optimizer_update(&model, WARMUP_BATCH);
        }
        restore();
    }
    CALLGRIND_STOP_INSTRUMENTATION;
    return 0;
}
