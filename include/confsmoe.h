/*
 * libconfsmoe: sparse Mixture-of-Experts layers with a confidence-guided gate
 * (Conf-SMoE, Zheng et al., arXiv 2505.19525), as an embeddable C library.
 *
 * This header is the stable API. Everything declared here keeps its meaning
 * and its binary layout for the life of soversion 0.
 *
 * Conventions
 * - Objects are opaque. A create function returns a confsmoe_status and writes
 *   the new handle through its last argument; on failure the out-pointer is
 *   set to NULL. destroy functions accept NULL and free synchronously.
 * - Destruction in any order: the ctx, tensors, experts, gates, imputers,
 *   optimizers, models and saved handles may be destroyed in any order (each
 *   once). Every object created from a ctx holds a reference to it; the ctx, and
 *   a host allocator's last frees, go when the last of them is destroyed, so a
 *   host allocator must stay callable until then. Objects stay usable after
 *   confsmoe_ctx_destroy, and their errors still go to the ctx: until the last
 *   of them is destroyed, the ctx handle may still be passed to
 *   confsmoe_ctx_last_error, and to no other function.
 * - Use still needs what an object borrows, see docs/API.md: once a borrowed
 *   object is destroyed, the borrower may only be destroyed. A gate borrows its
 *   experts, an optimizer its registered tensors, a saved handle names its layer,
 *   a wrapped tensor borrows its memory (destroy does not touch it). A model owns
 *   its experts, gate and imputer: never destroy those yourself.
 * - Errors: every entry point validates its arguments and returns a negative
 *   status on failure, with a precise message in confsmoe_ctx_last_error().
 *   A failed call changes no state. The library never aborts or exits.
 * - Threads: use a ctx (and everything created from it, destroy included) from
 *   one thread at a time. Different ctxs may be used concurrently. A ctx may run
 *   its work on threads of the library's own as well (confsmoe_ctx_params.n_threads;
 *   the environment variable CONFSMOE_NUM_THREADS is the fallback when it is 0):
 *   the calling thread's OpenMP team, or a pool of the ctx's own, started at first
 *   use (docs/API.md, "Threads"). Outside them BLIS runs on n_threads threads
 *   too; with n_threads 1 it follows the host's BLIS_NUM_THREADS.
 * - Tensors are dense, row-major and contiguous. Dimensions are int64_t.
 * - Options structs are sized: each starts with size_t struct_size, the size of the
 *   struct the caller was compiled with. confsmoe_X_params_init(p) is a macro that
 *   passes sizeof(confsmoe_X_params) to confsmoe_X_params_init_sized(), which fills
 *   the defaults and writes exactly struct_size bytes. A create function accepts any
 *   struct_size from the struct's first release (libconfsmoe 0.1.0) up to its own sizeof:
 *   fields the caller's struct lacks take their defaults. A larger struct_size (a
 *   program built for a newer library) is accepted only if every byte past this
 *   library's sizeof is 0. A smaller struct_size, or one above 65536, gives
 *   CONFSMOE_E_VERSION. For an output struct (confsmoe_gate_stats) the library writes
 *   at most struct_size bytes, zeros past its own sizeof. Fields are only ever appended,
 *   and 0 in an appended field means the earlier behaviour. See docs/API.md,
 *   "Struct versioning".
 * - Gradients accumulate until the host zeroes them. The host owns the
 *   training loop; the optimizer here is a convenience.
 */
#ifndef CONFSMOE_H
#define CONFSMOE_H

#include <stddef.h>
#include <stdint.h>

#include "confsmoe_version.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(CONFSMOE_BUILDING)
#define CONFSMOE_API __declspec(dllexport)
#elif defined(__GNUC__) && __GNUC__ >= 4
#define CONFSMOE_API __attribute__((visibility("default")))
#else
#define CONFSMOE_API
#endif

/* ---------------------------------------------------------------- status */

/* 0 is success. Negative values are errors; they are pinned and never renumbered. */
typedef int32_t confsmoe_status;

/* Every status, in order: X(NAME, VALUE, TEXT) for the macro CONFSMOE_<NAME>, its pinned value
 * and the text of confsmoe_status_string (an X-macro, as libuv's UV_ERRNO_MAP). The library, the
 * bindings and docs/API.md follow this list: lib/status.c does not compile if a macro below
 * differs from it, and tests/abi/check_constants.py compares the bindings and the docs with it.
 * A new status goes here and below. */
#define CONFSMOE_STATUS_MAP(X)                      \
    X(OK, 0, "ok")                                  \
    X(E_INVALID_ARGUMENT, -1, "invalid argument")   \
    X(E_SHAPE, -2, "shape mismatch")                \
    X(E_DTYPE, -3, "wrong dtype")                   \
    X(E_NOMEM, -4, "out of memory")                 \
    X(E_STATE, -5, "invalid state")                 \
    X(E_UNSUPPORTED, -6, "unsupported")             \
    X(E_NUMERIC, -7, "non-finite value")            \
    X(E_VERSION, -8, "version mismatch")            \
    X(E_INTERNAL, -9, "internal error")             \
    X(E_IO, -10, "i/o error")                       \
    X(E_FORMAT, -11, "bad file format")             \
    X(E_COMM, -12, "communication error")

/* The same values as plain macros, usable in #if. */
#define CONFSMOE_OK                0
#define CONFSMOE_E_INVALID_ARGUMENT (-1) /* NULL pointer, out-of-range value */
#define CONFSMOE_E_SHAPE           (-2)  /* dimensions do not fit together */
#define CONFSMOE_E_DTYPE           (-3)  /* wrong element type */
#define CONFSMOE_E_NOMEM           (-4)  /* allocation failed or size overflows */
#define CONFSMOE_E_STATE           (-5)  /* call out of order (e.g. backward twice) */
#define CONFSMOE_E_UNSUPPORTED     (-6)  /* valid request this build cannot do */
#define CONFSMOE_E_NUMERIC         (-7)  /* NaN or Inf in an input, with checks on */
#define CONFSMOE_E_VERSION         (-8)  /* incompatible version or struct size */
#define CONFSMOE_E_INTERNAL        (-9)  /* a bug in libconfsmoe: please report it */
#define CONFSMOE_E_IO              (-10) /* a file could not be opened, read or written */
#define CONFSMOE_E_FORMAT          (-11) /* a file is truncated, corrupted or does not match */
#define CONFSMOE_E_COMM            (-12) /* a message or collective of a distributed run failed */

