/* libFuzzer harness for tinyprop's native kernels (benchmarks/fuzz_native.sh, make fuzz-native).
 *
 * The fuzz input chooses a kernel (top-k in float32 or float64, Linear or convolution
 * backward), its shapes, keep counts (sometimes out of range), which outputs are wanted, and
 * the thread count (1 to 3), and the floats: a palette of eight arbitrary bit patterns (NaN, ±Inf, denormals, huge) drawn
 * from in runs, so rows hold ties, zeros and the rare NaN alike. Every buffer is exactly as
 * long as the Python wrappers allocate, so AddressSanitizer catches any access past it. The
 * harness aborts when a status is not the documented one (0; -1 for a bad keep or index;
 * 1 + the first row holding NaN or ±Inf) or a finite row's kept entries break the top-k rule.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check_topk.h"

int tp_topk_f32(const float *, int64_t, int64_t, const int64_t *, int64_t *, float *, float *,
                float *, int64_t *, int64_t);
int tp_topk_f64(const double *, int64_t, int64_t, const int64_t *, int64_t *, double *,
                double *, double *, int64_t *, int64_t);
int tp_linear_backward_f32(const float *, const float *, int64_t, int64_t, int64_t,
                           const int64_t *, const int64_t *, const float *, float *, float *,
                           int64_t *, int64_t *, float *, float *, int64_t);
int tp_linear_input_update_f32(const float *, float *, int64_t, int64_t, int64_t,
                               const int64_t *, const int64_t *, const float *, float *,
                               int64_t, float, float *, float, float, int64_t, int64_t,
                               int64_t *, int64_t *, float *, int64_t);
int tp_conv_backward_f32(const float *, const float *, const int64_t *, const int64_t *,
                         const int64_t *, const float *, float *, float *, int64_t);

typedef struct {
    const uint8_t *data;
    size_t size, at;
    uint64_t state; /* xorshift, seeded from the input: long rows from a short input */
    float palette[8];
} reader;

static uint8_t byte(reader *r) { return r->at < r->size ? r->data[r->at++] : 0; }

static uint32_t word(reader *r) {
    uint32_t bits = 0;
    for (int i = 0; i < 4; i++) bits = bits << 8 | byte(r);
    return bits;
}

static uint64_t next(reader *r) {
    r->state ^= r->state << 13, r->state ^= r->state >> 7, r->state ^= r->state << 17;
    return r->state;
}

static void read_palette(reader *r) {
    for (int i = 0; i < 8; i++) {
        uint32_t bits = word(r);
        memcpy(&r->palette[i], &bits, sizeof bits);
    }
    r->state = ((uint64_t)word(r) << 32 | word(r)) | 1;
}

/* n floats: mostly palette entry 0 (like the zeros behind a ReLU), the others in runs. */
static void fill(reader *r, float *out, int64_t n, uint8_t spread) {
    for (int64_t i = 0; i < n; i++) {
        uint64_t draw = next(r);
        out[i] = (draw & 0xff) < spread ? r->palette[(draw >> 8) % 8] : r->palette[0];
    }
}

