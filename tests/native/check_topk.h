/* What a correct top-k output is, checked entry by entry (tests/native/sanitize.c and
 * tests/native/fuzz_native.c): for one finite row of n entries and its k, the kept columns are
 * ascending and in range, every entry left out has |δ| at most the smallest kept |δ|, and among
 * entries of exactly that |δ| the lower indices were kept (the rule of select_topk). values and
 * masked (each when not NULL) hold δ at the kept entries, masked 0 elsewhere. */
#ifndef TINYPROP_CHECK_TOPK_H
#define TINYPROP_CHECK_TOPK_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Whether the row is finite (no NaN, no ±Inf): the kernel must reject it otherwise. */
#define DEFINE_ROW_IS_FINITE(SUFFIX, T)                                                      \
    static inline int row_is_finite_##SUFFIX(const T *row, int64_t n) {                      \
        for (int64_t i = 0; i < n; i++)                                                      \
            if (!isfinite(row[i])) return 0;                                                 \
        return 1;                                                                            \
    }

#define DEFINE_TOPK_ROW_IS_VALID(SUFFIX, T, ABS)                                             \
    static inline int topk_row_is_valid_##SUFFIX(const T *row, int64_t n, int64_t k,         \
                                          const int64_t *columns, const T *values,           \
                                          const T *masked) {                                 \
        T smallest = 0;                                                                      \
        int64_t last_tie = -1;                                                               \
        for (int64_t j = 0; j < k; j++) {                                                    \
            int64_t i = columns[j];                                                          \
            if (i < 0 || i >= n || (j > 0 && i <= columns[j - 1])) return 0;                 \
            if (values && memcmp(values + j, row + i, sizeof(T)) != 0) return 0;             \
            if (j == 0 || ABS(row[i]) < smallest) smallest = ABS(row[i]);                    \
        }                                                                                    \
        for (int64_t j = 0; j < k; j++)                                                      \
            if (ABS(row[columns[j]]) == smallest) last_tie = columns[j];                     \
        for (int64_t i = 0, j = 0; i < n; i++) {                                             \
            int kept = j < k && columns[j] == i;                                             \
            j += kept;                                                                       \
            if (masked && (kept ? memcmp(masked + i, row + i, sizeof(T)) != 0                \
                                : masked[i] != 0))                                           \
                return 0;                                                                    \
            if (!kept && (ABS(row[i]) > smallest || (ABS(row[i]) == smallest && i < last_tie))) \
                return 0;                                                                    \
        }                                                                                    \
        return 1;                                                                            \
    }

DEFINE_ROW_IS_FINITE(f32, float)
DEFINE_ROW_IS_FINITE(f64, double)
DEFINE_TOPK_ROW_IS_VALID(f32, float, fabsf)
DEFINE_TOPK_ROW_IS_VALID(f64, double, fabs)

#endif