/* Static text for a status, never NULL ("unknown status" for other values). */
CONFSMOE_API const char *confsmoe_status_string(confsmoe_status s);

/* ---------------------------------------------------------------- version */

/* CONFSMOE_VERSION_MAJOR*10000 + MINOR*100 + PATCH of the library in use. */
CONFSMOE_API uint32_t confsmoe_version_number(void);
/* "MAJOR.MINOR.PATCH" of the library in use. */
CONFSMOE_API const char *confsmoe_version_string(void);

/* ---------------------------------------------------------------- context */

typedef struct confsmoe_ctx confsmoe_ctx;

/* Log levels for confsmoe_log_fn. */
#define CONFSMOE_LOG_ERROR 0
#define CONFSMOE_LOG_WARN  1
#define CONFSMOE_LOG_INFO  2
#define CONFSMOE_LOG_DEBUG 3

typedef void (*confsmoe_log_fn)(void *user, int32_t level, const char *message);

/* Optional allocator. alloc returns memory aligned to `alignment` (a power of
 * two, at least sizeof(void *)) or NULL; free accepts what alloc returned. */
typedef struct confsmoe_allocator {
    void *(*alloc)(void *user, size_t size, size_t alignment);
    void (*free)(void *user, void *ptr);
    void *user;
} confsmoe_allocator;

typedef struct confsmoe_ctx_params {
    size_t struct_size;          /* the caller's sizeof(confsmoe_ctx_params), set by _init() */
    uint64_t seed;               /* RNG seed for init, noise and draws (default 0) */
    int32_t check_finite;        /* 1 (default): reject NaN/Inf inputs with
                                    CONFSMOE_E_NUMERIC; 0: skip the scan, and
                                    NaN/Inf propagate through the arithmetic */
    int32_t log_level;           /* messages up to this level go to log_fn
                                    (default CONFSMOE_LOG_WARN) */
    confsmoe_log_fn log_fn;      /* NULL (default): silent */
    void *log_user;
    const confsmoe_allocator *allocator; /* NULL (default): the C library's, with
                                            freed large blocks kept by the ctx for
                                            reuse, up to 64 MiB or up to its own
                                            peak in use (docs/API.md, "Memory";
                                            freed with the ctx).
                                            A host allocator sees every allocation.
                                            Copied at create; must not be NULL
                                            in its function pointers if given, and
                                            stays in use until the last object of
                                            the ctx is destroyed. */
    int32_t n_threads;           /* how many threads the calls on this ctx's objects
                                    run on, the calling thread included: 1 = none
                                    of the library's own; at most 64. 0 (default):
                                    the environment variable CONFSMOE_NUM_THREADS as
                                    it is at create (capped at 64), else 1. Results
                                    do not depend on it (docs/API.md, "Threads").
                                    Since 0.2.0. */
} confsmoe_ctx_params;

/* Defaults into the first struct_size bytes of p (see "Options structs are sized" above). */
CONFSMOE_API void confsmoe_ctx_params_init_sized(confsmoe_ctx_params *p, size_t struct_size);
#define confsmoe_ctx_params_init(p) confsmoe_ctx_params_init_sized((p), sizeof(confsmoe_ctx_params))
CONFSMOE_API size_t confsmoe_sizeof_ctx_params(void);

/* p == NULL means defaults. */
CONFSMOE_API confsmoe_status confsmoe_ctx_create(const confsmoe_ctx_params *p, confsmoe_ctx **out);
/* Drops the host's handle. Objects created from ctx may be destroyed before or after it
 * and stay usable; the ctx is freed with the last of them. */
CONFSMOE_API void confsmoe_ctx_destroy(confsmoe_ctx *ctx);
/* Detail of the last error on this ctx ("" if none). Valid until the next call on ctx. */
CONFSMOE_API const char *confsmoe_ctx_last_error(const confsmoe_ctx *ctx);
/* Restart the RNG stream: the same seed gives the same weights, noise and draws. */
CONFSMOE_API confsmoe_status confsmoe_ctx_set_seed(confsmoe_ctx *ctx, uint64_t seed);
/* Gives the freed blocks that the default allocator keeps for reuse back to the C library,
 * and forgets the ctx's peak, so that from then on it keeps only what later calls need
 * (docs/API.md, "Memory"). Blocks in use (tensors, handles, a model's step arena) stay.
 * Returns the bytes given back: 0 with a host allocator (it keeps nothing), or for NULL.
 * Since 0.2.0. */
CONFSMOE_API size_t confsmoe_ctx_trim(confsmoe_ctx *ctx);

/* ---------------------------------------------------------------- tensors */

typedef struct confsmoe_tensor confsmoe_tensor;

typedef int32_t confsmoe_dtype;
#define CONFSMOE_F32 0
#define CONFSMOE_I32 1
#define CONFSMOE_U8  2

#define CONFSMOE_MAX_DIMS 4

/* A zeroed, 64-byte aligned tensor owned by the library. 1 <= ndim <= 4, dims >= 0. */
CONFSMOE_API confsmoe_status confsmoe_tensor_create(confsmoe_ctx *ctx, confsmoe_dtype dtype, int32_t ndim,
                                                    const int64_t *dims, confsmoe_tensor **out);
/* A tensor over caller memory, without copying. `data` must hold the whole
 * tensor, be aligned to the element size, and stay valid while the tensor is
 * used (destroy does not touch it). It may be NULL only when the tensor has no
 * elements. */
CONFSMOE_API confsmoe_status confsmoe_tensor_wrap(confsmoe_ctx *ctx, confsmoe_dtype dtype, int32_t ndim,
                                                  const int64_t *dims, void *data, confsmoe_tensor **out);
CONFSMOE_API void confsmoe_tensor_destroy(confsmoe_tensor *t);

/* Accessors return -1 (or NULL) for a NULL tensor or an axis out of range. */
CONFSMOE_API confsmoe_dtype confsmoe_tensor_dtype(const confsmoe_tensor *t);
CONFSMOE_API int32_t confsmoe_tensor_ndim(const confsmoe_tensor *t);
CONFSMOE_API int64_t confsmoe_tensor_dim(const confsmoe_tensor *t, int32_t axis);
CONFSMOE_API int64_t confsmoe_tensor_numel(const confsmoe_tensor *t);
CONFSMOE_API size_t confsmoe_tensor_nbytes(const confsmoe_tensor *t);
CONFSMOE_API void *confsmoe_tensor_data(confsmoe_tensor *t);

