/* Native CPU kernels of tinyprop's sparse backward (built on first use, see native/__init__.py).
 *
 * tp_topk_{f32,f64}: the k entries of largest magnitude of each row, ties to the lower index:
 *     the rule of tinyprop.functional.select_topk and the C runtime (runtime/src/selection.c).
 * tp_linear_backward_f32: weight and input gradients of a Linear layer from the kept entries of
 *     δ only, k · fan_in multiply-accumulates each, in one pass over the weight's rows.
 *
 * Plain C99; every buffer is caller-owned (PyTorch tensors), nothing is allocated here.
 */
#include <float.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#if defined(__AVX2__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <string.h>

/* Quickselect with a three-way partition (many equal scores stay linear): returns the value of
 * rank `index` (ascending) of a[0:n], reordering a. */
static double kth_smallest_f64(double *a, int64_t n, int64_t index) {
    int64_t low = 0, high = n - 1;
    while (low < high) {
        int64_t mid = low + (high - low) / 2;
        double x = a[low], y = a[mid], z = a[high]; /* median of three as the pivot */
        double pivot = (x < y) ? ((y < z) ? y : ((x < z) ? z : x))
                               : ((x < z) ? x : ((y < z) ? z : y));
        int64_t lt = low, i = low, gt = high; /* [low,lt) < p, [lt,i) == p, (gt,high] > p */
        while (i <= gt) {
            double v = a[i];
            if (v < pivot) {
                a[i] = a[lt], a[lt] = v, lt++, i++;
            } else if (v > pivot) {
                a[i] = a[gt], a[gt] = v, gt--;
            } else {
                i++;
            }
        }
        if (index < lt) high = lt - 1;
        else if (index > gt) low = gt + 1;
        else return pivot;
    }
    return a[index];
}

/* The k-th largest of a[0:n] >= 0 (k in [1, n]), a unchanged. Float32: the largest bit pattern
 * t with at least k entries >= t (floats >= 0 order like their bit patterns), built bit by bit;
 * each of the 31 steps is one branch-free count the compiler vectorizes. */
static float kth_largest_f32(const float *a, int64_t n, int64_t k, float *work) {
    int32_t *bits = (int32_t *)(void *)work;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, a + i, sizeof u);
        bits[i] = (int32_t)u;
    }
    int32_t t = 0;
    for (int bit = 30; bit >= 0; bit--) {
        int32_t trial = t | (int32_t)(1u << bit), at_least = 0;
        for (int64_t i = 0; i < n; i++) at_least += bits[i] >= trial;
        if (at_least >= k) t = trial;
    }
    float result;
    memcpy(&result, &t, sizeof result);
    return result;
}

/* Float64 (tests, reference runs): a quickselect on a copy. */
static double kth_largest_f64(const double *a, int64_t n, int64_t k, double *work) {
    memcpy(work, a, (size_t)n * sizeof(double));
    return kth_smallest_f64(work, n, n - k);
}

/* index[0:count], magnitude[0:count] := the entries with |row[i]| >= bound or NaN (unordered
 * compares), ascending; returns count. Every NaN and ±Inf of the row is collected whatever the
 * bound, so the caller finds them among the candidates. With AVX2, eight comparisons become one
 * bit mask, so the loop costs per candidate, not per entry (most entries are below the bound). */
static int64_t collect_f32(const float *row, int64_t n, float bound, int64_t *index,
                           float *magnitude) {
    int64_t count = 0, i = 0;
#if defined(__AVX2__) && defined(__GNUC__)
    const __m256 sign = _mm256_set1_ps(-0.0f), limit = _mm256_set1_ps(bound);
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(row + i)); /* |row[i..i+8)| */
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, limit, _CMP_NLT_UQ));
        for (; mask; mask &= mask - 1) {
            int64_t at = i + __builtin_ctz(mask);
            index[count] = at, magnitude[count] = fabsf(row[at]), count++;
        }
    }
#endif
    for (; i < n; i++) { /* branch-free: count <= i < n, so the slot is always in bounds */
        float a = fabsf(row[i]);
        index[count] = i, magnitude[count] = a;
        count += !(a < bound);
    }
    return count;
}

static int64_t collect_f64(const double *row, int64_t n, double bound, int64_t *index,
                           double *magnitude) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        double a = fabs(row[i]);
        index[count] = i, magnitude[count] = a;
        count += !(a < bound);
    }
    return count;
}

/* Per row of delta (rows, n): keep the keep[r] entries of largest |δ|, ties to the lower index
 * (keep in [1, n]). Writes, each when not NULL: columns (Σ keep,) the kept indices row by row
 * in ascending order, values (Σ keep,) δ there, masked (rows, n) δ at the kept entries and 0
 * elsewhere; never more than keep[r] entries per row. scratch (2 n,) of T, index_scratch (n,).
 * Returns 0; -1 when a keep is outside [1, n] (checked before anything is written); 1 + r when
 * row r holds a NaN or ±Inf (no k largest |δ| exist: the outputs of rows >= r are unspecified,
 * nothing is written outside them); -2 if the kept entries did not add up to keep[r] (a broken
 * invariant, never expected).
 *
 * Finding the k-th largest |δ| t: when k is small against n, a strided sample of 64 (256 for
 * long rows) entries gives a bound e a little below t (the sample's value of rank k · 64 / n
 * plus a margin of two standard deviations and 4);
 * one pass collects the candidates |δ| >= e, and the k-th largest is found among those few.
 * Every other entry is below e <= t, so t and its ties are among the candidates. If fewer than
 * k entries reach e (a bad sample), or k is large, the candidates are all non-zero |δ|. */
