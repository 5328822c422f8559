/* Native CPU kernels of tinyprop's sparse backward (built on first use, see native/__init__.py).
 *
 * tp_topk_{f32,f64}: the k entries of largest magnitude of each row, ties to the lower index:
 *     the rule of tinyprop.functional.select_topk and the C runtime (runtime/src/selection.c).
 * tp_topk_sums_f32: the same for one fixed k, with each row's Σ |δ| from the same read of it;
 *     tp_topk_sums_columns_f32 also with each column's Σ δ (a Linear layer's bias gradient).
 * tp_linear_backward_f32: weight and input gradients of a Linear layer from the kept entries of
 *     δ only, k · fan_in multiply-accumulates each (grad_input sample by sample, a strip of
 *     the weight's columns at a time); tp_linear_backward_relu_f32: the same with the input
 *     gradient through the ReLU whose output the input is (ReLU's backward fused).
 * tp_linear_update_f32, tp_linear_update_momentum_f32: SGD's update (plain, or with momentum)
 * of a Linear weight from the same kept entries, the weight
 *     gradient never written (summed tile by tile as tp_linear_backward_f32 sums it).
 * tp_conv_backward_f32: the same for a convolution, channels-last.
 * tp_conv_backward_planes_f32: the same with the input gradient written channels first, cropped.
 * tp_plane_conv_backward_f32: the same for a convolution with one input channel per group (a
 *     depthwise one), on the unpadded input as PyTorch holds it.
 * tp_conv_backward_planes_relu_f32, tp_plane_conv_backward_relu_f32: those two, the input
 *     gradient through the ReLU whose output the input is (relu_mask: ReLU's backward fused).
 * tp_channels_last_f32, tp_channels_first_f32: a batch from channels first to zero-padded
 *     channels-last (the convolution kernel's input) and its gradient back, cropped.
 * tp_max_pool_f32: max pooling with non-overlapping windows, with PyTorch's window indices
 *     (2x2 windows vectorized where tp_max_pool_2x2_vectorized says so).
 * tp_relu_unpool_f32, tp_relu_unpool_sums_f32: δ of a convolution's output behind ReLU and max
 *     pooling, from the pooled gradient (with Σ |δ| per sample and Σ δ per channel).
 * tp_pooled_topk_f32: those sums and tp_topk_f32's selection of that δ, without writing it.
 *
 * Each kernel cuts its work into parts along an axis whose outputs no two parts share (rows of δ
 * for top-k, input features for the Linear backward, output channels then samples for the
 * convolution) and runs them on up to `threads` threads, the caller's among them: OpenMP's
 * (PyTorch's own team) when built with -fopenmp, POSIX threads else. Every output is computed by
 * the same operations in the same order whatever the thread count, so results are identical at
 * every thread count.
 *
 * C99 with OpenMP or POSIX threads; every buffer is caller-owned (PyTorch tensors); the only
 * allocations are the small record of a threaded call's parts, the convolution's entry places
 * and the Linear input gradient's block of sums (batch · 128 floats) when it walks the weight.
 */
#define _POSIX_C_SOURCE 200809L
#include <float.h>
#include <limits.h>
#ifdef _OPENMP
#include <omp.h>
#else
#include <pthread.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#if defined(__AVX2__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <string.h>

/* One part of a kernel's work: the part-th of `parts` slices of its outputs, done by worker
 * `worker` (0 .. threads - 1, e.g. to pick its scratch); returns a status. */
typedef int (*part_body)(const void *context, int64_t part, int64_t parts, int64_t worker);

/* The parts of one kernel call, shared by the threads working on it. Parts are handed out in
 * order from `next`, so a thread that starts late (on a busy machine) simply takes fewer; the
 * last thread to let go of the job frees it, so one that starts after the call has returned
 * finds no part left and touches nothing else. */
#ifdef _OPENMP
/* Runs body for parts 0 .. parts - 1 on up to `threads` threads of the OpenMP team (the same
 * threads as PyTorch's own parallel work, so none of them waits spinning for a core another
 * one holds); returns the first non-zero status in part order, as a single thread stopping at
 * the first error would. Parts are handed out in order, so a thread that starts late simply
 * takes fewer. */
static int run_parts(part_body body, const void *context, int64_t parts, int64_t threads) {
    if (threads <= 1 || parts <= 1) {
        for (int64_t part = 0; part < parts; part++) {
            int status = body(context, part, parts, 0);
            if (status) return status;
        }
        return 0;
    }
    int *status = malloc((size_t)parts * sizeof(int));
    if (status == NULL) return run_parts(body, context, parts, 1);
    int64_t next = 0;
#pragma omp parallel num_threads((int)(threads < parts ? threads : parts))
    {
        int64_t part, worker = omp_get_thread_num();
        while ((part = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED)) < parts)
            status[part] = body(context, part, parts, worker);
    }
    int result = 0;
    for (int64_t part = 0; part < parts && !result; part++) result = status[part];
    free(status);
    return result;
}
#else
typedef struct {
    part_body body;
    const void *context;
    int64_t parts, next, done, workers; /* next, workers, users: atomics; done: under lock */
    int users;
    pthread_mutex_t lock;
    pthread_cond_t finished;
    int status[]; /* (parts,) */
} part_job;

static void work_on(part_job *job, int64_t worker) {
    int64_t part;
    while ((part = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->parts) {
        job->status[part] = job->body(job->context, part, job->parts, worker);
        pthread_mutex_lock(&job->lock);
        if (++job->done == job->parts) pthread_cond_signal(&job->finished);
        pthread_mutex_unlock(&job->lock);
    }
}

static void let_go(part_job *job) {
    if (__atomic_sub_fetch(&job->users, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&job->lock);
        pthread_cond_destroy(&job->finished);
        free(job);
    }
}

static void *helper(void *argument) {
    part_job *job = argument;
    work_on(job, __atomic_fetch_add(&job->workers, 1, __ATOMIC_RELAXED));
    let_go(job);
    return NULL;
}

/* Runs body for parts 0 .. parts - 1 on the calling thread and up to threads - 1 detached
 * helper threads (alone when a job or a thread cannot be had); returns the first non-zero
 * status in part order, as a single thread stopping at the first error would. */
static int run_parts(part_body body, const void *context, int64_t parts, int64_t threads) {
    part_job *job = NULL;
    if (threads > 1 && parts > 1) job = malloc(sizeof *job + (size_t)parts * sizeof(int));
    if (job == NULL) {
        for (int64_t part = 0; part < parts; part++) {
            int status = body(context, part, parts, 0);
            if (status) return status;
        }
        return 0;
    }
    *job = (part_job){.body = body, .context = context, .parts = parts, .workers = 1, .users = 1};
    pthread_mutex_init(&job->lock, NULL);
    pthread_cond_init(&job->finished, NULL);
    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    for (int64_t t = 1; t < threads && t < parts; t++) {
        pthread_t handle;
        __atomic_add_fetch(&job->users, 1, __ATOMIC_ACQ_REL);
        if (pthread_create(&handle, &detached, helper, job) != 0)
            __atomic_sub_fetch(&job->users, 1, __ATOMIC_ACQ_REL);
    }
    pthread_attr_destroy(&detached);
    work_on(job, 0);
    pthread_mutex_lock(&job->lock);
    while (job->done < job->parts) pthread_cond_wait(&job->finished, &job->lock);
    pthread_mutex_unlock(&job->lock);
    int status = 0;
    for (int64_t part = 0; part < parts && !status; part++) status = job->status[part];
    let_go(job);
    return status;
}
#endif

/* Start of the part-th of `parts` slices of [0, n), a multiple of `align` (the last ends at n). */
static int64_t slice_start(int64_t n, int64_t part, int64_t parts, int64_t align) {
    if (part >= parts) return n;
    int64_t at = n / parts * part + n % parts * part / parts;
    return at - at % align;
}

/* How many parts to cut `size` units into for `threads` threads: four per thread (so a thread
 * that starts late leaves its share to the others), one unit at least each. */
static int64_t parts_for(int64_t size, int64_t threads) {
    int64_t parts = 4 * threads;
    return parts < size ? parts : size < 1 ? 1 : size;
}

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
 * each step is one branch-free count the compiler vectorizes. The answer lies between the least
 * and the largest pattern, so it starts with the leading bits those two share: the steps start
 * at the first bit where they differ (the candidates of a row, close in size, share the sign
 * and most of the exponent), and t is the same as from bit 30. */
static float kth_largest_f32(const float *a, int64_t n, int64_t k, float *work) {
    int32_t *bits = (int32_t *)(void *)work;
    int32_t least = INT32_MAX, most = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, a + i, sizeof u);
        bits[i] = (int32_t)u;
        least = bits[i] < least ? bits[i] : least, most = bits[i] > most ? bits[i] : most;
    }
    uint32_t differ = (uint32_t)(least ^ most);
    if (differ == 0) { /* every entry the same */
        float result;
        memcpy(&result, &most, sizeof result);
        return result;
    }
    int first = 31 - __builtin_clz(differ); /* the highest bit where least and most differ */
    int32_t t = (int32_t)((uint32_t)most & ~((2u << first) - 1)); /* the shared leading bits */
    for (int bit = first; bit >= 0; bit--) {
        int32_t trial = t | (int32_t)(1u << bit), at_least = 0, more = 0;
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) /* two independent sums: twice the compares per cycle */
            for (int64_t j = 0; j < 16; j++)
                at_least += bits[i + j] >= trial, more += bits[i + 16 + j] >= trial;
        for (; i < n; i++) at_least += bits[i] >= trial;
        if (at_least + more >= k) t = trial;
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

/* The step of the row sample i · step mod n (i < 256): near n / φ and coprime with n, so the
 * sample visits distinct entries spread over the row without following the period of a pooling
 * window or an image row (a plain stride n / 256 can hit only positions that max pooling never
 * passes an error to). */
static int64_t sample_step(int64_t n) {
    int64_t step = (int64_t)((double)n * 0.6180339887498949) | 1;
    for (;; step += 2) {
        int64_t a = n, b = step;
        while (b) { int64_t t = a % b; a = b; b = t; }
        if (a == 1) return step;
    }
}

/* How many entries of a row of n the bound of top-k's search samples: 64, 256 for long rows, 0
 * (no sample) for short ones. */
enum { SAMPLE = 64 };
static int64_t sample_size(int64_t n) {
    return n >= 16 * SAMPLE ? 4 * SAMPLE : n >= 4 * SAMPLE ? SAMPLE : 0;
}

/* sampled[0:sample_size(n)] := the places i · sample_step(n) mod n of a row's sample, in
 * ascending order: the same entries, read front to back (in the order they were drawn, they
 * jumped across the row and each missed the cache). */
static void sample_places(int64_t n, int64_t *sampled) {
    int64_t sample = sample_size(n), step = sample ? sample_step(n) : 0;
    for (int64_t i = 0, at = 0; i < sample; i++, at = at + step < n ? at + step : at + step - n) {
        int64_t j = i; /* insertion sort: once per call */
        for (; j > 0 && sampled[j - 1] > at; j--) sampled[j] = sampled[j - 1];
        sampled[j] = at;
    }
}

/* index[0:count], magnitude[0:count] := the entries i in [from, to) with |row[i]| >= bound or
 * NaN (unordered compares), ascending; returns count. Every NaN and ±Inf of the row is collected
 * whatever the bound, so the caller finds them among the candidates. With AVX-512 (or AVX2),
 * sixteen (eight) comparisons become one bit mask; AVX-512 packs the candidates of a block with
 * one compress, so the loop has no branch per candidate. Whole blocks are stored at `count`
 * <= i - from: for buffers of n slots holding at most `from` candidates before index[0] (the
 * caller's earlier spans), they end before i + 16 <= to <= n, inside both buffers. */
static int64_t collect_span_f32(const float *row, int64_t from, int64_t to, float bound,
                                int64_t *index, float *magnitude) {
    int64_t count = 0, i = from, n = to;
#if defined(__AVX512F__) && defined(__GNUC__)
    const __m512 limit = _mm512_set1_ps(bound);
    const __m512i low_lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i high_lanes = _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(row + i)); /* |row[i..i+16)| */
        __mmask16 mask = _mm512_cmp_ps_mask(a, limit, _CMP_NLT_UQ);
        if (!mask) continue;
        __m512i at = _mm512_set1_epi64(i);
        __mmask8 low = (__mmask8)mask, high = (__mmask8)(mask >> 8);
        int64_t low_count = __builtin_popcount(low);
        _mm512_storeu_ps(magnitude + count, _mm512_maskz_compress_ps(mask, a));
        _mm512_storeu_si512((void *)(index + count),
                            _mm512_maskz_compress_epi64(low, _mm512_add_epi64(at, low_lanes)));
        _mm512_storeu_si512((void *)(index + count + low_count),
                            _mm512_maskz_compress_epi64(high, _mm512_add_epi64(at, high_lanes)));
        count += __builtin_popcount(mask);
    }
#elif defined(__AVX2__) && defined(__GNUC__)
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

