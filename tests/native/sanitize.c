/* Random shapes through every native kernel, built with -fsanitize=address,undefined by
 * tests/test_native.py: no read or write outside the buffers the Python wrappers allocate, on
 * any float input (NaN, ±Inf and denormals included) and 1 to 4 threads (also built with
 * -fsanitize=thread: no data race), and every top-k output is checked. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_topk.h"

int tp_topk_f32(const float *, int64_t, int64_t, const int64_t *, int64_t *, float *, float *,
                float *, int64_t *, int64_t);
int tp_topk_f64(const double *, int64_t, int64_t, const int64_t *, int64_t *, double *,
                double *, double *, int64_t *, int64_t);
int tp_topk_sums_f32(const float *, int64_t, int64_t, int64_t, float *, int64_t *, int64_t *,
                     float *, float *, int64_t *, int64_t);
int tp_topk_sums_columns_f32(const float *, int64_t, int64_t, int64_t, float *, int64_t *,
                             int64_t *, float *, float *, int64_t *, float *, float *, int64_t);
int tp_linear_backward_f32(const float *, const float *, int64_t, int64_t, int64_t,
                           const int64_t *, const int64_t *, const float *, float *, float *,
                           int64_t *, int64_t *, float *, float *, int64_t);
int tp_linear_backward_relu_f32(const float *, const float *, int64_t, int64_t, int64_t,
                                const int64_t *, const int64_t *, const float *, float *,
                                float *, int64_t *, int64_t *, float *, float *, int64_t);
int tp_linear_update_f32(const float *, float *, int64_t, int64_t, int64_t, const int64_t *,
                         const int64_t *, const float *, float, int64_t *, int64_t *, float *,
                         int64_t);
int tp_linear_update_momentum_f32(const float *, float *, int64_t, int64_t, int64_t,
                                  const int64_t *, const int64_t *, const float *, float, float *,
                                  float, float, int64_t, int64_t, int64_t *, int64_t *, float *,
                                  int64_t);
int tp_linear_input_update_f32(const float *, float *, int64_t, int64_t, int64_t,
                               const int64_t *, const int64_t *, const float *, float *,
                               int64_t, float, float *, float, float, int64_t, int64_t,
                               int64_t *, int64_t *, float *, int64_t);
int tp_conv_backward_f32(const float *, const float *, const int64_t *, const int64_t *,
                         const int64_t *, const float *, float *, float *, int64_t);
int tp_conv_backward_planes_f32(const float *, const float *, const int64_t *, const int64_t *,
                                const int64_t *, const int64_t *, const float *, float *, float *,
                                float *, int64_t);
int tp_plane_conv_backward_f32(const float *, const float *, const int64_t *, const int64_t *,
                               const int64_t *, const float *, float *, float *, int64_t);
int tp_conv_backward_planes_relu_f32(const float *, const float *, const int64_t *,
                                     const int64_t *, const int64_t *, const int64_t *,
                                     const float *, float *, float *, float *, int64_t, int64_t);
int tp_plane_conv_backward_relu_f32(const float *, const float *, const int64_t *,
                                    const int64_t *, const int64_t *, const float *, float *,
                                    float *, int64_t, int64_t);
void tp_channels_last_f32(const float *, const int64_t *, float *, int64_t);
void tp_channels_first_f32(const float *, const int64_t *, float *, int64_t);
int tp_relu_unpool_f32(const float *, const float *, const int64_t *, int64_t, int64_t, int64_t,
                       float *, int64_t);
int tp_relu_unpool_sums_f32(const float *, const float *, const int64_t *, int64_t, int64_t,
                            int64_t, int64_t, float *, double *, float *, float *, int64_t);
int tp_pooled_topk_f32(const float *, const float *, const int64_t *, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t *, float *, double *, float *, float *, float *,
                       int64_t *, int64_t);
void tp_max_pool_f32(const float *, int64_t, int64_t, int64_t, int64_t, int64_t, float *,
                     int64_t *, int64_t);

static float uniform(void) { return (float)rand() / (float)RAND_MAX - 0.5f; }

/* One entry of a row of the given kind: continuous, ties, mostly zeros, denormals, or
 * continuous with NaN and ±Inf sprinkled in (rarely, so most such rows have one or none). */
static float entry(int kind) {
    switch (kind) {
    case 1: return (float)(rand() % 3);
    case 2: return rand() % 4 ? 0.0f : uniform();
    case 3: return uniform() * 1e-40f;
    case 4: {
        int pick = rand() % 4000;
        return pick == 0 ? NAN : pick == 1 ? INFINITY : pick == 2 ? -INFINITY : uniform();
    }
    default: return uniform();
    }
}

/* Exactly-sized buffers, so the sanitizer sees overruns; checks the status (0, -1 for a bad
 * keep, 1 + the first row holding NaN or ±Inf) and, when 0, every row's kept entries. */
static int check_topk(int64_t rows, int64_t n, int64_t threads) {
    float *delta = malloc(sizeof(float) * rows * n), *masked = malloc(sizeof(float) * rows * n);
    double *wide = malloc(sizeof(double) * rows * n), *wide_masked = malloc(sizeof(double) * rows * n);
    int64_t *keep = malloc(sizeof(int64_t) * rows), total = 0;
    int kind = rand() % 5, bad_keep = rand() % 50 == 0, expected = 0;
    for (int64_t i = 0; i < rows * n; i++) wide[i] = delta[i] = entry(kind);
    for (int64_t r = 0; r < rows; r++) {
        int64_t most = rand() % 2 ? n : n / 8 + 1;
        keep[r] = 1 + rand() % (most < n ? most : n);
        total += keep[r];
        if (!expected && !row_is_finite_f32(delta + r * n, n)) expected = (int)r + 1;
    }
    if (bad_keep) { /* a keep out of range: rejected before anything is written */
        int64_t r = rand() % rows;
        total -= keep[r];
        keep[r] = rand() % 2 ? 0 : -n;
        expected = -1;
    }
    total = total > 0 ? total : 1;
    int64_t *columns = malloc(sizeof(int64_t) * total);
    int64_t *index = malloc(sizeof(int64_t) * threads * n);
    float *values = malloc(sizeof(float) * total);
    float *scratch = malloc(sizeof(float) * threads * 2 * n);
    double *wide_values = malloc(sizeof(double) * total);
    double *wide_scratch = malloc(sizeof(double) * threads * 2 * n);
    int64_t *wide_columns = malloc(sizeof(int64_t) * total);
    int status = tp_topk_f32(delta, rows, n, keep, columns, values, masked, scratch, index,
                             threads);
    int wide_status = tp_topk_f64(wide, rows, n, keep, wide_columns, wide_values, wide_masked,
                                  wide_scratch, index, threads);
    int failed = status != expected || wide_status != expected;
    for (int64_t r = 0, at = 0; !failed && status == 0 && r < rows; at += keep[r++]) {
        failed |= !topk_row_is_valid_f32(delta + r * n, n, keep[r], columns + at, values + at,
                                         masked + r * n);
        failed |= !topk_row_is_valid_f64(wide + r * n, n, keep[r], wide_columns + at,
                                         wide_values + at, wide_masked + r * n);
    }
    if (failed)
        fprintf(stderr, "topk rows %lld n %lld kind %d: status %d / %d, expected %d\n",
                (long long)rows, (long long)n, kind, status, wide_status, expected);
    free(delta), free(masked), free(wide), free(wide_masked), free(keep), free(columns);
    free(index), free(values), free(scratch), free(wide_values), free(wide_scratch);
    free(wide_columns);
    return failed;
}

