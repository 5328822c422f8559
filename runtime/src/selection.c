/* selection.c: local error, backprop ratio, top-k by partial selection, skip decision. */
#include <math.h>

#include "tp_internal.h"

/* Y = sum_i |delta_i| (the layer's local error, TinyProp eq. 1), in float32 with a running
 * compensation (Neumaier) so that it is as close to the exact sum as PyTorch's cascade sum.
 * Zeros change neither the sum nor the compensation (both stay as they are, bit for bit), so
 * tp_gather_nonzero_sum, which adds the non-zero magnitudes only, gets the same float. */
/* One step of that sum: sum += value, with the rounding error kept in compensation. */
#define TP_NEUMAIER_ADD(sum, compensation, value)                                           \
    do {                                                                                    \
        const float next = (sum) + (value);                                                 \
        if ((sum) >= (value))                                                               \
            (compensation) += ((sum) - next) + (value);                                     \
        else                                                                                \
            (compensation) += ((value) - next) + (sum);                                     \
        (sum) = next;                                                                       \
    } while (0)
#define TP_NEUMAIER_SUM(magnitude)                                                          \
    do {                                                                                    \
        float sum = 0.0f, compensation = 0.0f;                                              \
        int32_t i;                                                                          \
        for (i = 0; i < n; i++) {                                                           \
            const float value = magnitude;                                                  \
            TP_NEUMAIER_ADD(sum, compensation, value);                                      \
        }                                                                                   \
        return sum + compensation;                                                          \
    } while (0)

float tp_local_error(const float *delta, int32_t n) { TP_NEUMAIER_SUM(fabsf(delta[i])); }

#undef TP_NEUMAIER_SUM

/* k = clamp(floor(bpr * N + 0.5), 1, N) with bpr = (s_min + Y/Ymax (s_max - s_min)) zeta^d for
 * TinyProp, bpr = ratio for top-k, and k = N for full training. Ymax already includes Y, and
 * k = 1 while Ymax is 0. In double precision, as the Python library computes it. */
int32_t tp_keep_count(const tp_policy_config *policy, float local_error, float running_max,
                      double depth_scale, int32_t n) {
    double backprop_ratio, k;
    if (policy->policy == TP_POLICY_FULL) return n;
    if (policy->policy == TP_POLICY_TOPK) {
        backprop_ratio = policy->ratio;
    } else {
        if (!(running_max > 0.0f)) return 1;
        backprop_ratio = (policy->s_min + ((double)local_error / (double)running_max) *
                                              (policy->s_max - policy->s_min)) * depth_scale;
    }
    k = floor(backprop_ratio * (double)n + 0.5);
    if (!(k >= 1.0)) return 1; /* also NaN */
    if (k >= (double)n) return n;
    return (int32_t)k;
}

/* The k-th largest value (1-based) of a[0..n), reordering a; O(n) expected: Hoare's
 * partition around the median of three (Wirth's loop: the pivot's own value stops both
 * scans, so no bounds checks; NaN compares false and stops them too). Zeros are not among the
 * values (tp_select_topk leaves them out), so long runs of equal values are rare. */