static int64_t collect_f32(const float *row, int64_t n, float bound, int64_t *index,
                           float *magnitude) {
    return collect_span_f32(row, 0, n, bound, index, magnitude);
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

/* index[0:written] := the candidates index[0:count] whose magnitude is >= threshold, in order,
 * in place (written <= c at every c); returns written. With AVX-512, sixteen candidates at a
 * time: one comparison mask, their indices packed in registers and stored whole (each store
 * ends at or before the candidates still to be read, both halves loaded first). */
static int64_t pack_at_least_f32(const float *magnitude, int64_t *index, int64_t count,
                                 float threshold) {
    int64_t written = 0, c = 0;
#if defined(__AVX512F__) && defined(__GNUC__)
    const __m512 bound = _mm512_set1_ps(threshold);
    for (; c + 16 <= count; c += 16) {
        __mmask16 take = _mm512_cmp_ps_mask(_mm512_loadu_ps(magnitude + c), bound, _CMP_GE_OQ);
        __m512i low = _mm512_loadu_si512((const void *)(index + c));
        __m512i high = _mm512_loadu_si512((const void *)(index + c + 8));
        __mmask8 low_take = (__mmask8)take, high_take = (__mmask8)(take >> 8);
        _mm512_storeu_si512((void *)(index + written), _mm512_maskz_compress_epi64(low_take, low));
        written += __builtin_popcount(low_take);
        _mm512_storeu_si512((void *)(index + written),
                            _mm512_maskz_compress_epi64(high_take, high));
        written += __builtin_popcount(high_take);
    }
#endif
    for (; c < count; c++) {
        index[written] = index[c];
        written += magnitude[c] >= threshold;
    }
    return written;
}

static int64_t pack_at_least_f64(const double *magnitude, int64_t *index, int64_t count,
                                 double threshold) {
    int64_t written = 0;
    for (int64_t c = 0; c < count; c++) {
        index[written] = index[c];
        written += magnitude[c] >= threshold;
    }
    return written;
}

/* Per row of delta (rows, n): keep the keep[r] entries of largest |δ|, ties to the lower index
 * (keep in [1, n]). Writes, each when not NULL: columns (Σ keep,) the kept indices row by row
 * in ascending order, values (Σ keep,) δ there, masked (rows, n) δ at the kept entries and 0
 * elsewhere; never more than keep[r] entries per row. scratch (threads, 2 n) of T,
 * index_scratch (threads, n): one slice per thread. Returns 0; -1 when a keep is outside
 * [1, n] (checked before anything is written); 1 + r when row r holds a NaN or ±Inf (no k largest |δ| exist: the outputs of the rows from r
 * on are unspecified, nothing is written outside them); -2 if the kept entries did not add up to
 * keep[r] (a broken invariant, never expected).
 *
 * Finding the k-th largest |δ| t: when k is small against n, a sample of 64 (256 for long rows)
 * entries spread over the row (see sample_step) gives a bound e a little below t (the sample's
 * value of rank k · 64 / n plus a margin of two standard deviations and 4), at least the
 * smallest non-zero |δ| (behind ReLU and pooling most entries are zeros, and a zero is never
 * needed as a candidate: rows with fewer than k non-zero entries take the path below);
 * one pass collects the candidates |δ| >= e, and the k-th largest is found among those few.
 * Every other entry is below e <= t, so t and its ties are among the candidates. If fewer than
 * k entries reach e (a bad sample), or k is large, the candidates are all non-zero |δ|. */
#define DEFINE_TOPK(SUFFIX, T, ABS, SMALLEST, LARGEST)                                       \
    /* Whether the row's sample gives a bound (k small against n), and that bound: every entry \
     * below it is below the k-th largest |δ|. scratch (2 n) is worked in. */                 \
    static int topk_bound_##SUFFIX(const T *row, int64_t n, int64_t k, T *scratch,           \
                                   const int64_t *sampled, T *bound) {                       \
        T *work = scratch + n;                                                               \
        int64_t sample = sample_size(n);                                                     \
        if (!(sample && 8 * k <= n)) return 0;                                               \
        for (int64_t i = 0; i < sample; i++) work[i] = ABS(row[sampled[i]]);                \
        double expected = (double)k * (double)sample / (double)n; /* rank of t */            \
        int64_t rank = (int64_t)(expected + 2 * sqrt(expected)) + 4; /* margin */            \
        *bound = kth_largest_##SUFFIX(work, sample, rank + 1, scratch);                      \
        if (*bound < SMALLEST) *bound = SMALLEST; /* zeros are never needed as candidates */ \
        return 1;                                                                            \
    }                                                                                        \
                                                                                             \
    static int topk_kept_##SUFFIX(const T *row, int64_t n, int64_t k, int64_t *columns,      \
                                  T *values, T *masked, T *scratch, int64_t *index,          \
                                  int64_t count);                                            \
                                                                                             \
    /* The end p of the shortest prefix row[0:p) that holds `zeros` (>= 1) zero entries, or -1 \
     * if the row has fewer. Blocks of 64 are counted whole (a loop the compiler vectorizes:  \
     * entry by entry, the branch on each entry's zeroness was mispredicted about every other \
     * entry), the block that reaches `zeros` entry by entry. */                             \
    static int64_t zeros_end_##SUFFIX(const T *row, int64_t n, int64_t zeros) {              \
        int64_t p = 0, seen = 0;                                                             \
        for (; p + 64 <= n; p += 64) {                                                       \
            int64_t block = 0;                                                               \
            for (int64_t j = 0; j < 64; j++) block += row[p + j] == 0;                       \
            if (seen + block >= zeros) break;                                                \
            seen += block;                                                                   \
        }                                                                                    \
        for (; p < n && seen < zeros; p++) seen += row[p] == 0;                              \
        return seen == zeros ? p : -1;                                                       \
    }                                                                                        \
                                                                                             \
    /* One row: 0, 1 when it holds NaN or ±Inf, -2 on a broken invariant. */                 \
    static int topk_row_##SUFFIX(const T *row, int64_t n, int64_t k, int64_t *columns,       \
                                 T *values, T *masked, T *scratch, int64_t *index,           \
                                 const int64_t *sampled) {                                   \
        int64_t count = 0; /* candidates index[0:count], ascending, |δ| in scratch[0:count] */ \
        T bound;                                                                             \
        if (topk_bound_##SUFFIX(row, n, k, scratch, sampled, &bound))                        \
            count = collect_##SUFFIX(row, n, bound, index, scratch);                         \
        return topk_kept_##SUFFIX(row, n, k, columns, values, masked, scratch, index, count); \
    }                                                                                        \
                                                                                             \
    /* The rest of topk_row from the candidates index[0:count] (|δ| in scratch[0:count]) of a \
     * bound, or none (count 0): the k kept entries written. */                              \
    static int topk_kept_##SUFFIX(const T *row, int64_t n, int64_t k, int64_t *columns,      \
                                  T *values, T *masked, T *scratch, int64_t *index,          \
                                  int64_t count) {                                           \
        T *magnitude = scratch, *work = scratch + n;                                         \
        if (count < k) /* no usable bound: every non-zero entry is a candidate */            \
            count = collect_##SUFFIX(row, n, SMALLEST, index, magnitude);                    \
        int not_finite = 0; /* every NaN and ±Inf is a candidate */                          \
        for (int64_t c = 0; c < count; c++) not_finite |= !(magnitude[c] <= LARGEST);        \
        if (not_finite) return 1;                                                            \
        T threshold = 0; /* the k-th largest |δ|; 0 when fewer than k are non-zero */        \
        if (count >= k) threshold = kth_largest_##SUFFIX(magnitude, count, k, work);         \
        int64_t room = k, ties = 0; /* ties at the threshold go to the lower index */        \
        for (int64_t c = 0; c < count; c++)                                                  \
            room -= magnitude[c] > threshold, ties += magnitude[c] == threshold;             \
        if (masked) memset(masked, 0, (size_t)n * sizeof(T));                                \
        int64_t written = 0;                                                                 \
        if (threshold == 0) { /* every non-zero entry (the candidates), then the first zeros: \
                               * the whole prefix row[0:p) that holds `room` zeros, then the   \
                               * candidates from p on (the p - room candidates below p are in  \
                               * the prefix) */                                                \
            int64_t p = zeros_end_##SUFFIX(row, n, room);                                    \
            if (p < 0 || p - room > count) return -2;                                        \
            for (int64_t i = 0; i < p; i++) {                                                \
                if (columns) columns[i] = i;                                                 \
                if (values) values[i] = row[i];                                              \
            }                                                                                \
            if (masked) memcpy(masked, row, (size_t)p * sizeof(T));                          \
            written = p;                                                                     \
            for (int64_t c = p - room; c < count && written < k; c++, written++) {           \
                int64_t i = index[c];                                                        \
                if (columns) columns[written] = i;                                           \
                if (values) values[written] = row[i];                                        \
                if (masked) masked[i] = row[i];                                              \
            }                                                                                \
        } else { /* the kept candidates packed to index[0:written] in place */              \
            if (ties <= room) { /* every tie fits: every candidate >= threshold is kept */   \
                written = pack_at_least_##SUFFIX(magnitude, index, count, threshold);        \
            } else { /* the lower-index ties up to the room left, branch-free */             \
                for (int64_t c = 0; c < count; c++) {                                        \
                    T a = magnitude[c];                                                      \
                    int64_t tie = a == threshold;                                            \
                    int64_t take = (a > threshold) | (tie & (room > 0));                     \
                    room -= tie & take;                                                      \
                    index[written] = index[c]; /* written <= c */                            \
                    written += take;                                                         \
                }                                                                            \
            }                                                                                \
            if (written > k) return -2;                                                      \
            for (int64_t w = 0; w < written; w++) {                                          \
                int64_t i = index[w];                                                        \
                if (columns) columns[w] = i;                                                 \
                if (values) values[w] = row[i];                                              \
                if (masked) masked[i] = row[i];                                              \
            }                                                                                \
        }                                                                                    \
        return written == k ? 0 : -2;                                                        \
    }                                                                                        \
                                                                                             \
    typedef struct {                                                                         \
        const T *delta;                                                                      \
        int64_t rows, n;                                                                     \
        const int64_t *keep;                                                                 \
        int64_t *columns;                                                                    \
        T *values, *masked, *scratch;                                                        \
        int64_t *index_scratch;                                                              \
        const int64_t *sampled;                                                              \
    } topk_##SUFFIX##_call;                                                                  \
                                                                                             \
    static int topk_part_##SUFFIX(const void *context, int64_t part, int64_t parts,          \
                                  int64_t worker) {                                          \
        const topk_##SUFFIX##_call *c = context;                                             \
        int64_t n = c->n, first = slice_start(c->rows, part, parts, 1);                      \
        int64_t end = slice_start(c->rows, part + 1, parts, 1), at = 0;                      \
        for (int64_t r = 0; r < first; r++) at += c->keep[r]; /* this part's first slot */   \
        for (int64_t r = first; r < end; r++) {                                              \
            if (r + 1 < end) { /* the next row into the cache while this one is selected */  \
                const char *next = (const char *)(c->delta + (r + 1) * n);                   \
                for (int64_t byte = 0; byte < n * (int64_t)sizeof(T); byte += 64)            \
                    __builtin_prefetch(next + byte);                                         \
            }                                                                                \
            int status = topk_row_##SUFFIX(                                                  \
                c->delta + r * n, n, c->keep[r], c->columns ? c->columns + at : NULL,        \
                c->values ? c->values + at : NULL, c->masked ? c->masked + r * n : NULL,     \
                c->scratch + worker * 2 * n, c->index_scratch + worker * n, c->sampled);     \
            if (status == 1) return r < INT_MAX - 1 ? (int)r + 1 : INT_MAX;                  \
            if (status) return status;                                                       \
            at += c->keep[r];                                                                \
        }                                                                                    \
        return 0;                                                                            \
    }                                                                                        \
                                                                                             \
    int tp_topk_##SUFFIX(const T *delta, int64_t rows, int64_t n, const int64_t *keep,       \
                         int64_t *columns, T *values, T *masked, T *scratch,                 \
                         int64_t *index_scratch, int64_t threads) {                          \
        for (int64_t r = 0; r < rows; r++)                                                   \
            if (keep[r] < 1 || keep[r] > n) return -1;                                       \
        int64_t sampled[4 * SAMPLE];                                                         \
        sample_places(n, sampled);                                                           \
        topk_##SUFFIX##_call call = {delta, rows, n, keep, columns, values, masked, scratch, \
                                     index_scratch, sampled};                                \
        return run_parts(topk_part_##SUFFIX, &call, parts_for(rows, threads), threads);      \
    }

DEFINE_TOPK(f32, float, fabsf, nextafterf(0.0f, 1.0f), FLT_MAX)
DEFINE_TOPK(f64, double, fabs, nextafter(0.0, 1.0), DBL_MAX)

/* Σ |row[i]| over a row of n floats, in double (every float converts exactly): LANES sums of
 * every LANES-th entry (independent, so the vector adds do not wait on each other), then
 * added in lane order; the same value whatever the thread count. */
enum { LANES = 32 };
static double row_magnitude(const float *row, int64_t n) {
    double lane[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) lane[j] += fabs((double)row[i + j]);
    for (int j = 0; i < n; i++, j++) lane[j] += fabs((double)row[i]);
    double sum = 0;
    for (int j = 0; j < LANES; j++) sum += lane[j];
    return sum;
}

/* row_magnitude and, from the same read of the row (with AVX-512), its candidates of `bound` as
 * collect_f32 gives them (index[0:*count], magnitude[0:*count]): the same sum, the same
 * candidates. */
static double row_magnitude_collect(const float *row, int64_t n, float bound, int64_t *index,
                                    float *magnitude, int64_t *count) {
#if !(defined(__AVX512F__) && defined(__GNUC__))
    *count = collect_f32(row, n, bound, index, magnitude); /* two passes (one block of lanes at */
    return row_magnitude(row, n);                         /* a time, spilled, was slower) */
#else
    double lane[LANES] = {0};
    int64_t i = 0, found = 0;
    /* lanes 0-7, 8-15, 16-23, 24-31 in four registers: each lane adds the same terms in the same
     * order as row_magnitude's; each block of 16 collected as collect_span_f32 does */
    __m512d sum0 = _mm512_setzero_pd(), sum1 = sum0, sum2 = sum0, sum3 = sum0;
    const __m512 limit = _mm512_set1_ps(bound);
    const __m512i low_lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i high_lanes = _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + LANES <= n; i += LANES) {
        for (int half = 0; half < 2; half++) {
            int64_t at = i + 16 * half;
            __m512 a = _mm512_abs_ps(_mm512_loadu_ps(row + at)); /* |row[at..at+16)| */
            __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
            __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                _mm512_castps_pd(a), 1)));
            if (half) sum2 = _mm512_add_pd(sum2, low), sum3 = _mm512_add_pd(sum3, high);
            else sum0 = _mm512_add_pd(sum0, low), sum1 = _mm512_add_pd(sum1, high);
            __mmask16 mask = _mm512_cmp_ps_mask(a, limit, _CMP_NLT_UQ);
            __m512i start = _mm512_set1_epi64(at);
            __mmask8 low_mask = (__mmask8)mask, high_mask = (__mmask8)(mask >> 8);
            int64_t low_count = __builtin_popcount(low_mask);
            _mm512_storeu_ps(magnitude + found, _mm512_maskz_compress_ps(mask, a));
            _mm512_storeu_si512((void *)(index + found), _mm512_maskz_compress_epi64(
                low_mask, _mm512_add_epi64(start, low_lanes)));
            _mm512_storeu_si512((void *)(index + found + low_count), _mm512_maskz_compress_epi64(
                high_mask, _mm512_add_epi64(start, high_lanes)));
            found += __builtin_popcount(mask);
        }
    }
    _mm512_storeu_pd(lane, sum0), _mm512_storeu_pd(lane + 8, sum1);
    _mm512_storeu_pd(lane + 16, sum2), _mm512_storeu_pd(lane + 24, sum3);
    found += collect_span_f32(row, i, n, bound, index + found, magnitude + found);
    for (int j = 0; i < n; i++, j++) lane[j] += fabs((double)row[i]);
    double sum = 0;
    for (int j = 0; j < LANES; j++) sum += lane[j];
    *count = found;
    return sum;
#endif
}

/* A row's Σ |δ| at or above this is left to the caller's own sum (NaN, ±Inf, or a finite row
 * near float32's overflow, where another summation order could round to inf). */
#define NEAR_OVERFLOW (FLT_MAX / 1.01f)

typedef struct {
    const float *delta;
    int64_t rows, n, k;
    float *sums;
    int64_t *counts, *columns;
    float *values, *scratch;
    int64_t *index_scratch;
    const int64_t *sampled;
    float *groups; /* NULL, or (⌈rows / GROUP_ROWS⌉, n): each group of rows' Σ δ by column */
} topk_sums_call;

/* Rows summed one after the other from zero into a group's column sums: PyTorch's CPU sum over
 * the rows of a (rows, n) float32 tensor (delta.sum(0), cascade_sum's multi_row_sum) adds its
 * rows GROUP_ROWS at a time into one accumulator per column, then adds the groups up in levels
 * (column_cascade); below 2^20 rows its level step is 16 rows, at any thread count (its threads
 * split the columns). */
enum { GROUP_ROWS = 16, CASCADE_ROWS_LIMIT = 1 << 20 };

/* groups[r / GROUP_ROWS] (n,) := 0 + row for the first row of its group, else += row. */
static void add_to_group(float *restrict group, const float *restrict row, int64_t n, int first) {
    if (first)
        for (int64_t i = 0; i < n; i++) group[i] = 0.0f + row[i];
    else
        for (int64_t i = 0; i < n; i++) group[i] += row[i];
}

/* sum[c] = Σ_r δ[r, c] from the groups' sums as PyTorch's multi_row_sum adds them (four levels
 * of accumulators, each taking the one below every 16 groups of the one below it, then the
 * rows after the last whole group plus the levels in order): delta.sum(0) bit for bit. */
static void column_cascade(const float *groups, int64_t rows, int64_t n, float *sum) {
    int64_t whole = rows / GROUP_ROWS;
    for (int64_t c = 0; c < n; c++) {
        float level1 = 0.0f, level2 = 0.0f, level3 = 0.0f;
        for (int64_t g = 0; g < whole; g++) {
            int64_t done = (g + 1) * GROUP_ROWS; /* rows summed so far */
            level1 += groups[g * n + c];
            if (done & (int64_t)(GROUP_ROWS - 1) << 4) continue; /* not a multiple of 16² */
            level2 += level1, level1 = 0.0f;
            if (done & (int64_t)(GROUP_ROWS - 1) << 8) continue; /* nor of 16³ */
            level3 += level2, level2 = 0.0f;
        }
        float last = rows % GROUP_ROWS ? groups[whole * n + c] : 0.0f;
        sum[c] = ((last + level1) + level2) + level3;
    }
}

static int topk_sums_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    const topk_sums_call *c = context;
    int64_t align = c->groups ? GROUP_ROWS : 1; /* a group of rows in one part */
    int64_t n = c->n, k = c->k, first = slice_start(c->rows, part, parts, align);
    int64_t end = slice_start(c->rows, part + 1, parts, align);
    for (int64_t r = first; r < end; r++) {
        const float *row = c->delta + r * n;
        float *scratch = c->scratch + worker * 2 * n, bound;
        int64_t *index = c->index_scratch + worker * n, count = 0;
        if (c->groups) /* while the row is in the cache */
            add_to_group(c->groups + r / GROUP_ROWS * n, row, n, r % GROUP_ROWS == 0);
        /* the sum and the candidates of the sample's bound from one read of the row */
        double sum = topk_bound_f32(row, n, k, scratch, c->sampled, &bound)
                         ? row_magnitude_collect(row, n, bound, index, scratch, &count)
                         : row_magnitude(row, n);
        c->sums[r] = (float)sum;
        c->counts[r] = 0;
        if (!(sum < (double)NEAR_OVERFLOW)) return r < INT_MAX - 1 ? (int)r + 1 : INT_MAX;
        if (sum == 0) continue; /* a zero row keeps nothing */
        int status = topk_kept_f32(row, n, k, c->columns + r * k, c->values + r * k, NULL,
                                   scratch, index, count);
        if (status) return status == 1 ? (int)(r < INT_MAX - 1 ? r + 1 : INT_MAX) : status;
        c->counts[r] = k;
    }
    return 0;
}

/* tp_topk_sums_f32 (below) and, from the same read of each row, column_sum (n,) = Σ_r δ[r, :]
 * (a Linear layer's bias gradient Σ δ) as PyTorch's delta.sum(0) sums a block column, bit for
 * bit (column_cascade), when no row is zero (row_start[rows] == rows · k; else column_sum is
 * unspecified: the rows the caller keeps are not these). groups: scratch of ⌈rows / 16⌉ · n
 * floats. Rows from CASCADE_ROWS_LIMIT on PyTorch sums in other levels: -1 then, nothing
 * written. */
