/* count_instructions.c: instructions per tp_batch_add call of the example program on the
 * Cortex-M4, counted under QEMU (benchmarks/m4_instructions.py). Linked with
 * -Wl,--wrap=tp_batch_add and run with `-icount shift=0`, which makes QEMU's virtual clock
 * advance one nanosecond per instruction executed: SysTick, on the processor clock (25 MHz on
 * mps2-an386), then counts one tick per 40 instructions, the same count on every run. Each
 * call is counted as a trained or a skipped sample; at exit the program prints
 *     instructions trained T calls N skipped S calls M
 * (T and S in instructions, to within 40 per call). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "tinyprop.h"

#define TP_SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define TP_SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define TP_SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define TP_INSTRUCTIONS_PER_TICK 40u /* 1 ns per instruction, 40 ns per tick of 25 MHz */

tp_status __real_tp_batch_add(tp_model *model, tp_batch *batch, const float *x, int32_t label,
                              int32_t *keep_row, uint8_t *trained_out);
tp_status __wrap_tp_batch_add(tp_model *model, tp_batch *batch, const float *x, int32_t label,
                              int32_t *keep_row, uint8_t *trained_out);

static uint64_t ticks[2];       /* skipped, trained */
static unsigned long calls[2];

static void print_counts(void) {
    printf("instructions trained %llu calls %lu skipped %llu calls %lu\n",
           (unsigned long long)(ticks[1] * TP_INSTRUCTIONS_PER_TICK), calls[1],
           (unsigned long long)(ticks[0] * TP_INSTRUCTIONS_PER_TICK), calls[0]);
}

tp_status __wrap_tp_batch_add(tp_model *model, tp_batch *batch, const float *x, int32_t label,
                              int32_t *keep_row, uint8_t *trained_out) {
    static int started = 0;
    uint8_t trained = 0;
    uint32_t before, after;
    tp_status status;
    if (!started) { /* the largest reload: a call of up to 671 M instructions */
        TP_SYST_RVR = 0xFFFFFFu;
        TP_SYST_CVR = 0u;
        TP_SYST_CSR = 5u; /* enabled, processor clock, no interrupt */
        atexit(print_counts);
        started = 1;
    }
    before = TP_SYST_CVR;
    status = __real_tp_batch_add(model, batch, x, label, keep_row, &trained);
    after = TP_SYST_CVR;
    if (trained_out != NULL) *trained_out = trained;
    ticks[trained != 0] += (before - after) & 0xFFFFFFu; /* it counts down */
    calls[trained != 0]++;
    return status;
}
