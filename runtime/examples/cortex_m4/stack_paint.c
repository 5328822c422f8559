/* stack_paint.c: the stack and heap the example program takes on the Cortex-M4, measured under
 * QEMU. Linked with -Wl,--wrap=main, so that newlib's start-up calls __wrap_main, which fills
 * the free RAM between the heap and the stack with a pattern, runs the program's main and then
 * finds the deepest word the stack overwrote (stack painting) and the end of the heap
 * (newlib's stdio buffers come from malloc). It prints
 *     memory stack S heap H
 * S: bytes of stack below main's caller (main and everything it calls; the start-up code's
 * few words above it are not counted); H: bytes of heap (sbrk) when main returns.
 *
 * With -DTP_SRAM_BYTES=N the program runs as on a part with N bytes of SRAM: main gets its
 * stack at RAM start + N (its .data, .bss and heap are at the start of RAM), and the line also
 * says whether the stack stayed clear of the heap ("sram N fits" or "sram N overflow"). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define TP_PAINT 0x5aa5c33cu
#define TP_PAINT_WINDOW (256u * 1024u) /* painted below main's stack without TP_SRAM_BYTES */

extern char end;         /* the first byte after .bss: the heap starts here */
extern char __ram_start; /* ORIGIN(RAM), from the linker script */
void *sbrk(ptrdiff_t increment);
int __real_main(void);
int __wrap_main(void);

static uint32_t stack_pointer(void) {
    uint32_t sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    return sp;
}

/* Fill [bottom, top) with the pattern; words only, 4-byte aligned. */
static void paint(uint32_t bottom, uint32_t top) {
    volatile uint32_t *word;
    for (word = (volatile uint32_t *)((bottom + 3u) & ~3u); (uint32_t)word < top; word++)
        *word = TP_PAINT;
}

/* The lowest word in [bottom, top) that no longer holds the pattern, or top. */
static uint32_t deepest_write(uint32_t bottom, uint32_t top) {
    volatile uint32_t *word;
    for (word = (volatile uint32_t *)((bottom + 3u) & ~3u); (uint32_t)word < top; word++)
        if (*word != TP_PAINT) return (uint32_t)word;
    return top;
}

#ifdef TP_SRAM_BYTES
/* main on a stack whose top is `top`; the caller's stack is restored afterwards. */
__attribute__((naked, noinline)) static int main_on_stack(uint32_t top) {
    __asm__ volatile("push {r4, lr}\n\t"
                     "mov r4, sp\n\t"
                     "mov sp, r0\n\t"
                     "bl __real_main\n\t"
                     "mov sp, r4\n\t"
                     "pop {r4, pc}\n\t");
}
#endif

int __wrap_main(void) {
    uint32_t heap = (uint32_t)sbrk(0), top, bottom, deepest, heap_end;
    int status;
#ifdef TP_SRAM_BYTES
    top = (uint32_t)&__ram_start + (uint32_t)TP_SRAM_BYTES;
    if ((uint32_t)&end >= top) {
        printf("memory sram %lu overflow: .data and .bss end at %lu bytes\n",
               (unsigned long)TP_SRAM_BYTES, (unsigned long)((uint32_t)&end - (uint32_t)&__ram_start));
        return 1;
    }
    bottom = heap;
    paint(bottom, top);
    status = main_on_stack(top);
#else
    top = stack_pointer() - 64u; /* this function's own frame stays above */
    bottom = top - heap > TP_PAINT_WINDOW ? top - TP_PAINT_WINDOW : heap;
    paint(bottom, top);
    status = __real_main();
    top += 64u;
#endif
    heap_end = (uint32_t)sbrk(0);
    deepest = deepest_write(heap_end > bottom ? heap_end : bottom, top);
    printf("memory stack %lu heap %lu", (unsigned long)(top - deepest),
           (unsigned long)(heap_end - (uint32_t)&end));
#ifdef TP_SRAM_BYTES
    printf(" sram %lu %s", (unsigned long)TP_SRAM_BYTES,
           deepest > heap_end ? "fits" : "overflow");
#else
    if (deepest <= bottom) printf(" (the whole painted window: more)");
#endif
    printf("\n");
    return status;
}