int tp_topk_sums_columns_f32(const float *delta, int64_t rows, int64_t n, int64_t k, float *sums,
                             int64_t *row_start, int64_t *columns, float *values, float *scratch,
                             int64_t *index_scratch, float *groups, float *column_sum,
                             int64_t threads) {
    if (k < 1 || k > n || (groups && rows >= CASCADE_ROWS_LIMIT)) return -1;
    int64_t sampled[4 * SAMPLE];
    sample_places(n, sampled);
    topk_sums_call call = {delta, rows, n, k, sums, row_start + 1, columns, values, scratch,
                           index_scratch, sampled, column_sum ? groups : NULL};
    int status = run_parts(topk_sums_part, &call, parts_for(rows, threads), threads);
    if (status) return status;
    row_start[0] = 0; /* row_start[r + 1] held row r's count: make it the offsets, and move
                       * every row's entries from its slot r · k down to row_start[r] */
    for (int64_t r = 0; r < rows; r++) {
        int64_t count = row_start[r + 1], at = row_start[r];
        if (at != r * k && count) {
            memmove(columns + at, columns + r * k, (size_t)count * sizeof(int64_t));
            memmove(values + at, values + r * k, (size_t)count * sizeof(float));
        }
        row_start[r + 1] = at + count;
    }
    if (call.groups && row_start[rows] == rows * k) column_cascade(groups, rows, n, column_sum);
    return 0;
}

/* Top-k with each row's local error, for a k that does not depend on it (fixed-ratio top-k):
 * sums[r] = Σ |δ| of row r (float32, summed in double: see row_magnitude), and the k entries of
 * largest |δ| of every row whose sum is not 0, as tp_topk_f32 keeps them; a zero row keeps
 * nothing. One pass per row reads it for both, so the selection finds it in the cache.
 * Writes row_start (rows + 1,) and the kept entries row by row, columns and values (rows · k
 * slots each: the first row_start[rows] hold them). scratch (threads, 2 n) float,
 * index_scratch (threads, n). Returns 0; -1 when k is outside [1, n] (nothing written); 1 + r
 * for a row r whose sum is NaN, ±Inf or near float32's overflow (NEAR_OVERFLOW: the outputs
 * are then unspecified, the caller sums and selects by its own means); -2 on a broken
 * invariant. */
int tp_topk_sums_f32(const float *delta, int64_t rows, int64_t n, int64_t k, float *sums,
                     int64_t *row_start, int64_t *columns, float *values, float *scratch,
                     int64_t *index_scratch, int64_t threads) {
    return tp_topk_sums_columns_f32(delta, rows, n, k, sums, row_start, columns, values, scratch,
                                    index_scratch, NULL, NULL, threads);
}

/* Features per tile of the Linear gradients: a tile's outputs are summed in registers.
 *
 * The input gradient reads the weight once, row after row, each row added into the rows of the
 * samples that kept it, asking for the row WALK_AHEAD ahead of the one it adds (a thread reads a
 * slice of each row, a row of the weight apart from the last: strided reads the hardware does
 * not fetch ahead by itself). It walks WALK_COLUMNS columns at a time, into a contiguous block,
 * so that the samples' rows it adds into stay in the core's L2 cache (128 samples: 64 kB) while
 * the weight streams past: walking whole rows, the batch's input gradient (1 MB for 128 samples
 * of 2048) went out to L3 and came back for every kept entry, and walking a block of
 * grad_input's own rows (8 kB apart: rows of a width that is a multiple of 1024 floats lie a
 * multiple of 4 kB apart) filled a few cache sets. A caller may instead pass strip scratch:
 * each thread then sums a sample's tile in registers, from a copy of the tile's strip of the
 * weight (STRIP_ROWS rows of TILE columns, contiguous: no two rows share a set), copying the
 * next block of rows while the samples read the current one, asking for the row COPY_AHEAD
 * ahead of the one it copies (tinyprop passes none: the walk into blocks measured faster at
 * one and two threads). Both sum δ[s, j] · weight[j] in j order from zero, rounded alike: the
 * same input gradient, bit for bit. */
enum { TILE = 64, STRIP_ROWS = 512, WALK_AHEAD = 4, COPY_AHEAD = 16, WALK_COLUMNS = 128 };
/* how many rows ahead of the one it updates SGD's fused update asks for a weight row */
enum { UPDATE_AHEAD = 2 };
/* Weight gradients of at least this many floats (4 MB, twice a core's L2 cache on the machines
 * measured) are written past the caches: they would not stay there, and a streamed store does
 * not read the line it replaces first. */
#define STREAM_FLOATS ((int64_t)1 << 20)
/* A weight gradient alone is cut by rows when x (batch · m floats) is at most this (512 kB,
 * half a core's L2 cache on the machines measured): every thread then reads all of x. */
#define WEIGHT_ROWS_X_FLOATS ((int64_t)1 << 17)

/* ReLU's backward at an input x = ReLU(y) of a Linear layer or a convolution, on its input gradient g, in place:
 * g[i] = x[i] <= 0 ? 0 : g[i] over n floats, the value PyTorch's threshold_backward(g, x, 0)
 * writes (x NaN keeps g; +0 written). */
static void relu_mask_span(float *restrict g, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = x[i] <= 0.0f ? 0.0f : g[i];
}

/* out[i] = (from_out ? out[i] : 0) + Σ_t value[t] · source[(index[t] - origin) · stride + i]
 * for i in [0, width), over `count` terms in t order (width <= TILE): the tile's sums stay in
 * registers, so each multiply-accumulate loads one source float and out is stored once. */
static void tile_sum(float *restrict out, const float *restrict source, int64_t stride,
                     int64_t origin, int64_t width, const int64_t *index, const float *value,
                     int64_t count, int from_out, int stream) {
#if defined(__AVX512F__) && defined(__GNUC__)
    __mmask16 k[4];
    for (int q = 0; q < 4; q++) {
        int64_t lanes = width - 16 * q;
        k[q] = lanes >= 16 ? 0xFFFF : lanes <= 0 ? 0 : (__mmask16)((1u << lanes) - 1);
    }
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    if (from_out) {
        a0 = _mm512_maskz_loadu_ps(k[0], out), a1 = _mm512_maskz_loadu_ps(k[1], out + 16);
        a2 = _mm512_maskz_loadu_ps(k[2], out + 32), a3 = _mm512_maskz_loadu_ps(k[3], out + 48);
    }
    for (int64_t t = 0; t < count; t++) {
        const float *row = source + (index[t] - origin) * stride;
        __m512 v = _mm512_set1_ps(value[t]);
        a0 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[0], row), a0);
        a1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[1], row + 16), a1);
        a2 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[2], row + 32), a2);
        a3 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[3], row + 48), a3);
    }
    if (stream && width == TILE && ((uintptr_t)out & 63) == 0) {
        _mm512_stream_ps(out, a0), _mm512_stream_ps(out + 16, a1);
        _mm512_stream_ps(out + 32, a2), _mm512_stream_ps(out + 48, a3);
        return;
    }
    _mm512_mask_storeu_ps(out, k[0], a0), _mm512_mask_storeu_ps(out + 16, k[1], a1);
    _mm512_mask_storeu_ps(out + 32, k[2], a2), _mm512_mask_storeu_ps(out + 48, k[3], a3);
#else
    (void)stream;
    float sum[TILE];
    for (int64_t i = 0; i < width; i++) sum[i] = from_out ? out[i] : 0.0f;
    for (int64_t t = 0; t < count; t++) {
        const float *restrict row = source + (index[t] - origin) * stride;
        float v = value[t];
        for (int64_t i = 0; i < width; i++) sum[i] += v * row[i];
    }
    memcpy(out, sum, (size_t)width * sizeof(float));
#endif
}

/* tile_sum of two whole tiles side by side (out[i] for i in [0, 2 TILE)), from zero, with no
 * origin: the same sums, rounded alike, with twice the independent sums per term, so that a
 * few terms (a weight gradient row's handful of samples) keep the multiply-adds busy instead
 * of waiting on each other. */
static void two_tile_sum(float *restrict out, const float *restrict source, int64_t stride,
                         const int64_t *index, const float *value, int64_t count, int stream) {
#if defined(__AVX512F__) && defined(__GNUC__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0;
    __m512 a7 = a0;
    for (int64_t t = 0; t < count; t++) {
        const float *row = source + index[t] * stride;
        __m512 v = _mm512_set1_ps(value[t]);
        a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row), a0);
        a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 16), a1);
        a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 32), a2);
        a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 48), a3);
        a4 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 64), a4);
        a5 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 80), a5);
        a6 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 96), a6);
        a7 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 112), a7);
    }
    if (stream && ((uintptr_t)out & 63) == 0) {
        _mm512_stream_ps(out, a0), _mm512_stream_ps(out + 16, a1);
        _mm512_stream_ps(out + 32, a2), _mm512_stream_ps(out + 48, a3);
        _mm512_stream_ps(out + 64, a4), _mm512_stream_ps(out + 80, a5);
        _mm512_stream_ps(out + 96, a6), _mm512_stream_ps(out + 112, a7);
        return;
    }
    _mm512_storeu_ps(out, a0), _mm512_storeu_ps(out + 16, a1);
    _mm512_storeu_ps(out + 32, a2), _mm512_storeu_ps(out + 48, a3);
    _mm512_storeu_ps(out + 64, a4), _mm512_storeu_ps(out + 80, a5);
    _mm512_storeu_ps(out + 96, a6), _mm512_storeu_ps(out + 112, a7);
#else
    tile_sum(out, source, stride, 0, TILE, index, value, count, 0, stream);
    tile_sum(out + TILE, source + TILE, stride, 0, TILE, index, value, count, 0, stream);
#endif
}

/* out[i] += v · row[i] for i in [0, width): the step tile_sum takes per term, rounded as it
 * rounds it (a fused multiply-add with AVX-512, the same C expression without). */
static void row_add(float *restrict out, const float *restrict row, int64_t width, float v) {
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__GNUC__)
    const __m512 value = _mm512_set1_ps(v);
    for (; i + 16 <= width; i += 16) {
        __m512 sum = _mm512_fmadd_ps(value, _mm512_loadu_ps(row + i), _mm512_loadu_ps(out + i));
        _mm512_storeu_ps(out + i, sum);
    }
    if (i < width) {
        __mmask16 lanes = (__mmask16)((1u << (width - i)) - 1);
        __m512 sum = _mm512_fmadd_ps(value, _mm512_maskz_loadu_ps(lanes, row + i),
                                     _mm512_maskz_loadu_ps(lanes, out + i));
        _mm512_mask_storeu_ps(out + i, lanes, sum);
    }
#else
    for (; i < width; i++) out[i] += v * row[i];
#endif
}

/* Whether row_start (batch + 1,) is a CSR offset array: starts at 0, never decreases. */
static int valid_offsets(const int64_t *row_start, int64_t batch) {
    if (row_start[0] != 0) return 0;
    for (int64_t s = 0; s < batch; s++)
        if (row_start[s + 1] < row_start[s]) return 0;
    return 1;
}

/* The kept entries (CSR by sample) regrouped by output (CSC): column_start (n + 1,), and the
 * samples (ascending) and values of each output's entries. Returns 0, -1 on an index out of
 * range, offsets that decrease or a sample's indices that do not ascend. */
static int regroup_by_column(int64_t batch, int64_t n, const int64_t *row_start,
                             const int64_t *column, const float *value, int64_t *column_start,
                             int64_t *by_column_sample, float *by_column_value) {
    if (!valid_offsets(row_start, batch)) return -1;
    memset(column_start, 0, (size_t)(n + 1) * sizeof(int64_t));
    for (int64_t s = 0; s < batch; s++) {
        for (int64_t e = row_start[s], previous = -1; e < row_start[s + 1]; e++) {
            if (column[e] <= previous || column[e] >= n) return -1; /* ascending, in [0, n) */
            previous = column[e];
            column_start[column[e] + 1]++;
        }
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
    return 0;
}

typedef struct {
    const float *x, *weight;
    int64_t batch, n, m;
    int stream; /* write grad_weight with streamed stores */
    int relu_mask; /* grad_input through the ReLU whose output x is (relu_mask_span) */
    const int64_t *row_start, *column; /* (batch + 1,), (nnz,): the entries by sample */
    const float *value;
    const int64_t *column_start, *by_column_sample; /* (n + 1,), (nnz,): the entries by output */
    const float *by_column_value;
    float *grad_weight, *grad_input;
    float *strip; /* NULL: walk the weight's rows; else (threads, 2, min(n, STRIP_ROWS), TILE) */
    const struct update_call *update; /* NULL; else SGD's step of the weight, in the walk */
} linear_call;

/* The first of the entries [from, to) of a sample (columns ascending) with a column >= value. */
static int64_t first_at_least(const int64_t *column, int64_t from, int64_t to, int64_t value) {
    while (from < to) {
        int64_t mid = from + (to - from) / 2;
        if (column[mid] < value) from = mid + 1;
        else to = mid;
    }
    return from;
}

/* copy[(j - first) · TILE + i] := weight[j · m + at + i] for the rows j in [from, to) of the
 * block [first, last) of the weight's rows and i in [0, width), asking for the row COPY_AHEAD
 * ahead of the one copied (within the block). */
static void copy_rows(float *restrict copy, const float *restrict weight, int64_t m, int64_t at,
                      int64_t width, int64_t first, int64_t last, int64_t from, int64_t to) {
    for (int64_t j = from; j < to; j++) {
#if defined(__GNUC__)
        if (j + COPY_AHEAD < last) /* a hint: nothing depends on it */
            for (int64_t i = 0; i < width; i += 64 / (int64_t)sizeof(float))
                __builtin_prefetch(weight + (j + COPY_AHEAD) * m + at + i, 0, 3);
#endif
        memcpy(copy + (j - first) * TILE, weight + j * m + at, (size_t)width * sizeof(float));
    }
}

/* grad_weight[j, at .. end) = Σ_{s keeps j} δ[s, j] · x[s, at .. end), the samples in
 * ascending order, from zero: two tiles at a time while two are left, then tile by tile (every
 * float the same sum however the columns are cut). */
static void weight_piece(const linear_call *c, int64_t j, int64_t at, int64_t width,
                         const int64_t *sample, const float *value, int64_t count) {
    int64_t m = c->m, end = at + width;
    for (; end - at >= 2 * TILE; at += 2 * TILE)
        two_tile_sum(c->grad_weight + j * m + at, c->x + at, m, sample, value, count, c->stream);
    for (; at < end; at += TILE)
        tile_sum(c->grad_weight + j * m + at, c->x + at, m, 0, end - at < TILE ? end - at : TILE,
                 sample, value, count, 0, c->stream);
}

static void row_update(const struct update_call *c, int64_t j, int64_t from, int64_t width,
                       const int64_t *sample, const float *value, int64_t count);

/* grad_input's columns [first, end) (whole tiles but the last), walking the weight's rows: row
 * s starts at zero and adds δ[s, j] · weight[j] for the outputs j it kept, j ascending; the
 * weight is read once, row after row, each row added into the samples that kept it, a block
 * of WALK_COLUMNS columns at a time (each column's sum in the same order), summed in a
 * contiguous copy of the block (batch, WALK_COLUMNS) and copied into grad_input when done (in
 * grad_input itself when that copy cannot be had). In the same walk, while the row's piece is
 * in the cache: grad_weight's piece of row j (when asked for; the sums linear_part's own loop
 * makes), or SGD's step of it (c->update, after the row was added: the input gradient takes
 * the weight before the step), so that the weight is read once and written at most once. */
static void input_by_rows(const linear_call *c, int64_t first, int64_t end) {
    int64_t m = c->m, batch = c->batch;
    void *held = malloc((size_t)(batch * WALK_COLUMNS) * sizeof(float) + 64);
    float *block = held ? (float *)(((uintptr_t)held + 63) & ~(uintptr_t)63) : NULL;
    for (int64_t from = first; from < end; from += WALK_COLUMNS) {
        int64_t width = end - from < WALK_COLUMNS ? end - from : WALK_COLUMNS;
        float *out = block ? block : c->grad_input + from; /* sample s's sums at s · stride */
        int64_t stride = block ? width : m;
        for (int64_t s = 0; s < batch; s++)
            memset(out + s * stride, 0, (size_t)width * sizeof(float));
        for (int64_t j = 0; j < c->n; j++) {
            const float *restrict row = c->weight + j * m + from;
            int64_t start = c->column_start[j], count = c->column_start[j + 1] - start;
            const int64_t *sample = c->by_column_sample + start;
            const float *value = c->by_column_value + start;
#if defined(__GNUC__)
            if (j + WALK_AHEAD < c->n) /* a hint: nothing depends on it */
                for (int64_t i = 0; i < width; i += 64 / (int64_t)sizeof(float))
                    __builtin_prefetch(row + WALK_AHEAD * m + i, 0, 3);
#endif
            for (int64_t t = 0; t < count; t++)
                row_add(out + sample[t] * stride, row, width, value[t]);
            if (c->update)
                row_update(c->update, j, from, width, sample, value, count);
            else if (c->grad_weight)
                weight_piece(c, j, from, width, sample, value, count);
        }
        for (int64_t s = 0; s < batch; s++) {
            if (block)
                memcpy(c->grad_input + s * m + from, block + s * width,
                       (size_t)width * sizeof(float));
            if (c->relu_mask) /* the sums still in the cache */
                relu_mask_span(c->grad_input + s * m + from, c->x + s * m + from, width);
        }
    }
    free(held);
}

/* The same columns by strips: block q of the part's blocks (each tile's strip cut into blocks
 * of STRIP_ROWS rows, in order) is summed from one of the worker's two copies while block
 * q + 1 is copied into the other, a share of its rows per sample. A sample's tile sums its
 * entries of the block in registers, going on from what the blocks before stored. */
static void input_by_strips(const linear_call *c, int64_t first, int64_t end, int64_t worker) {
    int64_t m = c->m, n = c->n, batch = c->batch;
    int64_t rows = n < STRIP_ROWS ? n : STRIP_ROWS, blocks = (n + rows - 1) / rows;
    int64_t count = (end - first + TILE - 1) / TILE * blocks; /* blocks of these columns */
    float *copies = c->strip + worker * 2 * rows * TILE;     /* (2, rows, TILE) */
    if (batch == 0) return;
    copy_rows(copies, c->weight, m, first, end - first < TILE ? end - first : TILE, 0, rows, 0,
              rows);
    for (int64_t q = 0; q < count; q++) {
        int64_t at = first + q / blocks * TILE, from = q % blocks * rows;
        int64_t to = n - from < rows ? n : from + rows, width = end - at < TILE ? end - at : TILE;
        int64_t next_at = first + (q + 1) / blocks * TILE, next_from = (q + 1) % blocks * rows;
        int64_t next_rows = n - next_from < rows ? n - next_from : rows;
        int64_t next_width = end - next_at < TILE ? end - next_at : TILE;
        float *copy = copies + q % 2 * rows * TILE, *next = copies + (q + 1) % 2 * rows * TILE;
        for (int64_t s = 0; s < batch; s++) {
            if (q + 1 < count) /* a share of the next block's rows */
                copy_rows(next, c->weight, m, next_at, next_width, next_from,
                          next_from + next_rows, next_from + s * next_rows / batch,
                          next_from + (s + 1) * next_rows / batch);
            int64_t e = c->row_start[s], last = c->row_start[s + 1];
            if (from > 0) e = first_at_least(c->column, e, last, from);
            if (to < n) last = first_at_least(c->column, e, last, to);
            tile_sum(c->grad_input + s * m + at, copy, TILE, from, width, c->column + e,
                     c->value + e, last - e, from > 0, 0);
        }
    }
    for (int64_t s = 0; c->relu_mask && s < batch; s++)
        relu_mask_span(c->grad_input + s * m + first, c->x + s * m + first, end - first);
}

/* The tiles [part, part + 1) · tiles / parts of TILE input features of both gradients. With
 * grad_input walking the weight's rows (input_by_rows), grad_weight (or SGD's step of the
 * weight) comes in the same walk; else row by row (each row's tiles written one after the
 * other, not a row of the weight apart), each tile of grad_weight row j sums the x rows of the
 * samples that kept j (weight_piece), then grad_input's columns (input_by_strips). */
static int linear_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    const linear_call *c = context;
    int64_t m = c->m, tiles = (m + TILE - 1) / TILE;
    int64_t first = slice_start(tiles, part, parts, 1) * TILE;
    int64_t end = slice_start(tiles, part + 1, parts, 1) * TILE;
    if (end > m) end = m;
    int walks = c->grad_input && !c->strip; /* input_by_rows writes grad_weight too */
    if (c->grad_weight && !walks) {
        for (int64_t j = 0; j < c->n; j++) {
            int64_t start = c->column_start[j], count = c->column_start[j + 1] - start;
            weight_piece(c, j, first, end - first, c->by_column_sample + start,
                         c->by_column_value + start, count);
        }
    }
    if (c->grad_input && first < end) {
        if (c->strip) input_by_strips(c, first, end, worker);
        else input_by_rows(c, first, end);
    }
    return 0;
}

