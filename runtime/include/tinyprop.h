/*
 * tinyprop.h: TinyPropv2 on-device training in C99.
 *
 * Dynamic sparse backpropagation (TinyProp v1, arXiv 2308.09201; TinyPropv2, arXiv 2409.07109)
 * with the same formulas as the Python library `tinyprop`. No dynamic allocation and no
 * dependency beyond libm: the caller gives one memory arena, whose size `tp_arena_bytes` tells
 * before anything runs. Every public function checks its arguments and returns a tp_status.
 *
 * Example (runtime/examples/train_example.c is a complete program; `tinyprop export` writes
 * the model header it includes and copies it as main.c):
 *
 *     static const tp_layer_spec layers[] = {
 *         TP_FLATTEN_SPEC(),
 *         TP_DENSE_SPEC(16, weight0, bias0), TP_RELU_SPEC(),
 *         TP_DENSE_SPEC(10, weight1, bias1),
 *     };
 *     tp_model_spec spec = {1, 8, 8, 4, layers};              // input (C, H, W) = (1, 8, 8)
 *     tp_policy_config policy = tp_policy_defaults(TP_POLICY_TINYPROPV2);
 *     tp_optimizer_config sgd = tp_sgd(0.05, 0.9, 0.0);
 *     size_t bytes;
 *     tp_arena_bytes(&spec, &policy, &sgd, &bytes);
 *     static float arena[ARENA_FLOATS];                          // >= bytes, 4-byte aligned
 *     static tp_model model;
 *     tp_init(&model, &spec, &policy, &sgd, arena, sizeof arena);
 *     tp_step_stats stats;
 *     tp_train_batch(&model, x, labels, batch, &stats, NULL, NULL);  // x: (B, C, H, W) float32
 *     // the last two arguments, k per sample and layer and the trained mask, may be NULL
 *
 * Layout conventions follow PyTorch: activations are (C, H, W) channel-major; a dense weight
 * is [out, in]; a conv weight is [C_out, C_in / groups, kh, kw]. A Conv1d / pool1d is a 2-D one
 * with height 1.
 */
#ifndef TINYPROP_H
#define TINYPROP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Capacity of the model description (layers of any kind). tp_model holds this many layer
 * records (about 150 bytes each on a 32-bit target): a build for one model may set it to that
 * model's layer count, the same for every file (-DTP_MAX_LAYERS=N), at most 16383. */
#ifndef TP_MAX_LAYERS
#define TP_MAX_LAYERS 48
#endif

typedef enum {
    TP_OK = 0,
    TP_ERR_NULL = -1,        /* a required pointer is NULL */
    TP_ERR_ARGUMENT = -2,    /* a setting or count is out of range */
    TP_ERR_SHAPE = -3,       /* layer shapes do not fit together */
    TP_ERR_ARENA = -4,       /* the arena is too small or not 4-byte aligned */
    TP_ERR_LABEL = -5,       /* a label outside [0, classes) */
    TP_ERR_NONFINITE = -6,   /* a loss, input, gradient, weight or logit is NaN or infinite:
                                nothing changed */
    TP_ERR_STATE = -7,       /* the model was not initialised by tp_init */
    TP_ERR_UNSUPPORTED = -8, /* a layer or setting this runtime does not offer */
    TP_ERR_BUILD = -9,       /* the program was compiled with another TP_MAX_LAYERS (or enum
                                size) than the runtime: their tp_model differ; nothing written */
    TP_ERR_ALIGNMENT = -10   /* a float or int32 buffer (input, labels, keep, logits, running
                                maxima, a spec's weights) is not at a multiple of 4 bytes: the
                                Cortex-M4's float loads fault there; nothing read or written */
} tp_status;

/* A short English text for a status code (never NULL). */
const char *tp_status_string(tp_status status);

/* ---------------------------------------------------------------- model description */