#define DEFINE_TOPK(SUFFIX, T, ABS, SMALLEST, LARGEST)                                       \
    int tp_topk_##SUFFIX(const T *delta, int64_t rows, int64_t n, const int64_t *keep,       \
                         int64_t *columns, T *values, T *masked, T *scratch,                 \
                         int64_t *index_scratch) {                                           \
        enum { SAMPLE = 64 };                                                                \
        T *magnitude = scratch, *work = scratch + n;                                         \
        for (int64_t r = 0; r < rows; r++)                                                   \
            if (keep[r] < 1 || keep[r] > n) return -1;                                       \
        for (int64_t r = 0; r < rows; r++) {                                                 \
            const T *row = delta + r * n;                                                    \
            int64_t k = keep[r], count = 0;                                                  \
            int64_t *index = index_scratch; /* the candidates, ascending */                  \
            if (n >= 4 * SAMPLE && 8 * k <= n) {                                             \
                int64_t sample = n >= 16 * SAMPLE ? 4 * SAMPLE : SAMPLE;                     \
                for (int64_t i = 0; i < sample; i++) work[i] = ABS(row[i * (n / sample)]);   \
                double expected = (double)k * (double)sample / (double)n; /* rank of t */    \
                int64_t rank = (int64_t)(expected + 2 * sqrt(expected)) + 4; /* margin */    \
                T bound = kth_largest_##SUFFIX(work, sample, rank + 1, magnitude);           \
                count = collect_##SUFFIX(row, n, bound, index, magnitude);                   \
            }                                                                                \
            if (count < k) /* no usable bound: every non-zero entry is a candidate */        \
                count = collect_##SUFFIX(row, n, SMALLEST, index, magnitude);                \
            for (int64_t c = 0; c < count; c++) /* every NaN and ±Inf is a candidate */      \
                if (!(magnitude[c] <= LARGEST)) return r < INT_MAX - 1 ? (int)r + 1 : INT_MAX; \
            T threshold = 0; /* the k-th largest |δ|; 0 when fewer than k are non-zero */    \
            if (count >= k) {                                                                \
                threshold = kth_largest_##SUFFIX(magnitude, count, k, work);                 \
            }                                                                                \
            int64_t room = k; /* ties at the threshold go to the lower index */              \
            for (int64_t c = 0; c < count; c++) room -= magnitude[c] > threshold;            \
            if (masked) memset(masked + r * n, 0, (size_t)n * sizeof(T));                    \
            int64_t written = 0;                                                             \
            if (threshold == 0) { /* every non-zero entry, then the first zeros */           \
                for (int64_t i = 0; i < n && written < k; i++) {                             \
                    if (row[i] != 0 || room-- > 0) {                                         \
                        if (columns) columns[written] = i;                                   \
                        if (values) values[written] = row[i];                                \
                        if (masked) masked[r * n + i] = row[i];                              \
                        written++;                                                           \
                    }                                                                        \
                }                                                                            \
            } else {                                                                         \
                for (int64_t c = 0; c < count && written < k; c++) {                         \
                    T a = magnitude[c];                                                      \
                    int64_t i = index[c], tie = a == threshold;                              \
                    if (!((a > threshold) | (tie & (room > 0)))) continue;                   \
                    room -= tie;                                                             \
                    if (columns) columns[written] = i;                                       \
                    if (values) values[written] = row[i];                                    \
                    if (masked) masked[r * n + i] = row[i];                                  \
                    written++;                                                               \
                }                                                                            \
            }                                                                                \
            if (written != k) return -2;                                                     \
            if (columns) columns += k;                                                       \
            if (values) values += k;                                                         \
        }                                                                                    \
        return 0;                                                                            \
    }

DEFINE_TOPK(f32, float, fabsf, nextafterf(0.0f, 1.0f), FLT_MAX)
DEFINE_TOPK(f64, double, fabs, nextafter(0.0, 1.0), DBL_MAX)

/* out[0:m] = Σ_t value[t] · source[sample[t]][0:m] over `count` terms (zeros for none), four at
 * a time after the first so the accumulator row is loaded and stored once per four terms. */
