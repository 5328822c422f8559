/* train_example.c: train an exported model on samples fed to it.
 *
 * `tinyprop export MODEL.pt --out DIR` writes DIR/tinyprop_model.h (shapes, initial weights,
 * policy, optimizer, arena size) and copies this file as DIR/main.c, beside a Makefile and the
 * runtime sources. It is the complete program that runtime/include/tinyprop.h points to.
 *
 * Host:   make && ./train < samples.bin
 *         samples.bin: records of TP_MODEL_INPUT_SIZE float32 values then one int32 label
 *         (native byte order); every TP_MODEL_BATCH_SIZE records make one update.
 * Board:  build with -DTP_EMBEDDED_SAMPLES: trains on tinyprop_samples.h for TP_SAMPLE_EPOCHS.
 * Prints one line per batch, the MAC totals and (with -DTP_PRINT_PARAMETERS) every trained
 * weight as its float32 bit pattern, so that two builds can be compared exactly.
 */
#include <stdio.h>
#include <string.h>

#include "tinyprop_model.h"
#ifdef TP_EMBEDDED_SAMPLES
#include "tinyprop_samples.h"
#endif

/* Exactly the bytes tp_arena_bytes_mode asks for under the header's memory mode (checked at
 * start-up). */
static float arena[TP_MODEL_ARENA_BYTES / sizeof(float)];
static tp_model model;
static float batch_x[TP_MODEL_BATCH_SIZE * TP_MODEL_INPUT_SIZE];
static int32_t batch_y[TP_MODEL_BATCH_SIZE];

static int train(int32_t count, int32_t number) {
    tp_step_stats stats;
    tp_status status = tp_train_batch(&model, batch_x, batch_y, count, &stats, NULL, NULL);
    if (status != TP_OK) {
        printf("batch %ld: %s\n", (long)number, tp_status_string(status));
        return 1;
    }
    printf("batch %ld loss %.6f trained %ld skipped %ld\n", (long)number, (double)stats.loss,
           (long)stats.trained, (long)stats.skipped);
    return 0;
}

#ifdef TP_EMBEDDED_SAMPLES
static int feed(void) {
    int32_t epoch, start, number = 0;
    for (epoch = 0; epoch < TP_SAMPLE_EPOCHS; epoch++) {
        for (start = 0; start < TP_SAMPLE_COUNT; start += TP_MODEL_BATCH_SIZE) {
            int32_t count = TP_SAMPLE_COUNT - start;
            if (count > TP_MODEL_BATCH_SIZE) count = TP_MODEL_BATCH_SIZE;
            memcpy(batch_x, &tp_samples_x[(size_t)start * TP_MODEL_INPUT_SIZE],
                   (size_t)count * TP_MODEL_INPUT_SIZE * sizeof(float));
            memcpy(batch_y, &tp_samples_y[start], (size_t)count * sizeof(int32_t));
            if (train(count, number++) != 0) return 1;
        }
    }
    return 0;
}
#else
static int feed(void) {
    const size_t values = (size_t)TP_MODEL_INPUT_SIZE * sizeof(float), record = values + 4;
    int32_t count = 0, number = 0;
    for (;;) {
        size_t got = fread(&batch_x[(size_t)count * TP_MODEL_INPUT_SIZE], 1, values, stdin);
        if (got == values) got += fread(&batch_y[count], 1, sizeof(int32_t), stdin);
        if (got == 0) break;
        if (got != record) { /* a file written for another input size, or cut short */
            printf("samples: the input ends inside record %ld (%lu of its %lu bytes: %d float32 "
                   "values, then an int32 label)\n",
                   (long)number * TP_MODEL_BATCH_SIZE + count, (unsigned long)got,
                   (unsigned long)record, TP_MODEL_INPUT_SIZE);
            return 1;
        }
        if (++count == TP_MODEL_BATCH_SIZE) {
            if (train(count, number++) != 0) return 1;
            count = 0;
        }
    }
    if (count > 0 && train(count, number) != 0) return 1;
    return 0;
}
#endif

int main(void) {
    size_t needed = 0;
    tp_status status = tp_arena_bytes_mode(&tp_model_spec_exported, &tp_model_policy,
                                           &tp_model_optimizer, &tp_model_memory, &needed);
    tp_ledger total;
    size_t used;
    if (status != TP_OK || needed != TP_MODEL_ARENA_BYTES) {
        printf("arena: %s, needs %lu bytes, header says %lu\n", tp_status_string(status),
               (unsigned long)needed, (unsigned long)TP_MODEL_ARENA_BYTES);
        return 1;
    }
    status = tp_init_mode(&model, &tp_model_spec_exported, &tp_model_policy, &tp_model_optimizer,
                          &tp_model_memory, arena, sizeof arena);
    if (status != TP_OK) {
        printf("tp_init: %s\n", tp_status_string(status));
        return 1;
    }
    printf("model: %d parameters, training arena %lu bytes, inference %lu bytes\n",
           TP_MODEL_PARAMETERS, (unsigned long)TP_MODEL_ARENA_BYTES,
           (unsigned long)TP_MODEL_INFERENCE_BYTES);
    if (feed() != 0) return 1;
    tp_read_totals(&model, &total, &used);
    printf("macs forward %lu backward %lu backward_dense %lu selection %lu\n",
           (unsigned long)total.forward, (unsigned long)total.backward,
           (unsigned long)total.backward_dense, (unsigned long)total.selection);
#ifdef TP_PRINT_PARAMETERS
    {
        size_t i;
        for (i = 0; i < model.parameter_count; i++) {
            uint32_t bits;
            memcpy(&bits, &model.parameters[i], sizeof bits);
            printf("p %lu %08lx\n", (unsigned long)i, (unsigned long)bits);
        }
    }
#endif
    printf("done\n");
    return 0;
}