typedef enum {
    TP_LAYER_DENSE = 0,   /* nn.Linear on a flat input */
    TP_LAYER_CONV2D = 1,  /* nn.Conv2d / nn.Conv1d (height 1), groups for depthwise */
    TP_LAYER_RELU = 2,
    TP_LAYER_MAXPOOL = 3, /* nn.MaxPool2d / nn.MaxPool1d */
    TP_LAYER_AVGPOOL = 4, /* nn.AvgPool2d / nn.AvgPool1d (count_include_pad=True) */
    TP_LAYER_FLATTEN = 5, /* (C, H, W) -> (C*H*W, 1, 1), no copy */
    TP_LAYER_RELU6 = 6,   /* nn.ReLU6: min(max(x, 0), 6) */
    TP_LAYER_LEAKY_RELU = 7, /* nn.LeakyReLU: x > 0 ? x : slope x, slope >= 0 (weight points
                                at it; NULL means PyTorch's 0.01) */
    TP_LAYER_SIGMOID = 8, /* nn.Sigmoid */
    TP_LAYER_TANH = 9,    /* nn.Tanh */
    /* these take their derivative from their input: each writes an output of its own, and
     * the layer before keeps its output until their backward */
    TP_LAYER_SILU = 10,        /* nn.SiLU: x sigmoid(x) */
    TP_LAYER_GELU = 11,        /* nn.GELU(): x / 2 (1 + erf(x / sqrt 2)) */
    TP_LAYER_GELU_TANH = 12,   /* nn.GELU(approximate='tanh') */
    TP_LAYER_HARDSWISH = 13,   /* nn.Hardswish: x min(max(x + 3, 0), 6) / 6 */
    TP_LAYER_HARDSIGMOID = 14, /* nn.Hardsigmoid: min(max(x + 3, 0), 6) / 6 */
    TP_LAYER_MISH = 15,        /* nn.Mish: x tanh(softplus(x)) */
    /* in place again, the derivative from the output (as PyTorch's in-place forms take it) */
    TP_LAYER_ELU = 16,      /* nn.ELU: x > 0 ? x : alpha (e^x - 1), alpha >= 0 (weight points
                               at alpha; NULL means 1) */
    TP_LAYER_CELU = 17,     /* nn.CELU: x > 0 ? x : alpha (e^(x / alpha) - 1) (weight points at
                               {alpha, 1 / alpha rounded to float}; NULL means {1, 1}) */
    TP_LAYER_SELU = 18,     /* nn.SELU: scale (x > 0 ? x : alpha (e^x - 1)), PyTorch's constants */
    TP_LAYER_HARDTANH = 19  /* nn.Hardtanh: min(max(x, min_val), max_val) (weight points at
                               {min_val, max_val}, min_val <= max_val; NULL means {-1, 1}) */
} tp_layer_kind;

typedef struct {
    tp_layer_kind kind;
    int32_t out_channels;           /* dense: out_features; conv: C_out; others: unused */
    int32_t kernel_h, kernel_w;     /* conv and pools */
    int32_t stride_h, stride_w;     /* conv and pools; 0 means 1 for conv, kernel for pools */
    int32_t padding_h, padding_w;   /* conv and pools */
    int32_t dilation_h, dilation_w; /* conv only; 0 means 1 */
    int32_t groups;                 /* conv only; 0 means 1; C_in for depthwise */
    int32_t has_bias;               /* dense and conv: 1 with a bias, 0 without */
    const float *weight;            /* initial weights (PyTorch layout); NULL means zeros;
                                       LeakyReLU: its negative_slope (one float); ELU: alpha;
                                       CELU: alpha, 1 / alpha; Hardtanh: min_val, max_val
                                       (copied by tp_init) */
    const float *bias;              /* initial bias; NULL means zeros */
} tp_layer_spec;

#define TP_DENSE_SPEC(out, w, b) {TP_LAYER_DENSE, (out), 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, (w), (b)}
#define TP_CONV_SPEC(out, kh, kw, sh, sw, ph, pw, groups, w, b) \
    {TP_LAYER_CONV2D, (out), (kh), (kw), (sh), (sw), (ph), (pw), 1, 1, (groups), 1, (w), (b)}
