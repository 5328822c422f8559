/* Random shapes through every native kernel, built with -fsanitize=address,undefined by
 * tests/test_native.py: no read or write outside the buffers the Python wrappers allocate. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int tp_topk_f32(const float *, int64_t, int64_t, const int64_t *, int64_t *, float *, float *,
                float *, int64_t *);
int tp_topk_f64(const double *, int64_t, int64_t, const int64_t *, int64_t *, double *,
                double *, double *, int64_t *);
int tp_linear_backward_f32(const float *, const float *, int64_t, int64_t, int64_t,
                           const int64_t *, const int64_t *, const float *, float *, float *,
                           int64_t *, int64_t *, float *);
int tp_conv_backward_f32(const float *, const float *, const int64_t *, const int64_t *,
                         const int64_t *, const float *, float *, float *);

static float uniform(void) { return (float)rand() / (float)RAND_MAX - 0.5f; }

/* Exactly-sized buffers (plus the one slot the wrappers add), so the sanitizer sees overruns. */
static int check_topk(int64_t rows, int64_t n) {
    float *delta = malloc(sizeof(float) * rows * n), *masked = malloc(sizeof(float) * rows * n);
    double *wide = malloc(sizeof(double) * rows * n), *wide_masked = malloc(sizeof(double) * rows * n);
    int64_t *keep = malloc(sizeof(int64_t) * rows), total = 0;
    int kind = rand() % 3; /* continuous, ties, mostly zeros */
    for (int64_t i = 0; i < rows * n; i++) {
        float v = kind == 1 ? (float)(rand() % 3) : uniform();
        delta[i] = (kind == 2 && rand() % 4) ? 0.0f : v;
        wide[i] = delta[i];
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t most = rand() % 2 ? n : n / 8 + 1;
        keep[r] = 1 + rand() % (most < n ? most : n);
        total += keep[r];
    }
    int64_t *columns = malloc(sizeof(int64_t) * (total + 1)), *index = malloc(sizeof(int64_t) * n);
    float *values = malloc(sizeof(float) * (total + 1)), *scratch = malloc(sizeof(float) * 2 * n);
    double *wide_values = malloc(sizeof(double) * (total + 1));
    double *wide_scratch = malloc(sizeof(double) * 2 * n);
    int status = tp_topk_f32(delta, rows, n, keep, columns, values, masked, scratch, index) |
                 tp_topk_f64(wide, rows, n, keep, columns, wide_values, wide_masked, wide_scratch,
                             index);
    free(delta), free(masked), free(wide), free(wide_masked), free(keep), free(columns);
    free(index), free(values), free(scratch), free(wide_values), free(wide_scratch);
    return status;
}

/* Random kept entries: sample s keeps a random subset of its n outputs (maybe none). */
static int64_t kept_entries(int64_t batch, int64_t n, int64_t *row_start, int64_t **column,
                            float **value) {
    *column = malloc(sizeof(int64_t) * (batch * n + 1));
    *value = malloc(sizeof(float) * (batch * n + 1));
    int64_t nnz = 0;
    row_start[0] = 0;
    for (int64_t s = 0; s < batch; s++) {
        for (int64_t j = 0; j < n; j++)
            if (rand() % 5 == 0) (*column)[nnz] = j, (*value)[nnz++] = uniform();
        row_start[s + 1] = nnz;
    }
    return nnz;
}

static int check_linear(int64_t batch, int64_t n, int64_t m) {
    float *x = malloc(sizeof(float) * batch * m), *weight = malloc(sizeof(float) * n * m);
    for (int64_t i = 0; i < batch * m; i++) x[i] = uniform();
    for (int64_t i = 0; i < n * m; i++) weight[i] = uniform();
    int64_t *row_start = malloc(sizeof(int64_t) * (batch + 1)), *column;
    float *value;
    int64_t nnz = kept_entries(batch, n, row_start, &column, &value);
    float *grad_weight = malloc(sizeof(float) * n * m), *grad_input = malloc(sizeof(float) * batch * m);
    int64_t *column_start = malloc(sizeof(int64_t) * (n + 1));
    int64_t *by_sample = malloc(sizeof(int64_t) * (nnz + 1));
    float *by_value = malloc(sizeof(float) * (nnz + 1));
    int status = tp_linear_backward_f32(x, weight, batch, n, m, row_start, column, value,
                                        grad_weight, grad_input, column_start, by_sample,
                                        by_value);
    free(x), free(weight), free(row_start), free(column), free(value), free(grad_weight);
    free(grad_input), free(column_start), free(by_sample), free(by_value);
    return status;
}

static int check_conv(void) {
    int64_t groups = 1 + rand() % 3, cg = 1 + rand() % 3, per_group = 1 + rand() % 3;
    int64_t kh = 1 + rand() % 3, kw = 1 + rand() % 3, sh = 1 + rand() % 2, sw = 1 + rand() % 2;
    int64_t dh = 1 + rand() % 2, dw = 1 + rand() % 2, batch = 1 + rand() % 3;
    int64_t in_h = dh * (kh - 1) + 1 + rand() % 5, in_w = dw * (kw - 1) + 1 + rand() % 5;
    int64_t out_h = (in_h - dh * (kh - 1) - 1) / sh + 1, out_w = (in_w - dw * (kw - 1) - 1) / sw + 1;
    int64_t cin = groups * cg, cout = groups * per_group, n = cout * out_h * out_w;
    int64_t shape[14] = {batch, in_h, in_w, cin, cout, kh, kw, out_h, out_w, sh, sw, dh, dw, groups};
    float *x = malloc(sizeof(float) * batch * in_h * in_w * cin);
    float *weight = malloc(sizeof(float) * cout * kh * kw * cg);
    for (int64_t i = 0; i < batch * in_h * in_w * cin; i++) x[i] = uniform();
    for (int64_t i = 0; i < cout * kh * kw * cg; i++) weight[i] = uniform();
    int64_t *row_start = malloc(sizeof(int64_t) * (batch + 1)), *column;
    float *value;
    kept_entries(batch, n, row_start, &column, &value);
    float *grad_weight = malloc(sizeof(float) * cout * kh * kw * cg);
    float *grad_input = malloc(sizeof(float) * batch * in_h * in_w * cin);
    int status = tp_conv_backward_f32(x, weight, shape, row_start, column, value, grad_weight,
                                      grad_input);
    free(x), free(weight), free(row_start), free(column), free(value), free(grad_weight);
    free(grad_input);
    return status;
}

int main(void) {
    srand(7);
    for (int trial = 0; trial < 2000; trial++)
        if (check_topk(1 + rand() % 4, 1 + rand() % 3000)) return 1;
    for (int trial = 0; trial < 300; trial++)
        if (check_linear(1 + rand() % 6, 1 + rand() % 40, 1 + rand() % 40)) return 1;
    for (int trial = 0; trial < 300; trial++)
        if (check_conv()) return 1;
    puts("ok");
    return 0;
}
