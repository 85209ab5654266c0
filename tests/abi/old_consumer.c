/* A program built against the BASELINE headers (abi/include), run against the library
 * just built: what an application compiled for an earlier libconfsmoe.so.0 does when
 * the library under it is upgraded. It walks most of the API and checks that the
 * results are sane, and that every params struct the library fills in is the size this
 * program was compiled with (the library's own may have grown since: docs/API.md,
 * "Struct versioning"). */
#include <confsmoe.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static confsmoe_ctx *ctx;
static int failures;

/* Records a failed check (with the status and the ctx's error text for a call); the run
 * goes on, to report every failure. */
static void report(int line, const char *what, const confsmoe_status *status)
{
    if (status)
        fprintf(stderr, "FAIL old_consumer.c:%d: %s returned %s: %s\n", line, what, confsmoe_status_string(*status),
                ctx ? confsmoe_ctx_last_error(ctx) : "");
    else
        fprintf(stderr, "FAIL old_consumer.c:%d: %s\n", line, what);
    failures++;
}
#define CHECK(cond)                                                                                        \
    do {                                                                                                   \
        if (!(cond))                                                                                       \
            report(__LINE__, #cond, NULL);                                                                 \
    } while (0)
#define CHECK_OK(call)                                                                                     \
    do {                                                                                                   \
        confsmoe_status status_ = (call);                                                                  \
        if (status_ != CONFSMOE_OK)                                                                        \
            report(__LINE__, #call, &status_);                                                             \
    } while (0)

/* A params struct followed by a canary: _init() is the library's, and a library whose
 * struct grew would write past the struct this program allocated. */
#define CANARY 64
#define GUARDED(type) struct { type p; unsigned char canary[CANARY]; }

static void canary_set(unsigned char *c) { memset(c, 0xA5, CANARY); }

static int canary_intact(const unsigned char *c)
{
    for (int i = 0; i < CANARY; i++)
        if (c[i] != 0xA5)
            return 0;
    return 1;
}

/* _init() must stay within, and agree with, the struct this program was compiled with;
 * a newer library's struct may only be larger (fields are appended, never removed). */
#define INIT_GUARDED(g, init_fn, sizeof_fn)                                                                \
    do {                                                                                                   \
        canary_set((g).canary);                                                                            \
        init_fn(&(g).p);                                                                                   \
        CHECK(canary_intact((g).canary));                                                                  \
        CHECK((g).p.struct_size == sizeof (g).p);                                                          \
        CHECK(sizeof_fn() >= sizeof (g).p);                                                                \
    } while (0)

static size_t n_alloc, n_free;

static void *count_alloc(void *user, size_t size, size_t alignment)
{
    (void)user;
    void *p = NULL;
    if (posix_memalign(&p, alignment, size ? size : 1) != 0)
        return NULL;
    n_alloc++;
    return p;
}

static void count_free(void *user, void *ptr)
{
    (void)user;
    if (ptr)
        n_free++;
    free(ptr);
}

static int all_finite(confsmoe_tensor *t)
{
    const float *v = confsmoe_tensor_data(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        if (!isfinite(v[i]))
            return 0;
    return 1;
}

static double abs_sum(confsmoe_tensor *t)
{
    const float *v = confsmoe_tensor_data(t);
    double s = 0.0;
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        s += fabs(v[i]);
    return s;
}

static confsmoe_tensor *tensor(confsmoe_dtype dtype, int32_t ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3)
{
    const int64_t dims[4] = {d0, d1, d2, d3};
    confsmoe_tensor *t = NULL;
    CHECK_OK(confsmoe_tensor_create(ctx, dtype, ndim, dims, &t));
    return t;
}

/* Deterministic values in [-1, 1]. */
static void fill(confsmoe_tensor *t, int salt)
{
    float *v = confsmoe_tensor_data(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        v[i] = sinf(0.37f * (float)i + (float)salt);
}

static void check_version(void)
{
    uint32_t number = confsmoe_version_number();
    /* Same soversion (major), and at least the version these headers describe. */
    CHECK(number / 10000 == CONFSMOE_VERSION_MAJOR);
    CHECK(number >= CONFSMOE_VERSION_NUMBER);
    CHECK(strchr(confsmoe_version_string(), '.') != NULL);
    CHECK(strcmp(confsmoe_status_string(CONFSMOE_OK), confsmoe_status_string(CONFSMOE_E_SHAPE)) != 0);
    printf("old consumer: headers %s, library %s\n", CONFSMOE_VERSION_STRING, confsmoe_version_string());
}

static void check_tensor(void)
{
    float host[6] = {1, 2, 3, 4, 5, 6}, back[6] = {0};
    const int64_t dims[2] = {2, 3};
    confsmoe_tensor *w = NULL;
    CHECK_OK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, host, &w));
    CHECK(confsmoe_tensor_dtype(w) == CONFSMOE_F32 && confsmoe_tensor_ndim(w) == 2);
    CHECK(confsmoe_tensor_dim(w, 1) == 3 && confsmoe_tensor_numel(w) == 6 && confsmoe_tensor_nbytes(w) == sizeof host);
    CHECK(confsmoe_tensor_data(w) == (void *)host);
    confsmoe_tensor *t = tensor(CONFSMOE_F32, 2, 2, 3, 0, 0);
    CHECK_OK(confsmoe_tensor_copy_in(t, host, sizeof host));
    CHECK_OK(confsmoe_tensor_copy_out(t, back, sizeof back));
    CHECK(memcmp(host, back, sizeof host) == 0);
    /* Errors come back as statuses, with the out-pointer cleared. */
    confsmoe_tensor *bad = w;
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_F32, 9, dims, &bad) != CONFSMOE_OK && bad == NULL);
    CHECK(confsmoe_tensor_copy_in(t, host, 5) != CONFSMOE_OK);
    CHECK(confsmoe_ctx_last_error(ctx)[0] != '\0');
    confsmoe_tensor_destroy(t);
    confsmoe_tensor_destroy(w);
}

