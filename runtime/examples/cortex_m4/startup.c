/* startup.c: vector table and reset handler for Cortex-M4 under QEMU mps2-an386.
 * The reset handler turns the FPU on (hard-float code needs it) and enters newlib's rdimon
 * start-up (_start), which sets up semihosting, clears .bss, calls main and exits. */
#include <stdint.h>

extern void _start(void);
extern uint32_t __stack_top;

void tp_reset_handler(void);
static void tp_fault_handler(void) {
    for (;;) {
    }
}

void tp_reset_handler(void) {
    volatile uint32_t *cpacr = (volatile uint32_t *)0xE000ED88u;
    *cpacr |= 0xFu << 20; /* CP10 and CP11: full access */
    __asm__ volatile("dsb\n\tisb");
    _start();
    for (;;) {
    }
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(&__stack_top), tp_reset_handler, tp_fault_handler, tp_fault_handler,
    tp_fault_handler, tp_fault_handler, tp_fault_handler, 0, 0, 0, 0,
    tp_fault_handler, tp_fault_handler, 0, tp_fault_handler, tp_fault_handler,
};