/* Copy exactly nbytes == confsmoe_tensor_nbytes(t) in or out. */
CONFSMOE_API confsmoe_status confsmoe_tensor_copy_in(confsmoe_tensor *t, const void *src, size_t nbytes);
CONFSMOE_API confsmoe_status confsmoe_tensor_copy_out(const confsmoe_tensor *t, void *dst, size_t nbytes);

/* ---------------------------------------------------------------- saved state */

/* What ONE training-mode forward call saved for its backward. Backward may be
 * run once per saved handle; the host destroys the handle afterwards (or
 * instead, to discard the call). It may be destroyed before or after its layer;
 * once its layer is destroyed, destroy is the only call it accepts. */
typedef struct confsmoe_saved confsmoe_saved;

CONFSMOE_API void confsmoe_saved_destroy(confsmoe_saved *s);

/* ---------------------------------------------------------------- experts */

/* The FFN of one expert: y = W2 GELU(W1 x + b1) + b2, with W1 [h, d], b1 [h],
 * W2 [d, h], b2 [d] (the layout of PyTorch's nn.Linear) and the exact erf GELU.
 * Weights and biases are drawn like nn.Linear, U(-1/sqrt(fan_in), +1/sqrt(fan_in)),
 * from the ctx RNG. */
typedef struct confsmoe_expert confsmoe_expert;

CONFSMOE_API confsmoe_status confsmoe_expert_create(confsmoe_ctx *ctx, int64_t d, int64_t h, confsmoe_expert **out);
CONFSMOE_API void confsmoe_expert_destroy(confsmoe_expert *e);
CONFSMOE_API int64_t confsmoe_expert_d(const confsmoe_expert *e);
CONFSMOE_API int64_t confsmoe_expert_h(const confsmoe_expert *e);

/* x [N, d] f32 -> y [N, d] f32, N >= 0. With saved != NULL (training mode),
 * *saved receives a new handle for this call's backward. */
CONFSMOE_API confsmoe_status confsmoe_expert_forward(confsmoe_expert *e, const confsmoe_tensor *x,
                                                     confsmoe_tensor *y, confsmoe_saved **saved);
/* dy [N, d] -> accumulates dW1, db1, dW2, db2 and writes dx [N, d] (dx may be NULL). */
CONFSMOE_API confsmoe_status confsmoe_expert_backward(confsmoe_expert *e, confsmoe_saved *saved,
                                                      const confsmoe_tensor *dy, confsmoe_tensor *dx);

/* Uniform parameter view: params 0..n-1 named "w1", "b1", "w2", "b2".
 * The returned tensors belong to the expert; write to them freely. */
CONFSMOE_API int32_t confsmoe_expert_n_params(const confsmoe_expert *e);
CONFSMOE_API const char *confsmoe_expert_param_name(const confsmoe_expert *e, int32_t i);
CONFSMOE_API confsmoe_tensor *confsmoe_expert_param(confsmoe_expert *e, int32_t i);
CONFSMOE_API confsmoe_tensor *confsmoe_expert_grad(confsmoe_expert *e, int32_t i);
CONFSMOE_API void confsmoe_expert_zero_grad(confsmoe_expert *e);

/* ---------------------------------------------------------------- gates */

/* One sparse MoE call over N tokens of width d: a router picks the top-k of E
 * experts per token, the experts run on their tokens (one batched call per
 * expert), and the k outputs are combined, either by a softmax over the kept
 * router logits (the classic SMoE) or by each expert's confidence network
 * (Conf-SMoE). The gate owns its router, ConfNets and target classifier, and
 * borrows the experts: forward and backward run them, so once one of them is
 * destroyed the gate may only be destroyed. Destroying the gate does not touch
 * them: gate and experts may be destroyed in any order. */
typedef struct confsmoe_gate confsmoe_gate;

/* Router logits u_e for a token z and router column w_e. */
#define CONFSMOE_ROUTER_SOFTMAX   0 /* u_e = z . w_e */
#define CONFSMOE_ROUTER_GAUSSIAN  1 /* u_e = -||z - w_e||^2 */
#define CONFSMOE_ROUTER_LAPLACIAN 2 /* u_e = -||z - w_e|| */

/* How the k expert outputs y_j are combined. */
#define CONFSMOE_COMBINE_ROUTER_SOFTMAX 0 /* sum_j softmax(u_topk)_j y_j */
#define CONFSMOE_COMBINE_CONFIDENCE     1 /* sum_j c_j y_j, c_j = sigmoid(v . LN(y_j) + beta), unnormalised */

/* Confidence granularity (CONFIDENCE only). */
#define CONFSMOE_CONFIDENCE_TOKEN  0 /* c per slot */
#define CONFSMOE_CONFIDENCE_EXPERT 1 /* c of an expert = mean over its slots in this call */

/* Target of the confidence loss (CONFIDENCE only). */
#define CONFSMOE_TARGET_SINGLE_LABEL 0 /* p = softmax(P y)[label]; labels i32 [N] */
#define CONFSMOE_TARGET_MULTI_LABEL  1 /* p = mean_l of sigmoid(P y)_l or 1 - it; labels u8 [N, C] */

/* Where the router's gradient comes from. Under COMBINE_ROUTER_SOFTMAX the
 * router is always trained by the output; these apply to CONFIDENCE. */
#define CONFSMOE_ROUTER_GRAD_FROZEN    0 /* none: the router keeps its init (the reference); a load
                                            loss is still reported in the loss but has no gradient */
#define CONFSMOE_ROUTER_GRAD_TRAINABLE 1 /* from the load loss, if one is set */
#define CONFSMOE_ROUTER_GRAD_SCORE     2 /* also from a score term: y = sum_j c_j y_j g_j / stopgrad(g_j),
                                            g = softmax(u_topk); the output is unchanged, and the router
                                            learns to raise the logits of helpful experts */

/* Load-balancing losses, the baselines the paper argues against. */
#define CONFSMOE_LOAD_LOSS_NONE    0
#define CONFSMOE_LOAD_LOSS_CV      1 /* Shazeer: CV^2(importance) + CV^2(load); CV^2 uses the unbiased
                                        variance and is 0 for E = 1. load is the slot count, or in noisy
                                        training with k < E Shazeer's smooth estimate sum_t Phi(...) */
#define CONFSMOE_LOAD_LOSS_ENTROPY 2 /* 1 / H(mean over tokens of the scattered gate weights) */