/* The rows [part, part + 1) · n / parts of grad_weight alone (no input gradient), each row
 * whole, written once from its first feature to its last (as linear_part sums its tiles: the
 * same sums). Cutting by rows instead of by tiles of features gives each row one pass over
 * its samples, not one per part, and each thread a contiguous share of the output; a
 * thread then reads every feature of x, which a narrow layer's x (batch · m floats) keeps
 * in its cache. */
static int weight_rows_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    (void)worker;
    const linear_call *c = context;
    int64_t m = c->m, first = slice_start(c->n, part, parts, 1);
    int64_t end = slice_start(c->n, part + 1, parts, 1);
    for (int64_t j = first; j < end; j++) {
        int64_t start = c->column_start[j], count = c->column_start[j + 1] - start;
        const int64_t *sample = c->by_column_sample + start;
        const float *value = c->by_column_value + start;
        int64_t at = 0;
        for (; m - at >= 2 * TILE; at += 2 * TILE)
            two_tile_sum(c->grad_weight + j * m + at, c->x + at, m, sample, value, count,
                         c->stream);
        for (; at < m; at += TILE)
            tile_sum(c->grad_weight + j * m + at, c->x + at, m, 0, m - at < TILE ? m - at : TILE,
                     sample, value, count, 0, c->stream);
    }
    return 0;
}

/* Linear backward from the kept entries of δ, given by sample (CSR):
 *   row_start (batch + 1,), column (nnz,) output index j (ascending within each sample),
 *   value (nnz,) δ[s, j].
 * x (batch, m), weight (n, m). Writes (when not NULL):
 *   grad_weight (n, m): row j = Σ_{s keeps j} δ[s, j] · x[s]   (zeros where nobody kept j)
 *   grad_input (batch, m): row s = Σ_{j kept by s} δ[s, j] · weight[j], j ascending
 * The entries are also regrouped by output (CSC) for grad_weight; the input features are cut
 * into tiles of TILE, shared out among up to `threads` threads, every output summed in the same
 * order whatever the thread count. Scratch: column_start (n + 1,), by_column_sample (nnz,),
 * by_column_value (nnz,); strip: NULL (the input gradient walks the weight's rows, into blocks:
 * tinyprop's choice), or (threads, 2, min(n, STRIP_ROWS), TILE) floats (it sums strips of the
 * weight).
 * Returns 0, -1 on an index out of range, offsets that decrease or a
 * sample's indices that do not ascend (nothing written then). Any float values
 * (NaN, ±Inf) only flow into the gradients: no branch depends on them. */
static int linear_backward(const float *x, const float *weight, int64_t batch, int64_t n,
                           int64_t m, const int64_t *row_start, const int64_t *column,
                           const float *value, float *grad_weight, float *grad_input,
                           int64_t *column_start, int64_t *by_column_sample,
                           float *by_column_value, float *strip, int64_t threads,
                           int relu_mask) {
    if (regroup_by_column(batch, n, row_start, column, value, column_start, by_column_sample,
                          by_column_value) != 0)
        return -1;
    linear_call call = {.strip = strip, .x = x, .weight = weight, .batch = batch, .n = n, .m = m,
                        .stream = n * m >= STREAM_FLOATS, .row_start = row_start,
                        .column = column, .value = value, .column_start = column_start,
                        .by_column_sample = by_column_sample,
                        .by_column_value = by_column_value, .grad_weight = grad_weight,
                        .grad_input = grad_input, .relu_mask = relu_mask};
    int status;
    if (grad_input == NULL && grad_weight != NULL && batch * m <= WEIGHT_ROWS_X_FLOATS)
        status = run_parts(weight_rows_part, &call, parts_for(n, threads), threads);
    else
        status = run_parts(linear_part, &call, parts_for((m + TILE - 1) / TILE, threads), threads);
#if defined(__AVX512F__) && defined(__GNUC__)
    _mm_sfence(); /* the streamed stores of grad_weight are visible before the caller reads */
#endif
    return status;
}

int tp_linear_backward_f32(const float *x, const float *weight, int64_t batch, int64_t n,
                           int64_t m, const int64_t *row_start, const int64_t *column,
                           const float *value, float *grad_weight, float *grad_input,
                           int64_t *column_start, int64_t *by_column_sample,
                           float *by_column_value, float *strip, int64_t threads) {
    return linear_backward(x, weight, batch, n, m, row_start, column, value, grad_weight,
                           grad_input, column_start, by_column_sample, by_column_value, strip,
                           threads, 0);
}

/* tp_linear_backward_f32 with x the output of a ReLU: grad_input is the gradient at the ReLU's
 * input instead, x[s, i] <= 0 ? 0 : the sum (relu_mask_span), each block of sums masked while
 * it is still in the cache: ReLU's backward pass fused. */
int tp_linear_backward_relu_f32(const float *x, const float *weight, int64_t batch, int64_t n,
                                int64_t m, const int64_t *row_start, const int64_t *column,
                                const float *value, float *grad_weight, float *grad_input,
                                int64_t *column_start, int64_t *by_column_sample,
                                float *by_column_value, float *strip, int64_t threads) {
    return linear_backward(x, weight, batch, n, m, row_start, column, value, grad_weight,
                           grad_input, column_start, by_column_sample, by_column_value, strip,
                           threads, 1);
}

typedef struct update_call {
    const float *x;
    int64_t n, m;
    const int64_t *column_start, *by_column_sample;
    const float *by_column_value;
    float *weight, scale;
    float *buffer; /* NULL: plain SGD; else SGD's momentum buffer (n, m), updated too */
    float momentum, damped; /* damped = 1 - dampening */
    int first, nesterov; /* first: the buffer is new (it becomes the gradient) */
} update_call;

/* One tile of `width` weights of a row with SGD's momentum, as torch.optim.SGD's step on the
 * CPU computes it, rounding included: buf = g on the first step, else buf = buf · momentum
 * (rounded), then buf += damped · g (one fused multiply-add, as Tensor.add_ with alpha); the
 * step s = buf, or g + momentum · buf with Nesterov (fused); w += scale · s (fused). */
static void momentum_tile(const update_call *c, float *restrict w, float *restrict buf,
                          const float *restrict g, int64_t width) {
    float momentum = c->momentum, damped = c->damped, scale = c->scale;
    if (c->first) {
        for (int64_t i = 0; i < width; i++) {
            buf[i] = g[i];
            w[i] = fmaf(c->nesterov ? fmaf(g[i], momentum, g[i]) : g[i], scale, w[i]);
        }
        return;
    }
    for (int64_t i = 0; i < width; i++) {
        float kept = buf[i] * momentum;
        float next = fmaf(g[i], damped, kept);
        buf[i] = next;
        w[i] = fmaf(c->nesterov ? fmaf(next, momentum, g[i]) : next, scale, w[i]);
    }
}

/* SGD's step of the weight's row j over the columns [from, from + width): += scale · (its
 * gradient, summed as tp_linear_backward_f32 sums it), read and written once; a row nobody
 * kept stays as it is under plain SGD, and takes a zero gradient under momentum (its buffer
 * still decays, its weight still moves). Two tiles are summed at a time while two are left
 * (two_tile_sum, the same sums). */
static void row_update(const update_call *c, int64_t j, int64_t from, int64_t width,
                       const int64_t *sample, const float *value, int64_t count) {
    float sum[2 * TILE];
    if (count == 0 && c->buffer == NULL) return; /* a zero gradient row: w + scale · 0 */
    for (int64_t at = from, end = from + width, piece; at < end; at += piece) {
        piece = end - at >= 2 * TILE ? 2 * TILE : end - at < TILE ? end - at : TILE;
        if (!count)
            memset(sum, 0, sizeof sum);
        else if (piece == 2 * TILE) /* two tiles' sums, as tp_linear_backward_f32's */
            two_tile_sum(sum, c->x + at, c->m, sample, value, count, 0);
        else
            tile_sum(sum, c->x + at, c->m, 0, piece, sample, value, count, 0, 0);
        float *restrict w = c->weight + j * c->m + at;
        if (c->buffer) {
            momentum_tile(c, w, c->buffer + j * c->m + at, sum, piece);
            continue;
        }
        for (int64_t i = 0; i < piece; i++) w[i] += c->scale * sum[i];
    }
}

/* The rows [part, part + 1) · n / parts of the weight, each row's SGD step whole (row_update),
 * in order (x stays in the cache), asking for the weight row UPDATE_AHEAD rows ahead, to be
 * written: the update then waits less on memory. */
static int update_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    (void)worker;
    const update_call *c = context;
    int64_t m = c->m, first = slice_start(c->n, part, parts, 1);
    int64_t end = slice_start(c->n, part + 1, parts, 1);
    for (int64_t j = first; j < end; j++) {
        int64_t start = c->column_start[j], count = c->column_start[j + 1] - start;
#if defined(__GNUC__)
        if (c->buffer == NULL && j + UPDATE_AHEAD < end) /* a hint: nothing depends on it */
            for (int64_t i = 0; i < m; i += 64 / (int64_t)sizeof(float))
                __builtin_prefetch(c->weight + (j + UPDATE_AHEAD) * m + i, 1, 3);
#endif
        row_update(c, j, 0, m, c->by_column_sample + start, c->by_column_value + start, count);
    }
    return 0;
}

/* SGD's update of a Linear weight from the kept entries of δ, without the weight gradient:
 *   weight (n, m) += scale · Σ_{s keeps j} δ[s, j] · x[s]   row by row (scale = -lr),
 * the gradient rows summed as by tp_linear_backward_f32 (same order at every thread count).
 * Inputs and scratch as for tp_linear_backward_f32. Returns 0, -1 on kept entries it refuses
 * (nothing written then). */
int tp_linear_update_f32(const float *x, float *weight, int64_t batch, int64_t n, int64_t m,
                         const int64_t *row_start, const int64_t *column, const float *value,
                         float scale, int64_t *column_start, int64_t *by_column_sample,
                         float *by_column_value, int64_t threads) {
    if (regroup_by_column(batch, n, row_start, column, value, column_start, by_column_sample,
                          by_column_value) != 0)
        return -1;
    update_call call = {.x = x, .n = n, .m = m, .column_start = column_start,
                        .by_column_sample = by_column_sample,
                        .by_column_value = by_column_value, .weight = weight, .scale = scale};
    return run_parts(update_part, &call, parts_for(n, threads), threads);
}

/* tp_linear_update_f32 with SGD's momentum: buffer (n, m), the parameter's momentum buffer,
 * is updated with the weight, every row (see momentum_tile), as torch.optim.SGD does with
 * momentum, dampening and nesterov (damped = 1 - dampening as the caller rounds it to float);
 * first: the buffer is new (written, never read). */
int tp_linear_update_momentum_f32(const float *x, float *weight, int64_t batch, int64_t n,
                                  int64_t m, const int64_t *row_start, const int64_t *column,
                                  const float *value, float scale, float *buffer,
                                  float momentum, float damped, int64_t first,
                                  int64_t nesterov, int64_t *column_start,
                                  int64_t *by_column_sample, float *by_column_value,
                                  int64_t threads) {
    if (regroup_by_column(batch, n, row_start, column, value, column_start, by_column_sample,
                          by_column_value) != 0)
        return -1;
    update_call call = {.x = x, .n = n, .m = m, .column_start = column_start,
                        .by_column_sample = by_column_sample,
                        .by_column_value = by_column_value, .weight = weight, .scale = scale,
                        .buffer = buffer, .momentum = momentum, .damped = damped,
                        .first = first != 0, .nesterov = nesterov != 0};
    return run_parts(update_part, &call, parts_for(n, threads), threads);
}

/* tp_linear_backward_f32's input gradient and SGD's step of the weight (tp_linear_update_f32,
 * or with buffer not NULL tp_linear_update_momentum_f32) in one walk down the weight's rows:
 * each piece of a row is added into the input gradient of the samples that kept it and then
 * stepped, read once and written once, instead of read for the input gradient and read and
 * written again by the update. grad_input (batch, m) as tp_linear_backward_f32 writes it from
 * the weight before the step (relu_mask: as tp_linear_backward_relu_f32 writes it); the weight
 * (and buffer) as the update writes them, bit for bit, at every thread count (threads split
 * the input features, each walking every row for its own). Returns 0, -1 on kept entries it
 * refuses (nothing written then). */
int tp_linear_input_update_f32(const float *x, float *weight, int64_t batch, int64_t n,
                               int64_t m, const int64_t *row_start, const int64_t *column,
                               const float *value, float *grad_input, int64_t relu_mask,
                               float scale, float *buffer, float momentum, float damped,
                               int64_t first, int64_t nesterov, int64_t *column_start,
                               int64_t *by_column_sample, float *by_column_value,
                               int64_t threads) {
    if (regroup_by_column(batch, n, row_start, column, value, column_start, by_column_sample,
                          by_column_value) != 0)
        return -1;
    update_call update = {.x = x, .n = n, .m = m, .column_start = column_start,
                          .by_column_sample = by_column_sample,
                          .by_column_value = by_column_value, .weight = weight, .scale = scale,
                          .buffer = buffer, .momentum = momentum, .damped = damped,
                          .first = first != 0, .nesterov = nesterov != 0};
    linear_call call = {.x = x, .weight = weight, .batch = batch, .n = n, .m = m,
                        .row_start = row_start, .column = column, .value = value,
                        .column_start = column_start, .by_column_sample = by_column_sample,
                        .by_column_value = by_column_value, .grad_input = grad_input,
                        .relu_mask = relu_mask != 0, .update = &update};
    return run_parts(linear_part, &call, parts_for((m + TILE - 1) / TILE, threads), threads);
}