#define TP_RELU_SPEC() {TP_LAYER_RELU, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL}
#define TP_MAXPOOL_SPEC(kh, kw, sh, sw) \
    {TP_LAYER_MAXPOOL, 0, (kh), (kw), (sh), (sw), 0, 0, 0, 0, 0, 0, NULL, NULL}
#define TP_AVGPOOL_SPEC(kh, kw, sh, sw) \
    {TP_LAYER_AVGPOOL, 0, (kh), (kw), (sh), (sw), 0, 0, 0, 0, 0, 0, NULL, NULL}
#define TP_FLATTEN_SPEC() {TP_LAYER_FLATTEN, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL}
/* the other activations (TP_LAYER_RELU6 ... TP_LAYER_HARDTANH) with PyTorch's default
 * settings; slope: a pointer to LeakyReLU's negative_slope (>= 0), or NULL */
#define TP_ACTIVATION_SPEC(kind) {(kind), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL}
#define TP_LEAKY_RELU_SPEC(slope) \
    {TP_LAYER_LEAKY_RELU, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (slope), NULL}
/* an activation with its settings: a pointer to the floats the kind above names */
#define TP_ACTIVATION_SETTINGS_SPEC(kind, settings) \
    {(kind), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (settings), NULL}

typedef struct {
    int32_t input_channels, input_height, input_width; /* one sample's shape (C, H, W) */
    int32_t layer_count;
    const tp_layer_spec *layers; /* the last layer's output are the class logits */
} tp_model_spec;

/* ---------------------------------------------------------------- policy and optimizer */

typedef enum {
    TP_POLICY_FULL = 0,       /* dense backprop: the reference */
    TP_POLICY_TOPK = 1,       /* meProp: k = round(ratio * N) per layer */
    TP_POLICY_TINYPROP = 2,   /* TinyProp v1: adaptive k per layer and sample */
    TP_POLICY_TINYPROPV2 = 3  /* v1 + per-sample skip decision */
} tp_policy;

/* Settings are doubles, as Python's floats are: k is computed in double precision like the
 * Python library does, the skip metric in float32 like its tensors. */
typedef struct {
    tp_policy policy;
    double s_min, s_max, zeta;   /* backprop ratio: (s_min + Y/Ymax (s_max - s_min)) zeta^d */
    double ratio;                /* topk: kept fraction, in (0, 1] */
    double d_min, d_max, beta;   /* skip metric D = (d_min + alpha (d_max - d_min)) beta */
    double skip_threshold;       /* a sample is trained iff D >= skip_threshold */
} tp_policy_config;

/* The Python library's defaults (s_min 0.1, s_max 0.9, zeta 0.5, ratio 0.1, d 0..1, beta 1,
 * threshold 0.5). */
tp_policy_config tp_policy_defaults(tp_policy policy);

typedef enum { TP_OPTIMIZER_SGD = 0, TP_OPTIMIZER_ADAM = 1 } tp_optimizer_kind;

typedef struct {
    tp_optimizer_kind kind;
    double lr;
    double momentum;      /* SGD; 0 disables the momentum buffer */
    int32_t nesterov;     /* SGD with momentum */
    double weight_decay;  /* L2 term added to the gradient (PyTorch semantics, both) */
    double beta1, beta2;  /* Adam */
    double eps;           /* Adam, added outside the square root */
} tp_optimizer_config;

/* torch.optim.SGD(lr, momentum, weight_decay) */
tp_optimizer_config tp_sgd(double lr, double momentum, double weight_decay);
/* torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay) */
tp_optimizer_config tp_adam(double lr, double weight_decay);

/* ---------------------------------------------------------------- memory mode */