/* Forward and backward of one expert, then an SGD step that must move its weights. */
static void check_expert(void)
{
    enum { N = 5, D = 6, H = 10 };
    confsmoe_expert *e = NULL;
    CHECK_OK(confsmoe_expert_create(ctx, D, H, &e));
    CHECK(confsmoe_expert_d(e) == D && confsmoe_expert_h(e) == H);
    CHECK(confsmoe_expert_n_params(e) == 4 && strcmp(confsmoe_expert_param_name(e, 0), "w1") == 0);
    confsmoe_tensor *x = tensor(CONFSMOE_F32, 2, N, D, 0, 0), *y = tensor(CONFSMOE_F32, 2, N, D, 0, 0);
    confsmoe_tensor *dx = tensor(CONFSMOE_F32, 2, N, D, 0, 0);
    fill(x, 1);
    confsmoe_saved *saved = NULL;
    CHECK_OK(confsmoe_expert_forward(e, x, y, &saved));
    CHECK(all_finite(y) && abs_sum(y) > 0.0);
    fill(y, 2); /* dL/dy */
    CHECK_OK(confsmoe_expert_backward(e, saved, y, dx));
    CHECK(confsmoe_expert_backward(e, saved, y, dx) == CONFSMOE_E_STATE);
    confsmoe_saved_destroy(saved);
    CHECK(all_finite(dx) && abs_sum(dx) > 0.0);
    CHECK(abs_sum(confsmoe_expert_grad(e, 0)) > 0.0);

    GUARDED(confsmoe_optim_params) op;
    INIT_GUARDED(op, confsmoe_optim_params_init, confsmoe_sizeof_optim_params);
    op.p.kind = CONFSMOE_OPTIM_SGD;
    op.p.lr = 0.1f;
    confsmoe_optim *o = NULL;
    CHECK_OK(confsmoe_optim_create(ctx, &op.p, &o));
    for (int32_t i = 0; i < confsmoe_expert_n_params(e); i++)
        CHECK_OK(confsmoe_optim_add(o, confsmoe_expert_param(e, i), confsmoe_expert_grad(e, i)));
    double before = abs_sum(confsmoe_expert_param(e, 0));
    CHECK_OK(confsmoe_optim_step(o));
    CHECK(abs_sum(confsmoe_expert_param(e, 0)) != before);
    confsmoe_expert_zero_grad(e);
    CHECK(abs_sum(confsmoe_expert_grad(e, 0)) == 0.0);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dx);
    confsmoe_expert_destroy(e);
}