typedef struct confsmoe_gate_params {
    size_t struct_size;       /* the caller's sizeof(confsmoe_gate_params), set by _init() */
    int64_t d;                /* token width; every expert's d (required, no default) */
    int32_t k;                /* experts per token, 1 <= k <= E (default 2) */
    /* Settings from a CONFSMOE_* list are int32_t, not enum types, in every public struct: an
     * enum's size is the compiler's choice, and the ABI baseline (abi/) and the bindings
     * (ctypes, C++) fix these fields at 4 bytes. */
    int32_t router;           /* CONFSMOE_ROUTER_* (default SOFTMAX) */
    int32_t noisy;            /* 1: noisy top-k in training, u += eps (softplus(z W_noise) + 0.01),
                                 eps ~ N(0, 1) from the ctx RNG (default 0) */
    int32_t combine;          /* CONFSMOE_COMBINE_* (default CONFIDENCE) */
    int32_t confidence;       /* CONFSMOE_CONFIDENCE_* (default TOKEN) */
    int32_t n_classes;        /* C of the target classifier P: R^d -> R^C (>= 1 for CONFIDENCE) */
    int32_t target;           /* CONFSMOE_TARGET_* (default SINGLE_LABEL) */
    int32_t detach_target;    /* 1: no gradient through the target p (default 0) */
    int32_t router_grad;      /* CONFSMOE_ROUTER_GRAD_* (default FROZEN) */
    int32_t load_loss;        /* CONFSMOE_LOAD_LOSS_* (default NONE) */
    float load_loss_weight;   /* weight of the load loss in the returned loss (default 0.01) */
    float conf_loss_weight;   /* weight of the confidence loss (default 1) */
    int32_t compat;           /* 1: reproduce the reference dispatch defect: slot j of token t runs
                                 on token (t k + j) mod N (default 0: on token t) */
} confsmoe_gate_params;

/* Defaults into the first struct_size bytes of p (see "Options structs are sized" above). */
CONFSMOE_API void confsmoe_gate_params_init_sized(confsmoe_gate_params *p, size_t struct_size);
#define confsmoe_gate_params_init(p) confsmoe_gate_params_init_sized((p), sizeof(confsmoe_gate_params))
CONFSMOE_API size_t confsmoe_sizeof_gate_params(void);

/* experts[0..n_experts-1] are borrowed (see above) and must all have width p->d. */
CONFSMOE_API confsmoe_status confsmoe_gate_create(confsmoe_ctx *ctx, const confsmoe_gate_params *p,
                                                  confsmoe_expert *const *experts, int32_t n_experts,
                                                  confsmoe_gate **out);
CONFSMOE_API void confsmoe_gate_destroy(confsmoe_gate *g);
CONFSMOE_API int32_t confsmoe_gate_n_experts(const confsmoe_gate *g);
CONFSMOE_API int32_t confsmoe_gate_k(const confsmoe_gate *g);

/* One MoE call. With saved != NULL it runs in training mode (noise on) and
 * returns a handle for this call's backward.
 *   x       in  f32 [N, d]
 *   labels  in  i32 [N] or u8 [N, C] (see CONFSMOE_TARGET_*); needed in training
 *               under CONFIDENCE, otherwise ignored and may be NULL
 *   present in  u8 [N], 1 = the token's slots count in the confidence loss; NULL = all
 *   y       out f32 [N, d]
 *   topk    out i32 [N, k] expert indices, best first, ties to the lower index; or NULL
 *   slots   out f32 [N, k, d], each slot's expert output before weighting; or NULL
 *   loss    out conf_loss_weight L_conf + load_loss_weight L_load (0 at inference); or NULL.
 *               L_conf = mean of (c - p)^2 over the slots of present tokens (0 if there are none;
 *               compat: over all N k slots, absent ones adding 0). A slot's label and present
 *               flag are its token's, also under compat. */
CONFSMOE_API confsmoe_status confsmoe_gate_forward(confsmoe_gate *g, const confsmoe_tensor *x,
                                                   const confsmoe_tensor *labels, const confsmoe_tensor *present,
                                                   confsmoe_tensor *y, confsmoe_tensor *topk,
                                                   confsmoe_tensor *slots, float *loss, confsmoe_saved **saved);
/* dy [N, d]; dslots [N, k, d] or NULL (gradient of the forward's slots output);
 * dloss the gradient of the returned loss (1 when it is added to the total).
 * Accumulates into the gate's and the experts' parameter gradients, and writes
 * dx [N, d] when dx is not NULL. */
CONFSMOE_API confsmoe_status confsmoe_gate_backward(confsmoe_gate *g, confsmoe_saved *saved,
                                                    const confsmoe_tensor *dy, const confsmoe_tensor *dslots,
                                                    float dloss, confsmoe_tensor *dx);

/* Parameters owned by the gate (not the experts'): "router.w" [d, E],
 * "noise.w" [d, E] when noisy, and under CONFIDENCE, for each expert i,
 * "conf.<i>.ln.weight" [d], "conf.<i>.ln.bias" [d], "conf.<i>.w" [d],
 * "conf.<i>.b" [1], then "target.w" [C, d] and "target.b" [C]. */
CONFSMOE_API int32_t confsmoe_gate_n_params(const confsmoe_gate *g);
CONFSMOE_API const char *confsmoe_gate_param_name(const confsmoe_gate *g, int32_t i);
CONFSMOE_API confsmoe_tensor *confsmoe_gate_param(confsmoe_gate *g, int32_t i);
CONFSMOE_API confsmoe_tensor *confsmoe_gate_grad(confsmoe_gate *g, int32_t i);
CONFSMOE_API void confsmoe_gate_zero_grad(confsmoe_gate *g);

/* Expert utilisation, over the last forward call or accumulated over all calls
 * (training and inference) since create or reset. Load counts slots (a token sends k of them). */
#define CONFSMOE_STATS_LAST_CALL 0
#define CONFSMOE_STATS_TOTAL     1

typedef struct confsmoe_gate_stats {
    size_t struct_size;        /* the caller's sizeof(confsmoe_gate_stats): set it before the call;
                                  the library writes at most this many bytes */
    int64_t tokens;            /* tokens routed */
    double load_entropy;       /* H(load) / log E: 1 is perfectly balanced, 0 is one expert (1 if E = 1) */
    double load_cv2;           /* CV^2 of the slots per expert (unbiased variance, as the Shazeer loss) */
    double max_load_fraction;  /* largest share of the slots on one expert */
    double conf_loss;          /* confidence loss of the training calls (their mean for TOTAL; 0 if none) */
} confsmoe_gate_stats;

CONFSMOE_API size_t confsmoe_sizeof_gate_stats(void);
/* load [n] receives slots per expert, mean_confidence [n] the mean c of each
 * expert's slots (NaN for an expert with none, or outside CONFIDENCE); either may
 * be NULL, otherwise n must equal E. */