/* How lean training is with memory (all settings exact against the Python library's mirror,
 * tinyprop.memory):
 * - first_trained_layer: the trainable layers (dense and conv, counted in forward order from 0)
 *   before this one are frozen: their weights stay in the spec's (const, flash) arrays, they
 *   get no gradient, no optimizer state, and their activations live only until the next
 *   layer has read them. 0 trains every layer (last-layers fine-tuning: e.g. the last one).
 * - sgd_in_place: every trained sample is its own SGD step (plain SGD: no momentum, no
 *   Nesterov; weight decay allowed), applied as soon as a layer's backward is done: a dense
 *   layer updates each weight where its gradient is formed (no gradient buffer), a conv layer
 *   gathers its gradient in a buffer of its own size that lives only during its backward.
 *   The batch given to tp_train_batch is then a list of samples, each trained with lr (not
 *   lr / batch). If a sample's loss is not finite, the samples before it stay applied. Every
 *   layer's error and gradient is shown finite before the first step (sgd_in_place and
 *   adam_in_place): by a bound (max |input| of the trained layers, max |W|, fan-out, pool
 *   windows and activation slopes; a pass over the kept inputs per trained sample, and over
 *   the trained weights under adam_in_place: under sgd_in_place each trained layer follows a
 *   bound on its max |W| from step to step, from lr, weight_decay and the bound on its
 *   gradient, and its weights are read again only when the bound fails on that) or, where the
 *   bound exceeds FLT_MAX / 64, by a dry run of the backward that forms and checks them
 *   without stepping (then the forward and the backward again). A program that writes a
 *   trained layer's weights itself between samples sets its activation[0] to 0 (not known).
 *   When one is NaN or infinite (finite inputs and loss, values near the float range):
 *   TP_ERR_NONFINITE, no layer is stepped for the sample, the running maxima are those before
 *   the sample and the batch is cancelled.
 * - bias_only_layers: bit i set: trainable layer i (from first_trained_layer on, with a bias)
 *   trains its bias only (TinyTL-style): its weights stay in the spec's const arrays, its
 *   error still passes on to the layers below, its input is not kept for the backward, and
 *   a ReLU right before it keeps a 1-bit mask of its output instead of the output. Not with
 *   sgd_in_place (TP_ERR_UNSUPPORTED). Trainable layers 0..31 only.
 * - momentum_in_place: SGD with momentum (momentum > 0, no Nesterov; TP_ERR_ARGUMENT
 *   otherwise), one update per batch, without a gradient buffer: at a batch's first trained
 *   sample the momentum buffer is scaled by momentum * batch, each trained sample's gradient is
 *   added into it, and the update divides it by the batch size, adds the weight decay and
 *   steps (torch.optim.SGD's step up to the order of float additions). Not with sgd_in_place.
 *   If a sample's loss is not finite, the weights and running maxima stay as they were but the
 *   momentum buffer (which held part of the batch's gradient) is reset to zero, as after
 *   tp_init, and the next update is a first step.
 * - selection_in_place: a sparse policy keeps no selection scratch (two entries per output):
 *   the k-th largest |delta| is found by a radix select over its bits (a table of 256 counts),
 *   the entries not kept are set to zero in delta itself (dead after this layer's backward;
 *   the bias gradient and Y are taken before), and the backward runs over delta skipping its
 *   zeros. The same kept entries (ties to the lower index); the same floats but where k
 *   exceeds the count of non-zero errors (the scratch-based backward then also runs the kept
 *   zeros, pairing channels differently: float rounding). Not with sgd_in_place
 *   (TP_ERR_UNSUPPORTED). A first trained layer that is bias-only selects nothing (any
 *   policy): its bias gradient is dense, it has no weight gradient or input error.
 * - adam_in_place: Adam (TP_ERR_ARGUMENT otherwise) where every trained sample is its own step
 *   (t counts trained samples; lr, not lr / batch), applied as soon as a layer's backward is
 *   done: each trained layer gathers the sample's gradient in a buffer of its own size that
 *   lives only during its backward, then steps. No gradient buffer for the model. Bias-only
 *   layers and selection_in_place work with it; not with sgd_in_place or momentum_in_place.
 *   A sample whose error is zero from some layer down (sparse policies) steps those layers
 *   with a zero gradient, as torch.optim.Adam does. If a sample's loss is not finite, the
 *   samples before it stay applied; a gradient that is not finite as under sgd_in_place (no
 *   step, t as before the sample).
 * - moment_bits: 32 (or 0: float moments) or 8 (Adam only, TP_ERR_ARGUMENT otherwise): Adam
 *   keeps m and v between steps in 8 bits per entry plus one float per block of
 *   TP_MOMENT_BLOCK entries of each weight and bias (m: codes -127..127 times max|m| / 127;
 *   v through w = sqrt(v): codes 0..255, at least 1 where w > 0, times max w / 255). A step
 *   decodes them, runs the float Adam step and encodes them again (rounding to nearest even;
 *   tinyprop.moments.Adam8bit, the same floats).
 * - recompute_layers: bit i set: trainable layer i (after first_trained_layer, not bias-only;
 *   TP_ERR_ARGUMENT otherwise) keeps no input for its backward: when its backward runs, the
 *   forward of the layers before it runs again from the sample (the same floats; its outputs
 *   alternate between this layer's recomputed input and the error buffer of its input, which
 *   is written only after), and a ReLU working in place on that input reads it there. The
 *   recomputed forward is not counted in the ledger (it repeats work already counted).
 *   Trainable layers 0..31 only.
 * The arena's transient buffers (activations, errors, selection and conv scratch, in-place
 * gradients) are placed by their lifetimes within one training step, each where it does not
 * overlap a buffer alive at the same time, so that memory is reused once a buffer's backward
 * has run; tp_arena_bytes computes that plan before anything runs. */