/* by_channel (nnz,): the entries 0 .. nnz - 1 grouped by channel, each channel's in entry order
 * (a counting sort), channel c's from channel_start[c] to channel_start[c + 1] (C_out + 1,).
 * The selection gives each sample's entries channel by channel, so the entries come in runs of
 * one channel: counted and placed run by run (one counter update per run, not per entry). */
static void entries_by_channel(int64_t nnz, int64_t channels_out, const int64_t *entry_channel,
                               int64_t *channel_start, int64_t *by_channel) {
    memset(channel_start, 0, (size_t)(channels_out + 1) * sizeof(int64_t));
    for (int64_t e = 0, run; e < nnz; e += run) {
        for (run = 1; e + run < nnz && entry_channel[e + run] == entry_channel[e]; run++) {}
        channel_start[entry_channel[e] + 1] += run;
    }
    for (int64_t ch = 0; ch < channels_out; ch++) channel_start[ch + 1] += channel_start[ch];
    for (int64_t e = 0, run; e < nnz; e += run) {
        for (run = 1; e + run < nnz && entry_channel[e + run] == entry_channel[e]; run++) {}
        int64_t *slot = by_channel + channel_start[entry_channel[e]];
        for (int64_t r = 0; r < run; r++) slot[r] = e + r;
        channel_start[entry_channel[e]] += run;
    }
    for (int64_t ch = channels_out; ch > 0; ch--) channel_start[ch] = channel_start[ch - 1];
    channel_start[0] = 0;
}

/* One sample's planes (channels, height, width) and its padded channels-last copy (rows of
 * padded_w positions of `channels` floats, the sample's first row `top` rows down and its first
 * column `left` columns in): copies the planes into the copy (to_copy) or back, the padding
 * untouched either way. With AVX2, blocks of 8 channels x 8 positions (taken in row-major order
 * over the sample, a block may span image rows) are transposed in registers: 8 loads and 8
 * stores of 8 floats instead of 64 single copies; the rest one float at a time. Every float is
 * copied as it is, so either way gives the same copy. */
static void copy_sample(float *planes, float *copy, int64_t channels, int64_t height,
                        int64_t width, int64_t padded_w, int64_t top, int64_t left, int to_copy) {
    int64_t ch = 0;
#if defined(__AVX2__) && defined(__GNUC__)
    const int64_t size = height * width;
    for (; ch + 8 <= channels; ch += 8) {
        int64_t q = 0;
        for (; q + 8 <= size; q += 8) {
            float *at[8]; /* where positions q .. q + 7 of the block's first channel go */
            for (int64_t i = 0, row = q / width, col = q % width; i < 8; i++) {
                at[i] = copy + ((row + top) * padded_w + left + col) * channels + ch;
                if (++col == width) col = 0, row++;
            }
            const float *plane = planes + ch * size + q;
            __m256 r[8], t[8];
            for (int j = 0; j < 8; j++) /* r[j]: 8 positions of one channel, or the reverse */
                r[j] = _mm256_loadu_ps(to_copy ? plane + j * size : at[j]);
            t[0] = _mm256_unpacklo_ps(r[0], r[1]), t[1] = _mm256_unpackhi_ps(r[0], r[1]);
            t[2] = _mm256_unpacklo_ps(r[2], r[3]), t[3] = _mm256_unpackhi_ps(r[2], r[3]);
            t[4] = _mm256_unpacklo_ps(r[4], r[5]), t[5] = _mm256_unpackhi_ps(r[4], r[5]);
            t[6] = _mm256_unpacklo_ps(r[6], r[7]), t[7] = _mm256_unpackhi_ps(r[6], r[7]);
            r[0] = _mm256_shuffle_ps(t[0], t[2], 0x44), r[1] = _mm256_shuffle_ps(t[0], t[2], 0xEE);
            r[2] = _mm256_shuffle_ps(t[1], t[3], 0x44), r[3] = _mm256_shuffle_ps(t[1], t[3], 0xEE);
            r[4] = _mm256_shuffle_ps(t[4], t[6], 0x44), r[5] = _mm256_shuffle_ps(t[4], t[6], 0xEE);
            r[6] = _mm256_shuffle_ps(t[5], t[7], 0x44), r[7] = _mm256_shuffle_ps(t[5], t[7], 0xEE);
            for (int i = 0; i < 4; i++) { /* t[i] = column i of the block, t[i + 4] column i+4 */
                t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
                t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
            }
            for (int i = 0; i < 8; i++)
                _mm256_storeu_ps(to_copy ? at[i] : (float *)plane + i * size, t[i]);
        }
        for (; q < size; q++) {
            float *line = copy + ((q / width + top) * padded_w + left + q % width) * channels;
            for (int64_t c = ch; c < ch + 8; c++) {
                if (to_copy) line[c] = planes[c * size + q];
                else planes[c * size + q] = line[c];
            }
        }
    }
#endif
    for (int64_t row = 0; ch < channels && row < height; row++) {
        float *line = copy + ((row + top) * padded_w + left) * channels;
        for (int64_t col = 0; col < width; col++)
            for (int64_t c = ch; c < channels; c++) {
                if (to_copy) line[col * channels + c] = planes[(c * height + row) * width + col];
                else planes[(c * height + row) * width + col] = line[col * channels + c];
            }
    }
}

typedef struct {
    const float *x, *weight;
    const int64_t *shape, *row_start;
    const int64_t *entry_channel, *entry_start; /* (nnz,) each, from conv_entry_places */
    const int64_t *channel_start, *by_channel; /* (C_out + 1,), (nnz,): the entries by channel */
    const float *value;
    float *grad_weight, *grad_input;
    const int64_t *pads; /* NULL: grad_input padded channels-last; else {top, bottom, left,
                          * right}: grad_input (batch, C_in, H, W), through `scratch` */
    float *scratch;      /* (threads, in_h · in_w · C_in): one padded sample per worker */
    /* each sample's columns ascending (as the selection gives them): the entries are walked in
     * runs of one channel per sample, without the places above (NULL then). column (nnz,);
     * position_start (P,): the offset of output position p's window in a sample; per worker,
     * run_end (threads, batch): where each sample's run of the current channel ends, and
     * gathered / gathered_value (threads, GATHERED): a channel's entries (patch offsets in x,
     * δ) for conv_weight_part */
    int sorted;
    const int64_t *column, *position_start;
    int64_t *run_end, *gathered;
    float *gathered_value;
    int relu_mask; /* grad_input through the ReLU whose output x is (relu_mask_span) */
} conv_call;

enum { GATHERED = 256 }; /* entries of a channel summed at a time (its lists stay in L1) */

/* For every kept entry e (column c · P + p of sample s): entry_channel[e] = c and entry_start[e]
 * = the offset in x of the first input its patch reads (sample s, the window's top-left at
 * output position p, the first channel of c's group). position_start (P,) is scratch. The
 * entries of a sample come in ascending order from the selection, so the channel is found
 * with one division per channel of a sample, not per entry (any order is still right). */
static void conv_entry_places(const int64_t *shape, const int64_t *row_start,
                              const int64_t *column, int64_t *entry_channel,
                              int64_t *entry_start, int64_t *position_start) {
    int64_t in_h = shape[1], in_w = shape[2], channels_in = shape[3], channels_out = shape[4];
    int64_t out_h = shape[7], out_w = shape[8], stride_h = shape[9], stride_w = shape[10];
    int64_t groups = shape[13], positions = out_h * out_w;
    int64_t cg = channels_in / groups, per_group = channels_out / groups;
    for (int64_t row = 0, p = 0; row < out_h; row++)
        for (int64_t col = 0; col < out_w; col++, p++)
            position_start[p] = (row * stride_h * in_w + col * stride_w) * channels_in;
    for (int64_t s = 0; s < shape[0]; s++) {
        int64_t ch = 0, base = -1, group_start = 0, sample_start = s * in_h * in_w * channels_in;
        for (int64_t e = row_start[s]; e < row_start[s + 1]; e++) {
            if (column[e] < base || column[e] >= base + positions || base < 0) {
                ch = column[e] / positions, base = ch * positions;
                group_start = sample_start + (ch / per_group) * cg;
            }
            entry_channel[e] = ch;
            entry_start[e] = group_start + position_start[column[e] - base];
        }
    }
}

/* The offset in a patch (from its first input) of the 16 floats that vector q of a channel's
 * weights (kh, kw, cg) multiplies, cg a multiple of 16. */
static int64_t patch_offset(const int64_t *shape, int64_t q) {
    int64_t in_w = shape[2], channels_in = shape[3], kw = shape[6];
    int64_t cg = channels_in / shape[13], tap = q / (cg / 16), i = q % (cg / 16) * 16;
    return (tap / kw * shape[11] * in_w + tap % kw * shape[12]) * channels_in + i;
}

/* One kept entry's patch gradient: δ = v times its channel's weights w (kh, kw, cg) added into
 * the patch at gx, whose taps lie row_step and col_step floats apart (16 floats at a time with
 * AVX-512 when cg allows). */
static inline void add_patch(float *gx, const float *restrict w, float v, int64_t cg,
                             int64_t kh, int64_t kw, int64_t row_step, int64_t col_step) {
    for (int64_t ky = 0; ky < kh; ky++) {
        for (int64_t kx = 0; kx < kw; kx++, w += cg) {
            float *restrict tap = gx + ky * row_step + kx * col_step;
#if defined(__AVX512F__) && defined(__GNUC__)
            if (cg % 16 == 0) {
                __m512 value = _mm512_set1_ps(v);
                for (int64_t i = 0; i < cg; i += 16)
                    _mm512_storeu_ps(tap + i, _mm512_fmadd_ps(value, _mm512_loadu_ps(w + i),
                                                              _mm512_loadu_ps(tap + i)));
                continue;
            }
#endif
            for (int64_t i = 0; i < cg; i++) tap[i] += v * w[i];
        }
    }
}

/* The kept entries of samples [first, end) into `out` (grad_input, or a sample's scratch placed
 * so that the sample's entries land in it), in entry order. With each sample's columns
 * ascending (`sorted`), a run of one channel's entries at a time: its channel, weights and
 * group found once for the run; else from the entries' places. */
static void conv_input_entries(const conv_call *c, int64_t first, int64_t end, float *out) {
    const int64_t *shape = c->shape, *column = c->column;
    int64_t channels_in = shape[3], kh = shape[5], kw = shape[6], cg = channels_in / shape[13];
    int64_t row_step = shape[11] * shape[2] * channels_in, col_step = shape[12] * channels_in;
    if (!c->sorted) {
        for (int64_t e = c->row_start[first]; e < c->row_start[end]; e++)
            add_patch(out + c->entry_start[e], c->weight + c->entry_channel[e] * kh * kw * cg,
                      c->value[e], cg, kh, kw, row_step, col_step);
        return;
    }
    int64_t positions = shape[7] * shape[8], per_group = shape[4] / shape[13];
    int64_t sample_size = shape[1] * shape[2] * channels_in;
    for (int64_t s = first; s < end; s++) {
        int64_t e = c->row_start[s], stop = c->row_start[s + 1];
        while (e < stop) { /* a run of one channel's entries */
            int64_t ch = column[e] / positions, base = ch * positions, limit = base + positions;
            float *group = out + s * sample_size + ch / per_group * cg;
            const float *w = c->weight + ch * kh * kw * cg;
            for (; e < stop && column[e] < limit; e++)
                add_patch(group + c->position_start[column[e] - base], w, c->value[e], cg, kh, kw,
                          row_step, col_step);
        }
    }
}

/* grad_weight of output channel ch from `count` entries, in order, added to its sum so far
 * (`more`) or to zero: the patch of entry t starts at x + start[t], its δ is value[t]. With
 * AVX-512 and cg a multiple of 16, four vectors of the channel's weights at a time are summed in
 * registers over every entry, then stored; else each entry adds into grad_weight. Either way
 * each weight adds the entries in the same order, one multiply-add each. */
static void channel_weight(const conv_call *c, int64_t ch, const int64_t *start,
                           const float *value, int64_t count, int more) {
    const int64_t *shape = c->shape;
    int64_t in_w = shape[2], channels_in = shape[3], kh = shape[5], kw = shape[6];
    int64_t cg = channels_in / shape[13], taps = kh * kw, size = taps * cg;
    float *restrict gw = c->grad_weight + ch * size;
#if defined(__AVX512F__) && defined(__GNUC__)
    if (cg % 16 == 0) {
        int64_t vectors = size / 16, q = 0;
        for (; q + 4 <= vectors; q += 4) {
            int64_t o0 = patch_offset(shape, q), o1 = patch_offset(shape, q + 1);
            int64_t o2 = patch_offset(shape, q + 2), o3 = patch_offset(shape, q + 3);
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            if (more) {
                a0 = _mm512_loadu_ps(gw + 16 * q), a1 = _mm512_loadu_ps(gw + 16 * q + 16);
                a2 = _mm512_loadu_ps(gw + 16 * q + 32), a3 = _mm512_loadu_ps(gw + 16 * q + 48);
            }
            for (int64_t t = 0; t < count; t++) {
                const float *patch = c->x + start[t];
                __m512 v = _mm512_set1_ps(value[t]);
                a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(patch + o0), a0);
                a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(patch + o1), a1);
                a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(patch + o2), a2);
                a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(patch + o3), a3);
            }
            _mm512_storeu_ps(gw + 16 * q, a0), _mm512_storeu_ps(gw + 16 * q + 16, a1);
            _mm512_storeu_ps(gw + 16 * q + 32, a2), _mm512_storeu_ps(gw + 16 * q + 48, a3);
        }
        for (; q < vectors; q++) {
            int64_t o = patch_offset(shape, q);
            __m512 a = more ? _mm512_loadu_ps(gw + 16 * q) : _mm512_setzero_ps();
            for (int64_t t = 0; t < count; t++)
                a = _mm512_fmadd_ps(_mm512_set1_ps(value[t]), _mm512_loadu_ps(c->x + start[t] + o),
                                    a);
            _mm512_storeu_ps(gw + 16 * q, a);
        }
        return;
    }
#endif
    if (!more) memset(gw, 0, (size_t)size * sizeof(float));
    for (int64_t t = 0; t < count; t++) {
        float v = value[t];
        for (int64_t ky = 0, tap = 0; ky < kh; ky++) {
            for (int64_t kx = 0; kx < kw; kx++, tap++) {
                const float *restrict patch =
                    c->x + start[t] + (ky * shape[11] * in_w + kx * shape[12]) * channels_in;
                for (int64_t i = 0; i < cg; i++) gw[tap * cg + i] += v * patch[i];
            }
        }
    }
}

/* A channel's entries gathered for channel_weight, GATHERED at a time at most. */
typedef struct {
    const conv_call *c;
    int64_t ch, count, *start; /* start, value: the worker's lists */
    float *value;
    int more; /* a part of the channel's entries is summed into grad_weight already */
} gathering;

static void gather(gathering *g, int64_t start, float value) {
    g->start[g->count] = start, g->value[g->count] = value;
    if (++g->count < GATHERED) return;
    channel_weight(g->c, g->ch, g->start, g->value, g->count, g->more);
    g->count = 0, g->more = 1;
}

/* grad_weight of output channels [first, end), each channel's entries in entry order. With each
 * sample's columns ascending (`sorted`) a channel's entries are one run per sample (its columns
 * c · P .. c · P + P - 1), each continuing where the last channel's ended; else
 * entries_by_channel's lists. */
static int conv_weight_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    const conv_call *c = context;
    const int64_t *shape = c->shape, *column = c->column, *row_start = c->row_start;
    int64_t batch = shape[0], channels_in = shape[3], positions = shape[7] * shape[8];
    int64_t per_group = shape[4] / shape[13], cg = channels_in / shape[13];
    int64_t sample_size = shape[1] * shape[2] * channels_in;
    int64_t first = slice_start(shape[4], part, parts, 1);
    int64_t end = slice_start(shape[4], part + 1, parts, 1);
    int64_t *next = c->run_end + worker * batch;
    for (int64_t s = 0; c->sorted && s < batch; s++)
        next[s] = first_at_least(column, row_start[s], row_start[s + 1], first * positions);
    for (int64_t ch = first; ch < end; ch++) {
        gathering g = {c, ch, 0, c->gathered + worker * GATHERED,
                       c->gathered_value + worker * GATHERED, 0};
        if (c->sorted) {
            int64_t base = ch * positions, limit = base + positions;
            for (int64_t s = 0; s < batch; s++) {
                int64_t e = next[s], origin = s * sample_size + ch / per_group * cg;
                for (; e < row_start[s + 1] && column[e] < limit; e++)
                    gather(&g, origin + c->position_start[column[e] - base], c->value[e]);
                next[s] = e;
            }
        } else {
            for (int64_t t = c->channel_start[ch]; t < c->channel_start[ch + 1]; t++)
                gather(&g, c->entry_start[c->by_channel[t]], c->value[c->by_channel[t]]);
        }
        if (g.count || !g.more) channel_weight(c, ch, g.start, g.value, g.count, g.more);
    }
    return 0;
}