static float kth_largest(float *a, int32_t n, int32_t k) {
    int32_t low = 0, high = n - 1;
    const int32_t target = k - 1;
    while (low < high) {
        const float first = a[low], middle = a[low + (high - low) / 2], last = a[high];
        float pivot;
        int32_t i = low, j = high;
        if ((first >= middle) == (middle >= last))
            pivot = middle;
        else if ((middle >= first) == (first >= last))
            pivot = first;
        else
            pivot = last;
        do { /* descending: [low, i) >= pivot, (j, high] <= pivot */
            while (a[i] > pivot) i++;
            while (pivot > a[j]) j--;
            if (i <= j) {
                const float t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        } while (i <= j);
        if (j < target) low = i;
        if (target < i) high = j;
    }
    return a[target];
}

/* Only the non-zero magnitudes compete in top-k (behind a ReLU or a max pool most are zero):
 * gather them and their indices (ascending, into kept, which tp_select_topk_gathered's filter
 * overwrites in place: it never writes ahead of what it reads). Returns their count. A zero
 * entry costs a load, a test and a branch; only the non-zero ones are stored. With `sum`, also
 * Y of the same entries (TP_NEUMAIER_SUM's step, TP_NEUMAIER_ADD, in the same order, zeros left
 * out, which add nothing to it), so that TinyProp takes Y and the selection's input from one
 * pass. */
#define TP_GATHER_NONZERO(index, with_sum)                                                  \
    do {                                                                                    \
        union {                                                                             \
            float value;                                                                    \
            uint32_t bits;                                                                  \
        } magnitude;                                                                        \
        magnitude.value = delta[index];                                                     \
        magnitude.bits &= 0x7fffffffu; /* |delta|; a NaN stays non-zero */                  \
        if (magnitude.bits != 0u) {                                                         \
            const float value = magnitude.value;                                            \
            scratch[nonzero] = value;                                                       \
            kept[nonzero] = (int32_t)(index);                                               \
            nonzero++;                                                                      \
            if (with_bias) bias_sum += delta[index];                                        \
            if (with_sum) TP_NEUMAIER_ADD(sum, compensation, value);                        \
        }                                                                                   \
    } while (0)
/* over [from, to) */
#define TP_GATHER_LOOP(from, to, with_sum)                                                  \
    do {                                                                                    \
        for (i = (from); i + 4 <= (to); i += 4) { /* unrolled: loop control is most of it */ \
            TP_GATHER_NONZERO(i, with_sum);                                                 \
            TP_GATHER_NONZERO(i + 1, with_sum);                                             \
            TP_GATHER_NONZERO(i + 2, with_sum);                                             \
            TP_GATHER_NONZERO(i + 3, with_sum);                                             \
        }                                                                                   \
        for (; i < (to); i++) TP_GATHER_NONZERO(i, with_sum);                               \
    } while (0)
/* grad_bias != NULL: delta is `channels` rows of `plane` entries, and each row's sum (in
 * order, zeros left out: they add nothing to it) is added to grad_bias[row], the floats of
 * the bias gradient loop that the backward then leaves out */
#define TP_GATHER_BODY(with_sum)                                                            \
    do {                                                                                    \
        if (grad_bias == NULL) {                                                            \
            const int with_bias = 0;                                                        \
            float bias_sum = 0.0f;                                                          \
            TP_GATHER_LOOP(0, n, with_sum);                                                 \
            (void)bias_sum;                                                                 \
        } else {                                                                            \
            const int with_bias = 1;                                                        \
            int32_t row;                                                                    \
            for (row = 0; row * plane < n; row++) {                                         \
                float bias_sum = 0.0f;                                                      \
                TP_GATHER_LOOP(row * plane, (row + 1) * plane, with_sum);                   \
                grad_bias[row] += bias_sum;                                                 \
            }                                                                               \
        }                                                                                   \
    } while (0)

int32_t tp_gather_nonzero_bias(const float *delta, int32_t n, float *scratch, int32_t *kept,
                               int32_t plane, float *grad_bias) {
    int32_t i, nonzero = 0;
    float sum = 0.0f, compensation = 0.0f;
    TP_GATHER_BODY(0);
    (void)sum;
    (void)compensation;
    return nonzero;
}

int32_t tp_gather_nonzero(const float *delta, int32_t n, float *scratch, int32_t *kept) {
    return tp_gather_nonzero_bias(delta, n, scratch, kept, n, NULL);
}

int32_t tp_gather_nonzero_sum(const float *delta, int32_t n, float *scratch, int32_t *kept,
                              float *local_error, int32_t plane, float *grad_bias) {
    int32_t i, nonzero = 0;
    float sum = 0.0f, compensation = 0.0f;
    TP_GATHER_BODY(1);
    *local_error = sum + compensation;
    return nonzero;
}
#undef TP_GATHER_BODY
#undef TP_GATHER_LOOP
#undef TP_GATHER_NONZERO

/* |delta|'s bits: non-negative floats order as their bit patterns (a NaN above infinity) */
static uint32_t magnitude_bits(float value) {
    union {
        float value;
        uint32_t bits;
    } magnitude;
    magnitude.value = value;
    return magnitude.bits & 0x7fffffffu;
}

/* The same floats as the gather's pass (rows of `plane` entries, zeros left out of the bias
 * sums and of Y, Y's compensated steps in index order), without storing the entries. */
int32_t tp_error_sums(const float *delta, int32_t n, float *local_error, int32_t plane,
                      float *grad_bias) {
    int32_t row, i, nonzero = 0;
    float sum = 0.0f, compensation = 0.0f;
    if (plane < 1) plane = n;
    for (row = 0; row * plane < n; row++) {
        const int32_t end = (row + 1) * plane < n ? (row + 1) * plane : n;
        float bias_sum = 0.0f;
        for (i = row * plane; i < end; i++) {
            if (magnitude_bits(delta[i]) != 0u) {
                const float value = fabsf(delta[i]);
                nonzero++;
                bias_sum += delta[i];
                if (local_error != NULL) TP_NEUMAIER_ADD(sum, compensation, value);
            }
        }
        if (grad_bias != NULL) grad_bias[row] += bias_sum;
    }
    if (local_error != NULL) *local_error = sum + compensation;
    return nonzero;
}

/* Radix select, most significant byte first: the bits t of the k-th largest magnitude, and
 * how many of the kept entries equal it (k minus those above t). Four passes over delta, one
 * table of 256 counts. Then one pass zeroes every entry below t and the entries equal to t
 * past the first `equal` of them (ties go to the lower index, as tp_select_topk_gathered). */
void tp_keep_topk_in_place(float *delta, int32_t n, int32_t k, int32_t nonzero,
                           uint32_t *counts) {
    uint32_t prefix = 0u, mask = 0u;
    int32_t shift, i, left = k, equal;
    if (k >= nonzero) return; /* every non-zero entry is kept; the zeros stay zero */
    for (shift = 24; shift >= 0; shift -= 8) {
        int32_t digit;
        for (i = 0; i < TP_RADIX_COUNTS; i++) counts[i] = 0u;
        for (i = 0; i < n; i++) {
            const uint32_t bits = magnitude_bits(delta[i]);
            if ((bits & mask) == prefix) counts[(bits >> shift) & 0xffu]++;
        }
        for (digit = TP_RADIX_COUNTS - 1; digit > 0 && (uint32_t)left > counts[digit]; digit--)
            left -= (int32_t)counts[digit];
        prefix |= (uint32_t)digit << shift;
        mask |= 0xffu << shift;
    }
    equal = left; /* the k-th largest is the `left`-th entry equal to prefix */
    for (i = 0; i < n; i++) {
        const uint32_t bits = magnitude_bits(delta[i]);
        if (bits > prefix) continue;
        if (bits == prefix && equal > 0) {
            equal--;
            continue;
        }
        delta[i] = 0.0f;
    }
}

/* The k-th largest (1-based) of the n gathered magnitudes a[] (reordering a), and how many
 * of them are greater than it (*greater) and at least as large (*at_least).
 *
 * Large n: two pivots taken from a sample of SAMPLE values bracket the k-th largest (Floyd
 * and Rivest's idea); one pass counts the values above the upper pivot and moves those between
 * the pivots to the front of a, and the quickselect runs on those few only. If the sample was
 * unlucky (the k-th largest is not between the pivots) or a NaN upset the counts, the values
 * are gathered again from delta (through kept) and the quickselect runs on all of them.
 * Without NaNs the threshold is the k-th largest value whichever way it was found, so the
 * selection is the same. */
#define SAMPLE 48
#define SAMPLE_GAP 4 /* ranks of the sample on each side of the k-th one's expected rank */
static float select_threshold(float *a, int32_t n, int32_t k, const float *delta,
                              const int32_t *kept, int32_t *greater, int32_t *at_least) {
    int32_t i, above = 0, between = 0, count_greater = 0, count_at_least = 0;
    float threshold;
    if (n >= 4 * SAMPLE) {
        float sample[SAMPLE], high = 0.0f, low;
        /* descending ranks (0-based) of the pivots in the sample; rank -1: no upper pivot */
        const int32_t rank = (int32_t)(((int64_t)k * SAMPLE) / n);
        const int32_t high_rank = rank - SAMPLE_GAP;
        const int32_t low_rank = rank + SAMPLE_GAP < SAMPLE ? rank + SAMPLE_GAP : SAMPLE - 1;
        const int32_t stride = n / SAMPLE;
        for (i = 0; i < SAMPLE; i++) sample[i] = a[i * stride];
        if (high_rank >= 0) {
            high = kth_largest(sample, SAMPLE, high_rank + 1);
            low = kth_largest(sample + high_rank + 1, SAMPLE - high_rank - 1,
                              low_rank - high_rank);
            for (i = 0; i < n; i++) {
                const float value = a[i];
                if (value >= low) {
                    if (value > high)
                        above++;
                    else
                        a[between++] = value;
                }
            }
        } else {
            low = kth_largest(sample, SAMPLE, low_rank + 1);
            for (i = 0; i < n; i++) {
                const float value = a[i];
                if (value >= low) a[between++] = value;
            }
        }
        if (above < k && k <= above + between) {
            threshold = kth_largest(a, between, k - above);
            for (i = 0; i < between; i++) {
                count_greater += a[i] > threshold;
                count_at_least += a[i] >= threshold;
            }
            *greater = above + count_greater;
            *at_least = above + count_at_least;
            return threshold;
        }
        /* the pivots missed: the k-th largest is above the upper pivot or below the lower one;
         * gather that side again from delta (a's front was overwritten) and select there */
        {
            const int32_t higher = k <= above, skipped = higher ? 0 : above + between;
            int32_t side = 0;
            for (i = 0; i < n; i++) {
                const float value = fabsf(delta[kept[i]]);
                if (higher ? value > high : value < low) a[side++] = value;
            }
            if (k - skipped >= 1 && k - skipped <= side) {
                threshold = kth_largest(a, side, k - skipped);
                for (i = 0; i < side; i++) {
                    count_greater += a[i] > threshold;
                    count_at_least += a[i] >= threshold;
                }
                *greater = skipped + count_greater;
                *at_least = skipped + count_at_least;
                return threshold;
            }
        }
        /* (NaNs upset the counts): start again from all the values */
        for (i = 0; i < n; i++) a[i] = fabsf(delta[kept[i]]);
    }
    threshold = kth_largest(a, n, k);
    for (i = 0; i < n; i++) {
        count_greater += a[i] > threshold;
        count_at_least += a[i] >= threshold;
    }
    *greater = count_greater;
    *at_least = count_at_least;
    return threshold;
}
#undef SAMPLE
#undef SAMPLE_GAP

void tp_select_topk_gathered(const float *delta, int32_t n, int32_t k, float *scratch,
                             int32_t *kept, int32_t nonzero) {
    int32_t i, greater = 0, at_least = 0, count = 0, equal_left;
    float threshold;
    if (k >= nonzero) {
        /* every non-zero entry, then the zeros of lowest index */
        int32_t zeros_left = k - nonzero;
        for (i = 0; i < n && count < k; i++) {
            if (fabsf(delta[i]) != 0.0f) {
                kept[count++] = i;
            } else if (zeros_left > 0) {
                kept[count++] = i;
                zeros_left--;
            }
        }
        return;
    }
    threshold = select_threshold(scratch, nonzero, k, delta, kept, &greater, &at_least);
    equal_left = k - greater;
    if (at_least >= k && greater <= k) {
        /* k of the gathered entries qualify (always, unless NaNs upset the selection): the
         * filter stops at the k-th without a bounds test; one comparison per entry when every
         * value equal to the threshold is kept (the usual case: it is the only one) */
        if (at_least == k) {
            for (i = 0; count < k; i++) {
                const int32_t index = kept[i];
                if (fabsf(delta[index]) >= threshold) kept[count++] = index;
            }
            return;
        }
        for (i = 0; count < k; i++) {
            const int32_t index = kept[i];
            const float magnitude = fabsf(delta[index]);
            if (magnitude >= threshold) {
                if (magnitude > threshold) {
                    kept[count++] = index;
                } else if (equal_left > 0) {
                    kept[count++] = index;
                    equal_left--;
                }
            }
        }
        return;
    }
    for (i = 0; i < nonzero && count < k; i++) {
        const int32_t index = kept[i];
        const float magnitude = fabsf(delta[index]);
        if (magnitude > threshold) {
            kept[count++] = index;
        } else if (magnitude == threshold && equal_left > 0) {
            kept[count++] = index;
            equal_left--;
        }
    }
    /* NaN magnitudes compare false everywhere: fill up with the lowest unused indices */
    for (i = 0; count < k && i < n; i++) {
        const float magnitude = fabsf(delta[i]);
        if (!(magnitude > threshold) && !(magnitude == threshold)) kept[count++] = i;
    }
}

void tp_select_topk(const float *delta, int32_t n, int32_t k, float *scratch, int32_t *kept) {
    tp_select_topk_gathered(delta, n, k, scratch, kept, tp_gather_nonzero(delta, n, scratch, kept));
}

/* TinyPropv2: D = (d_min + alpha (d_max - d_min)) beta with alpha = Y_out / Ymax_out; the
 * sample is trained iff D >= skip_threshold. Ymax_out already includes Y_out. */
int tp_skip_decision_trains(const tp_policy_config *policy, float output_error,
                            float running_max_output) {
    float alpha, decision;
    if (policy->policy != TP_POLICY_TINYPROPV2) return 1;
    /* float32, as the Python library's tensors; the settings' arithmetic in double first */
    alpha = running_max_output > 0.0f ? output_error / running_max_output : 0.0f;
    decision = ((float)policy->d_min + alpha * (float)(policy->d_max - policy->d_min)) *
               (float)policy->beta;
    return decision >= (float)policy->skip_threshold;
}