typedef struct {
    int32_t first_trained_layer;
    int32_t sgd_in_place;
    uint32_t bias_only_layers;
    int32_t momentum_in_place;
    int32_t selection_in_place;
    int32_t adam_in_place;
    int32_t moment_bits;
    uint32_t recompute_layers;
} tp_memory_config;

/* moment_bits 8: entries per block of a moment (one float of scale per block and moment) */
#define TP_MOMENT_BLOCK 64

/* Every layer trained, one update per batch (the Python library's train_step). */
tp_memory_config tp_memory_defaults(void);

/* ---------------------------------------------------------------- model state */

/* Multiply-accumulates, counted as the Python library's Ledger does. */
typedef struct {
    uint64_t forward;        /* forward pass of every sample (trained or skipped) */
    uint64_t backward;       /* backward work actually done */
    uint64_t backward_dense; /* what full training would have done on the same samples */
    uint64_t selection;      /* computing Y and choosing the top k */
} tp_ledger;

typedef struct {
    tp_layer_kind kind;
    int32_t in_c, in_h, in_w, out_c, out_h, out_w;
    int32_t kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w;
    int32_t groups, has_bias;
    int32_t trainable_index;     /* 0.. in forward order, -1 if the layer has no parameters */
    int32_t depth;               /* d_l = L - l for trainable layers */
    float input_max;             /* recompute_input in sgd_in_place / adam_in_place: max |input|
                                    of this sample, taken in its forward (fills padding) */
    double depth_scale;          /* zeta^d_l */
    int32_t fan_in;              /* in_features, or C_in/groups * kh * kw */
    int32_t input_is_sample;     /* 1 when this layer reads the sample itself */
    int32_t trained;             /* 1 for a trainable layer at or after first_trained_layer */
    int32_t bias_only;           /* trained, its weight frozen (bias_only_layers) */
    int32_t skip_zero_errors;    /* selection_in_place: the backward leaves out zero errors */
    float *weight, *bias;        /* a frozen layer's point into the spec (never written) */
    float *grad_weight, *grad_bias; /* NULL for frozen layers and in-place dense layers */
    float *output;               /* this layer's output for the current sample */
    float *input_delta;          /* where its backward writes the error of its input */
    float *forward_scratch;      /* conv: zero-padded input, tap offsets */
    float *backward_scratch;     /* trained conv: the same, patch buffers, position sort */
    float *selection;            /* trained, sparse policies: |delta| values then indices
                                    (selection_in_place: 256 counts) */
    uint32_t *relu_mask;         /* a ReLU before a bias-only layer: bit j = output j > 0 */
    float running_max;           /* Ymax_l */
    size_t parameter_offset;     /* trained: its first parameter in the model's arrays */
    size_t block_offset;         /* trained, moment_bits 8: its first block of moments */
    int32_t recompute_input;     /* recompute_layers: its input is computed again */
    float *recomputed_input;     /* where (the last of the recomputed outputs) */
    float *recompute_partner;    /* where the other recomputed outputs alternate */
    float *recompute_scratch;    /* the recomputed convs' forward scratch */
    float activation[2];         /* LeakyReLU: {negative_slope}; ELU: {alpha}; CELU:
                                    {alpha, 1 / alpha}; Hardtanh: {min_val, max_val}; a
                                    trained dense or conv layer in sgd_in_place: {a bound on
                                    max |W| followed from step to step, 0 when not known} */
} tp_layer;

