/* Native CPU kernels of tinyprop's sparse backward (built on first use, see native/__init__.py).
 *
 * tp_select_topk_{f32,f64}: the k largest scores of each row, ties to the lower index: the same
 *     rule as tinyprop.functional.select_topk and the C runtime (runtime/src/selection.c).
 * tp_linear_backward_f32: weight and input gradients of a Linear layer from the kept entries of
 *     δ only, k · fan_in multiply-accumulates each, in one pass over the weight's rows.
 *
 * Plain C99; every buffer is caller-owned (PyTorch tensors), nothing is allocated here.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Quickselect with a three-way partition (many equal scores stay linear): returns the value of
 * rank `index` (ascending) of a[0:n], reordering a. */
#define DEFINE_KTH_SMALLEST(SUFFIX, T)                                                       \
    static T kth_smallest_##SUFFIX(T *a, int64_t n, int64_t index) {                         \
        int64_t low = 0, high = n - 1;                                                       \
        while (low < high) {                                                                 \
            int64_t mid = low + (high - low) / 2;                                            \
            T x = a[low], y = a[mid], z = a[high]; /* median of three as the pivot */        \
            T pivot = (x < y) ? ((y < z) ? y : ((x < z) ? z : x))                            \
                              : ((x < z) ? x : ((y < z) ? z : y));                           \
            int64_t lt = low, i = low, gt = high; /* [low,lt) < p, [lt,i) == p, (gt,high] > p */ \
            while (i <= gt) {                                                                \
                T v = a[i];                                                                  \
                if (v < pivot) {                                                             \
                    a[i] = a[lt], a[lt] = v, lt++, i++;                                      \
                } else if (v > pivot) {                                                      \
                    a[i] = a[gt], a[gt] = v, gt--;                                           \
                } else {                                                                     \
                    i++;                                                                     \
                }                                                                            \
            }                                                                                \
            if (index < lt) high = lt - 1;                                                   \
            else if (index > gt) low = gt + 1;                                               \
            else return pivot;                                                               \
        }                                                                                    \
        return a[index];                                                                     \
    }

DEFINE_KTH_SMALLEST(f32, float)
DEFINE_KTH_SMALLEST(f64, double)

/* The k-th largest of row[0:n] >= 0 (k in [1, n]), scratch (n,). Float32, the training dtype: a
 * histogram of the exponent and top two mantissa bits (the bit pattern of a float >= 0 orders
 * like the float) finds the bucket holding the k-th largest, and the quickselect runs on that
 * bucket's few entries only: two branch-free passes over the row. */
static float kth_largest_f32(const float *row, int64_t n, int64_t k, float *scratch) {
    enum { SHIFT = 21, BUCKETS = 1024 }; /* bits 21..30; bit 31 (sign) is 0, or -0.0 */
    int64_t count[BUCKETS] = {0};
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, row + i, sizeof bits);
        count[(bits >> SHIFT) & (BUCKETS - 1)]++;
    }
    int64_t above = 0, bucket = BUCKETS - 1; /* entries in the buckets above `bucket` */
    while (above + count[bucket] < k) above += count[bucket--];
    int64_t candidates = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, row + i, sizeof bits);
        scratch[candidates] = row[i];
        candidates += (int64_t)((bits >> SHIFT) & (BUCKETS - 1)) == bucket;
    }
    return kth_smallest_f32(scratch, candidates, candidates - (k - above));
}

/* Float64 (tests, reference runs): δ behind ReLU is mostly exact zeros, so select among the
 * positive entries only. */
static double kth_largest_f64(const double *row, int64_t n, int64_t k, double *scratch) {
    int64_t positive = 0;
    for (int64_t i = 0; i < n; i++) {
        scratch[positive] = row[i];
        positive += row[i] > 0;
    }
    return positive >= k ? kth_smallest_f64(scratch, positive, positive - k) : 0;
}

/* scores (rows, n) >= 0; keep (rows,) in [1, n]; columns (Σ keep,) written row by row in
 * ascending order; scratch (n,). Returns 0, or -1 on a keep outside [1, n]. */
#define DEFINE_SELECT_TOPK(SUFFIX, T)                                                        \
    int tp_select_topk_##SUFFIX(const T *scores, int64_t rows, int64_t n, const int64_t *keep, \
                                int64_t *columns, T *scratch) {                              \
        for (int64_t r = 0; r < rows; r++) {                                                 \
            const T *row = scores + r * n;                                                   \
            int64_t k = keep[r];                                                             \
            if (k < 1 || k > n) return -1;                                                   \
            T threshold = kth_largest_##SUFFIX(row, n, k, scratch);                          \
            int64_t room = k; /* ties at the threshold go to the lower index */              \
            for (int64_t i = 0; i < n; i++) room -= row[i] > threshold;                      \
            for (int64_t i = 0; i < n; i++) {                                                \
                T v = row[i];                                                                \
                if (v > threshold || (v == threshold && room-- > 0)) *columns++ = i;         \
            }                                                                                \
        }                                                                                    \
        return 0;                                                                            \
    }