static void fuzz_topk(reader *r, int wide) {
    int64_t rows = 1 + byte(r) % 4, n = 1 + (int64_t)(word(r) % 4096);
    uint8_t flags = byte(r), spread = byte(r);
    int64_t *keep = malloc(sizeof(int64_t) * rows), total = 0;
    int expected = 0, bad_keep = 0;
    for (int64_t r_ = 0; r_ < rows; r_++) {
        uint8_t how = byte(r);
        int64_t small = n / 16 + 1; /* small k: the sampled bound */
        keep[r_] = how < 240 ? 1 + (int64_t)word(r) % (how % 2 ? n : small)
                             : (int64_t)((uint64_t)word(r) << 32 | word(r)); /* anything */
        if (keep[r_] < 1 || keep[r_] > n) bad_keep = 1;
        else total += keep[r_];
    }
    float *delta = malloc(sizeof(float) * rows * n);
    fill(r, delta, rows * n, spread);
    double *wide_delta = malloc(sizeof(double) * rows * n);
    for (int64_t i = 0; i < rows * n; i++) /* float64: also its own denormals */
        wide_delta[i] = (flags & 8) ? delta[i] * 1e-300 : delta[i];
    for (int64_t r_ = 0; r_ < rows && !expected; r_++)
        if (wide ? !row_is_finite_f64(wide_delta + r_ * n, n) : !row_is_finite_f32(delta + r_ * n, n))
            expected = (int)r_ + 1;
    if (bad_keep) expected = -1;
    total = total > 0 ? total : 1;
    int64_t *columns = (flags & 1) ? malloc(sizeof(int64_t) * total) : NULL;
    int64_t threads = 1 + (flags >> 4) % 3;
    int64_t *index = malloc(sizeof(int64_t) * threads * n);
    size_t size = wide ? sizeof(double) : sizeof(float);
    void *values = (flags & 2) ? malloc(size * total) : NULL;
    void *masked = (flags & 4) ? malloc(size * rows * n) : NULL;
    void *scratch = malloc(size * threads * 2 * n);
    int status = wide ? tp_topk_f64(wide_delta, rows, n, keep, columns, values, masked, scratch,
                                    index, threads)
                      : tp_topk_f32(delta, rows, n, keep, columns, values, masked, scratch, index,
                                    threads);
    if (status != expected) abort();
    for (int64_t r_ = 0, at = 0; status == 0 && columns && r_ < rows; at += keep[r_++]) {
        int valid = wide ? topk_row_is_valid_f64(wide_delta + r_ * n, n, keep[r_], columns + at,
                                                 values ? (double *)values + at : NULL,
                                                 masked ? (double *)masked + r_ * n : NULL)
                         : topk_row_is_valid_f32(delta + r_ * n, n, keep[r_], columns + at,
                                                 values ? (float *)values + at : NULL,
                                                 masked ? (float *)masked + r_ * n : NULL);
        if (!valid) abort();
    }
    free(keep), free(delta), free(wide_delta), free(columns), free(index), free(values);
    free(masked), free(scratch);
}

/* Kept entries of a batch, CSR by sample; sometimes an index out of range (status -1). */
static int64_t kept_entries(reader *r, int64_t batch, int64_t n, int64_t *row_start,
                            int64_t **column, float **value, int *expected) {
    uint8_t density = byte(r), bad = byte(r);
    *column = malloc(sizeof(int64_t) * (batch * n + 1));
    *value = malloc(sizeof(float) * (batch * n + 1));
    int64_t nnz = 0;
    row_start[0] = 0;
    for (int64_t s = 0; s < batch; s++) {
        for (int64_t j = 0; j < n; j++)
            if ((next(r) & 0xff) < density) (*column)[nnz++] = j;
        row_start[s + 1] = nnz;
    }
    fill(r, *value, nnz, byte(r));
    *expected = 0;
    if (nnz && bad > 250) {
        (*column)[next(r) % (uint64_t)nnz] = bad % 2 ? n : -1;
        *expected = -1;
    }
    return nnz;
}

