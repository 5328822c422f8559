/* test_sizes.c: hostile shapes whose sizes overflow 32-bit arithmetic are refused, on the host
 * and on a 32-bit target (size_t and long of 32 bits: Cortex-M4 under QEMU).
 *
 * Each spec below is what a hand-written or corrupted model description could claim. On a
 * 64-bit host the products fit in a long; on a Cortex-M4 they wrapped around, so a spec
 * claiming 2^32 input elements (or a dilated kernel spanning 2^32 entries, or 12 GB of
 * parameters) passed the checks and the arena was sized for far less than the layers use.
 * Prints one line per failed check and "sizes ok N" at the end; exit status 0 when all pass. */
#include <stdio.h>

#include "tinyprop.h"

#include "checks.h"

#define LAYERS 48 /* TP_MAX_LAYERS by default */

static tp_layer_spec layers[LAYERS];

static tp_status arena(const tp_model_spec *spec, size_t *bytes) {
    const tp_policy_config policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);
    const tp_optimizer_config adam = tp_adam(0.01, 0.0);
    return tp_arena_bytes(spec, &policy, &adam, bytes);
}

static void refused(const tp_model_spec *spec) {
    size_t bytes = 0;
    CHECK(arena(spec, &bytes) == TP_ERR_SHAPE);
    CHECK(tp_inference_bytes(spec, &bytes) == TP_ERR_SHAPE);
}

int main(void) {
    const tp_layer_spec dense = TP_DENSE_SPEC(2, NULL, NULL);
    tp_model_spec spec = {1, 1, 1, 1, layers};
    size_t bytes = 0;
    int i;

    /* an input of 65536 x 65536 x 1 elements: 2^32, which a 32-bit long wraps to 0 */
    layers[0] = (tp_layer_spec)TP_FLATTEN_SPEC();
    layers[1] = dense;
    spec = (tp_model_spec){65536, 65536, 1, 2, layers};
    refused(&spec);
    spec = (tp_model_spec){1, 65536, 65536, 2, layers};
    refused(&spec);

    /* a dense layer of 65536 x 65536 weights */
    layers[0] = (tp_layer_spec)TP_DENSE_SPEC(65536, NULL, NULL);
    layers[1] = dense;
    spec = (tp_model_spec){65536, 1, 1, 2, layers};
    refused(&spec);

    /* a conv whose dilated kernel spans 65536 x 65535 + 1 entries (2^32 - 65535) */
    layers[0] = (tp_layer_spec)TP_CONV_SPEC(2, 65536, 1, 1, 1, 0, 0, 1, NULL, NULL);
    layers[0].dilation_h = 65536;
    layers[1] = (tp_layer_spec)TP_FLATTEN_SPEC();
    layers[2] = dense;
    spec = (tp_model_spec){1, 64, 1, 3, layers};
    refused(&spec);

    /* 48 dense layers of 8192 x 8192 (each within the limits): 3.2e9 parameters, Adam makes
     * it 51 GB, which wraps around a 32-bit size_t; the arena is refused beyond 2 GiB */
    for (i = 0; i < LAYERS; i++) layers[i] = (tp_layer_spec)TP_DENSE_SPEC(8192, NULL, NULL);
    spec = (tp_model_spec){8192, 1, 1, LAYERS, layers};
    CHECK(arena(&spec, &bytes) == TP_ERR_SHAPE);
    CHECK(tp_inference_bytes(&spec, &bytes) == TP_OK && bytes == 2u * 8192u * 4u);

    /* just below: one 8192 x 8192 layer (256 MiB of weights, 1 GiB with Adam) is planned */
    spec = (tp_model_spec){8192, 1, 1, 2, layers};
    layers[1] = dense;
    CHECK(arena(&spec, &bytes) == TP_OK && bytes > 4u * 8192u * 8192u);

    printf("sizes ok %d of %d\n", checks - failures, checks);
    return failures == 0 ? 0 : 1;
}