/* tp_topk_sums_f32 on rows of every kind, some all zero, exactly-sized buffers: a row with a
 * NaN or ±Inf gives 1 + its index or an earlier one's; else each row's sum is Σ |δ| summed in
 * the kernel's order, bit for bit (0 exactly for a zero row, which keeps nothing), the offsets count k per other row,
 * and every kept row is what tp_topk_f32 keeps of it. */
static int check_topk_sums(int64_t rows, int64_t n, int64_t threads) {
    float *delta = malloc(sizeof(float) * rows * n), *sums = malloc(sizeof(float) * rows);
    int kind = rand() % 5, first_bad = 0;
    int64_t k = 1 + rand() % (rand() % 2 ? n : n / 8 + 1);
    for (int64_t r = 0; r < rows; r++) {
        int zero = rand() % 4 == 0;
        for (int64_t i = 0; i < n; i++) delta[r * n + i] = zero ? 0.0f : entry(kind);
        if (!first_bad && !row_is_finite_f32(delta + r * n, n)) first_bad = (int)r + 1;
    }
    int64_t *row_start = malloc(sizeof(int64_t) * (rows + 1));
    int64_t *columns = malloc(sizeof(int64_t) * rows * k), *index = malloc(sizeof(int64_t) * threads * n);
    float *values = malloc(sizeof(float) * rows * k), *scratch = malloc(sizeof(float) * threads * 2 * n);
    int status = tp_topk_sums_f32(delta, rows, n, k, sums, row_start, columns, values, scratch,
                                  index, threads);
    int failed = first_bad ? !(status >= 1 && status <= first_bad) : status != 0;
    failed |= tp_topk_sums_f32(delta, rows, n, 0, sums, row_start, columns, values, scratch, index,
                               threads) != -1;
    for (int64_t r = 0; !failed && status == 0 && r < rows; r++) {
        double lane[32] = {0}, sum = 0; /* the kernel's order: 32 lanes, then lane by lane */
        for (int64_t i = 0; i < n; i++) lane[i % 32] += fabs((double)delta[r * n + i]);
        for (int j = 0; j < 32; j++) sum += lane[j];
        int64_t count = row_start[r + 1] - row_start[r];
        failed |= sum == 0 ? sums[r] != 0 || count != 0
                           : sums[r] != (float)sum || count != k ||
                                 !topk_row_is_valid_f32(delta + r * n, n, k,
                                                        columns + row_start[r],
                                                        values + row_start[r], NULL);
    }
    failed |= status == 0 && row_start[0] != 0;
    if (failed)
        fprintf(stderr, "topk_sums rows %lld n %lld k %lld kind %d: status %d, first bad %d\n",
                (long long)rows, (long long)n, (long long)k, kind, status, first_bad);
    free(delta), free(sums), free(row_start), free(columns), free(index), free(values);
    free(scratch);
    return failed;
}

/* Column j's Σ_r δ[r, j] as PyTorch's multi_row_sum (SumKernel.cpp) adds it for a block column:
 * four levels of accumulators; rows into level 0, and after every 16 rows each level adds into
 * the next while the rows summed are a multiple of 16 to its power; then the rows after the
 * last 16 and the levels 1-3 into level 0, in order. */