DEFINE_SELECT_TOPK(f32, float)
DEFINE_SELECT_TOPK(f64, double)

/* out[0:m] (+)= Σ_t value[t] · source[sample[t]][0:m] over `count` terms, four at a time so the
 * accumulator row is loaded and stored once per four terms. */
static void accumulate_rows(float *restrict out, const float *restrict source, int64_t m,
                            const int64_t *sample, const float *value, int64_t count, int add) {
    if (!add) {
        if (count == 0) {
            memset(out, 0, (size_t)m * sizeof(float));
            return;
        }
        const float *x = source + sample[0] * m;
        float v = value[0];
        for (int64_t i = 0; i < m; i++) out[i] = v * x[i];
        sample++, value++, count--;
    }
    int64_t t = 0;
    for (; t + 4 <= count; t += 4) {
        const float *restrict x0 = source + sample[t] * m, *restrict x1 = source + sample[t + 1] * m;
        const float *restrict x2 = source + sample[t + 2] * m, *restrict x3 = source + sample[t + 3] * m;
        float v0 = value[t], v1 = value[t + 1], v2 = value[t + 2], v3 = value[t + 3];
        for (int64_t i = 0; i < m; i++) out[i] += v0 * x0[i] + v1 * x1[i] + v2 * x2[i] + v3 * x3[i];
    }
    for (; t < count; t++) {
        const float *restrict x = source + sample[t] * m;
        float v = value[t];
        for (int64_t i = 0; i < m; i++) out[i] += v * x[i];
    }
}

/* Linear backward from the kept entries of δ, given by sample (CSR):
 *   row_start (batch + 1,), column (nnz,) output index j, value (nnz,) δ[s, j].
 * x (batch, m), weight (n, m). Writes (when not NULL):
 *   grad_weight (n, m): row j = Σ_{s keeps j} δ[s, j] · x[s]   (zeros where nobody kept j)
 *   grad_input (batch, m): row s = Σ_{j kept by s} δ[s, j] · weight[j]
 * The entries are regrouped by output (CSC) first, so each pass over j reads every weight row
 * (and writes every grad_weight row) once. Scratch: column_start (n + 1,), by_column_sample (nnz,), by_column_value (nnz,).
 * Returns 0, or -1 on an index out of range. */
int tp_linear_backward_f32(const float *x, const float *weight, int64_t batch, int64_t n,
                           int64_t m, const int64_t *row_start, const int64_t *column,
                           const float *value, float *grad_weight, float *grad_input,
                           int64_t *column_start, int64_t *by_column_sample,
                           float *by_column_value) {
    int64_t nnz = row_start[batch];
    memset(column_start, 0, (size_t)(n + 1) * sizeof(int64_t));
    for (int64_t e = 0; e < nnz; e++) {
        if (column[e] < 0 || column[e] >= n) return -1;
        column_start[column[e] + 1]++;
    }
    for (int64_t j = 0; j < n; j++) column_start[j + 1] += column_start[j];
    for (int64_t s = 0; s < batch; s++) { /* samples in ascending order inside each column */
        for (int64_t e = row_start[s]; e < row_start[s + 1]; e++) {
            int64_t slot = column_start[column[e]]++;
            by_column_sample[slot] = s;
            by_column_value[slot] = value[e];
        }
    }
    for (int64_t j = n; j > 0; j--) column_start[j] = column_start[j - 1]; /* undo the shift */
    column_start[0] = 0;

    if (grad_weight)
        for (int64_t j = 0; j < n; j++) {
            int64_t first = column_start[j], count = column_start[j + 1] - first;
            accumulate_rows(grad_weight + j * m, x, m, by_column_sample + first,
                            by_column_value + first, count, 0);
        }
    if (grad_input) {
        memset(grad_input, 0, (size_t)(batch * m) * sizeof(float));
        for (int64_t j = 0; j < n; j++) { /* weight row j is read once, for every sample */
            int64_t first = column_start[j], count = column_start[j + 1] - first;
            const float *restrict w = weight + j * m;
            for (int64_t t = first; t < first + count; t++) {
                float *restrict out = grad_input + by_column_sample[t] * m;
                float v = by_column_value[t];
                for (int64_t i = 0; i < m; i++) out[i] += v * w[i];
            }
        }
    }
    return 0;
}