/* The caller allocates this struct (e.g. static); tp_init fills it; the arena holds the rest. */
typedef struct {
    uint32_t magic;
    int32_t layer_count, trainable_count;
    int32_t input_size, class_count;
    tp_layer layers[TP_MAX_LAYERS];
    int32_t first_trained_layer; /* index into layers of the first trained layer */
    tp_policy_config policy;
    tp_optimizer_config optimizer;
    tp_memory_config memory;
    size_t parameter_count;      /* parameters in the arena: the trained layers' */
    size_t total_parameter_count; /* of every layer, frozen ones included */
    float *parameters, *gradients, *moment1, *moment2; /* gradients: NULL when in place
                                                         (momentum_in_place: moment1) */
    int8_t *first_codes;         /* moment_bits 8: m's codes, v's (of sqrt v), block maxima */
    uint8_t *second_codes;
    float *first_max, *second_max;
    float *loss_delta;           /* dloss/dlogits of the current sample */
    float running_max_output;    /* Ymax of the output error, for the v2 skip decision */
    int64_t optimizer_steps;     /* batches with an update (Adam's t; SGD's first-step rule) */
    tp_ledger total;             /* accumulated since tp_init */
    size_t arena_bytes_used;
    int32_t momentum_batch;      /* momentum_in_place: the batch size until its first trained
                                    sample scales the momentum buffer, then 0 */
} tp_model;

typedef struct {
    float loss;           /* mean over the batch (all samples, skipped ones included) */
    int32_t trained, skipped;
    tp_ledger macs;       /* this step only */
} tp_step_stats;

/* A batch fed one sample at a time (tp_batch_begin, tp_batch_add per sample, tp_batch_end):
 * the same floats as tp_train_batch with the whole batch, but the program holds one sample,
 * not the batch (a batch of 32 keyword samples is 62,720 B; one is 1,960 B). The caller
 * owns the struct (stack or static); one pending batch per model. */
typedef struct {
    uint32_t magic;              /* set by tp_batch_begin, cleared by tp_batch_end or an error */
    const tp_model *model;
    int32_t size, added, trained;
    float loss_sum;
    tp_ledger macs;
    float saved_max[TP_MAX_LAYERS]; /* the running maxima to go back to on a non-finite loss */
    float saved_output_max;
} tp_batch;

/* ---------------------------------------------------------------- functions */

/* Bytes of arena that training `spec` with `policy` and `optimizer` needs (weights, gradients,
 * optimizer state, one sample's activations, the backward buffers and the selection scratch). */
tp_status tp_arena_bytes(const tp_model_spec *spec, const tp_policy_config *policy,
                         const tp_optimizer_config *optimizer, size_t *bytes);

/* The same for a memory mode (tp_arena_bytes uses tp_memory_defaults()).
 * Stack: both hold the arena plan, as tp_init_mode does (112 bytes per layer of TP_MAX_LAYERS
 * on a Cortex-M4, gcc -O2), and their own copy of the layers (184 bytes per layer, the
 * tp_model's records): 280 + 296 x TP_MAX_LAYERS bytes in all (3,536 for 11 layers), against
 * tp_init_mode's 312 + 112 x TP_MAX_LAYERS (1,544). On a part with little RAM, size the arena
 * with the exported TP_MODEL_ARENA_BYTES and read what tp_init_mode used with tp_read_totals. */