static float torch_column_sum(const float *delta, int64_t rows, int64_t n, int64_t j) {
    float level[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    while (i + 16 <= rows) {
        for (int64_t t = 0; t < 16; t++, i++) level[0] += delta[i * n + j];
        for (int l = 1; l < 4; l++) {
            level[l] += level[l - 1];
            level[l - 1] = 0.0f;
            if (i & (int64_t)15 << (4 * l)) break;
        }
    }
    for (; i < rows; i++) level[0] += delta[i * n + j];
    for (int l = 1; l < 4; l++) level[0] += level[l];
    return level[0];
}

/* tp_topk_sums_columns_f32: what tp_topk_sums_f32 writes, and each column's Σ δ as PyTorch sums
 * it (bit for bit, NaN where it is NaN) when no row is zero (a quarter of the cases have one);
 * k out of range: -1. */
static int check_topk_sums_columns(int64_t rows, int64_t n, int64_t threads) {
    int kind = rand() % 5, zero_row = rand() % 4 == 0 ? (int)(rand() % rows) : -1;
    int64_t k = 1 + rand() % n, groups_size = (rows + 15) / 16 * n;
    float *delta = malloc(sizeof(float) * rows * n), *sums = malloc(sizeof(float) * rows);
    float *sums2 = malloc(sizeof(float) * rows), *column_sum = malloc(sizeof(float) * n);
    float *groups = malloc(sizeof(float) * groups_size);
    for (int64_t i = 0; i < rows * n; i++) delta[i] = entry(kind);
    for (int64_t i = 0; zero_row >= 0 && i < n; i++) delta[zero_row * n + i] = 0.0f;
    int64_t *row_start = malloc(sizeof(int64_t) * (rows + 1));
    int64_t *row_start2 = malloc(sizeof(int64_t) * (rows + 1));
    int64_t *columns = malloc(sizeof(int64_t) * rows * k), *index = malloc(sizeof(int64_t) * threads * n);
    int64_t *columns2 = malloc(sizeof(int64_t) * rows * k);
    float *values = malloc(sizeof(float) * rows * k), *scratch = malloc(sizeof(float) * threads * 2 * n);
    float *values2 = malloc(sizeof(float) * rows * k);
    int status = tp_topk_sums_columns_f32(delta, rows, n, k, sums, row_start, columns, values,
                                          scratch, index, groups, column_sum, threads);
    int status2 = tp_topk_sums_f32(delta, rows, n, k, sums2, row_start2, columns2, values2, scratch,
                                   index, threads);
    int failed = status != status2;
    failed |= tp_topk_sums_columns_f32(delta, rows, n, n + 1, sums, row_start, columns, values,
                                       scratch, index, groups, column_sum, threads) != -1;
    if (!failed && status == 0) {
        failed |= memcmp(sums, sums2, sizeof(float) * rows) != 0;
        failed |= memcmp(row_start, row_start2, sizeof(int64_t) * (rows + 1)) != 0;
        failed |= memcmp(columns, columns2, sizeof(int64_t) * row_start[rows]) != 0;
        failed |= memcmp(values, values2, sizeof(float) * row_start[rows]) != 0;
        for (int64_t j = 0; row_start[rows] == rows * k && j < n; j++) { /* no zero row */
            float expected = torch_column_sum(delta, rows, n, j);
            failed |= isnan(expected) ? !isnan(column_sum[j])
                                      : memcmp(&expected, column_sum + j, sizeof(float)) != 0;
        }
    }
    if (failed)
        fprintf(stderr, "topk_sums_columns rows %lld n %lld k %lld kind %d: status %d / %d\n",
                (long long)rows, (long long)n, (long long)k, kind, status, status2);
    free(delta), free(sums), free(sums2), free(column_sum), free(groups), free(row_start);
    free(row_start2), free(columns), free(index), free(columns2), free(values), free(scratch);
    free(values2);
    return failed;
}

/* Random kept entries: sample s keeps a random subset of its n outputs (maybe none). */
static int64_t kept_entries(int64_t batch, int64_t n, int64_t *row_start, int64_t **column,
                            float **value, int kind) {
    *column = malloc(sizeof(int64_t) * (batch * n + 1));
    *value = malloc(sizeof(float) * (batch * n + 1));
    int64_t nnz = 0;
    row_start[0] = 0;
    for (int64_t s = 0; s < batch; s++) {
        for (int64_t j = 0; j < n; j++)
            if (rand() % 5 == 0) (*column)[nnz] = j, (*value)[nnz++] = entry(kind);
        row_start[s + 1] = nnz;
    }
    return nnz;
}

/* Each sample's kept entries (CSR) in reverse order, in place. */
static void reverse_each_sample(int64_t batch, const int64_t *row_start, int64_t *column,
                                float *value) {
    for (int64_t s = 0; s < batch; s++)
        for (int64_t a = row_start[s], b = row_start[s + 1] - 1; a < b; a++, b--) {
            int64_t c = column[a];
            float v = value[a];
            column[a] = column[b], value[a] = value[b], column[b] = c, value[b] = v;
        }
}

static int check_linear(int64_t batch, int64_t n, int64_t m, int64_t threads) {
    int kind = rand() % 5; /* NaN and ±Inf flow into the gradients, nothing else */
    float *x = malloc(sizeof(float) * batch * m), *weight = malloc(sizeof(float) * n * m);
    for (int64_t i = 0; i < batch * m; i++) x[i] = entry(kind);
    for (int64_t i = 0; i < n * m; i++) weight[i] = entry(kind);
    int64_t *row_start = malloc(sizeof(int64_t) * (batch + 1)), *column;
    float *value;
    int64_t nnz = kept_entries(batch, n, row_start, &column, &value, kind);
    float *grad_weight = malloc(sizeof(float) * n * m), *grad_input = malloc(sizeof(float) * batch * m);
    int64_t *column_start = malloc(sizeof(int64_t) * (n + 1));
    int64_t *by_sample = malloc(sizeof(int64_t) * (nnz + 1));
    float *by_value = malloc(sizeof(float) * (nnz + 1));
    /* NULL (grad_input by the weight's rows) or each thread's two copies of a block of a strip
     * of the weight: (threads, 2, min(n, 512), 64), exactly; either at any thread count */
    float *strip = rand() % 2 ? malloc(sizeof(float) * threads * 2 * (n < 512 ? n : 512) * 64)
                              : NULL;
    /* the input gradient through a ReLU whose output x is (masked: x <= 0 gives 0), or none
     * (the weight gradient alone, cut by rows) */
    int relu = rand() % 2, weight_only = rand() % 4 == 0;
    int status = (relu ? tp_linear_backward_relu_f32 : tp_linear_backward_f32)(
        x, weight, batch, n, m, row_start, column, value, grad_weight,
        weight_only ? NULL : grad_input, column_start, by_sample, by_value, strip, threads);
    /* grad_input row s: its kept entries in ascending j (as kept_entries gives them), one
     * term at a time from zero, rounded as the kernel rounds them (exactly the same sums) */
    for (int64_t s = 0; status == 0 && !weight_only && s < batch; s++) {
        for (int64_t i = 0; i < m; i++) {
            float sum = 0.0f;
            for (int64_t e = row_start[s]; e < row_start[s + 1]; e++) {
                float term = weight[column[e] * m + i];
#if defined(__AVX512F__) && defined(__GNUC__)
                sum = fmaf(value[e], term, sum);
#else
                sum += value[e] * term;
#endif
            }
            int masked = relu && x[s * m + i] <= 0.0f; /* threshold_backward's rule: +0 */
            float got = grad_input[s * m + i];
            if (masked ? got != 0.0f || signbit(got) : !(got == sum || (isnan(got) && isnan(sum))))
                status = 1;
        }
    }
    /* grad_weight row j: the samples that kept j in ascending order, one term at a time from
     * zero (whole tiles two at a time or one: the same sums either way) */
    for (int64_t j = 0; status == 0 && j < n; j++) {
        for (int64_t i = 0; i < m; i++) {
            float sum = 0.0f;
            for (int64_t s = 0; s < batch; s++)
                for (int64_t e = row_start[s]; e < row_start[s + 1]; e++) {
                    if (column[e] != j) continue;
#if defined(__AVX512F__) && defined(__GNUC__)
                    sum = fmaf(value[e], x[s * m + i], sum);
#else
                    sum += value[e] * x[s * m + i];
#endif
                }
            float got = grad_weight[j * m + i];
            if (!(got == sum || (isnan(got) && isnan(sum)))) status = 1;
        }
    }
    /* the fused SGD update: weight += -lr · grad_weight, the same sums (exactly, as the
     * kernel's sums run in the same order) */
    float *updated = malloc(sizeof(float) * n * m);
    for (int64_t i = 0; i < n * m; i++) updated[i] = weight[i];
    int update_status = tp_linear_update_f32(x, updated, batch, n, m, row_start, column, value,
                                             -0.5f, column_start, by_sample, by_value, threads);
    if (update_status != status) status = 1;
    for (int64_t i = 0; status == 0 && i < n * m; i++) {
        float expected = weight[i] + -0.5f * grad_weight[i];
        if (!(updated[i] == expected || (isnan(updated[i]) && isnan(expected)))) status = 1;
    }
    /* with SGD's momentum: the buffer and the weight as torch.optim.SGD rounds them (a new
     * buffer becomes the gradient; else buf · momentum, then a fused multiply-add each) */
    int first = rand() % 2, nesterov = rand() % 2;
    float momentum = 0.9f, damped = nesterov ? 1.0f : 0.75f;
    float *buffer = malloc(sizeof(float) * n * m), *expected_buffer = malloc(sizeof(float) * n * m);
    float *buffer_before = malloc(sizeof(float) * n * m);
    for (int64_t i = 0; i < n * m; i++) updated[i] = weight[i], buffer[i] = entry(kind);
    memcpy(buffer_before, buffer, sizeof(float) * n * m);
    for (int64_t i = 0; i < n * m; i++)
        expected_buffer[i] = first ? grad_weight[i] : fmaf(grad_weight[i], damped, buffer[i] * momentum);
    if (status == 0 && tp_linear_update_momentum_f32(x, updated, batch, n, m, row_start, column,
                                                     value, -0.5f, buffer, momentum, damped,
                                                     first, nesterov, column_start, by_sample,
                                                     by_value, threads))
        status = 1;
    for (int64_t i = 0; status == 0 && i < n * m; i++) {
        float b = expected_buffer[i];
        float step = nesterov ? fmaf(b, momentum, grad_weight[i]) : b;
        float expected = fmaf(step, -0.5f, weight[i]);
        int same = buffer[i] == b || (isnan(buffer[i]) && isnan(b));
        if (!same || !(updated[i] == expected || (isnan(updated[i]) && isnan(expected)))) status = 1;
    }
    /* the input gradient and the update in one walk (tp_linear_input_update_f32): the input
     * gradient of the weight before the step (as tp_linear_backward's, same relu), the weight
     * and buffer as the update kernels leave them, bit for bit */
    int with_buffer = rand() % 2;
    float *walked = malloc(sizeof(float) * n * m), *walked_input = malloc(sizeof(float) * batch * m);
    for (int64_t i = 0; i < n * m; i++) walked[i] = weight[i];
    if (status == 0 && tp_linear_input_update_f32(
                           x, walked, batch, n, m, row_start, column, value, walked_input, relu,
                           -0.5f, with_buffer ? buffer_before : NULL, momentum, damped, first,
                           nesterov, column_start, by_sample, by_value, threads))
        status = 1;
    for (int64_t i = 0; status == 0 && i < n * m; i++) {
        float expected = with_buffer ? updated[i] : weight[i] + -0.5f * grad_weight[i];
        float b = buffer[i], got_buffer = buffer_before[i];
        int same = !with_buffer || got_buffer == b || (isnan(got_buffer) && isnan(b));
        if (!same || !(walked[i] == expected || (isnan(walked[i]) && isnan(expected)))) status = 1;
    }
    for (int64_t i = 0; status == 0 && !weight_only && i < batch * m; i++) {
        float got = walked_input[i], expected = grad_input[i];
        if (isnan(got) ? !isnan(expected) : got != expected || signbit(got) != signbit(expected))
            status = 1;
    }
    free(walked), free(walked_input), free(buffer_before);
    free(buffer), free(expected_buffer);
    free(updated);
    free(x), free(weight), free(row_start), free(column), free(value), free(grad_weight);
    free(grad_input), free(column_start), free(by_sample), free(by_value), free(strip);
    return status;
}

/* acc + v · w as the convolution kernel adds a product: fused on its AVX-512 path (cg a multiple
 * of 16), else as the compiler rounds the plain expression. */
static float conv_madd(float acc, float v, float w, int64_t cg) {
#if defined(__AVX512F__) && defined(__GNUC__)
    if (cg % 16 == 0) return fmaf(v, w, acc);
#else
    (void)cg;
#endif
    return acc + v * w;
}

/* ReLU's backward on a convolution's input gradient g (n floats) at its input x = ReLU(y), in
 * place: zero (+0) where x <= 0, g kept elsewhere (x NaN too), as threshold_backward(g, x, 0). */
static void relu_backward(float *g, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (x[i] <= 0.0f) g[i] = 0.0f;
}

static int check_conv(int64_t threads) {
    int kind = rand() % 5;
    int64_t groups = 1 + rand() % 3, cg = rand() % 4 ? 1 + rand() % 3 : 16 * (1 + rand() % 2);
    int64_t per_group = 1 + rand() % 3; /* cg 16 or 32: the vector paths */
    int64_t kh = 1 + rand() % 3, kw = 1 + rand() % 3, sh = 1 + rand() % 2, sw = 1 + rand() % 2;
    int64_t dh = 1 + rand() % 2, dw = 1 + rand() % 2, batch = 1 + rand() % 3;
    int64_t in_h = dh * (kh - 1) + 1 + rand() % 5, in_w = dw * (kw - 1) + 1 + rand() % 5;
    /* now and then a pointwise one with more entries per channel than the kernel sums at a time
     * (GATHERED): 4-8 samples of 256-576 positions, a fifth of them kept */
    if (rand() % 8 == 0) kh = kw = sh = sw = 1, batch = 4 + rand() % 5, in_h = 16 + rand() % 9, in_w = in_h;
    int64_t out_h = (in_h - dh * (kh - 1) - 1) / sh + 1, out_w = (in_w - dw * (kw - 1) - 1) / sw + 1;
    int64_t cin = groups * cg, cout = groups * per_group, n = cout * out_h * out_w;
    int64_t shape[14] = {batch, in_h, in_w, cin, cout, kh, kw, out_h, out_w, sh, sw, dh, dw, groups};
    float *x = malloc(sizeof(float) * batch * in_h * in_w * cin);
    float *weight = malloc(sizeof(float) * cout * kh * kw * cg);
    for (int64_t i = 0; i < batch * in_h * in_w * cin; i++) x[i] = entry(kind);
    for (int64_t i = 0; i < cout * kh * kw * cg; i++) weight[i] = entry(kind);
    int64_t *row_start = malloc(sizeof(int64_t) * (batch + 1)), *column;
    float *value;
    kept_entries(batch, n, row_start, &column, &value, kind);
    if (rand() % 2) /* each sample's entries in descending order: the kernel's unsorted path */
        reverse_each_sample(batch, row_start, column, value);
    float *grad_weight = malloc(sizeof(float) * cout * kh * kw * cg);
    float *grad_input = malloc(sizeof(float) * batch * in_h * in_w * cin);
    int status = tp_conv_backward_f32(x, weight, shape, row_start, column, value, grad_weight,
                                      grad_input, threads);
    /* both gradients as the definition sums them, entries in their order, one multiply-add
     * each as the kernel's vector path (fused) or its scalar one rounds it: the same floats,
     * whichever way the kernel walks the entries (runs of a channel, or by channel) */
    int64_t positions = out_h * out_w, size = batch * in_h * in_w * cin, taps = kh * kw;
    float *expected_input = calloc((size_t)size, sizeof(float));
    float *expected_weight = calloc((size_t)(cout * taps * cg), sizeof(float));
    for (int64_t s = 0; s < batch; s++)
        for (int64_t e = row_start[s]; e < row_start[s + 1]; e++) {
            int64_t ch = column[e] / positions, p = column[e] % positions;
            int64_t corner = ((s * in_h + p / out_w * sh) * in_w + p % out_w * sw) * cin;
            corner += ch / per_group * cg;
            for (int64_t tap = 0; tap < taps; tap++)
                for (int64_t i = 0; i < cg; i++) {
                    int64_t at = corner + (tap / kw * dh * in_w + tap % kw * dw) * cin + i;
                    float *gw = expected_weight + (ch * taps + tap) * cg + i;
                    float *gx = expected_input + at, w = weight[(ch * taps + tap) * cg + i];
                    *gw = conv_madd(*gw, value[e], x[at], cg);
                    *gx = conv_madd(*gx, value[e], w, cg);
                }
        }
    for (int64_t i = 0; status == 0 && i < size; i++)
        if (memcmp(grad_input + i, expected_input + i, sizeof(float))) status = 1;
    for (int64_t i = 0; status == 0 && i < cout * taps * cg; i++)
        if (memcmp(grad_weight + i, expected_weight + i, sizeof(float))) status = 1;
    free(expected_input), free(expected_weight);
    /* the same with the input gradient channels first, cropped: the values of the channels-
     * first copy of the padded gradient, padding of up to a third of each side */
    int64_t pads[4] = {rand() % (in_h / 3 + 1), 0, rand() % (in_w / 3 + 1), 0};
    pads[1] = rand() % (in_h - 2 * pads[0] + 1) / 2, pads[3] = rand() % (in_w - 2 * pads[2] + 1) / 2;
    int64_t height = in_h - pads[0] - pads[1], width = in_w - pads[2] - pads[3];
    int64_t layout[8] = {batch, cin, height, width, pads[0], pads[1], pads[2], pads[3]};
    float *planes = malloc(sizeof(float) * batch * cin * height * width);
    float *expected = malloc(sizeof(float) * batch * cin * height * width);
    float *scratch = malloc(sizeof(float) * threads * in_h * in_w * cin);
    float *planes_weight = malloc(sizeof(float) * cout * kh * kw * cg);
    if (status == 0 && tp_conv_backward_planes_f32(x, weight, shape, pads, row_start, column, value,
                                                   planes_weight, planes, scratch, threads))
        status = 1;
    if (status == 0) tp_channels_first_f32(grad_input, layout, expected, threads);
    for (int64_t i = 0; status == 0 && i < batch * cin * height * width; i++)
        if (memcmp(planes + i, expected + i, sizeof(float))) status = 1;
    for (int64_t i = 0; status == 0 && i < cout * kh * kw * cg; i++)
        if (memcmp(planes_weight + i, grad_weight + i, sizeof(float))) status = 1;
    /* with relu_mask (x is a ReLU's output): the same gradient through the ReLU's backward */
    relu_backward(grad_input, x, size);
    if (status == 0) tp_channels_first_f32(grad_input, layout, expected, threads);
    if (status == 0 && tp_conv_backward_planes_relu_f32(x, weight, shape, pads, row_start, column,
                                                        value, planes_weight, planes, scratch,
                                                        threads, 1))
        status = 1;
    for (int64_t i = 0; status == 0 && i < batch * cin * height * width; i++)
        if (memcmp(planes + i, expected + i, sizeof(float))) status = 1;
    for (int64_t i = 0; status == 0 && i < cout * kh * kw * cg; i++)
        if (memcmp(planes_weight + i, grad_weight + i, sizeof(float))) status = 1;
    free(planes), free(expected), free(scratch), free(planes_weight);
    free(x), free(weight), free(row_start), free(column), free(value), free(grad_weight);
    free(grad_input);
    return status;
}

/* A convolution with one input channel per group on the unpadded input (channels first),
 * any padding that leaves at least one output position; `square`: a 3 x 3 window with each
 * sample's entries ascending (the kernel's unrolled path, its windows on the border too). */
static int check_plane_conv(int64_t threads, int square) {
    int kind = rand() % 5;
    int64_t groups = 1 + rand() % 4, per_group = 1 + rand() % 3, batch = 1 + rand() % 3;
    int64_t kh = 1 + rand() % 3, kw = 1 + rand() % 3, sh = 1 + rand() % 2, sw = 1 + rand() % 2;
    if (square) kh = kw = 3;
    int64_t dh = 1 + rand() % 2, dw = 1 + rand() % 2, top = rand() % 3, left = rand() % 3;
    int64_t in_h = 1 + rand() % 6, in_w = 1 + rand() % 6;
    int64_t span_h = in_h + top + rand() % 3 - dh * (kh - 1) - 1;
    int64_t span_w = in_w + left + rand() % 3 - dw * (kw - 1) - 1;
    if (span_h < 0 || span_w < 0) return 0; /* no output position: not a convolution */
    int64_t out_h = span_h / sh + 1, out_w = span_w / sw + 1;
    int64_t cout = groups * per_group, n = cout * out_h * out_w;
    int64_t shape[16] = {batch, groups, in_h, in_w, cout, kh, kw, out_h, out_w, sh, sw,
                         top, left, dh, dw, groups};
    float *x = malloc(sizeof(float) * batch * groups * in_h * in_w);
    float *weight = malloc(sizeof(float) * cout * kh * kw);
    for (int64_t i = 0; i < batch * groups * in_h * in_w; i++) x[i] = entry(kind);
    for (int64_t i = 0; i < cout * kh * kw; i++) weight[i] = entry(kind);
    int64_t *row_start = malloc(sizeof(int64_t) * (batch + 1)), *column;
    float *value;
    kept_entries(batch, n, row_start, &column, &value, kind);
    if (!square && rand() % 2) /* each sample's entries descending: the unsorted path */
        reverse_each_sample(batch, row_start, column, value);
    float *grad_weight = malloc(sizeof(float) * cout * kh * kw);
    float *grad_input = malloc(sizeof(float) * batch * groups * in_h * in_w);
    int status = tp_plane_conv_backward_f32(x, weight, shape, row_start, column, value,
                                            grad_weight, grad_input, threads);
    /* grad_input as the definition sums it: each entry's taps inside the input, entries in
     * their order (the kernel's runs of a channel, sorted or not, must give the same floats) */
    int64_t size = batch * groups * in_h * in_w, positions = out_h * out_w;
    float *expected = calloc((size_t)size, sizeof(float));
    for (int64_t s = 0; s < batch; s++)
        for (int64_t e = row_start[s]; e < row_start[s + 1]; e++) {
            int64_t ch = column[e] / positions, p = column[e] % positions;
            float *plane = expected + (s * groups + ch / per_group) * in_h * in_w;
            for (int64_t ky = 0; ky < kh; ky++)
                for (int64_t kx = 0; kx < kw; kx++) {
                    int64_t row = p / out_w * sh - top + ky * dh, col = p % out_w * sw - left + kx * dw;
                    if (row >= 0 && row < in_h && col >= 0 && col < in_w)
                        plane[row * in_w + col] += value[e] * weight[(ch * kh + ky) * kw + kx];
                }
        }
    for (int64_t i = 0; status == 0 && i < size; i++)
        if (memcmp(grad_input + i, expected + i, sizeof(float))) status = 1;
    /* with relu_mask (x is a ReLU's output): the same gradient through the ReLU's backward */
    relu_backward(expected, x, size);
    if (status == 0 && tp_plane_conv_backward_relu_f32(x, weight, shape, row_start, column, value,
                                                       grad_weight, grad_input, threads, 1))
        status = 1;
    for (int64_t i = 0; status == 0 && i < size; i++)
        if (memcmp(grad_input + i, expected + i, sizeof(float))) status = 1;
    free(expected);
    free(x), free(weight), free(row_start), free(column), free(value), free(grad_weight);
    free(grad_input);
    return status;
}

/* A batch to padded channels-last and back: every float lands where it belongs, the padding
 * is zero, and the copy of every float comes back. Up to 20 channels and 12 x 12 planes, so
 * the 8 x 8 blocks of the vector path, their remainders and blocks across image rows all run. */
static int check_layout(int64_t threads) {
    int64_t shape[8] = {1 + rand() % 4, 1 + rand() % 20, 1 + rand() % 12, 1 + rand() % 12,
                        rand() % 3, rand() % 3, rand() % 3, rand() % 3};
    int64_t batch = shape[0], channels = shape[1], height = shape[2], width = shape[3];
    int64_t padded_h = height + shape[4] + shape[5], padded_w = width + shape[6] + shape[7];
    int64_t size = batch * channels * height * width;
    int64_t padded = batch * channels * padded_h * padded_w;
    float *x = malloc(sizeof(float) * size), *back = malloc(sizeof(float) * size);
    float *last = malloc(sizeof(float) * padded);
    for (int64_t i = 0; i < size; i++) x[i] = (float)(i + 1);
    for (int64_t i = 0; i < padded; i++) last[i] = -1.0f; /* the padding must be written */
    tp_channels_last_f32(x, shape, last, threads);
    int status = 0;
    for (int64_t s = 0; s < batch; s++)
        for (int64_t row = 0; row < padded_h; row++)
            for (int64_t col = 0; col < padded_w; col++)
                for (int64_t ch = 0; ch < channels; ch++) {
                    int64_t r = row - shape[4], c = col - shape[6];
                    float expected = r < 0 || r >= height || c < 0 || c >= width
                                         ? 0.0f
                                         : x[((s * channels + ch) * height + r) * width + c];
                    status |= last[((s * padded_h + row) * padded_w + col) * channels + ch] !=
                              expected;
                }
    tp_channels_first_f32(last, shape, back, threads);
    for (int64_t i = 0; i < size; i++) status |= back[i] != x[i];
    free(x), free(back), free(last);
    return status;
}

/* δ behind ReLU and max pooling: every plane zero but 0 + g at the maxima of windows with a
 * pooled value not <= 0 (any floats), and -1 for an index outside the plane. */
static int check_unpool(int64_t threads) {
    int64_t planes = 1 + rand() % 40, pooled_size = 1 + rand() % 30;
    int64_t plane_size = pooled_size * (1 + rand() % 4);
    int64_t size = planes * pooled_size;
    float *grad = malloc(sizeof(float) * size), *pooled = malloc(sizeof(float) * size);
    float *delta = malloc(sizeof(float) * planes * plane_size);
    int64_t *index = malloc(sizeof(int64_t) * size);
    for (int64_t i = 0; i < size; i++) { /* distinct maxima per plane, as pooling gives them */
        grad[i] = entry(rand() % 5), pooled[i] = entry(rand() % 5);
        index[i] = i % pooled_size * (plane_size / pooled_size) + rand() % (plane_size / pooled_size);
    }
    int status = tp_relu_unpool_f32(grad, pooled, index, planes, pooled_size, plane_size, delta,
                                    threads) != 0;
    for (int64_t p = 0; p < planes && !status; p++)
        for (int64_t i = 0; i < plane_size; i++) {
            float expected = 0.0f;
            for (int64_t q = p * pooled_size; q < (p + 1) * pooled_size; q++)
                if (index[q] == i && !(pooled[q] <= 0.0f)) expected = 0.0f + grad[q];
            float got = delta[p * plane_size + i];
            status |= memcmp(&got, &expected, sizeof got) != 0 && !(isnan(got) && isnan(expected));
        }
    index[size - 1] = plane_size; /* outside: refused */
    status |= tp_relu_unpool_f32(grad, pooled, index, planes, pooled_size, plane_size, delta,
                                 threads) != -1;
    free(grad), free(pooled), free(delta), free(index);
    return status;
}

static int same_float(float a, float b) {
    return memcmp(&a, &b, sizeof a) == 0 || (isnan(a) && isnan(b));
}

/* A plane's Σ |δ| or Σ δ as the kernels sum it: float64, in eight lanes (q mod 8), then the lanes
 * in order. */
static double plane_sum(const float *grad, const float *pooled, int64_t size, int absolute) {
    double lanes[8] = {0}, sum = 0;
    for (int64_t q = 0; q < size; q++) {
        float value = pooled[q] <= 0.0f ? 0.0f : 0.0f + grad[q];
        lanes[q % 8] += absolute ? fabsf(value) : value;
    }
    for (int lane = 0; lane < 8; lane++) sum += lanes[lane];
    return sum;
}

static float rounded(double v) { /* to float32, ±Inf beyond its range */
    return isnan(v) || fabs(v) <= 3.4028234663852886e38 ? (float)v : v > 0 ? INFINITY : -INFINITY;
}

/* The sums of tp_relu_unpool_sums_f32 (its δ as tp_relu_unpool_f32's) against their definition,
 * and tp_pooled_topk_f32 against tp_topk_f32 on that δ: the same status, kept entries, values
 * and sums, bit for bit; a keep outside [1, n] refused. */
static int check_pooled_topk(int64_t threads) {
    /* the windows' maxima: in windows along the plane (in the row's order), in 2-D windows
     * (the pooled order differs from the row's within a window row), or anywhere (repeats) */
    int layout = rand() % 3;
    int64_t pooled_h = 1 + rand() % 6, pooled_w = 1 + rand() % 7, kh = 1 + rand() % 3;
    int64_t kw = 1 + rand() % 3, plane_w = pooled_w * kw + rand() % 2;
    int64_t plane_h = pooled_h * kh + rand() % 2;
    int64_t batch = 1 + rand() % 9, channels = 1 + rand() % 6;
    int64_t pooled_size = layout == 1 ? pooled_h * pooled_w : 1 + rand() % 40;
    int64_t plane_size = layout == 1 ? plane_h * plane_w : pooled_size * (1 + rand() % 4);
    int64_t n = channels * plane_size, planes = batch * channels, size = planes * pooled_size;
    int64_t keep = 1 + rand() % (rand() % 2 ? n : channels * pooled_size); /* often k <= m */
    int kind = rand() % 5;
    float *grad = malloc(sizeof(float) * size), *pooled = malloc(sizeof(float) * size);
    int64_t *index = malloc(sizeof(int64_t) * size);
    float *delta = malloc(sizeof(float) * planes * plane_size);
    float *plain = malloc(sizeof(float) * planes * plane_size);
    double *plane_sums = malloc(sizeof(double) * 2 * planes);
    float *row_abs = malloc(sizeof(float) * batch), *channel_sum = malloc(sizeof(float) * channels);
    float *pooled_abs = malloc(sizeof(float) * batch);
    float *pooled_sum = malloc(sizeof(float) * channels);
    int64_t *keeps = malloc(sizeof(int64_t) * batch), *columns = malloc(sizeof(int64_t) * batch * keep);
    int64_t *pooled_columns = malloc(sizeof(int64_t) * batch * keep);
    float *values = malloc(sizeof(float) * batch * keep);
    float *pooled_values = malloc(sizeof(float) * batch * keep);
    float *scratch = malloc(sizeof(float) * threads * 3 * n);
    float *topk_scratch = malloc(sizeof(float) * threads * 2 * n);
    int64_t *index_scratch = malloc(sizeof(int64_t) * threads * n);
    for (int64_t i = 0; i < size; i++) {
        grad[i] = entry(kind), pooled[i] = entry(rand() % 5);
        int64_t q = i % pooled_size, width = plane_size / pooled_size;
        index[i] = layout == 0 ? q * width + rand() % width
                   : layout == 1 ? (q / pooled_w * kh + rand() % kh) * plane_w +
                                       q % pooled_w * kw + rand() % kw
                                 : rand() % plane_size;
    }
    for (int64_t s = 0; s < batch; s++) keeps[s] = keep;
    int status = tp_relu_unpool_f32(grad, pooled, index, planes, pooled_size, plane_size, plain,
                                    threads) != 0;
    status |= tp_relu_unpool_sums_f32(grad, pooled, index, batch, channels, pooled_size,
                                      plane_size, delta, plane_sums, row_abs, channel_sum,
                                      threads) != 0;
    for (int64_t i = 0; i < planes * plane_size; i++) status |= !same_float(delta[i], plain[i]);
    for (int64_t s = 0; s < batch; s++) {
        double sum = 0;
        for (int64_t ch = 0; ch < channels; ch++) {
            int64_t at = (s * channels + ch) * pooled_size;
            sum += plane_sum(grad + at, pooled + at, pooled_size, 1);
        }
        status |= !same_float(row_abs[s], rounded(sum));
    }
    for (int64_t ch = 0; ch < channels; ch++) {
        double sum = 0;
        for (int64_t s = 0; s < batch; s++) {
            int64_t at = (s * channels + ch) * pooled_size;
            sum += plane_sum(grad + at, pooled + at, pooled_size, 0);
        }
        status |= !same_float(channel_sum[ch], rounded(sum));
    }
    int expected = tp_topk_f32(delta, batch, n, keeps, columns, values, NULL, topk_scratch,
                               index_scratch, threads);
    int got = tp_pooled_topk_f32(grad, pooled, index, batch, channels, pooled_size, plane_size,
                                 keep, pooled_columns, pooled_values, plane_sums, pooled_abs,
                                 pooled_sum, scratch, index_scratch, threads);
    status |= got != expected;
    if (got == 0 && expected == 0) {
        for (int64_t i = 0; i < batch * keep; i++)
            status |= pooled_columns[i] != columns[i] || !same_float(pooled_values[i], values[i]);
        for (int64_t s = 0; s < batch; s++) status |= !same_float(pooled_abs[s], row_abs[s]);
        for (int64_t ch = 0; ch < channels; ch++)
            status |= !same_float(pooled_sum[ch], channel_sum[ch]);
    }
    status |= tp_pooled_topk_f32(grad, pooled, index, batch, channels, pooled_size, plane_size,
                                 n + 1, pooled_columns, pooled_values, plane_sums, pooled_abs,
                                 pooled_sum, scratch, index_scratch, threads) != -4;
    index[size - 1] = plane_size; /* outside: refused (unless a row before holds a NaN) */
    if (expected == 0)
        status |= tp_pooled_topk_f32(grad, pooled, index, batch, channels, pooled_size, plane_size,
                                     keep, pooled_columns, pooled_values, plane_sums,
                                     pooled_abs, pooled_sum, scratch, index_scratch,
                                     threads) != -1;
    free(grad), free(pooled), free(index), free(delta), free(plain), free(plane_sums);
    free(row_abs), free(channel_sum), free(pooled_abs), free(pooled_sum), free(keeps);
    free(columns), free(pooled_columns), free(values), free(pooled_values), free(scratch);
    free(topk_scratch), free(index_scratch);
    return status;
}

/* Max pooling with non-overlapping windows against PyTorch's rule, window by window: the
 * entries in row-major order, each taken when greater than the maximum so far (-inf at first,
 * at the window's first entry) or NaN. 2x2 windows half the time (the vector path, with rows
 * of up to 40 windows: blocks of 16 and their remainders), odd sides (floor mode). */
static int check_max_pool(int64_t threads) {
    int64_t kh = rand() % 2 ? 2 : 1 + rand() % 3, kw = kh == 2 && rand() % 2 ? 2 : 1 + rand() % 3;
    int64_t planes = 1 + rand() % 12, height = kh * (1 + rand() % 6) + rand() % kh;
    int64_t width = kw * (1 + rand() % 40) + rand() % kw;
    int64_t out_h = height / kh, out_w = width / kw, size = planes * height * width;
    float *in = malloc(sizeof(float) * size), *out = malloc(sizeof(float) * planes * out_h * out_w);
    int64_t *index = malloc(sizeof(int64_t) * planes * out_h * out_w);
    int kind = rand() % 5;
    for (int64_t i = 0; i < size; i++) in[i] = entry(kind);
    tp_max_pool_f32(in, planes, height, width, kh, kw, out, index, threads);
    int status = 0;
    for (int64_t p = 0; p < planes; p++)
        for (int64_t i = 0; i < out_h; i++)
            for (int64_t j = 0; j < out_w; j++) {
                float best = -INFINITY;
                int64_t at = i * kh * width + j * kw;
                for (int64_t a = 0; a < kh; a++)
                    for (int64_t b = 0; b < kw; b++) {
                        int64_t place = (i * kh + a) * width + j * kw + b;
                        float v = in[p * height * width + place];
                        if (v > best || isnan(v)) best = v, at = place;
                    }
                int64_t q = (p * out_h + i) * out_w + j;
                status |= memcmp(&out[q], &best, sizeof best) != 0 || index[q] != at;
            }
    free(in), free(out), free(index);
    return status;
}

/* argv[1]: how many random cases of each kernel (default 2000 top-k, 300 of the others). */
int main(int argc, char **argv) {
    int cases = argc > 1 ? atoi(argv[1]) : 2000;
    srand(7);
    for (int trial = 0; trial < cases; trial++)
        if (check_topk(1 + rand() % 4, 1 + rand() % 3000, 1 + rand() % 4)) return 1;
    for (int trial = 0; trial < cases / 2; trial++)
        if (check_topk_sums(1 + rand() % 6, 1 + rand() % 3000, 1 + rand() % 4)) return 1;
    for (int trial = 0; trial < cases / 10; trial++) /* up to 300 rows: groups of 16, levels */
        if (check_topk_sums_columns(1 + rand() % (trial % 4 ? 40 : 300), 1 + rand() % 300,
                                    1 + rand() % 4))
            return 1;
    for (int trial = 0; trial < cases * 3 / 20; trial++)
        if (check_linear(1 + rand() % 6, trial % 8 == 1 ? 513 + rand() % 1200
                                         : 1 + rand() % (trial % 4 ? 40 : 300),
                         trial % 8 == 3 ? 513 + rand() % 800 : 1 + rand() % 150, 1 + rand() % 4))
            return 1; /* up to 300 outputs: several tiles; over 512: blocks of 512 rows; over
                       * 512 inputs: parts of several tiles (grad_weight two tiles at a time) */
    for (int trial = 0; trial < cases * 3 / 20; trial++)
        if (check_conv(1 + rand() % 4)) return 1;
    for (int trial = 0; trial < cases * 3 / 10; trial++)
        if (check_plane_conv(1 + rand() % 4, trial % 2)) return 1;
    for (int trial = 0; trial < cases * 3 / 20; trial++)
        if (check_layout(1 + rand() % 4)) return 1;
    for (int trial = 0; trial < cases * 3 / 20; trial++)
        if (check_unpool(1 + rand() % 4)) return 1;
    for (int trial = 0; trial < cases * 3 / 20; trial++)
        if (check_pooled_topk(1 + rand() % 4)) return 1;
    for (int trial = 0; trial < cases * 3 / 20; trial++)
        if (check_max_pool(1 + rand() % 4)) return 1;
    puts("ok");
    return 0;
}