/* Samples [first, end) of grad_input: their entries of every channel. */
static int conv_input_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    const conv_call *c = context;
    int64_t in_h = c->shape[1], in_w = c->shape[2], channels = c->shape[3];
    int64_t size = in_h * in_w * channels;
    int64_t first = slice_start(c->shape[0], part, parts, 1);
    int64_t end = slice_start(c->shape[0], part + 1, parts, 1);
    if (c->pads == NULL) {
        memset(c->grad_input + first * size, 0, (size_t)((end - first) * size) * sizeof(float));
        conv_input_entries(c, first, end, c->grad_input);
        if (c->relu_mask)
            relu_mask_span(c->grad_input + first * size, c->x + first * size, (end - first) * size);
        return 0;
    }
    /* one sample at a time in the worker's padded channels-last scratch (it stays in the cache),
     * then cropped into the sample's channels-first gradient */
    int64_t top = c->pads[0], left = c->pads[2];
    int64_t height = in_h - top - c->pads[1], width = in_w - left - c->pads[3];
    float *scratch = c->scratch + worker * size;
    for (int64_t s = first; s < end; s++) {
        memset(scratch, 0, (size_t)size * sizeof(float));
        conv_input_entries(c, s, s + 1, scratch - s * size);
        if (c->relu_mask) relu_mask_span(scratch, c->x + s * size, size); /* padding: cropped */
        copy_sample(c->grad_input + s * channels * height * width, scratch, channels, height,
                    width, in_w, top, left, 0);
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
 * cg contiguous in all three arrays. grad_weight is split by output channel, grad_input by
 * sample, into up to `threads` parts each. shape: {batch, in_h, in_w, channels_in,
 * channels_out, kh, kw, out_h, out_w, stride_h, stride_w, dilation_h, dilation_w, groups}.
 * Each sample's entries in ascending column order (as the selection gives them) are walked in
 * runs of one channel, by every thread; in another order, each entry's place is found and the
 * entries are sorted by channel first (one thread). Either way every output sums its entries in
 * entry order. Returns 0, -1 on an index out of range or offsets that decrease (checked before
 * anything is written), -3 when the P + threads · (batch + 2 · GATHERED) integers of the runs
 * (3 nnz + P + C_out + 1 more out of order) cannot be allocated; float values, NaN
 * and ±Inf included, only flow into the gradients. */
static int conv_backward(const float *x, const float *weight, const int64_t *shape,
                         const int64_t *row_start, const int64_t *column, const float *value,
                         float *grad_weight, float *grad_input, const int64_t *pads,
                         float *scratch, int64_t threads, int relu_mask) {
    int64_t batch = shape[0], channels_out = shape[4], positions = shape[7] * shape[8];
    if (!valid_offsets(row_start, batch)) return -1;
    int64_t nnz = row_start[batch];
    for (int64_t e = 0; e < nnz; e++)
        if (column[e] < 0 || column[e] >= channels_out * positions) return -1;
    int sorted = 1;
    for (int64_t s = 0; s < batch; s++)
        for (int64_t e = row_start[s] + 1; e < row_start[s + 1]; e++)
            sorted &= column[e - 1] < column[e];
    /* the P window offsets, per worker the run ends and a channel's gathered entries; unsorted,
     * also every entry's places and the entries by channel */
    int64_t workers = threads < 1 ? 1 : threads;
    int64_t runs = positions + workers * (batch + 2 * GATHERED);
    int64_t *places = malloc((size_t)(runs + (sorted ? 0 : 3 * nnz + positions + channels_out + 1))
                             * sizeof(int64_t));
    if (places == NULL) return -3;
    int64_t in_w = shape[2], channels_in = shape[3], out_w = shape[8];
    for (int64_t p = 0; p < positions; p++)
        places[p] = (p / out_w * shape[9] * in_w + p % out_w * shape[10]) * channels_in;
    int64_t *entry_channel = NULL, *entry_start = NULL, *by_channel = NULL, *channel_start = NULL;
    if (!sorted) {
        entry_channel = places + runs, entry_start = entry_channel + nnz;
        by_channel = entry_start + nnz, channel_start = by_channel + nnz + positions;
        conv_entry_places(shape, row_start, column, entry_channel, entry_start, by_channel + nnz);
        if (grad_weight)
            entries_by_channel(nnz, channels_out, entry_channel, channel_start, by_channel);
    }
    conv_call call = {x, weight, shape, row_start, entry_channel, entry_start, channel_start,
                      by_channel, value, grad_weight, grad_input, pads, scratch, sorted, column,
                      places, places + positions, places + positions + workers * batch,
                      (float *)(void *)(places + positions + workers * (batch + GATHERED)),
                      relu_mask};
    threads = workers;
    if (grad_weight) run_parts(conv_weight_part, &call, parts_for(channels_out, threads), threads);
    if (grad_input) run_parts(conv_input_part, &call, parts_for(batch, threads), threads);
    free(places);
    return 0;
}

int tp_conv_backward_f32(const float *x, const float *weight, const int64_t *shape,
                         const int64_t *row_start, const int64_t *column, const float *value,
                         float *grad_weight, float *grad_input, int64_t threads) {
    return conv_backward(x, weight, shape, row_start, column, value, grad_weight, grad_input,
                         NULL, NULL, threads, 0);
}

/* tp_conv_backward_f32 with grad_input written as PyTorch holds it: (batch, C_in, H, W),
 * channels first, without the padding pads = {top, bottom, left, right} (H = in_h - top -
 * bottom, W = in_w - left - right), every value as tp_conv_backward_f32 then
 * tp_channels_first_f32 give it. Each sample's gradient is summed in the worker's part of
 * scratch (threads, in_h · in_w · C_in), where it stays in the cache, and cropped from there:
 * no padded channels-last gradient of the whole batch is written, zeroed or read back. */
int tp_conv_backward_planes_f32(const float *x, const float *weight, const int64_t *shape,
                                const int64_t *pads, const int64_t *row_start,
                                const int64_t *column, const float *value, float *grad_weight,
                                float *grad_input, float *scratch, int64_t threads) {
    return conv_backward(x, weight, shape, row_start, column, value, grad_weight, grad_input,
                         pads, scratch, threads, 0);
}

/* tp_conv_backward_planes_f32 for a convolution whose input x is the output of a ReLU: with
 * relu_mask, grad_input is the gradient at the ReLU's input instead, each sample's masked in
 * the cache before it is written out (relu_mask_span): ReLU's backward pass fused. */
int tp_conv_backward_planes_relu_f32(const float *x, const float *weight, const int64_t *shape,
                                     const int64_t *pads, const int64_t *row_start,
                                     const int64_t *column, const float *value,
                                     float *grad_weight, float *grad_input, float *scratch,
                                     int64_t threads, int64_t relu_mask) {
    return conv_backward(x, weight, shape, row_start, column, value, grad_weight, grad_input,
                         pads, scratch, threads, relu_mask != 0);
}

typedef struct {
    const float *x, *weight;
    const int64_t *shape, *row_start;
    /* (nnz,) each: an entry's input plane's offset in x, its output position p, its channel;
     * (P,) each: the window's top row and left column at p (negative in the padding), whether
     * every tap of it is inside the input; (kh kw,): a tap's offset from the window's corner;
     * (C_out + 1,), (nnz,): the entries by output channel */
    const int64_t *entry_plane, *entry_position, *entry_channel, *top, *left, *inside;
    const int64_t *tap_offset, *channel_start, *by_channel;
    /* (P, kh kw): a tap's offset in the input plane at window p, -1 in the padding */
    const int64_t *tap_at;
    const float *value;
    float *grad_weight, *grad_input;
    const int64_t *column; /* (nnz,) the kept columns c · P + p */
    int sorted; /* each sample's columns ascend (the vector path of grad_weight needs it) */
    int relu_mask; /* grad_input through the ReLU whose output x is (relu_mask_span) */
} plane_call;

/* One kept entry's products δ · weight added into the input plane `plane` of its sample and
 * group, the window's top-left corner at (top, left) (negative in the padding), the taps in the
 * padding left out (plane_entry's input gradient, and the sorted path's), in tap order. */
static void plane_taps(const plane_call *c, float *restrict plane, int64_t top, int64_t left,
                       const float *restrict w, float v) {
    const int64_t *shape = c->shape;
    int64_t in_h = shape[2], in_w = shape[3], kh = shape[5], kw = shape[6];
    for (int64_t ky = 0; ky < kh; ky++) {
        int64_t row = top + ky * shape[13];
        if (row < 0 || row >= in_h) continue;
        for (int64_t kx = 0; kx < kw; kx++) {
            int64_t col = left + kx * shape[14];
            if (col < 0 || col >= in_w) continue;
            plane[row * in_w + col] += v * w[ky * kw + kx];
        }
    }
}

/* One kept entry e of a convolution with one input channel per group: the window's taps that
 * fall in the zero padding are left out. Adds into grad_weight[c] (for_weight) or into the
 * input plane's gradient. */
static void plane_entry(const plane_call *c, int64_t e, int for_weight) {
    const int64_t *shape = c->shape;
    int64_t in_h = shape[2], in_w = shape[3], kh = shape[5], kw = shape[6];
    int64_t p = c->entry_position[e], top = c->top[p], left = c->left[p];
    int64_t plane = c->entry_plane[e], first_tap = c->entry_channel[e] * kh * kw;
    float v = c->value[e];
    if (c->inside[p]) { /* no tap in the padding: no test per tap */
        const float *restrict in = for_weight ? c->x + plane + top * in_w + left
                                              : c->weight + first_tap;
        float *restrict out = for_weight ? c->grad_weight + first_tap
                                         : c->grad_input + plane + top * in_w + left;
        for (int64_t tap = 0; tap < kh * kw; tap++) {
            if (for_weight) out[tap] += v * in[c->tap_offset[tap]];
            else out[c->tap_offset[tap]] += v * in[tap];
        }
        return;
    }
    if (!for_weight) {
        plane_taps(c, c->grad_input + plane, top, left, c->weight + first_tap, v);
        return;
    }
    for (int64_t ky = 0; ky < kh; ky++) {
        int64_t row = top + ky * shape[13];
        if (row < 0 || row >= in_h) continue;
        for (int64_t kx = 0; kx < kw; kx++) {
            int64_t col = left + kx * shape[14];
            if (col < 0 || col >= in_w) continue;
            c->grad_weight[first_tap + ky * kw + kx] += v * c->x[plane + row * in_w + col];
        }
    }
}



#if defined(__AVX512F__) && defined(__GNUC__)
/* Whether the vector path below computes grad_weight: AVX-512, a window of at most 16 taps with
 * adjacent columns (dilation_w 1), and each sample's entries in ascending column order (as the
 * selection gives them), so the entries of a channel are one run per sample. */
static int plane_weight_vectorized(const plane_call *c) {
    return c->sorted && c->shape[5] * c->shape[6] <= 16 && c->shape[14] == 1;
}

/* grad_weight of output channels [first, end): sample by sample, each run of a channel's entries
 * adds into the channel's kh · kw taps held in one register (tap ky · kw + kx in lane
 * ky · kw + kx). Per entry, each window row inside the input is loaded into its lanes (the taps
 * in the padding masked out), and one masked multiply-add adds δ times the window. Each tap
 * sums the same products in the same order as plane_entry does (a channel's entries in entry
 * order, one fused multiply-add each), so the sums are the same. */
static void plane_weight_vector(const plane_call *c, int64_t first, int64_t end) {
    const int64_t *shape = c->shape, *column = c->column;
    int64_t channels_in = shape[1], in_h = shape[2], in_w = shape[3], channels_out = shape[4];
    int64_t kh = shape[5], kw = shape[6], positions = shape[7] * shape[8];
    int64_t dilation_h = shape[13], per_group = channels_out / shape[15], taps = kh * kw;
    __mmask16 tap_lanes = (__mmask16)((1u << taps) - 1);
    memset(c->grad_weight + first * taps, 0, (size_t)((end - first) * taps) * sizeof(float));
    /* the input planes of channels [first, end) of a sample: one block of x. The next sample's
     * block is fetched into the cache while this one's entries are summed (the entries read
     * most of its lines, in no order a hardware prefetcher follows; x was written in the
     * forward pass and is no longer in the cache) */
    int64_t plane_size = in_h * in_w, first_plane = first / per_group;
    int64_t block = ((end - 1) / per_group - first_plane + 1) * plane_size; /* floats */
    for (int64_t s = 0; s < shape[0]; s++) {
        if (s + 1 < shape[0]) {
            const char *next = (const char *)(c->x + ((s + 1) * channels_in + first_plane) *
                                                         plane_size);
            for (int64_t byte = 0; byte < block * (int64_t)sizeof(float); byte += 64)
                __builtin_prefetch(next + byte);
        }
        int64_t e = first_at_least(column, c->row_start[s], c->row_start[s + 1], first * positions);
        int64_t last = first_at_least(column, e, c->row_start[s + 1], end * positions);
        while (e < last) { /* a run of one channel's entries, walked to its end (runs are a
                            * few entries long: a search for the end costs more) */
            int64_t ch = column[e] / positions, base = ch * positions, limit = base + positions;
            const float *plane = c->x + (s * channels_in + ch / per_group) * in_h * in_w;
            float *gw = c->grad_weight + ch * taps;
            __m512 sum = _mm512_maskz_loadu_ps(tap_lanes, gw);
            for (; e < last && column[e] < limit; e++) {
                int64_t p = column[e] - base, top = c->top[p], left = c->left[p];
                int64_t from = left < 0 ? -left : 0; /* the window's columns inside the input */
                int64_t to = in_w - left < kw ? in_w - left : kw;
                if (from >= to) continue;
                /* lane ky · kw + kx of a row's load reads the input at column left + kx: the load
                 * starts ky · kw floats before the row's window (lanes outside the mask read
                 * nothing) */
                uintptr_t corner = (uintptr_t)(plane + left);
                __mmask16 row_lanes = (__mmask16)(((1u << (to - from)) - 1) << from), taken = 0;
                __m512 window = _mm512_setzero_ps();
                for (int64_t ky = 0; ky < kh; ky++, row_lanes = (__mmask16)(row_lanes << kw)) {
                    int64_t row = top + ky * dilation_h;
                    if (row < 0 || row >= in_h) continue;
                    uintptr_t at = corner + (uintptr_t)(row * in_w - ky * kw) * sizeof(float);
                    window = _mm512_mask_loadu_ps(window, row_lanes, (const void *)at);
                    taken |= row_lanes;
                }
                sum = _mm512_mask3_fmadd_ps(_mm512_set1_ps(c->value[e]), window, sum, taken);
            }
            _mm512_mask_storeu_ps(gw, tap_lanes, sum);
        }
    }
}
#else
static int plane_weight_vectorized(const plane_call *c) {
    (void)c;
    return 0;
}
#endif

/* Output channels [first, end) of grad_weight: their entries, in entry order. */
static int plane_weight_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    (void)worker;
    const plane_call *c = context;
    int64_t channels_out = c->shape[4], taps = c->shape[5] * c->shape[6];
    int64_t first = slice_start(channels_out, part, parts, 1);
    int64_t end = slice_start(channels_out, part + 1, parts, 1);
#if defined(__AVX512F__) && defined(__GNUC__)
    if (plane_weight_vectorized(c)) {
        plane_weight_vector(c, first, end);
        return 0;
    }
#endif
    memset(c->grad_weight + first * taps, 0, (size_t)((end - first) * taps) * sizeof(float));
    for (int64_t t = c->channel_start[first]; t < c->channel_start[end]; t++)
        plane_entry(c, c->by_channel[t], 1);
    return 0;
}

/* A 3 x 3 window that overlaps the padding: its taps inside the plane add δ · weight there, in
 * tap order, the taps in the padding into `sink` (never read): the same floats as plane_taps
 * without a test per tap, whose outcome changes from entry to entry (a mispredicted branch
 * each: 7 x 7 planes have half their windows on the border). `at`: (9,) tap_at of the window. */
static void border_taps(float *plane, const int64_t *at, const float *w, float v) {
    float sink[9];
    for (int64_t tap = 0; tap < 9; tap++) {
        float *target = at[tap] >= 0 ? plane + at[tap] : sink + tap;
        *target += v * w[tap];
    }
}

/* grad_input of sample s from its entries with each sample's columns ascending (`sorted`): a
 * run of one channel's entries at a time, its weights read once for the run, the plane found
 * once per run, not per entry (plane_entry's places are not needed). A 3 x 3 window inside the
 * input adds its nine products with their offsets held in registers. Every input sums the same
 * products in the same order as plane_entry does (entry order, one fused multiply-add each). */