CONFSMOE_API confsmoe_status confsmoe_gate_stats_get(confsmoe_gate *g, int32_t scope, confsmoe_gate_stats *out,
                                                     int64_t *load, double *mean_confidence, int32_t n);
CONFSMOE_API void confsmoe_gate_stats_reset(confsmoe_gate *g);

/* ---------------------------------------------------------------- imputer */

/* Two-stage imputation of missing modalities (docs/MODEL.md, section 5).
 * Stage 1 fills a missing sample's raw input with the mean of K rows drawn from
 * a pool of training inputs in which the modality is present. Stage 2 runs after
 * the MoE layer: each missing (sample b, modality m) token attends, per expert
 * slot j, over the expert outputs of the modalities present for b, keeps the top T
 * weights, and adds the result before a LayerNorm:
 *   q_s     = W_q mean_j Y_m[b,s,j] + b_q
 *   kv_tj   = W_k Y_m'[b,t,j] + b_k      (t over the tokens of present m' != m)
 *   a[s,t,j]= softmax_t(q_s . kv_tj / sqrt(d)), top T per (s, j), others 0
 *   Ihat[b,s] = sum_j sum_t a[s,t,j] v_tj                  (v = kv, or W_v Y + b_v)
 *   H_m[b,s] <- LN(H_m[b,s] + Ihat[b,s])     (writeback CONFSMOE_WRITEBACK_LN_IMP)
 *   H_m[b,s] <- Ihat[b,s]                    (writeback CONFSMOE_WRITEBACK_RESIDUAL: the
 *                                             host adds its residual and normalises)
 * The top-T indices are constants in backward. Availability masks are u8 [B, M]
 * with 1 = present; no other layout is accepted. */
typedef struct confsmoe_imputer confsmoe_imputer;

/* The post-imputation write-back of a missing (sample, modality) (docs/MODEL.md, sections 5
 * and 6). Since 0.3.0. */
#define CONFSMOE_WRITEBACK_LN_IMP   0 /* the imputer's own LayerNorm over h + Ihat */
#define CONFSMOE_WRITEBACK_RESIDUAL 1 /* Ihat alone; a model puts LN3(H_pre + Ihat) there */

typedef struct confsmoe_imputer_params {
    size_t struct_size;       /* the caller's sizeof(confsmoe_imputer_params), set by _init() */
    int64_t d;                /* token width (required) */
    int32_t n_modalities;     /* M >= 1 (required) */
    int64_t tokens;           /* S, tokens per modality (default 1) */
    int32_t k;                /* expert slots per token, the gate's k (default 2) */
    int32_t top_t;            /* T; 0 (default) = max(1, floor((M - 1) S / 4)), per missing m with
                                 modality_tokens: max(1, floor(sum_{m' != m} S_m' / 4)) */
    int32_t renormalize;      /* 1: kept weights renormalised to sum 1 (default 0) */
    int32_t separate_value;   /* 1: values from their own W_v, b_v (default 0: v = kv) */
    int32_t compat;           /* 1: reference defects: the query is zero unless sample 0 of
                                 the batch misses the modality, and LN runs twice (default 0) */
    const int64_t *modality_tokens; /* S_m of each modality, M entries, each >= 1 (read at
                                 create). NULL (default): `tokens` for every modality; when
                                 given, `tokens` is ignored. The default T of a missing m is then
                                 max(1, floor(sum_{m' != m} S_m' / 4)). Since 0.3.0 */
    int32_t writeback;        /* what a missing row of the output becomes: CONFSMOE_WRITEBACK_*
                                 (default LN_IMP). With RESIDUAL the imputer has no LayerNorm
                                 and no "ln.*" parameters, and compat changes only the query.
                                 Since 0.3.0 */
} confsmoe_imputer_params;

/* Defaults into the first struct_size bytes of p (see "Options structs are sized" above). */
CONFSMOE_API void confsmoe_imputer_params_init_sized(confsmoe_imputer_params *p, size_t struct_size);
#define confsmoe_imputer_params_init(p) confsmoe_imputer_params_init_sized((p), sizeof(confsmoe_imputer_params))
CONFSMOE_API size_t confsmoe_sizeof_imputer_params(void);
CONFSMOE_API confsmoe_status confsmoe_imputer_create(confsmoe_ctx *ctx, const confsmoe_imputer_params *p,
                                                     confsmoe_imputer **out);
CONFSMOE_API void confsmoe_imputer_destroy(confsmoe_imputer *imp);

/* Stage 1 for modality m: for each b with avail[b, m] == 0, x[b] becomes the mean of
 * `draws` distinct pool rows drawn uniformly from the ctx RNG (all rows if the pool
 * has fewer). x is [B, S, F] or [B, F]; pool has x's trailing shape and >= 1 row. */
CONFSMOE_API confsmoe_status confsmoe_imputer_fill(confsmoe_imputer *imp, int32_t m, const confsmoe_tensor *pool,
                                                   int32_t draws, const confsmoe_tensor *avail,
                                                   confsmoe_tensor *x);

/* Stage 2. With L = sum_m S_m and o_m = sum_{m' < m} S_m' (L = M S and o_m = m S when every
 * modality has S tokens): h [B, L, d] (the layer output, tokens of modality m at o_m ..
 * o_m + S_m - 1), slots [B L, k, d] (the gate's slots output of each modality's call, one
 * after the other: modality-major, the row of token s of sample b of modality m is
 * B o_m + b S_m + s), or equivalently [M, B S, k, d] when every S_m is S; avail u8 [B, M].
 * out [B, L, d] is h with the missing rows imputed (LN(h + Ihat), or Ihat with writeback
 * RESIDUAL, when those rows of out do not depend on h); it may be h itself.
 * saved != NULL keeps what backward needs. */
CONFSMOE_API confsmoe_status confsmoe_imputer_forward(confsmoe_imputer *imp, const confsmoe_tensor *h,
                                                      const confsmoe_tensor *slots, const confsmoe_tensor *avail,
                                                      confsmoe_tensor *out, confsmoe_saved **saved);
/* dout [B, L, d] -> writes dh [B, L, d] and adds into dslots (slots' shape: [B L, k, d],
 * or [M, B S, k, d] when every S_m is S) (either may be NULL); accumulates the imputer's
 * parameter gradients. */