/* A confidence gate over three experts: one training call, its backward, the statistics. */
static void check_gate(void)
{
    enum { N = 7, D = 8, E = 3, K = 2, C = 3 };
    confsmoe_expert *experts[E];
    for (int i = 0; i < E; i++)
        CHECK_OK(confsmoe_expert_create(ctx, D, D, &experts[i]));
    GUARDED(confsmoe_gate_params) gp;
    INIT_GUARDED(gp, confsmoe_gate_params_init, confsmoe_sizeof_gate_params);
    gp.p.d = D;
    gp.p.k = K;
    gp.p.n_classes = C;
    gp.p.combine = CONFSMOE_COMBINE_CONFIDENCE;
    confsmoe_gate *g = NULL;
    CHECK_OK(confsmoe_gate_create(ctx, &gp.p, experts, E, &g));
    CHECK(confsmoe_gate_n_experts(g) == E && confsmoe_gate_k(g) == K && confsmoe_gate_n_params(g) > 0);

    confsmoe_tensor *x = tensor(CONFSMOE_F32, 2, N, D, 0, 0), *y = tensor(CONFSMOE_F32, 2, N, D, 0, 0);
    confsmoe_tensor *dx = tensor(CONFSMOE_F32, 2, N, D, 0, 0), *labels = tensor(CONFSMOE_I32, 1, N, 0, 0, 0);
    confsmoe_tensor *topk = tensor(CONFSMOE_I32, 2, N, K, 0, 0);
    fill(x, 3);
    int32_t *lab = confsmoe_tensor_data(labels);
    for (int i = 0; i < N; i++)
        lab[i] = i % C;
    float loss = -1.0f;
    confsmoe_saved *saved = NULL;
    CHECK_OK(confsmoe_gate_forward(g, x, labels, NULL, y, topk, NULL, &loss, &saved));
    CHECK(all_finite(y) && isfinite(loss) && loss >= 0.0f);
    const int32_t *idx = confsmoe_tensor_data(topk);
    for (int i = 0; i < N * K; i++)
        CHECK(idx[i] >= 0 && idx[i] < E);
    fill(y, 4);
    CHECK_OK(confsmoe_gate_backward(g, saved, y, NULL, 1.0f, dx));
    confsmoe_saved_destroy(saved);
    CHECK(all_finite(dx) && abs_sum(dx) > 0.0);

    GUARDED(confsmoe_gate_stats) st;
    canary_set(st.canary);
    memset(&st.p, 0, sizeof st.p);
    st.p.struct_size = sizeof st.p;
    int64_t load[E];
    CHECK_OK(confsmoe_gate_stats_get(g, CONFSMOE_STATS_TOTAL, &st.p, load, NULL, E));
    CHECK(canary_intact(st.canary) && confsmoe_sizeof_gate_stats() >= sizeof st.p);
    CHECK(st.p.struct_size == sizeof st.p);
    CHECK(st.p.tokens == N && load[0] + load[1] + load[2] == N * K);
    CHECK(st.p.load_entropy >= 0.0 && st.p.load_entropy <= 1.0 + 1e-9);
    confsmoe_gate_stats_reset(g);
    confsmoe_gate_zero_grad(g);
    confsmoe_gate_destroy(g);
    for (int i = 0; i < E; i++)
        confsmoe_expert_destroy(experts[i]);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dx);
    confsmoe_tensor_destroy(labels);
    confsmoe_tensor_destroy(topk);
}