static void plane_input_sample(const plane_call *c, int64_t s) {
    const int64_t *shape = c->shape, *column = c->column;
    int64_t channels_in = shape[1], in_h = shape[2], in_w = shape[3], kh = shape[5];
    int64_t kw = shape[6], positions = shape[7] * shape[8], per_group = shape[4] / shape[15];
    int64_t dilation_h = shape[13], dilation_w = shape[14], taps = kh * kw;
    int64_t plane_size = in_h * in_w, row = dilation_h * in_w;
    float *sample = c->grad_input + s * channels_in * plane_size;
    memset(sample, 0, (size_t)(channels_in * plane_size) * sizeof(float));
    int64_t e = c->row_start[s], last = c->row_start[s + 1];
    while (e < last) { /* a run of one channel's entries */
        int64_t ch = column[e] / positions, base = ch * positions, limit = base + positions;
        float *restrict plane = sample + ch / per_group * plane_size;
        const float *restrict w = c->weight + ch * taps;
        if (kh == 3 && kw == 3) {
            float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5];
            float w6 = w[6], w7 = w[7], w8 = w[8];
            int64_t d1 = dilation_w, d2 = 2 * dilation_w;
            for (; e < last && column[e] < limit; e++) {
                int64_t p = column[e] - base;
                if (!c->inside[p]) {
                    border_taps(plane, c->tap_at + p * 9, w, c->value[e]);
                    continue;
                }
                float v = c->value[e];
                float *restrict r0 = plane + c->top[p] * in_w + c->left[p];
                float *restrict r1 = r0 + row, *restrict r2 = r1 + row;
                r0[0] += v * w0, r0[d1] += v * w1, r0[d2] += v * w2;
                r1[0] += v * w3, r1[d1] += v * w4, r1[d2] += v * w5;
                r2[0] += v * w6, r2[d1] += v * w7, r2[d2] += v * w8;
            }
            continue;
        }
        for (; e < last && column[e] < limit; e++) {
            int64_t p = column[e] - base;
            plane_taps(c, plane, c->top[p], c->left[p], w, c->value[e]);
        }
    }
}

/* Samples [first, end) of grad_input: their entries of every channel, in entry order. */
static int plane_input_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    (void)worker;
    const plane_call *c = context;
    int64_t size = c->shape[1] * c->shape[2] * c->shape[3];
    int64_t first = slice_start(c->shape[0], part, parts, 1);
    int64_t end = slice_start(c->shape[0], part + 1, parts, 1);
    if (c->sorted) {
        for (int64_t s = first; s < end; s++) plane_input_sample(c, s);
    } else {
        memset(c->grad_input + first * size, 0, (size_t)((end - first) * size) * sizeof(float));
        for (int64_t e = c->row_start[first]; e < c->row_start[end]; e++) plane_entry(c, e, 0);
    }
    if (c->relu_mask)
        relu_mask_span(c->grad_input + first * size, c->x + first * size, (end - first) * size);
    return 0;
}

/* Backward of a convolution with one input channel per group (a depthwise convolution, or a
 * first layer on one channel) from the kept entries of δ (CSR by sample, column = c · P + p),
 * on the unpadded input as PyTorch holds it (channels first): no padded or channels-last copy.
 *   x (batch, C_in, in_h, in_w), weight (C_out, kh, kw), C_in = groups. Writes, when not NULL
 *   (both zeroed here first): grad_weight (C_out, kh, kw), grad_input (batch, C_in, in_h, in_w).
 * shape: {batch, C_in, in_h, in_w, C_out, kh, kw, out_h, out_w, stride_h, stride_w, pad_top,
 * pad_left, dilation_h, dilation_w, groups}. grad_weight is split by output channel, grad_input
 * by sample; every output sums its entries in entry order whatever the thread count. Returns
 * 0, -1 on an index out of range or offsets that decrease (checked before anything is
 * written), -3 when the (4 nnz + (3 + kh kw) P + kh kw + C_out + 1) integers of the entries'
 * places cannot be allocated. */
static int plane_conv_backward(const float *x, const float *weight, const int64_t *shape,
                               const int64_t *row_start, const int64_t *column,
                               const float *value, float *grad_weight, float *grad_input,
                               int64_t threads, int relu_mask) {
    int64_t batch = shape[0], channels_in = shape[1], channels_out = shape[4];
    int64_t out_w = shape[8], positions = shape[7] * out_w, plane = shape[2] * shape[3];
    int64_t per_group = channels_out / shape[15];
    if (!valid_offsets(row_start, batch)) return -1;
    int64_t nnz = row_start[batch];
    for (int64_t e = 0; e < nnz; e++)
        if (column[e] < 0 || column[e] >= channels_out * positions) return -1;
    int64_t kh = shape[5], kw = shape[6], taps = kh * kw;
    int64_t *places = malloc((size_t)(4 * nnz + (3 + taps) * positions + taps + channels_out + 1) *
                             8);
    if (places == NULL) return -3;
    int64_t *entry_plane = places, *entry_position = places + nnz;
    int64_t *entry_channel = places + 2 * nnz, *by_channel = places + 3 * nnz;
    int64_t *top = places + 4 * nnz, *left = top + positions;
    int64_t *inside = left + positions, *tap_offset = inside + positions;
    int64_t *channel_start = tap_offset + taps, *tap_at = channel_start + channels_out + 1;
    for (int64_t tap = 0; tap < taps; tap++)
        tap_offset[tap] = tap / kw * shape[13] * shape[3] + tap % kw * shape[14];
    for (int64_t p = 0; p < positions; p++) {
        top[p] = p / out_w * shape[9] - shape[11];
        left[p] = p % out_w * shape[10] - shape[12];
        inside[p] = top[p] >= 0 && top[p] + (kh - 1) * shape[13] < shape[2] && left[p] >= 0 &&
                    left[p] + (kw - 1) * shape[14] < shape[3];
        for (int64_t tap = 0; tap < taps; tap++) {
            int64_t row = top[p] + tap / kw * shape[13], col = left[p] + tap % kw * shape[14];
            int64_t in = row >= 0 && row < shape[2] && col >= 0 && col < shape[3];
            tap_at[p * taps + tap] = in ? row * shape[3] + col : -1;
        }
    }
    int sorted = 1;
    for (int64_t s = 0; s < batch; s++)
        for (int64_t e = row_start[s] + 1; e < row_start[s + 1]; e++)
            sorted &= column[e - 1] < column[e];
    plane_call call = {x, weight, shape, row_start, entry_plane, entry_position, entry_channel,
                       top, left, inside, tap_offset, channel_start, by_channel, tap_at, value,
                       grad_weight, grad_input, column, sorted, relu_mask};
    int by_entry = grad_weight && !plane_weight_vectorized(&call); /* plane_entry's weights */
    for (int64_t s = 0; s < batch && (by_entry || (grad_input && !sorted)); s++) {
        int64_t ch = 0, base = -1, at = 0; /* one division per channel of a sample, as a rule */
        for (int64_t e = row_start[s]; e < row_start[s + 1]; e++) {
            if (column[e] < base || column[e] >= base + positions || base < 0) {
                ch = column[e] / positions, base = ch * positions;
                at = (s * channels_in + ch / per_group) * plane;
            }
            entry_channel[e] = ch, entry_position[e] = column[e] - base, entry_plane[e] = at;
        }
    }
    if (by_entry) entries_by_channel(nnz, channels_out, entry_channel, channel_start, by_channel);
    if (grad_weight) run_parts(plane_weight_part, &call, parts_for(channels_out, threads), threads);
    if (grad_input) run_parts(plane_input_part, &call, parts_for(batch, threads), threads);
    free(places);
    return 0;
}

int tp_plane_conv_backward_f32(const float *x, const float *weight, const int64_t *shape,
                               const int64_t *row_start, const int64_t *column,
                               const float *value, float *grad_weight, float *grad_input,
                               int64_t threads) {
    return plane_conv_backward(x, weight, shape, row_start, column, value, grad_weight,
                               grad_input, threads, 0);
}

/* tp_plane_conv_backward_f32 for a convolution whose input x is the output of a ReLU: with
 * relu_mask, grad_input is the gradient at the ReLU's input instead (relu_mask_span, after
 * the part's samples): ReLU's backward pass fused. */
int tp_plane_conv_backward_relu_f32(const float *x, const float *weight, const int64_t *shape,
                                    const int64_t *row_start, const int64_t *column,
                                    const float *value, float *grad_weight, float *grad_input,
                                    int64_t threads, int64_t relu_mask) {
    return plane_conv_backward(x, weight, shape, row_start, column, value, grad_weight,
                               grad_input, threads, relu_mask != 0);
}

typedef struct {
    const float *in;
    float *out;
    const int64_t *shape; /* {batch, channels, height, width, top, bottom, left, right} */
} layout_call;

/* Samples [first, end) of x (channels first) into the zero-padded channels-last copy. */
static int channels_last_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    (void)worker;
    const layout_call *c = context;
    const int64_t *shape = c->shape;
    int64_t channels = shape[1], height = shape[2], width = shape[3];
    int64_t padded_h = height + shape[4] + shape[5], padded_w = width + shape[6] + shape[7];
    int64_t first = slice_start(shape[0], part, parts, 1);
    int64_t end = slice_start(shape[0], part + 1, parts, 1);
    for (int64_t s = first; s < end; s++) {
        float *out = c->out + s * padded_h * padded_w * channels;
        int64_t row_size = padded_w * channels, top = shape[4], bottom = top + height;
        memset(out, 0, (size_t)(top * row_size) * sizeof(float)); /* the padding only */
        memset(out + bottom * row_size, 0, (size_t)(shape[5] * row_size) * sizeof(float));
        for (int64_t row = top; row < bottom; row++) {
            memset(out + row * row_size, 0, (size_t)(shape[6] * channels) * sizeof(float));
            memset(out + (row + 1) * row_size - shape[7] * channels, 0,
                   (size_t)(shape[7] * channels) * sizeof(float));
        }
        copy_sample((float *)(uintptr_t)(c->in + s * channels * height * width), out, channels,
                    height, width, padded_w, shape[4], shape[6], 1); /* reads the planes only */
    }
    return 0;
}

/* Samples [first, end) of the padded channels-last gradient, cropped, into channels first. */
static int channels_first_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    (void)worker;
    const layout_call *c = context;
    const int64_t *shape = c->shape;
    int64_t channels = shape[1], height = shape[2], width = shape[3];
    int64_t padded_h = height + shape[4] + shape[5], padded_w = width + shape[6] + shape[7];
    int64_t first = slice_start(shape[0], part, parts, 1);
    int64_t end = slice_start(shape[0], part + 1, parts, 1);
    for (int64_t s = first; s < end; s++) {
        copy_sample(c->out + s * channels * height * width,
                    (float *)(uintptr_t)(c->in + s * padded_h * padded_w * channels), channels,
                    height, width, padded_w, shape[4], shape[6], 0); /* reads the copy only */
    }
    return 0;
}

/* x (batch, channels, height, width) -> out (batch, top + height + bottom, left + width +
 * right, channels), zeros in the padding: the channels-last input of tp_conv_backward_f32. */
void tp_channels_last_f32(const float *x, const int64_t *shape, float *out, int64_t threads) {
    layout_call call = {x, out, shape};
    run_parts(channels_last_part, &call, parts_for(shape[0], threads), threads);
}

/* The reverse, without the padding: grad (batch, padded h, padded w, channels) -> out (batch,
 * channels, height, width). */
void tp_channels_first_f32(const float *grad, const int64_t *shape, float *out, int64_t threads) {
    layout_call call = {grad, out, shape};
    run_parts(channels_first_part, &call, parts_for(shape[0], threads), threads);
}

/* --- max pooling with non-overlapping windows (tinyprop/pool_fusion.py's forward) ---------- */

typedef struct {
    const float *in;
    float *out;
    int64_t *indices;
    int64_t planes, height, width, kernel_h, kernel_w;
} pool_call;

#if defined(__AVX512F__) && defined(__GNUC__)
/* One more entry v of 16 windows, at offset `at` from each window's first entry, taken where
 * it is greater than the maximum m so far or NaN (PyTorch's rule); offset: each window's. */
static inline void pool_take(__m512 *m, __m512i *offset, __m512 v, __m512i at) {
    __mmask16 take = _mm512_cmp_ps_mask(v, *m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    *m = _mm512_mask_mov_ps(*m, take, v);
    *offset = _mm512_mask_mov_epi32(*offset, take, at);
}

/* pool_part's windows of 2x2, 16 at a time across an output row (its rows are short: 14 or 7
 * entries in a small CNN, too few for the compiler's vectors): the first entry a of each
 * window taken as it is (the rule takes it whatever it is, or keeps -inf at its index: the
 * same), then b, c, d each where it is greater than the maximum so far or NaN. */
static void pool_2x2(const pool_call *c, int64_t first, int64_t end) {
    int64_t width = c->width, out_h = c->height / 2, out_w = width / 2;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i lane = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14); /* 2 j of lane j */
    const __m512i one = _mm512_set1_epi32(1), below = _mm512_set1_epi32((int)width);
    const __m512i below_next = _mm512_set1_epi32((int)width + 1);
    for (int64_t p = first; p < end; p++) {
        const float *plane = c->in + p * c->height * width;
        for (int64_t i = 0; i < out_h; i++) {
            float *out = c->out + (p * out_h + i) * out_w;
            int64_t *index = c->indices + (p * out_h + i) * out_w;
            const float *top = plane + 2 * i * width, *bottom = top + width;
            for (int64_t j = 0; j < out_w; j += 16) {
                int64_t n = out_w - j < 16 ? out_w - j : 16; /* windows in this block */
                __mmask16 low = (__mmask16)(2 * n >= 16 ? 0xFFFF : (1u << (2 * n)) - 1);
                __mmask16 high = (__mmask16)(2 * n <= 16 ? 0 : (1u << (2 * n - 16)) - 1);
                __mmask16 outs = (__mmask16)(n == 16 ? 0xFFFF : (1u << n) - 1);
                __m512 t0 = _mm512_maskz_loadu_ps(low, top + 2 * j);
                __m512 t1 = _mm512_maskz_loadu_ps(high, top + 2 * j + 16);
                __m512 b0 = _mm512_maskz_loadu_ps(low, bottom + 2 * j);
                __m512 b1 = _mm512_maskz_loadu_ps(high, bottom + 2 * j + 16);
                __m512 m = _mm512_permutex2var_ps(t0, even, t1); /* a */
                __m512i offset = _mm512_setzero_si512();
                pool_take(&m, &offset, _mm512_permutex2var_ps(t0, odd, t1), one);         /* b */
                pool_take(&m, &offset, _mm512_permutex2var_ps(b0, even, b1), below);      /* c */
                pool_take(&m, &offset, _mm512_permutex2var_ps(b0, odd, b1), below_next);  /* d */
                _mm512_mask_storeu_ps(out + j, outs, m);
                __m512i at = _mm512_add_epi64(_mm512_set1_epi64(2 * i * width + 2 * j), lane);
                __m512i first8 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(offset));
                __m512i last8 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(offset, 1));
                _mm512_mask_storeu_epi64(index + j, (__mmask8)outs, _mm512_add_epi64(at, first8));
                __m512i at8 = _mm512_add_epi64(at, _mm512_set1_epi64(16));
                _mm512_mask_storeu_epi64(index + j + 8, (__mmask8)(outs >> 8),
                                         _mm512_add_epi64(at8, last8));
            }
        }
    }
}
#define POOL_2X2 1
#else
#define POOL_2X2 0
#endif

/* Planes [first, end) of in (planes, height, width) pooled into out and indices (planes,
 * height / kernel_h, width / kernel_w): each window's maximum and its index into the plane,
 * by PyTorch's rule (max_pool2d_with_indices on the CPU): the window's entries in row-major
 * order, each taken when it is greater than the maximum so far (-inf at first, the index of
 * the window's first entry) or NaN. So the first of equal maxima, the last NaN. A window row
 * at a time across the output row, so that the compiler vectorizes it. */
static int pool_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    (void)worker;
    const pool_call *c = context;
    int64_t kh = c->kernel_h, kw = c->kernel_w, width = c->width;
    int64_t out_h = c->height / kh, out_w = width / kw;
    int64_t first = slice_start(c->planes, part, parts, 1);
    int64_t end = slice_start(c->planes, part + 1, parts, 1);
#if POOL_2X2
    if (kh == 2 && kw == 2 && width <= INT32_MAX - 1) {
        pool_2x2(c, first, end);
        return 0;
    }
#endif
    for (int64_t p = first; p < end; p++) {
        const float *plane = c->in + p * c->height * width;
        for (int64_t i = 0; i < out_h; i++) {
            float *restrict out = c->out + (p * out_h + i) * out_w;
            int64_t *restrict index = c->indices + (p * out_h + i) * out_w;
            int64_t top = i * kh * width;
            for (int64_t j = 0; j < out_w; j++) out[j] = -INFINITY, index[j] = top + j * kw;
            for (int64_t a = 0; a < kh; a++)
                for (int64_t b = 0; b < kw; b++) {
                    int64_t place = top + a * width + b;
                    const float *restrict row = plane + place;
                    for (int64_t j = 0; j < out_w; j++) {
                        float v = row[j * kw];
                        int take = (v > out[j]) | (v != v);
                        out[j] = take ? v : out[j];
                        index[j] = take ? place + j * kw : index[j];
                    }
                }
        }
    }
    return 0;
}