CONFSMOE_API confsmoe_status confsmoe_imputer_backward(confsmoe_imputer *imp, confsmoe_saved *saved,
                                                       const confsmoe_tensor *dout, confsmoe_tensor *dh,
                                                       confsmoe_tensor *dslots);

/* Parameters: "q.w" [d, d], "q.b" [d], "kv.w" [d, d], "kv.b" [d], then "v.w", "v.b"
 * with separate_value, then "ln.weight" [d], "ln.bias" [d] (not with writeback RESIDUAL). */
CONFSMOE_API int32_t confsmoe_imputer_n_params(const confsmoe_imputer *imp);
CONFSMOE_API const char *confsmoe_imputer_param_name(const confsmoe_imputer *imp, int32_t i);
CONFSMOE_API confsmoe_tensor *confsmoe_imputer_param(confsmoe_imputer *imp, int32_t i);
CONFSMOE_API confsmoe_tensor *confsmoe_imputer_grad(confsmoe_imputer *imp, int32_t i);
CONFSMOE_API void confsmoe_imputer_zero_grad(confsmoe_imputer *imp);

/* ---------------------------------------------------------------- optimizer */

/* Adam or SGD over (param, grad) pairs registered by the host. */
typedef struct confsmoe_optim confsmoe_optim;

typedef int32_t confsmoe_optim_kind;
#define CONFSMOE_OPTIM_ADAM 0
#define CONFSMOE_OPTIM_SGD  1

typedef struct confsmoe_optim_params {
    size_t struct_size;        /* the caller's sizeof(confsmoe_optim_params), set by _init() */
    confsmoe_optim_kind kind;  /* default CONFSMOE_OPTIM_ADAM */
    float lr;                  /* default 3e-4 */
    float beta1, beta2, eps;   /* Adam, default 0.9, 0.999, 1e-8 */
    float momentum;            /* SGD, default 0 */
    float weight_decay;        /* L2 added to the gradient, default 0 */
} confsmoe_optim_params;

/* Defaults into the first struct_size bytes of p (see "Options structs are sized" above). */
CONFSMOE_API void confsmoe_optim_params_init_sized(confsmoe_optim_params *p, size_t struct_size);
#define confsmoe_optim_params_init(p) confsmoe_optim_params_init_sized((p), sizeof(confsmoe_optim_params))
CONFSMOE_API size_t confsmoe_sizeof_optim_params(void);

/* p == NULL means defaults. */
CONFSMOE_API confsmoe_status confsmoe_optim_create(confsmoe_ctx *ctx, const confsmoe_optim_params *p,
                                                   confsmoe_optim **out);
CONFSMOE_API void confsmoe_optim_destroy(confsmoe_optim *o);
/* Register a parameter and its gradient (f32, same shape). Both are borrowed:
 * confsmoe_optim_step and checkpoints read them, so once one is destroyed the
 * optimizer may only be destroyed (which does not touch them). */
CONFSMOE_API confsmoe_status confsmoe_optim_add(confsmoe_optim *o, confsmoe_tensor *param, const confsmoe_tensor *grad);
/* One update of every registered parameter from its current gradient. */
CONFSMOE_API confsmoe_status confsmoe_optim_step(confsmoe_optim *o);
CONFSMOE_API confsmoe_status confsmoe_optim_set_lr(confsmoe_optim *o, float lr);

/* ---------------------------------------------------------------- model */

/* The full Conf-SMoE classifier of docs/MODEL.md, section 6, built from the public
 * expert, gate and imputer handles:
 *   tokens_m = Linear(F_m, d)(x_m)            (x_m stage-1 imputed where missing)
 *   X = concat_m tokens_m + P_pos;  H = X + Dropout(MHA(LN1(X)))
 *   per modality: H_m <- LN3(H_m + MoE(LN2(H_m)))      (one gate, shared experts)
 *   stage-2 imputation of missing (b, m) (writeback: LN_imp(that + Ihat), or LN3(H_m + Ihat))
 *   r = Linear(M d, d)(concat_m mean_s H_m)
 *   logits = Linear(d, C)(LN(r));  loss = CE (or BCE) + L_conf (+ load loss)
 * Inputs are M tensors x_m [B, S_m, F_m] (or [B, F_m] when S_m = 1; S_m = tokens unless
 * modality_tokens is given), the mask avail u8 [B, M] (1 = present) and labels i32 [B]
 * (or u8 [B, C] multi-label). */
typedef struct confsmoe_model confsmoe_model;

/* The gate of the MoE layer: the paper's confidence gate, or a router-softmax baseline. */
#define CONFSMOE_MODEL_GATE_CONFIDENCE 0
#define CONFSMOE_MODEL_GATE_SOFTMAX    1
#define CONFSMOE_MODEL_GATE_GAUSSIAN   2
#define CONFSMOE_MODEL_GATE_LAPLACIAN  3

/* How missing modalities are filled. */
#define CONFSMOE_IMPUTE_TWO_STAGE 0 /* stage 1 pool mean of K draws + stage 2 sparse attention */
#define CONFSMOE_IMPUTE_MEAN      1 /* the mean of the whole pool, no stage 2 */