tp_status tp_arena_bytes_mode(const tp_model_spec *spec, const tp_policy_config *policy,
                              const tp_optimizer_config *optimizer, const tp_memory_config *memory,
                              size_t *bytes);

/* Bytes inference alone needs if the weights stay in read-only memory: two activation buffers. */
tp_status tp_inference_bytes(const tp_model_spec *spec, size_t *bytes);

/* Validate everything, lay the arena out and copy the initial weights into it.
 * tp_init and tp_init_mode are macros (below) that pass the caller's struct sizes to
 * tp_init_checked / tp_init_mode_checked: a program compiled with another TP_MAX_LAYERS than
 * the runtime (a PlatformIO or Makefile build that sets it for one but not the other) holds a
 * tp_model of another size and layout than the runtime writes, and gets TP_ERR_BUILD with
 * nothing written. The functions tp_init and tp_init_mode (called by
 * name, e.g. from a language binding that allocates tp_model_struct_bytes()) do not check. */
tp_status(tp_init)(tp_model *model, const tp_model_spec *spec, const tp_policy_config *policy,
                   const tp_optimizer_config *optimizer, void *arena, size_t arena_bytes);

/* tp_init under a memory mode (tp_init uses tp_memory_defaults()). Frozen layers need their
 * weights (and biases) in the spec: TP_ERR_NULL otherwise. sgd_in_place needs plain SGD:
 * TP_ERR_ARGUMENT otherwise. A NaN or infinite weight or bias in the spec: TP_ERR_NONFINITE. */
tp_status(tp_init_mode)(tp_model *model, const tp_model_spec *spec,
                        const tp_policy_config *policy, const tp_optimizer_config *optimizer,
                        const tp_memory_config *memory, void *arena, size_t arena_bytes);

/* tp_init and tp_init_mode after checking that the caller was compiled with the runtime's
 * tp_model and enum sizes: `build` is the caller's TP_BUILD_SIZES (TP_ERR_BUILD, nothing
 * written, when it differs from the runtime's). */
tp_status tp_init_checked(tp_model *model, const tp_model_spec *spec,
                          const tp_policy_config *policy, const tp_optimizer_config *optimizer,
                          void *arena, size_t arena_bytes, size_t build);
tp_status tp_init_mode_checked(tp_model *model, const tp_model_spec *spec,
                               const tp_policy_config *policy,
                               const tp_optimizer_config *optimizer,
                               const tp_memory_config *memory, void *arena, size_t arena_bytes,
                               size_t build);

/* This file's compile-time sizes in one value: sizeof(tp_model), which TP_MAX_LAYERS sets
 * (every layer record adds to it), and the size of an enum (1 under -fshort-enums, arm-none-eabi-gcc's default, else 4). One
 * argument, so that the call takes no more stack than tp_init_mode's on a Cortex-M. */
#define TP_BUILD_SIZES (sizeof(tp_model) * 16u + sizeof(tp_layer_kind))
#define tp_init(model, spec, policy, optimizer, arena, arena_bytes)                       \
    tp_init_checked((model), (spec), (policy), (optimizer), (arena), (arena_bytes),          \
                    TP_BUILD_SIZES)
#define tp_init_mode(model, spec, policy, optimizer, memory, arena, arena_bytes)             \
    tp_init_mode_checked((model), (spec), (policy), (optimizer), (memory), (arena),          \
                         (arena_bytes), TP_BUILD_SIZES)

/* One training step on a batch: per sample forward, loss, skip decision (v2) and sparse
 * backward; one optimizer update with the gradient of the mean loss over the batch, none when
 * every sample is skipped. x: (batch, C, H, W) float32; labels: (batch,).
 * `keep` (optional, batch * trainable_count): k per sample and trainable layer, 0 if skipped.
 * `trained_mask` (optional, batch): 1 if the sample was trained. Either may be NULL.
 * Every label and input value is checked first (TP_ERR_LABEL, TP_ERR_NONFINITE: nothing ran);
 * x, labels or keep at an address that is not a multiple of 4: TP_ERR_ALIGNMENT, nothing ran.
 * On TP_ERR_NONFINITE (also a loss, or a gradient that summed to infinity, outside the
 * in-place modes) nothing (weights, optimizer, running maxima) has changed. */