/* Both imputer stages: fill leaves present rows alone; stage 2 changes only missing ones. */
static void check_imputer(void)
{
    enum { B = 4, M = 2, D = 8, K = 2, F = 5 };
    GUARDED(confsmoe_imputer_params) ip;
    INIT_GUARDED(ip, confsmoe_imputer_params_init, confsmoe_sizeof_imputer_params);
    ip.p.d = D;
    ip.p.n_modalities = M;
    ip.p.k = K;
    confsmoe_imputer *imp = NULL;
    CHECK_OK(confsmoe_imputer_create(ctx, &ip.p, &imp));
    CHECK(confsmoe_imputer_n_params(imp) == 6 && strcmp(confsmoe_imputer_param_name(imp, 0), "q.w") == 0);

    /* Sample 1 misses modality 0, sample 2 modality 1. */
    confsmoe_tensor *avail = tensor(CONFSMOE_U8, 2, B, M, 0, 0);
    uint8_t *a = confsmoe_tensor_data(avail);
    memset(a, 1, B * M);
    a[1 * M + 0] = 0;
    a[2 * M + 1] = 0;

    confsmoe_tensor *raw = tensor(CONFSMOE_F32, 2, B, F, 0, 0), *pool = tensor(CONFSMOE_F32, 2, 3, F, 0, 0);
    fill(raw, 5);
    fill(pool, 6);
    float raw0[F];
    memcpy(raw0, confsmoe_tensor_data(raw), sizeof raw0);
    CHECK_OK(confsmoe_imputer_fill(imp, 0, pool, 2, avail, raw));
    CHECK(memcmp(raw0, confsmoe_tensor_data(raw), sizeof raw0) == 0 && all_finite(raw));

    confsmoe_tensor *h = tensor(CONFSMOE_F32, 3, B, M, D, 0), *out = tensor(CONFSMOE_F32, 3, B, M, D, 0);
    confsmoe_tensor *slots = tensor(CONFSMOE_F32, 4, M, B, K, D), *dslots = tensor(CONFSMOE_F32, 4, M, B, K, D);
    confsmoe_tensor *dh = tensor(CONFSMOE_F32, 3, B, M, D, 0);
    fill(h, 7);
    fill(slots, 8);
    confsmoe_saved *saved = NULL;
    CHECK_OK(confsmoe_imputer_forward(imp, h, slots, avail, out, &saved));
    const float *hv = confsmoe_tensor_data(h), *ov = confsmoe_tensor_data(out);
    for (int b = 0; b < B; b++)
        for (int m = 0; m < M; m++) {
            int same = memcmp(hv + (b * M + m) * D, ov + (b * M + m) * D, D * sizeof(float)) == 0;
            CHECK(same == a[b * M + m]);
        }
    CHECK(all_finite(out));
    fill(out, 9); /* dL/dout */
    CHECK_OK(confsmoe_imputer_backward(imp, saved, out, dh, dslots));
    confsmoe_saved_destroy(saved);
    CHECK(all_finite(dh) && all_finite(dslots) && abs_sum(dslots) > 0.0);
    /* Not q.w: with one present token to attend to, the softmax is 1 and q gets no gradient. */
    CHECK(strcmp(confsmoe_imputer_param_name(imp, 2), "kv.w") == 0 && abs_sum(confsmoe_imputer_grad(imp, 2)) > 0.0);
    confsmoe_imputer_zero_grad(imp);
    confsmoe_imputer_destroy(imp);
    confsmoe_tensor *ts[] = {avail, raw, pool, h, out, slots, dslots, dh};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
        confsmoe_tensor_destroy(ts[i]);
}

/* The full model: training lowers the loss on a fixed batch with a missing modality,
 * and a checkpoint restores parameters and optimizer exactly. */