typedef struct confsmoe_model_params {
    size_t struct_size;        /* the caller's sizeof(confsmoe_model_params), set by _init() */
    int32_t n_modalities;      /* M >= 1 (required) */
    const int64_t *features;   /* F_m of each modality, M entries (required; read at create) */
    int64_t tokens;            /* S per modality (default 1) */
    int64_t d;                 /* default 128 */
    int32_t heads;             /* attention heads, must divide d (default 4) */
    int32_t n_experts;         /* default 8 */
    int32_t k;                 /* default 2 */
    int64_t expert_hidden;     /* h of each expert; 0 (default) = d */
    int32_t n_classes;         /* C >= 1 (required) */
    int32_t multilabel;        /* 1: BCE-with-logits and u8 [B, C] labels (default 0: CE) */
    int32_t gate;              /* CONFSMOE_MODEL_GATE_* (default CONFIDENCE) */
    int32_t load_loss;         /* CONFSMOE_LOAD_LOSS_* for the baselines (default NONE) */
    float load_loss_weight;    /* default 0.01 */
    float conf_loss_weight;    /* default 1 */
    int32_t confidence;        /* CONFSMOE_CONFIDENCE_* (default TOKEN) */
    int32_t router_grad;       /* CONFSMOE_ROUTER_GRAD_* for the confidence gate (default FROZEN) */
    int32_t detach_target;     /* default 0 */
    int32_t noisy;             /* noisy top-k in training (default 0) */
    int32_t imputation;        /* CONFSMOE_IMPUTE_* (default TWO_STAGE) */
    int32_t draws;             /* K of stage 1 (default 10) */
    int32_t top_t;             /* T of stage 2; 0 (default) = max(1, floor((M - 1) S / 4)), or per
                                  missing m, max(1, floor(sum_{m' != m} S_m' / 4)) */
    int32_t renormalize;       /* stage 2 option (default 0) */
    int32_t separate_value;    /* stage 2 option (default 0) */
    float dropout;             /* on attention weights and on the attention output (default 0.1) */
    int32_t compat;            /* 1: every reference defect of docs/MODEL.md, section 7
                                  (H = A + Dropout(A), the gate's dispatch and loss denominator,
                                  loss weights 1/M per modality, the imputer's) (default 0) */
    int32_t predict_pool_mean; /* 1: predict fills stage 1 with the mean of the whole pool (the
                                  expectation of the K-draw mean), so that inference is
                                  deterministic and draws nothing from the ctx RNG; training
                                  still draws. 0 (default, docs/MODEL.md, section 5.1): fresh
                                  draws in predict too */
    float modality_dropout;    /* training only (ModDrop): each present modality of a sample is
                                  also treated as missing with this probability, 0 <= p <= 1;
                                  a sample whose every modality was dropped keeps one of its
                                  present ones, chosen uniformly (docs/MODEL.md, section 6).
                                  Default 0 (off, as in the paper) */
    const int64_t *modality_tokens; /* S_m of each modality, M entries, each >= 1 (read at
                                  create). NULL (default): `tokens` for every modality; when
                                  given, `tokens` is ignored. Inputs and pools of modality m
                                  are then [B, S_m, F_m] (or [B, F_m] when S_m = 1), the
                                  attention runs over L = sum_m S_m tokens, and stage 2's
                                  default T of a missing m is max(1, floor(sum_{m' != m} S_m' / 4))
                                  (docs/MODEL.md, section 6). Since 0.3.0 */
    int32_t writeback;         /* CONFSMOE_WRITEBACK_* for a missing (sample, modality) under
                                  two-stage imputation (docs/MODEL.md, section 6): LN_IMP
                                  (0): H_m <- LN_imp(LN3(H_m + F) + Ihat), the MoE output of the
                                  stage-1 token enters and two LayerNorms follow; RESIDUAL:
                                  H_m <- LN3(H_m + Ihat), the imputation in place of the expert
                                  mixture, and the imputer has no "imputer.ln.*". No effect
                                  with mean imputation. Default LN_IMP. Since 0.3.0 */
} confsmoe_model_params;

/* Defaults into the first struct_size bytes of p (see "Options structs are sized" above). */
CONFSMOE_API void confsmoe_model_params_init_sized(confsmoe_model_params *p, size_t struct_size);
#define confsmoe_model_params_init(p) confsmoe_model_params_init_sized((p), sizeof(confsmoe_model_params))
CONFSMOE_API size_t confsmoe_sizeof_model_params(void);
CONFSMOE_API confsmoe_status confsmoe_model_create(confsmoe_ctx *ctx, const confsmoe_model_params *p,
                                                  confsmoe_model **out);
CONFSMOE_API void confsmoe_model_destroy(confsmoe_model *model);

/* The stage-1 pool of modality m: training inputs in which m is present, [P, S_m, F_m]
 * or [P, F_m] when S_m = 1, P >= 1. Copied. Needed before a batch that misses m. */
CONFSMOE_API confsmoe_status confsmoe_model_set_pool(confsmoe_model *model, int32_t m, const confsmoe_tensor *pool);

/* One training step: forward (dropout, noise, modality dropout and fresh stage-1 draws on)
 * and backward; parameter gradients accumulate. logits [B, C] may be NULL; loss
 * receives the total and task_loss the CE / BCE part (either may be NULL). */
CONFSMOE_API confsmoe_status confsmoe_model_step(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                                 const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                                 confsmoe_tensor *logits, float *loss, float *task_loss);
/* Inference: logits [B, C]; no labels, no dropout or noise; fresh stage-1 draws, or the
 * pool mean with predict_pool_mean. */
CONFSMOE_API confsmoe_status confsmoe_model_predict(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                                    const confsmoe_tensor *avail, confsmoe_tensor *logits);

/* Every trainable parameter of the model, its gate, experts and imputer, with
 * dotted names ("enc.0.w", "gate.router.w", "expert.3.w1", "imputer.q.w", ...). */
CONFSMOE_API int32_t confsmoe_model_n_params(const confsmoe_model *model);
CONFSMOE_API const char *confsmoe_model_param_name(const confsmoe_model *model, int32_t i);
CONFSMOE_API confsmoe_tensor *confsmoe_model_param(confsmoe_model *model, int32_t i);
CONFSMOE_API confsmoe_tensor *confsmoe_model_grad(confsmoe_model *model, int32_t i);
CONFSMOE_API void confsmoe_model_zero_grad(confsmoe_model *model);
/* The model's gate (for its utilisation statistics); owned by the model. */
CONFSMOE_API confsmoe_gate *confsmoe_model_gate(confsmoe_model *model);

/* ---------------------------------------------------------------- checkpoints */

/* Saves every model parameter, and the optimizer's state when o is not NULL, as a
 * safetensors file (8-byte header length, JSON header, raw little-endian data).
 * Parameter tensors keep their model names; optimizer moments are named
 * "optim.<name>.m" / ".v" and step counts "optim.<name>.step" (I64 [1]). The file
 * is written to a temporary name, synced, then renamed over path. */
CONFSMOE_API confsmoe_status confsmoe_checkpoint_save(confsmoe_model *model, const confsmoe_optim *o,
                                                      const char *path);
/* Loads what save wrote (or any safetensors file with the same names, shapes and
 * F32 dtype). The whole file is read and checked before anything changes: a
 * truncated, corrupted or mismatched file returns CONFSMOE_E_FORMAT (a missing file
 * CONFSMOE_E_IO) and leaves the model and optimizer as they were. Every model
 * parameter must be present; a tensor that is neither a parameter of this model nor
 * "optim.*" is rejected (a checkpoint of another configuration). With o == NULL the
 * optimizer tensors are ignored; otherwise every registered model parameter needs
 * its state, and the file's optimizer kind must match. Big-endian hosts get
 * CONFSMOE_E_UNSUPPORTED. */
CONFSMOE_API confsmoe_status confsmoe_checkpoint_load(confsmoe_model *model, confsmoe_optim *o, const char *path);

/* ---------------------------------------------------------------- experimental */

