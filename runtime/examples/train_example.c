/* train_example.c: train an exported model on samples fed to it.
 *
 * `tinyprop export MODEL.pt --out DIR` writes DIR/tinyprop_model.h (shapes, initial weights,
 * policy, optimizer, arena size) and copies this file as DIR/main.c, beside a Makefile and the
 * runtime sources. It is the complete program that runtime/include/tinyprop.h points to.
 *
 * Host:   make && ./train < samples.bin
 *         samples.bin: records of TP_MODEL_INPUT_SIZE float32 values then one int32 label
 *         (native byte order); every TP_MODEL_BATCH_SIZE records make one update (a last,
 *         shorter batch one of its own). The records are read one at a time and fed with
 *         tp_batch_add: the program holds one sample, so the file may be of any length.
 *         A record the runtime refuses (a label outside the classes, a NaN or infinite value)
 *         stops it with a line naming the record and the status, exit status 1.
 * Board:  build with -DTP_EMBEDDED_SAMPLES: trains on tinyprop_samples.h for TP_SAMPLE_EPOCHS
 *         (each epoch's last batch may be shorter), read where they are (flash).
 * Prints one line per batch, the MAC totals and (with -DTP_PRINT_PARAMETERS) every trained
 * weight as its float32 bit pattern, so that two builds can be compared exactly.
 */
#include <math.h>
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
static tp_batch pending;

/* A status as its code and text, e.g. "status -5 (a label is outside [0, classes))". */
static void print_status(tp_status status) {
    printf("status %d (%s)\n", (int)status, tp_status_string(status));
}

/* The batch's update and its line; a status other than TP_OK stops the program. */
static int end_batch(int32_t number) {
    tp_step_stats stats;
    tp_status status = tp_batch_end(&model, &pending, &stats);
    if (status != TP_OK) {
        printf("batch %ld: ", (long)number);
        print_status(status);
        return 1;
    }
    printf("batch %ld loss %.6f trained %ld skipped %ld\n", (long)number, (double)stats.loss,
           (long)stats.trained, (long)stats.skipped);
    return 0;
}

/* One sample into the pending batch (begun at its first sample); the batch's update once it
 * holds TP_MODEL_BATCH_SIZE samples. A sample the runtime refuses (a label outside the
 * classes, a NaN or infinite value, a loss that is not finite) stops the program with a line
 * naming the record. */
static int add_sample(const float *x, int32_t label, long record, int32_t *added,
                      int32_t *number) {
    tp_status status = TP_OK;
    int32_t i;
    if (*added == 0) status = tp_batch_begin(&model, &pending, TP_MODEL_BATCH_SIZE);
    if (status == TP_OK) status = tp_batch_add(&model, &pending, x, label, NULL, NULL);
    if (status != TP_OK) {
        printf("samples: record %ld (batch %ld): ", record, (long)*number);
        if (status == TP_ERR_LABEL)
            printf("label %ld is outside [0, %d); ", (long)label, TP_MODEL_CLASSES);
        for (i = 0; status == TP_ERR_NONFINITE && i < TP_MODEL_INPUT_SIZE; i++)
            if (!isfinite(x[i])) {
                printf("value %ld of %d is NaN or infinite; ", (long)i, TP_MODEL_INPUT_SIZE);
                break;
            }
        print_status(status);
        return 1;
    }
    if (++*added == TP_MODEL_BATCH_SIZE) {
        *added = 0;
        return end_batch((*number)++);
    }
    return 0;
}

/* The input ended inside a batch: update with the samples it has. */
static int end_short_batch(int32_t added, int32_t number) {
    tp_status status;
    if (added == 0) return 0;
    status = tp_batch_shorten(&model, &pending);
    if (status != TP_OK) {
        printf("samples: the input ends inside batch %ld after %ld of its %d samples, which "
               "this memory mode cannot train as a shorter batch (give whole batches): ",
               (long)number, (long)added, TP_MODEL_BATCH_SIZE);
        print_status(status);
        return 1;
    }
    return end_batch(number);
}

#ifdef TP_EMBEDDED_SAMPLES
/* straight from the samples in flash: no copy in RAM */
static int feed(void) {
    int32_t epoch, start, added = 0, number = 0;
    for (epoch = 0; epoch < TP_SAMPLE_EPOCHS; epoch++) {
        for (start = 0; start < TP_SAMPLE_COUNT; start++)
            if (add_sample(&tp_samples_x[(size_t)start * TP_MODEL_INPUT_SIZE],
                           tp_samples_y[start], (long)start, &added, &number) != 0)
                return 1;
        if (added > 0 && end_short_batch(added, number++) != 0) return 1; /* its last batch */
        added = 0;
    }
    return 0;
}
#else
/* One record at a time from stdin: the program holds one sample, whatever the batch size and
 * however long the input. */
static float sample[TP_MODEL_INPUT_SIZE];
static int feed(void) {
    const size_t values = (size_t)TP_MODEL_INPUT_SIZE * sizeof(float), record = values + 4;
    int32_t added = 0, number = 0, label = 0;
    long index;
    for (index = 0;; index++) {
        size_t got = fread(sample, 1, values, stdin);
        if (got == values) got += fread(&label, 1, sizeof label, stdin);
        if (got == 0) break;
        if (got != record) { /* a file written for another input size, or cut short */
            printf("samples: the input ends inside record %ld (%lu of its %lu bytes: %d float32 "
                   "values, then an int32 label)\n",
                   index, (unsigned long)got, (unsigned long)record, TP_MODEL_INPUT_SIZE);
            return 1;
        }
        if (add_sample(sample, label, index, &added, &number) != 0) return 1;
    }
    return end_short_batch(added, number);
}
#endif

/* tp_init_mode checks the arena against the plan and tp_read_totals says how many bytes it
 * used, so the header's TP_MODEL_ARENA_BYTES is checked without tp_arena_bytes_mode, whose
 * own copy of the layers would take the program's deepest stack (runtime/README.md). */
int main(void) {
    tp_ledger total;
    size_t used = 0;
    tp_status status = tp_init_mode(&model, &tp_model_spec_exported, &tp_model_policy,
                                    &tp_model_optimizer, &tp_model_memory, arena, sizeof arena);
    if (status != TP_OK) {
        printf("tp_init: ");
        print_status(status);
        return 1;
    }
    tp_read_totals(&model, &total, &used);
    if (used != TP_MODEL_ARENA_BYTES) {
        printf("arena: the model needs %lu bytes, the header says %lu\n", (unsigned long)used,
               (unsigned long)TP_MODEL_ARENA_BYTES);
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