static void check_model(void)
{
    enum { B = 6, M = 2, C = 3, STEPS = 40 };
    static const int64_t features[M] = {5, 3};
    GUARDED(confsmoe_model_params) mp;
    INIT_GUARDED(mp, confsmoe_model_params_init, confsmoe_sizeof_model_params);
    mp.p.n_modalities = M;
    mp.p.features = features;
    mp.p.d = 8;
    mp.p.heads = 2;
    mp.p.n_experts = 4;
    mp.p.n_classes = C;
    mp.p.dropout = 0.0f;
    confsmoe_model *model = NULL;
    CHECK_OK(confsmoe_model_create(ctx, &mp.p, &model));
    if (!model)
        return;
    CHECK(confsmoe_model_gate(model) != NULL && confsmoe_model_n_params(model) > 0);

    confsmoe_tensor *inputs[M], *pools[M];
    for (int m = 0; m < M; m++) {
        inputs[m] = tensor(CONFSMOE_F32, 2, B, features[m], 0, 0);
        pools[m] = tensor(CONFSMOE_F32, 2, 4, features[m], 0, 0);
        fill(inputs[m], 10 + m);
        fill(pools[m], 20 + m);
        CHECK_OK(confsmoe_model_set_pool(model, m, pools[m]));
    }
    confsmoe_tensor *avail = tensor(CONFSMOE_U8, 2, B, M, 0, 0), *all = tensor(CONFSMOE_U8, 2, B, M, 0, 0);
    memset(confsmoe_tensor_data(avail), 1, B * M);
    memset(confsmoe_tensor_data(all), 1, B * M);
    ((uint8_t *)confsmoe_tensor_data(avail))[3 * M + 1] = 0;
    confsmoe_tensor *labels = tensor(CONFSMOE_I32, 1, B, 0, 0, 0), *logits = tensor(CONFSMOE_F32, 2, B, C, 0, 0);
    for (int b = 0; b < B; b++)
        ((int32_t *)confsmoe_tensor_data(labels))[b] = b % C;

    GUARDED(confsmoe_optim_params) op;
    INIT_GUARDED(op, confsmoe_optim_params_init, confsmoe_sizeof_optim_params);
    op.p.lr = 1e-2f;
    confsmoe_optim *o = NULL;
    CHECK_OK(confsmoe_optim_create(ctx, &op.p, &o));
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        CHECK_OK(confsmoe_optim_add(o, confsmoe_model_param(model, i), confsmoe_model_grad(model, i)));

    const confsmoe_tensor *const *in = (const confsmoe_tensor *const *)inputs;
    float first = NAN, last = NAN, task = NAN;
    for (int s = 0; s < STEPS; s++) {
        confsmoe_model_zero_grad(model);
        CHECK_OK(confsmoe_model_step(model, in, avail, labels, logits, &last, &task));
        CHECK_OK(confsmoe_optim_step(o));
        if (s == 0)
            first = last;
    }
    printf("old consumer: model loss %.4f -> %.4f over %d steps\n", first, last, STEPS);
    CHECK(isfinite(first) && isfinite(last) && isfinite(task) && last < first);
    CHECK(strchr(confsmoe_model_param_name(model, 0), '.') != NULL);

    /* With every modality present, predict has no randomness: compare exactly. */
    char dir[] = "/tmp/confsmoe-abi-XXXXXX", path[64];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK_OK(confsmoe_model_predict(model, in, all, logits));
    CHECK(all_finite(logits));
    float saved_logits[B * C], now[B * C];
    CHECK_OK(confsmoe_tensor_copy_out(logits, saved_logits, sizeof saved_logits));
    CHECK_OK(confsmoe_checkpoint_save(model, o, path));
    confsmoe_model_zero_grad(model);
    CHECK_OK(confsmoe_model_step(model, in, avail, labels, NULL, NULL, NULL));
    CHECK_OK(confsmoe_optim_step(o));
    CHECK_OK(confsmoe_model_predict(model, in, all, logits));
    CHECK_OK(confsmoe_tensor_copy_out(logits, now, sizeof now));
    CHECK(memcmp(now, saved_logits, sizeof now) != 0);
    CHECK_OK(confsmoe_checkpoint_load(model, o, path));
    CHECK_OK(confsmoe_model_predict(model, in, all, logits));
    CHECK_OK(confsmoe_tensor_copy_out(logits, now, sizeof now));
    CHECK(memcmp(now, saved_logits, sizeof now) == 0);
    CHECK(unlink(path) == 0 && rmdir(dir) == 0);

    confsmoe_optim_destroy(o);
    confsmoe_model_destroy(model);
    for (int m = 0; m < M; m++) {
        confsmoe_tensor_destroy(inputs[m]);
        confsmoe_tensor_destroy(pools[m]);
    }
    confsmoe_tensor_destroy(avail);
    confsmoe_tensor_destroy(all);
    confsmoe_tensor_destroy(labels);
    confsmoe_tensor_destroy(logits);
}

int main(void)
{
    check_version();
    const confsmoe_allocator allocator = {count_alloc, count_free, NULL};
    GUARDED(confsmoe_ctx_params) cp;
    INIT_GUARDED(cp, confsmoe_ctx_params_init, confsmoe_sizeof_ctx_params);
    cp.p.seed = 7;
    cp.p.allocator = &allocator;
    CHECK_OK(confsmoe_ctx_create(&cp.p, &ctx));
    if (!ctx) {
        fprintf(stderr, "FAIL: no ctx, nothing else can run\n");
        return 1;
    }
    CHECK_OK(confsmoe_ctx_set_seed(ctx, 11));
    check_tensor();
    check_expert();
    check_gate();
    check_imputer();
    check_model();
    confsmoe_ctx_destroy(ctx);
    ctx = NULL;
    /* Everything went through the host allocator, and all of it came back. */
    CHECK(n_alloc > 0 && n_alloc == n_free);
    printf("old consumer: %zu allocations through the host allocator, %d failed checks\n", n_alloc, failures);
    return failures ? 1 : 0;
}