tp_status tp_train_batch(tp_model *model, const float *x, const int32_t *labels, int32_t batch,
                         tp_step_stats *stats, int32_t *keep, uint8_t *trained_mask);

/* tp_train_batch one sample at a time. tp_batch_begin: a batch of `size` samples (the update
 * averages over `size`; momentum_in_place scales its buffer by it). tp_batch_add: one sample's
 * forward, loss, skip decision and sparse backward; `keep_row` (optional, trainable_count
 * entries) and `trained` (optional) as one row of tp_train_batch's. A label outside
 * [0, classes) is TP_ERR_LABEL and an input value that is NaN or infinite TP_ERR_NONFINITE,
 * and neither changes anything (the batch goes on without that sample); a non-finite loss is
 * TP_ERR_NONFINITE, leaves the model as tp_train_batch leaves it and cancels the batch
 * (TP_ERR_STATE until the next tp_batch_begin); more than `size` samples: TP_ERR_STATE; x or
 * keep_row not at a multiple of 4 bytes: TP_ERR_ALIGNMENT, nothing changed (as for a label).
 * tp_batch_end: the update (none when every sample was skipped) and the batch's stats;
 * TP_ERR_ARGUMENT, the batch still pending, until exactly `size` samples were added; a
 * gradient that summed to infinity: TP_ERR_NONFINITE, the batch cancelled as for a loss.
 * tp_batch_shorten: the input ended early (a file's last, partial batch): the batch becomes
 * the samples added so far (at least one; TP_ERR_ARGUMENT otherwise), and the update averages
 * over them, as tp_train_batch with that many does. momentum_in_place scales its buffer by
 * `size` at a batch's first trained sample: after one, TP_ERR_UNSUPPORTED (still pending). */
tp_status tp_batch_begin(tp_model *model, tp_batch *batch, int32_t size);
tp_status tp_batch_add(tp_model *model, tp_batch *batch, const float *x, int32_t label,
                       int32_t *keep_row, uint8_t *trained);
tp_status tp_batch_end(tp_model *model, tp_batch *batch, tp_step_stats *stats);
tp_status tp_batch_shorten(tp_model *model, tp_batch *batch);

/* sizeof(tp_batch), for language bindings that allocate the struct themselves. */
size_t tp_batch_struct_bytes(void);

/* Forward one sample; writes class_count logits (optional) and the arg-max class (optional).
 * TP_ERR_NONFINITE (nothing written) when an input value or a logit is NaN or infinite;
 * TP_ERR_ALIGNMENT (nothing read or written) when x or logits is not at a multiple of 4. */
tp_status tp_predict(tp_model *model, const float *x, float *logits, int32_t *predicted);

/* Copy all parameters out, layer by layer (weight then bias), as in a PyTorch state_dict;
 * count: total_parameter_count (frozen layers included). */
tp_status tp_read_parameters(const tp_model *model, float *out, size_t count);

/* sizeof(tp_model), for language bindings that allocate the struct themselves. */
size_t tp_model_struct_bytes(void);

/* Number of parameters (all layers, frozen included) and trainable layers. */
tp_status tp_parameter_count(const tp_model *model, size_t *count);
tp_status tp_trainable_count(const tp_model *model, int32_t *count);

/* The running maxima: Ymax per trainable layer (count entries) and of the output error. */
tp_status tp_read_running_max(const tp_model *model, float *layer_max, int32_t count,
                              float *output_max);

/* The MACs counted since tp_init, and the arena bytes the model uses. */
tp_status tp_read_totals(const tp_model *model, tp_ledger *total, size_t *arena_bytes_used);

#ifdef __cplusplus
}
#endif

#endif /* TINYPROP_H */