#ifdef CONFSMOE_EXPERIMENTAL
/* Unstable: defined only when the includer defines CONFSMOE_EXPERIMENTAL. These
 * declarations may change or go in any release, and their symbols sit in their own
 * version node (CONFSMOE_EXPERIMENTAL), outside the stable ABI. They are the hooks that
 * libconfsmoe_mpi (confsmoe_mpi.h, docs/DISTRIBUTED.md) is built on, and they carry no
 * communication of their own. */

/* Data parallelism. One training step on a shard of a global batch: the shard's samples are
 * first .. first + B - 1 of a batch of B_global samples whose availability mask is
 * global_avail u8 [B_global, M]; inputs, avail and labels are the shard's rows (avail must
 * equal rows first .. first + B - 1 of global_avail; B = 0 is allowed). Every random draw of
 * a sample (modality dropout, stage-1 draws, attention and residual dropout, gate noise)
 * depends on its index in the global batch, the ctx stream moves as for the global batch,
 * and the losses are normalised over the global batch: summed over the shards, the returned
 * losses and the accumulated gradients are those of confsmoe_model_step on the global batch
 * (to float rounding), whatever the split. Exceptions, which are per shard, as in
 * DeepSpeed-MoE and Tutel: the load-balancing losses and CONFIDENCE_EXPERT's per-call
 * expert means. A compat model gives CONFSMOE_E_UNSUPPORTED for a part of its batch (its
 * defects span the batch). loss and task_loss receive this shard's share of the global loss. */
CONFSMOE_API confsmoe_status confsmoe_model_step_shard(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                                       const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                                       const confsmoe_tensor *global_avail, int64_t first,
                                                       confsmoe_tensor *logits, float *loss, float *task_loss);

/* The next forward calls of g see tokens first .. first + N - 1 of a global batch of `total`
 * tokens (N = the rows of x): the noise of a token is that of its global index, and the ctx
 * stream moves as for the global batch. total = 0 (the default) ends it. Under compat a call
 * of fewer than `total` tokens gives CONFSMOE_E_UNSUPPORTED. */
CONFSMOE_API confsmoe_status confsmoe_gate_set_shard(confsmoe_gate *g, int64_t first, int64_t total);

/* Expert parallelism: a gate whose experts run elsewhere. One forward call hands the
 * exchange every slot's input row at once, sorted by expert: rows offset[e] ..
 * offset[e + 1] - 1 of x [offset[E], d] go to expert e, in the order of their slots. The
 * exchange writes the experts' outputs in the same layout into y and, when training is
 * nonzero, may keep per-call state in *call. backward gets that state and dy in the same
 * layout, accumulates the experts' gradients, and writes their input gradients into dx.
 * release frees the state when the gate's saved handle is destroyed. On failure a callback
 * returns a negative status and may write a message into error (error_cap bytes); a failed
 * forward keeps no state. A gate backward whose exchange fails may have accumulated some of
 * the gate's own gradients. The gate owns the router, the ConfNets and the target
 * classifier; the exchange owns the experts. */
typedef struct confsmoe_gate_exchange {
    confsmoe_status (*forward)(void *user, const int64_t *offset, const float *x, float *y, int32_t training,
                               void **call, char *error, size_t error_cap);
    confsmoe_status (*backward)(void *user, void *call, const int64_t *offset, const float *dy, float *dx,
                                char *error, size_t error_cap);
    void (*release)(void *user, void *call);
    void *user;
} confsmoe_gate_exchange;

/* A gate of n_experts experts of width p->d behind `exchange` (copied). user must stay valid
 * while the gate is used, and for release until the gate's last saved handle is destroyed,
 * which may be after the gate. Its parameters are confsmoe_gate_create's, drawn in the same
 * order. */
CONFSMOE_API confsmoe_status confsmoe_gate_create_exchange(confsmoe_ctx *ctx, const confsmoe_gate_params *p,
                                                           int32_t n_experts, const confsmoe_gate_exchange *exchange,
                                                           confsmoe_gate **out);

/* Host memory for a tensor, e.g. a layer's parameter or gradient (confsmoe_X_param / _grad):
 * from then on t reads and writes `data`, as a wrapped tensor does, and its contents are used as
 * they are (nothing is copied). Memory the library had allocated for t is freed, so views of it
 * taken before must not be used. data must hold confsmoe_tensor_nbytes(t) bytes, be aligned to
 * the element size, and stay valid while t is used; it may be NULL only when t has no elements.
 * Layers read their parameters' and gradients' memory at every call, so a layer computes with
 * and accumulates into the host's memory from its next call (a training forward's saved handle
 * holds no parameter memory). This is how a host framework keeps one copy of the weights, in its
 * own buffers (the PyTorch bridge, bindings/python/confsmoe/_torch_native.py). */
CONFSMOE_API confsmoe_status confsmoe_tensor_set_data(confsmoe_tensor *t, void *data);
/* confsmoe_tensor_set_data of n >= 1 tensors into one host block: tensors[i] gets
 * (char *)base + offsets[i] bytes. Every tensor is checked before any changes, so a failed
 * call changes none. One call re-points all of a layer's parameters or gradients. */
CONFSMOE_API confsmoe_status confsmoe_tensors_set_data(confsmoe_tensor *const *tensors, int32_t n, void *base,
                                                       const size_t *offsets);

/* Memory from a ctx's allocator, for a library built on libconfsmoe (libconfsmoe_mpi), so that a
 * host allocator (confsmoe_ctx_params.allocator) sees its blocks too. confsmoe_ctx_calloc returns
 * count * size zeroed bytes, 64-byte aligned, or NULL for a NULL ctx, when out of memory or when
 * the product overflows. A block holds a reference to ctx, as an object does: the ctx lives until
 * the last block is given to confsmoe_ctx_free (NULL ptr: nothing). Both accept a ctx whose handle
 * the host has destroyed while objects or blocks of it remain, and run on the ctx's thread, as
 * object calls do. */
CONFSMOE_API void *confsmoe_ctx_calloc(confsmoe_ctx *ctx, size_t count, size_t size);
CONFSMOE_API void confsmoe_ctx_free(confsmoe_ctx *ctx, void *ptr);
/* The ctx g was created from (NULL for NULL); a model's is that of confsmoe_model_gate(model). */
CONFSMOE_API confsmoe_ctx *confsmoe_gate_ctx(const confsmoe_gate *g);
#endif /* CONFSMOE_EXPERIMENTAL */

#ifdef __cplusplus
}
#endif

#endif /* CONFSMOE_H */