static void accumulate_rows(float *restrict out, const float *restrict source, int64_t m,
                            const int64_t *sample, const float *value, int64_t count) {
    if (count == 0) {
        memset(out, 0, (size_t)m * sizeof(float));
        return;
    }
    const float *first = source + sample[0] * m;
    for (int64_t i = 0; i < m; i++) out[i] = value[0] * first[i];
    sample++, value++, count--;
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

/* Whether row_start (batch + 1,) is a CSR offset array: starts at 0, never decreases. */
static int valid_offsets(const int64_t *row_start, int64_t batch) {
    if (row_start[0] != 0) return 0;
    for (int64_t s = 0; s < batch; s++)
        if (row_start[s + 1] < row_start[s]) return 0;
    return 1;
}

/* Linear backward from the kept entries of δ, given by sample (CSR):
 *   row_start (batch + 1,), column (nnz,) output index j, value (nnz,) δ[s, j].
 * x (batch, m), weight (n, m). Writes (when not NULL):
 *   grad_weight (n, m): row j = Σ_{s keeps j} δ[s, j] · x[s]   (zeros where nobody kept j)
 *   grad_input (batch, m): row s = Σ_{j kept by s} δ[s, j] · weight[j]
 * The entries are regrouped by output (CSC) first, so each pass over j reads every weight row
 * (and writes every grad_weight row) once. Scratch: column_start (n + 1,), by_column_sample (nnz,), by_column_value (nnz,).
 * Returns 0, or -1 on an index out of range or offsets that decrease. Any float values
 * (NaN, ±Inf) only flow into the gradients: no branch depends on them. */
int tp_linear_backward_f32(const float *x, const float *weight, int64_t batch, int64_t n,
                           int64_t m, const int64_t *row_start, const int64_t *column,
                           const float *value, float *grad_weight, float *grad_input,
                           int64_t *column_start, int64_t *by_column_sample,
                           float *by_column_value) {
    if (!valid_offsets(row_start, batch)) return -1;
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
                            by_column_value + first, count);
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

/* Convolution backward from the kept entries of δ (CSR by sample, column = c · P + p with P =
 * out_h · out_w output positions), channels-last:
 *   x (batch, in_h, in_w, channels_in), the zero-padded input; weight (channels_out, kh, kw, cg)
 *   with cg = channels_in / groups. Writes, when not NULL (both zeroed here first):
 *   grad_weight (channels_out, kh, kw, cg) += δ[s, c, p] · patch(s, p, group of c)
 *   grad_input (batch, in_h, in_w, channels_in): patch(s, p, group of c) += δ[s, c, p] · weight[c]
 * so each kept entry costs cg · kh · kw multiply-accumulates per gradient, the inner loop over
 * cg contiguous in all three arrays. shape: {batch, in_h, in_w, channels_in, channels_out, kh,
 * kw, out_h, out_w, stride_h, stride_w, dilation_h, dilation_w, groups}.
 * Returns 0, or -1 on an index out of range or offsets that decrease; float values, NaN and
 * ±Inf included, only flow into the gradients. */
int tp_conv_backward_f32(const float *x, const float *weight, const int64_t *shape,
                         const int64_t *row_start, const int64_t *column, const float *value,
                         float *grad_weight, float *grad_input) {
    int64_t batch = shape[0], in_h = shape[1], in_w = shape[2], channels_in = shape[3];
    int64_t channels_out = shape[4], kh = shape[5], kw = shape[6], out_h = shape[7];
    int64_t out_w = shape[8], stride_h = shape[9], stride_w = shape[10];
    int64_t dilation_h = shape[11], dilation_w = shape[12], groups = shape[13];
    int64_t cg = channels_in / groups, per_group = channels_out / groups;
    int64_t positions = out_h * out_w, taps = kh * kw;
    if (!valid_offsets(row_start, batch)) return -1;
    if (grad_weight) memset(grad_weight, 0, (size_t)(channels_out * taps * cg) * sizeof(float));
    if (grad_input)
        memset(grad_input, 0, (size_t)(batch * in_h * in_w * channels_in) * sizeof(float));
    for (int64_t s = 0; s < batch; s++) {
        for (int64_t e = row_start[s]; e < row_start[s + 1]; e++) {
            if (column[e] < 0 || column[e] >= channels_out * positions) return -1;
            int64_t c = column[e] / positions, p = column[e] % positions;
            int64_t top = (p / out_w) * stride_h, left = (p % out_w) * stride_w;
            int64_t first = ((s * in_h + top) * in_w + left) * channels_in + (c / per_group) * cg;
            float v = value[e];
            for (int64_t ky = 0; ky < kh; ky++) {
                for (int64_t kx = 0; kx < kw; kx++) {
                    int64_t at = first + (ky * dilation_h * in_w + kx * dilation_w) * channels_in;
                    int64_t tap = (c * taps + ky * kw + kx) * cg;
                    if (grad_weight) {
                        float *restrict gw = grad_weight + tap;
                        const float *restrict patch = x + at;
                        for (int64_t i = 0; i < cg; i++) gw[i] += v * patch[i];
                    }
                    if (grad_input) {
                        float *restrict gx = grad_input + at;
                        const float *restrict w = weight + tap;
                        for (int64_t i = 0; i < cg; i++) gx[i] += v * w[i];
                    }
                }
            }
        }
    }
    return 0;
}
