/* checks.h: the CHECK macro of the runtime's C tests: counts the checks and the failures and
 * prints each failure with its line (stdout, which semihosting carries out of QEMU too). */
#ifndef TP_TEST_CHECKS_H
#define TP_TEST_CHECKS_H

#include <stdio.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        checks++;                                                                      \
        if (!(cond)) {                                                                 \
            failures++;                                                                \
            printf("%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);            \
        }                                                                              \
    } while (0)

#endif