static void fuzz_linear(reader *r) {
    int64_t batch = 1 + byte(r) % 6, n = 1 + byte(r) % 48, m = 1 + byte(r) % 80;
    uint8_t flags = byte(r), spread = byte(r);
    float *x = malloc(sizeof(float) * batch * m), *weight = malloc(sizeof(float) * n * m);
    fill(r, x, batch * m, spread), fill(r, weight, n * m, spread);
    int64_t *row_start = malloc(sizeof(int64_t) * (batch + 1)), *column;
    float *value;
    int expected;
    int64_t nnz = kept_entries(r, batch, n, row_start, &column, &value, &expected);
    float *grad_weight = (flags & 1) ? malloc(sizeof(float) * n * m) : NULL;
    float *grad_input = (flags & 2) ? malloc(sizeof(float) * batch * m) : NULL;
    int64_t *column_start = malloc(sizeof(int64_t) * (n + 1));
    int64_t *by_sample = malloc(sizeof(int64_t) * (nnz + 1));
    float *by_value = malloc(sizeof(float) * (nnz + 1));
    int64_t threads = 1 + (flags >> 4) % 3; /* each thread's two copies: (2, min(n, 512), 64) */
    float *strip = grad_input && (flags & 4) ? malloc(sizeof(float) * threads * 2 * n * 64) : NULL;
    int status = tp_linear_backward_f32(x, weight, batch, n, m, row_start, column, value,
                                        grad_weight, grad_input, column_start, by_sample,
                                        by_value, strip, threads);
    if (status != expected) abort();
    if (grad_input && (flags & 8)) { /* the input gradient and SGD's step in one walk */
        float *buffer = (flags & 64) ? malloc(sizeof(float) * n * m) : NULL;
        if (buffer) fill(r, buffer, n * m, spread);
        status = tp_linear_input_update_f32(x, weight, batch, n, m, row_start, column, value,
                                            grad_input, (flags >> 7) & 1, -0.5f, buffer, 0.9f,
                                            0.75f, spread & 1, (spread >> 1) & 1, column_start,
                                            by_sample, by_value, threads);
        if (status != expected) abort();
        free(buffer);
    }
    free(x), free(weight), free(row_start), free(column), free(value), free(grad_weight);
    free(grad_input), free(column_start), free(by_sample), free(by_value), free(strip);
}

static void fuzz_conv(reader *r) {
    int64_t groups = 1 + byte(r) % 3, cg = 1 + byte(r) % 4, per_group = 1 + byte(r) % 3;
    int64_t kh = 1 + byte(r) % 3, kw = 1 + byte(r) % 3, sh = 1 + byte(r) % 2;
    int64_t sw = 1 + byte(r) % 2, dh = 1 + byte(r) % 2, dw = 1 + byte(r) % 2;
    int64_t batch = 1 + byte(r) % 3;
    int64_t in_h = dh * (kh - 1) + 1 + byte(r) % 6, in_w = dw * (kw - 1) + 1 + byte(r) % 6;
    int64_t out_h = (in_h - dh * (kh - 1) - 1) / sh + 1;
    int64_t out_w = (in_w - dw * (kw - 1) - 1) / sw + 1;
    int64_t cin = groups * cg, cout = groups * per_group, n = cout * out_h * out_w;
    int64_t shape[14] = {batch, in_h, in_w, cin, cout, kh, kw, out_h, out_w, sh, sw, dh, dw,
                         groups};
    uint8_t flags = byte(r), spread = byte(r);
    int64_t x_size = batch * in_h * in_w * cin, w_size = cout * kh * kw * cg;
    float *x = malloc(sizeof(float) * x_size), *weight = malloc(sizeof(float) * w_size);
    fill(r, x, x_size, spread), fill(r, weight, w_size, spread);
    int64_t *row_start = malloc(sizeof(int64_t) * (batch + 1)), *column;
    float *value;
    int expected;
    kept_entries(r, batch, n, row_start, &column, &value, &expected);
    float *grad_weight = (flags & 1) ? malloc(sizeof(float) * w_size) : NULL;
    float *grad_input = (flags & 2) ? malloc(sizeof(float) * x_size) : NULL;
    int status = tp_conv_backward_f32(x, weight, shape, row_start, column, value, grad_weight,
                                      grad_input, 1 + (flags >> 4) % 3);
    if (status != expected) abort();
    free(x), free(weight), free(row_start), free(column), free(value), free(grad_weight);
    free(grad_input);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    reader r = {data, size, 0, 1, {0}};
    uint8_t kernel = byte(&r);
    read_palette(&r);
    switch (kernel % 4) {
    case 0: fuzz_topk(&r, 0); break;
    case 1: fuzz_topk(&r, 1); break;
    case 2: fuzz_linear(&r); break;
    default: fuzz_conv(&r); break;
    }
    return 0;
}
