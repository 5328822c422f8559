/* bench_replay.c: instruction counts of every step of a real training run under callgrind
 * (driven by benchmarks/runtime_bench.py; build against an exported tinyprop_model.h with its
 * tinyprop_samples.h, and replay_order.h).
 *
 * The run is the project's HAR benchmark run (small suite, finetune protocol, seed 0): the
 * pretrained weights, the on-device training samples, and the order in which the Python
 * benchmark feeds them (REPLAY_STEPS sample indices in REPLAY_BATCHES batches of
 * replay_batch_size[b] samples: an epoch's last batch may be short). Every
 * sample's step is measured twice on the same state: under full ("full_<i>") and under
 * tinypropv2 ("v2_<i>"); the tinypropv2 step is then kept, and the batch's update follows, so
 * the state moves as in a tinypropv2 training run. The driver prints one line per step:
 *   step <i> trained <0|1> keep <k per trainable layer>
 * tinypropv2's settings: the library's defaults, or -DREPLAY_S_MAX / -DREPLAY_ZETA /
 * -DREPLAY_SKIP_THRESHOLD.
 * Run: valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no ./bench_replay
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <valgrind/callgrind.h>

#include "tinyprop_model.h"
#include "tinyprop_samples.h"
#include "replay_order.h"
#include "tp_internal.h"

static float arena[TP_MODEL_ARENA_BYTES / sizeof(float)];
static float arena_saved[TP_MODEL_ARENA_BYTES / sizeof(float)];
static tp_model model, model_saved;

/* One per-sample step of sample `index` on the current state under the model's policy,
 * measured and dumped as `name`; returns trained (1) or skipped (0). */
static int measured_step(int32_t index, const char *name, int32_t *keep) {
    float loss;
    int trained = 0;
    tp_ledger macs = {0, 0, 0, 0};
    CALLGRIND_TOGGLE_COLLECT;
    tp_sample_step(&model, tp_samples_x + (size_t)index * TP_MODEL_INPUT_SIZE, -1.0f,
                   tp_samples_y[index], &loss, &trained, keep, &macs);
    CALLGRIND_TOGGLE_COLLECT;
    CALLGRIND_DUMP_STATS_AT(name);
    return trained;
}

int main(void) {
    tp_policy_config v2 = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    const tp_policy_config full = tp_policy_defaults(TP_POLICY_FULL);
    int32_t keep[TP_MODEL_LAYERS], batch, step = 0, l;
    char name[32];
#ifdef REPLAY_S_MAX
    v2.s_max = REPLAY_S_MAX;
#endif
#ifdef REPLAY_ZETA
    v2.zeta = REPLAY_ZETA;
#endif
#ifdef REPLAY_SKIP_THRESHOLD
    v2.skip_threshold = REPLAY_SKIP_THRESHOLD;
#endif
    if (tp_init(&model, &tp_model_spec_exported, &v2, &tp_model_optimizer, arena,
                sizeof arena) != TP_OK) {
        printf("init failed\n");
        return 1;
    }
    CALLGRIND_START_INSTRUMENTATION;
    for (batch = 0; batch < REPLAY_BATCHES; batch++) {
        const int32_t end = step + replay_batch_size[batch];
        int32_t i, trained_count = 0;
        tp_zero(model.gradients, model.parameter_count); /* as tp_train_batch does */
        for (i = step; i < end; i++) {
            int trained;
            /* full on a copy of the state, then the state back for tinypropv2 */
            memcpy(arena_saved, arena, sizeof arena);
            model_saved = model;
            model.policy = full;
            snprintf(name, sizeof name, "full_%ld", (long)i);
            measured_step(replay_order[i], name, keep);
            memcpy(arena, arena_saved, sizeof arena);
            model = model_saved;
            snprintf(name, sizeof name, "v2_%ld", (long)i);
            trained = measured_step(replay_order[i], name, keep);
            printf("step %ld trained %d keep", (long)i, trained);
            for (l = 0; trained && l < model.trainable_count; l++) printf(" %ld", (long)keep[l]);
            printf("\n");
            trained_count += trained;
        }
        if (trained_count > 0) tp_optimizer_update(&model, replay_batch_size[batch]);
        step = end;
    }
    CALLGRIND_STOP_INSTRUMENTATION;
    return 0;
}