/* 1 when tp_max_pool_f32 runs 2x2 windows vectorized (an AVX-512 build), else 0. */
int tp_max_pool_2x2_vectorized(void) { return POOL_2X2; }

/* in (planes, height, width) -> out, indices (planes, height / kernel_h, width / kernel_w):
 * max pooling with stride = kernel size, no padding, floor mode (see pool_part), the same
 * maxima and indices as PyTorch's max_pool2d_with_indices, at every thread count. */
void tp_max_pool_f32(const float *in, int64_t planes, int64_t height, int64_t width,
                     int64_t kernel_h, int64_t kernel_w, float *out, int64_t *indices,
                     int64_t threads) {
    pool_call call = {in, out, indices, planes, height, width, kernel_h, kernel_w};
    run_parts(pool_part, &call, parts_for(planes, threads), threads);
}

/* --- δ of a convolution's output behind ReLU and max pooling (tinyprop/pool_fusion.py) ------ */

typedef struct {
    const float *grad, *pooled;
    const int64_t *indices;
    int64_t planes, pooled_size, plane_size;
    float *delta;
    double *plane_abs, *plane_sum; /* (planes,) each, or NULL: no sums */
} unpool_call;

/* Pooled entries per block of unpool_plane: their values are computed into a buffer on the
 * stack first (a multiple of 8, so that an entry's lane in the sums is q mod 8). */
enum { UNPOOL_BLOCK = 256 };

/* Plane p into `plane` (plane_size,): zeros, then 0 + g[q] at the window maximum indices[q] of
 * every pooled entry q whose value is not <= 0 (what max pooling's backward and then ReLU's
 * write). With plane_abs, also the plane's Σ |δ| and Σ δ in float64, over its pooled entries in
 * order in eight lanes (q mod 8) added up lane by lane. Returns 0, -1 on an index outside the
 * plane (nothing written then). The values of a block are computed first, with a select the
 * compiler vectorizes (written as one loop with the stores, it became a branch on the sign of
 * z, mispredicted on about every other entry), then stored at their places. With `compact`
 * (pooled_size,) instead, the values go there in pooled order and `plane` is not written. */
static int unpool_plane(const unpool_call *c, int64_t p, float *plane, float *compact) {
    int64_t size = c->pooled_size;
    const float *grad = c->grad + p * size, *pooled = c->pooled + p * size;
    const int64_t *index = c->indices + p * size;
    uint64_t outside = 0;
    for (int64_t q = 0; q < size; q++) outside |= (uint64_t)index[q] >= (uint64_t)c->plane_size;
    if (outside) return -1;
    if (compact == NULL) memset(plane, 0, (size_t)c->plane_size * sizeof(float));
    double absolute[8] = {0}, total[8] = {0};
#if defined(__AVX512F__) && defined(__GNUC__)
    __m512d lanes_abs = _mm512_setzero_pd(), lanes_sum = _mm512_setzero_pd();
#endif
    for (int64_t block = 0; block < size; block += UNPOOL_BLOCK) {
        int64_t count = size - block < UNPOOL_BLOCK ? size - block : UNPOOL_BLOCK;
        float stack[UNPOOL_BLOCK], *value = compact ? compact + block : stack;
        for (int64_t i = 0; i < count; i++) {
            float kept = 0.0f + grad[block + i];
            value[i] = pooled[block + i] <= 0.0f ? 0.0f : kept;
        }
        if (compact == NULL)
            for (int64_t i = 0; i < count; i++) plane[index[block + i]] = value[i];
        if (c->plane_abs == NULL) continue;
#if defined(__AVX512F__) && defined(__GNUC__)
        /* eight at a time; the lanes past the end add +0.0, which changes no sum (no lane is
         * ever -0.0: every value is 0 + g or +0.0) */
        for (int64_t i = 0; i < count; i += 8) {
            __mmask8 lanes = (__mmask8)(count - i >= 8 ? 0xFF : (1u << (count - i)) - 1);
            __m512d wide = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(lanes, value + i));
            lanes_abs = _mm512_add_pd(lanes_abs, _mm512_abs_pd(wide));
            lanes_sum = _mm512_add_pd(lanes_sum, wide);
        }
#else
        for (int64_t i = 0; i < count; i++)
            absolute[i % 8] += fabsf(value[i]), total[i % 8] += value[i];
#endif
    }
    if (c->plane_abs == NULL) return 0;
#if defined(__AVX512F__) && defined(__GNUC__)
    _mm512_storeu_pd(absolute, lanes_abs), _mm512_storeu_pd(total, lanes_sum);
#endif
    double plane_abs = 0, plane_sum = 0;
    for (int lane = 0; lane < 8; lane++) plane_abs += absolute[lane], plane_sum += total[lane];
    c->plane_abs[p] = plane_abs, c->plane_sum[p] = plane_sum;
    return 0;
}

/* Planes [first, end) of delta. */
static int unpool_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    (void)worker;
    const unpool_call *c = context;
    int64_t first = slice_start(c->planes, part, parts, 1);
    int64_t end = slice_start(c->planes, part + 1, parts, 1);
    for (int64_t p = first; p < end; p++)
        if (unpool_plane(c, p, c->delta + p * c->plane_size, NULL)) return -1;
    return 0;
}

/* delta (planes, plane_size) from grad, pooled, indices (planes, pooled_size): the gradient of
 * MaxPool2d(ReLU(y)) with non-overlapping windows at y, the windows' maxima `indices` (into a
 * plane, as max_pool2d_with_indices gives them). Returns 0; -1 on an index outside the plane
 * (the planes from that part on are unspecified). */
int tp_relu_unpool_f32(const float *grad, const float *pooled, const int64_t *indices,
                       int64_t planes, int64_t pooled_size, int64_t plane_size, float *delta,
                       int64_t threads) {
    unpool_call call = {grad, pooled, indices, planes, pooled_size, plane_size, delta, NULL, NULL};
    return run_parts(unpool_part, &call, parts_for(planes, threads), threads);
}

/* v rounded to float32, ±Inf beyond its range (a conversion out of range is undefined in C). */
static float to_float(double v) {
    if (isnan(v) || fabs(v) <= FLT_MAX) return (float)v;
    return v > 0 ? INFINITY : -INFINITY;
}

/* row_abs (batch,) each sample's Σ |δ| and channel_sum (channels,) each channel's Σ δ from the
 * planes' float64 sums plane_sums (2, batch, channels), the planes in order (a sample's over
 * its channels, a channel's over the samples), rounded to float32 once. */
static void add_plane_sums(const double *plane_sums, int64_t batch, int64_t channels,
                           float *row_abs, float *channel_sum) {
    int64_t planes = batch * channels;
    for (int64_t s = 0; s < batch; s++) {
        double sum = 0;
        for (int64_t ch = 0; ch < channels; ch++) sum += plane_sums[s * channels + ch];
        row_abs[s] = to_float(sum);
    }
    for (int64_t ch = 0; ch < channels; ch++) {
        double sum = 0;
        for (int64_t s = 0; s < batch; s++) sum += plane_sums[planes + s * channels + ch];
        channel_sum[ch] = to_float(sum);
    }
}

/* tp_relu_unpool_f32 on (batch, channels) planes, and the sums of δ the sparse backward needs
 * besides (add_plane_sums): row_abs (batch,) each sample's Σ |δ| (its local error before the
 * loss unit) and channel_sum (channels,) Σ δ over the batch (the bias gradient), the same at
 * every thread count. plane_sums (2 · batch · channels,) is scratch. Returns as
 * tp_relu_unpool_f32 (sums unspecified on -1). */
int tp_relu_unpool_sums_f32(const float *grad, const float *pooled, const int64_t *indices,
                            int64_t batch, int64_t channels, int64_t pooled_size,
                            int64_t plane_size, float *delta, double *plane_sums,
                            float *row_abs, float *channel_sum, int64_t threads) {
    int64_t planes = batch * channels;
    unpool_call call = {grad,  pooled,     indices,   planes, pooled_size, plane_size,
                        delta, plane_sums, plane_sums + planes};
    int status = run_parts(unpool_part, &call, parts_for(planes, threads), threads);
    if (status == 0) add_plane_sums(plane_sums, batch, channels, row_abs, channel_sum);
    return status;
}

typedef struct {
    unpool_call unpool; /* the batch's planes, with their sums; delta unused */
    int64_t batch, channels, keep;
    int64_t *columns;
    float *values, *scratch;     /* scratch (threads, 3 n): a row of δ, then top-k's 2 n */
    int64_t *index_scratch;      /* (threads, n) */
    const int64_t *sampled;      /* top-k's sample places in a row of δ (n) */
    const int64_t *pooled_sampled; /* and in a row of the pooled entries (channels · pooled) */
    int by_pooled;               /* whether pooled_row_topk may run (see there) */
} pooled_topk_call;

/* Sample s's row of δ built in `row` (n,) from its planes, and its keep entries of largest |δ|
 * chosen there by topk_row_f32 (scratch: row + n, 2 n floats; index (n,)). */
static int built_row_topk(const pooled_topk_call *c, int64_t s, float *row, int64_t *index) {
    int64_t plane_size = c->unpool.plane_size, n = c->channels * plane_size;
    for (int64_t ch = 0; ch < c->channels; ch++)
        if (unpool_plane(&c->unpool, s * c->channels + ch, row + ch * plane_size, NULL)) return -1;
    return topk_row_f32(row, n, c->keep, c->columns + s * c->keep, c->values + s * c->keep, NULL,
                        row + n, index, c->sampled);
}

/* marks[place[q]] = q for q in [0, size) in order (the last one wins), one store at a time:
 * vectorized, it became an AVX-512 scatter, microcoded and several times slower on AMD's
 * cores. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
static void mark_places(int32_t *marks, const int64_t *place, int64_t size) {
#if defined(__clang__)
#pragma clang loop vectorize(disable)
#endif
    for (int64_t q = 0; q < size; q++) marks[place[q]] = (int32_t)q;
}

/* Sample s's keep entries of largest |δ| chosen among its pooled entries, without building its
 * row of δ (n = channels · plane_size entries, of which only the m = channels · pooled_size
 * pooled ones can be non-zero): the values of the pooled entries in pooled order (with the
 * planes' sums, as unpool_plane computes them) into `compact` (m,), topk_row_f32 on those, then
 * each kept entry's place in the row, c · plane_size + indices[q], the places of a channel put
 * in ascending order (the pooled order differs from the row's only within a channel: a window
 * row spans several image rows). The same entries as in the built row whenever its k-th largest
 * |δ| t is not 0 (every entry of the row that is not a pooled entry is 0) and every entry at t
 * is kept (the row's rule, ties to the lower place, then has nothing to choose). Returns 0, -1
 * on an index outside the plane, -2 on a broken invariant, or 2 when the row must be built
 * after all: t = 0, ties cut at t, a NaN or ±Inf (the built row tells whether it is in the
 * row), or a kept entry whose place a later pooled entry of its plane also names (in the built
 * row the later one's value is there: never so for max pooling's windows, which do not
 * overlap). `marks` (plane_size,) int32 scratch. */
static int pooled_row_topk(const pooled_topk_call *c, int64_t s, float *compact, int64_t *index,
                           int32_t *marks) {
    int64_t size = c->unpool.pooled_size, plane_size = c->unpool.plane_size, k = c->keep;
    int64_t channels = c->channels, m = channels * size;
    for (int64_t ch = 0; ch < channels; ch++)
        if (unpool_plane(&c->unpool, s * channels + ch, NULL, compact + ch * size)) return -1;
    if (m < k) return 2; /* fewer pooled entries than k: zeros of the row are kept */
    int64_t *columns = c->columns + s * k;
    float *values = c->values + s * k;
    int status = topk_row_f32(compact, m, k, columns, values, NULL, compact + m, index,
                              c->pooled_sampled);
    if (status) return status == 1 ? 2 : status; /* a NaN or ±Inf: the built row reports it */
    float threshold = fabsf(values[0]); /* the k-th largest |δ|: the least kept one */
    for (int64_t w = 1; w < k; w++) threshold = fabsf(values[w]) < threshold ? fabsf(values[w])
                                                                             : threshold;
    if (threshold == 0) return 2; /* fewer than k non-zero entries */
    int64_t ties = 0, kept_ties = 0;
    for (int64_t i = 0; i < m; i++) ties += fabsf(compact[i]) == threshold;
    for (int64_t w = 0; w < k; w++) kept_ties += fabsf(values[w]) == threshold;
    if (ties != kept_ties) return 2; /* the row's tie rule would choose among them */
    for (int64_t w = 0; w < k;) { /* a channel's kept entries: columns[w, end) */
        int64_t ch = columns[w] / size, end = w;
        const int64_t *place = c->unpool.indices + (s * channels + ch) * size;
        mark_places(marks, place, size);
        for (; end < k && columns[end] < (ch + 1) * size; end++) {
            int64_t q = columns[end] - ch * size, column = ch * plane_size + place[q];
            if (marks[place[q]] != q) return 2; /* a later entry at the same place */
            float value = values[end];
            int64_t at = end; /* insertion: the pooled order is nearly the row's */
            for (; at > w && columns[at - 1] > column; at--)
                columns[at] = columns[at - 1], values[at] = values[at - 1];
            columns[at] = column, values[at] = value;
        }
        w = end;
    }
    return 0;
}

/* Samples [first, end): each sample's keep entries of largest |δ|, into columns and values at
 * keep · s, by pooled_row_topk where it may run, else (or where it says so) from the sample's
 * row of δ written into the worker's scratch, where it stays in the cache. */
static int pooled_topk_part(const void *context, int64_t part, int64_t parts, int64_t worker) {
    const pooled_topk_call *c = context;
    int64_t n = c->channels * c->unpool.plane_size, m = c->channels * c->unpool.pooled_size;
    int64_t first = slice_start(c->batch, part, parts, 1);
    int64_t end = slice_start(c->batch, part + 1, parts, 1);
    float *row = c->scratch + worker * 3 * n;
    int64_t *index = c->index_scratch + worker * n;
    for (int64_t s = first; s < end; s++) {
        int status = 2;
        if (c->by_pooled) /* marks after the m candidates top-k may collect: see by_pooled */
            status = pooled_row_topk(c, s, row, index, (int32_t *)(void *)(index + m));
        if (status == 2) status = built_row_topk(c, s, row, index);
        if (status == 1) return s < INT_MAX - 1 ? (int)s + 1 : INT_MAX;
        if (status) return status;
    }
    return 0;
}

/* tp_relu_unpool_sums_f32's sums and tp_topk_f32's selection of δ with the same keep for every
 * row (batch rows of n = channels · plane_size), without writing δ: each sample's entries are
 * chosen among its pooled entries (pooled_row_topk), or where that cannot tell, its row is
 * built in the worker's scratch (threads, 3 n) from the pooled entries, as tp_relu_unpool_f32
 * writes it, and top-k runs on it there; index_scratch (threads, n). Writes columns and values
 * (batch · keep,), row by row, every row's keep entries (a row whose δ is all zero keeps its
 * first zeros, as tp_topk_f32 would), row_abs (batch,), channel_sum (channels,); plane_sums
 * (2 · batch · channels,) is scratch. Returns 0; -1 on an index outside the plane; -4 when
 * keep is outside [1, n] (nothing written); 1 + s when row s of δ holds a NaN or ±Inf; -2 on
 * a broken invariant (never expected). The outputs are unspecified unless it returns 0. */
int tp_pooled_topk_f32(const float *grad, const float *pooled, const int64_t *indices,
                       int64_t batch, int64_t channels, int64_t pooled_size, int64_t plane_size,
                       int64_t keep, int64_t *columns, float *values, double *plane_sums,
                       float *row_abs, float *channel_sum, float *scratch,
                       int64_t *index_scratch, int64_t threads) {
    int64_t planes = batch * channels, n = channels * plane_size;
    if (keep < 1 || keep > n) return -4;
    int64_t sampled[4 * SAMPLE], pooled_sampled[4 * SAMPLE];
    sample_places(n, sampled);
    sample_places(channels * pooled_size, pooled_sampled);
    /* windows of two entries or more: the pooled entries' m = n / 2 or fewer candidates leave
     * room in a worker's index scratch (n int64) for a plane's marks (plane_size int32) */
    int by_pooled = 2 * pooled_size <= plane_size && plane_size <= INT32_MAX;
    pooled_topk_call call = {
        {grad, pooled, indices, planes, pooled_size, plane_size, NULL, plane_sums,
         plane_sums + planes},
        batch, channels, keep, columns, values, scratch, index_scratch, sampled,
        pooled_sampled, by_pooled};
    int status = run_parts(pooled_topk_part, &call, parts_for(batch, threads), threads);
    if (status == 0) add_plane_sums(plane_sums, batch, channels, row_abs, channel_sum);
    return status;
}
