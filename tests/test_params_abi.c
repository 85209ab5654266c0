/* Sized option structs (docs/API.md, "Struct versioning"), for every params struct and
 * confsmoe_gate_stats: init_sized writes exactly struct_size bytes; create accepts any size
 * from the first release's up to its own sizeof, and larger ones whose unknown bytes are 0;
 * anything else is CONFSMOE_E_VERSION with a message naming the struct. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "confsmoe.h"
#include "testutil.h"

/* The sizeof a struct had when `member` was its last field (as lib/sized.h). */
#define SIZE_UP_TO(type, member)                                                                          \
    ((offsetof(type, member) + sizeof(((type *)0)->member) + _Alignof(type) - 1) / _Alignof(type) *     \
     _Alignof(type))

#define GUARD 64
#define BYTE_GUARD 0xA5
#define CAP 1024 /* every buffer: a struct, room for a newer one, and the guard */

typedef struct {
    const char *type;
    size_t size;  /* this library's sizeof, as compiled here */
    size_t min;   /* the first release's: the smallest struct_size accepted */
    void (*init)(void *p, size_t struct_size);
    void (*require)(void *p); /* the fields without a default, for create */
    /* create (with whatever it needs) then destroy; the ctx carries the message */
    confsmoe_status (*create)(confsmoe_ctx *ctx, const void *p);
} kind;

static const int64_t features[2] = {3, 2};

static void init_ctx(void *p, size_t n) { confsmoe_ctx_params_init_sized(p, n); }
static void init_gate(void *p, size_t n) { confsmoe_gate_params_init_sized(p, n); }
static void init_imputer(void *p, size_t n) { confsmoe_imputer_params_init_sized(p, n); }
static void init_optim(void *p, size_t n) { confsmoe_optim_params_init_sized(p, n); }
static void init_model(void *p, size_t n) { confsmoe_model_params_init_sized(p, n); }

static void require_gate(void *v)
{
    confsmoe_gate_params *p = v;
    p->d = 4;
    p->n_classes = 3;
}

static void require_imputer(void *v)
{
    confsmoe_imputer_params *p = v;
    p->d = 4;
    p->n_modalities = 2;
}

static void require_model(void *v)
{
    confsmoe_model_params *p = v;
    p->n_modalities = 2;
    p->features = features;
    p->n_classes = 3;
    p->d = 8;
    p->heads = 2;
    p->n_experts = 2;
    p->k = 1;
}

static confsmoe_status create_ctx(confsmoe_ctx *unused, const void *p)
{
    (void)unused;
    confsmoe_ctx *c = (confsmoe_ctx *)(uintptr_t)0x1234;
    confsmoe_status s = confsmoe_ctx_create(p, &c);
    ck_assert_ptr_eq(s == CONFSMOE_OK ? NULL : c, NULL);
    confsmoe_ctx_destroy(c);
    return s;
}

static confsmoe_status create_gate(confsmoe_ctx *ctx, const void *p)
{
    confsmoe_expert *ex[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(confsmoe_expert_create(ctx, 4, 5, &ex[i]), CONFSMOE_OK);
    confsmoe_gate *g = NULL;
    confsmoe_status s = confsmoe_gate_create(ctx, p, ex, 2, &g);
    ck_assert(s == CONFSMOE_OK ? g != NULL : g == NULL);
    if (g)
        ck_assert_int_eq(confsmoe_gate_k(g), ((const confsmoe_gate_params *)p)->k);
    confsmoe_gate_destroy(g);
    for (int i = 0; i < 2; i++)
        confsmoe_expert_destroy(ex[i]);
    return s;
}

static confsmoe_status create_imputer(confsmoe_ctx *ctx, const void *p)
{
    confsmoe_imputer *imp = NULL;
    confsmoe_status s = confsmoe_imputer_create(ctx, p, &imp);
    ck_assert(s == CONFSMOE_OK ? imp != NULL : imp == NULL);
    confsmoe_imputer_destroy(imp);
    return s;
}

static confsmoe_status create_optim(confsmoe_ctx *ctx, const void *p)
{
    confsmoe_optim *o = NULL;
    confsmoe_status s = confsmoe_optim_create(ctx, p, &o);
    ck_assert(s == CONFSMOE_OK ? o != NULL : o == NULL);
    confsmoe_optim_destroy(o);
    return s;
}

static confsmoe_status create_model(confsmoe_ctx *ctx, const void *p)
{
    confsmoe_model *m = NULL;
    confsmoe_status s = confsmoe_model_create(ctx, p, &m);
    ck_assert(s == CONFSMOE_OK ? m != NULL : m == NULL);
    confsmoe_model_destroy(m);
    return s;
}

static const kind kinds[] = {
    {"confsmoe_ctx_params", sizeof(confsmoe_ctx_params), SIZE_UP_TO(confsmoe_ctx_params, allocator), init_ctx, NULL,
     create_ctx},
    {"confsmoe_gate_params", sizeof(confsmoe_gate_params), SIZE_UP_TO(confsmoe_gate_params, compat), init_gate,
     require_gate, create_gate},
    {"confsmoe_imputer_params", sizeof(confsmoe_imputer_params), SIZE_UP_TO(confsmoe_imputer_params, compat),
     init_imputer, require_imputer, create_imputer},
    {"confsmoe_optim_params", sizeof(confsmoe_optim_params), SIZE_UP_TO(confsmoe_optim_params, weight_decay),
     init_optim, NULL, create_optim},
    {"confsmoe_model_params", sizeof(confsmoe_model_params), SIZE_UP_TO(confsmoe_model_params, modality_dropout),
     init_model, require_model, create_model},
};
#define N_KINDS ((int)(sizeof kinds / sizeof kinds[0]))

/* A buffer aligned for any of the structs. */
typedef union {
    max_align_t align;
    unsigned char b[CAP];
} buffer;

static int all_bytes(const unsigned char *p, size_t n, unsigned char v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            return 0;
    return 1;
}

static size_t size_of(const buffer *b)
{
    size_t n;
    memcpy(&n, b->b, sizeof n);
    return n;
}

static void set_size(buffer *b, size_t n) { memcpy(b->b, &n, sizeof n); }

static void ck_error_names(confsmoe_ctx *ctx, const kind *k, const char *phrase)
{
    if (k->create == create_ctx)
        return; /* no ctx to hold a message: the status alone */
    const char *e = confsmoe_ctx_last_error(ctx);
    ck_assert_msg(strstr(e, k->type) != NULL, "error \"%s\" does not name %s", e, k->type);
    ck_assert_msg(strstr(e, phrase) != NULL, "error \"%s\" lacks \"%s\"", e, phrase);
}

/* ------------------------------------------------------------ the minimum sizes */

START_TEST(test_sizeof_matches_compiled)
{
    const kind *k = &kinds[_i];
    ck_assert_uint_le(k->min, k->size);
    ck_assert_uint_le(k->size + GUARD + 64, CAP);
    ck_assert_uint_eq(confsmoe_sizeof_ctx_params(), sizeof(confsmoe_ctx_params));
    ck_assert_uint_eq(confsmoe_sizeof_gate_params(), sizeof(confsmoe_gate_params));
    ck_assert_uint_eq(confsmoe_sizeof_imputer_params(), sizeof(confsmoe_imputer_params));
    ck_assert_uint_eq(confsmoe_sizeof_optim_params(), sizeof(confsmoe_optim_params));
    ck_assert_uint_eq(confsmoe_sizeof_model_params(), sizeof(confsmoe_model_params));
    ck_assert_uint_eq(confsmoe_sizeof_gate_stats(), sizeof(confsmoe_gate_stats));
#if UINTPTR_MAX == UINT64_MAX && SIZE_MAX == UINT64_MAX
    /* The first release on LP64, documented in docs/API.md. */
    static const size_t lp64[] = {48, 72, 56, 40, 144};
    ck_assert_uint_eq(k->min, lp64[_i]);
#endif
}
END_TEST

/* ------------------------------------------------------------ init_sized */

/* The header's macro passes the caller's sizeof and fills exactly that. */
START_TEST(test_init_macro_writes_own_size)
{
    struct {
        confsmoe_model_params p;
        unsigned char guard[GUARD];
    } w;
    memset(&w, BYTE_GUARD, sizeof w);
    confsmoe_model_params_init(&w.p);
    ck_assert_uint_eq(w.p.struct_size, sizeof w.p);
    ck_assert(all_bytes(w.guard, GUARD, BYTE_GUARD));
    ck_assert_int_eq(w.p.draws, 10);
    ck_assert_float_eq(w.p.dropout, 0.1f);
    confsmoe_model_params_init(NULL); /* ignored */
}
END_TEST

/* At the minimum size: exactly min bytes, the guard after them intact, and create works. */
START_TEST(test_init_min_size_stays_within)
{
    const kind *k = &kinds[_i];
    buffer full, b;
    memset(&full, 0, sizeof full);
    k->init(full.b, k->size);
    memset(&b, BYTE_GUARD, sizeof b);
    k->init(b.b, k->min);
    ck_assert_uint_eq(size_of(&b), k->min);
    ck_assert_msg(all_bytes(b.b + k->min, GUARD, BYTE_GUARD), "%s: init_sized(min) wrote past min", k->type);
    /* The defaults, as far as min reaches. */
    ck_assert(memcmp(b.b + sizeof(size_t), full.b + sizeof(size_t), k->min - sizeof(size_t)) == 0);
    /* create reads no byte past min (they are 0xA5 here): later fields take their defaults. */
    if (k->require)
        k->require(b.b);
    confsmoe_ctx *ctx = test_ctx(1);
    ck_assert_int_eq(k->create(ctx, b.b), CONFSMOE_OK);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* Below the minimum: only the struct_size member is written (when it fits), nothing else. */
START_TEST(test_init_too_small_writes_only_the_size)
{
    const kind *k = &kinds[_i];
    const size_t sizes[] = {0, 1, sizeof(size_t) - 1, sizeof(size_t), sizeof(size_t) + 4, k->min - 1};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        buffer b;
        memset(&b, BYTE_GUARD, sizeof b);
        k->init(b.b, sizes[i]);
        if (sizes[i] >= sizeof(size_t)) {
            ck_assert_uint_eq(size_of(&b), sizes[i]);
            ck_assert(all_bytes(b.b + sizeof(size_t), CAP - sizeof(size_t), BYTE_GUARD));
        } else {
            ck_assert(all_bytes(b.b, CAP, BYTE_GUARD));
        }
    }
    k->init(NULL, k->size); /* ignored */
    k->init(NULL, 0);
}
END_TEST

/* A newer program's larger struct: the known fields, then zeros up to struct_size. */
START_TEST(test_init_larger_zero_fills)
{
    const kind *k = &kinds[_i];
    buffer full, b;
    memset(&full, 0, sizeof full);
    k->init(full.b, k->size);
    const size_t newer = k->size + 24;
    memset(&b, BYTE_GUARD, sizeof b);
    k->init(b.b, newer);
    ck_assert_uint_eq(size_of(&b), newer);
    ck_assert(memcmp(b.b + sizeof(size_t), full.b + sizeof(size_t), k->size - sizeof(size_t)) == 0);
    ck_assert(all_bytes(b.b + k->size, 24, 0));
    ck_assert(all_bytes(b.b + newer, GUARD, BYTE_GUARD));
}
END_TEST

/* ------------------------------------------------------------ create */

START_TEST(test_create_too_small_is_version_error)
{
    const kind *k = &kinds[_i];
    const size_t sizes[] = {0, 1, sizeof(size_t), k->min / 2, k->min - 1};
    confsmoe_ctx *ctx = test_ctx(2);
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        buffer b;
        memset(&b, 0, sizeof b);
        k->init(b.b, k->size);
        if (k->require)
            k->require(b.b);
        set_size(&b, sizes[i]);
        ck_assert_int_eq(k->create(ctx, b.b), CONFSMOE_E_VERSION);
        ck_error_names(ctx, k, "struct_size is");
    }
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* Larger than this library's: accepted while every unknown byte is 0, refused otherwise. */
START_TEST(test_create_larger)
{
    const kind *k = &kinds[_i];
    confsmoe_ctx *ctx = test_ctx(3);
    buffer b;
    memset(&b, BYTE_GUARD, sizeof b);
    const size_t newer = k->size + 16;
    k->init(b.b, newer);
    if (k->require)
        k->require(b.b);
    ck_assert_int_eq(k->create(ctx, b.b), CONFSMOE_OK);
    for (size_t at = k->size; at < newer; at += 5) {
        b.b[at] = 1;
        ck_assert_int_eq(k->create(ctx, b.b), CONFSMOE_E_VERSION);
        ck_error_names(ctx, k, "is not 0");
        b.b[at] = 0;
    }
    ck_assert_int_eq(k->create(ctx, b.b), CONFSMOE_OK);
    /* Above the 64 KiB limit: refused without reading a byte past the buffer. */
    set_size(&b, (size_t)65536 + 8);
    ck_assert_int_eq(k->create(ctx, b.b), CONFSMOE_E_VERSION);
    ck_error_names(ctx, k, "struct_size is");
    set_size(&b, SIZE_MAX);
    ck_assert_int_eq(k->create(ctx, b.b), CONFSMOE_E_VERSION);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* NULL params keep meaning the defaults where they did. */
START_TEST(test_create_null_params_defaults)
{
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(NULL, &ctx), CONFSMOE_OK);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, NULL, &o), CONFSMOE_OK);
    confsmoe_optim_destroy(o);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ------------------------------------------------------------ gate stats (an output struct) */

static confsmoe_gate *stats_gate(confsmoe_ctx *ctx, confsmoe_expert **ex)
{
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(confsmoe_expert_create(ctx, 4, 5, &ex[i]), CONFSMOE_OK);
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    p.d = 4;
    p.k = 1;
    p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    confsmoe_gate *g = NULL;
    ck_assert_int_eq(confsmoe_gate_create(ctx, &p, ex, 2, &g), CONFSMOE_OK);
    const int64_t dims[2] = {3, 4};
    confsmoe_tensor *x = NULL, *y = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &x), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &y), CONFSMOE_OK);
    fill_const(x, 0.5f);
    ck_assert_int_eq(confsmoe_gate_forward(g, x, NULL, NULL, y, NULL, NULL, NULL, NULL), CONFSMOE_OK);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    return g;
}

START_TEST(test_gate_stats_sizes)
{
    confsmoe_ctx *ctx = test_ctx(4);
    confsmoe_expert *ex[2];
    confsmoe_gate *g = stats_gate(ctx, ex);
    const size_t size = sizeof(confsmoe_gate_stats), min = SIZE_UP_TO(confsmoe_gate_stats, conf_loss);
    ck_assert_uint_le(min, size);

    /* The reference: this program's own size. */
    confsmoe_gate_stats ref = {.struct_size = sizeof ref};
    ck_assert_int_eq(confsmoe_gate_stats_get(g, CONFSMOE_STATS_TOTAL, &ref, NULL, NULL, 0), CONFSMOE_OK);
    ck_assert_int_eq(ref.tokens, 3);
    ck_assert_uint_eq(ref.struct_size, sizeof ref);

    /* The minimum: no byte past it written. */
    buffer b;
    memset(&b, BYTE_GUARD, sizeof b);
    set_size(&b, min);
    ck_assert_int_eq(confsmoe_gate_stats_get(g, CONFSMOE_STATS_TOTAL, (confsmoe_gate_stats *)b.b, NULL, NULL, 0),
                     CONFSMOE_OK);
    ck_assert_uint_eq(size_of(&b), min);
    ck_assert(memcmp(b.b + sizeof(size_t), (unsigned char *)&ref + sizeof(size_t), min - sizeof(size_t)) == 0);
    ck_assert(all_bytes(b.b + min, GUARD, BYTE_GUARD));

    /* Larger (a newer program): the known fields, zeros up to struct_size, nothing after. */
    memset(&b, BYTE_GUARD, sizeof b);
    set_size(&b, size + 24);
    ck_assert_int_eq(confsmoe_gate_stats_get(g, CONFSMOE_STATS_TOTAL, (confsmoe_gate_stats *)b.b, NULL, NULL, 0),
                     CONFSMOE_OK);
    ck_assert_uint_eq(size_of(&b), size + 24);
    ck_assert(memcmp(b.b + sizeof(size_t), (unsigned char *)&ref + sizeof(size_t), size - sizeof(size_t)) == 0);
    ck_assert(all_bytes(b.b + size, 24, 0));
    ck_assert(all_bytes(b.b + size + 24, GUARD, BYTE_GUARD));

    /* Too small, or above the limit: CONFSMOE_E_VERSION, nothing written. */
    const size_t bad[] = {0, sizeof(size_t), min - 1, (size_t)65536 + 1, SIZE_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&b, BYTE_GUARD, sizeof b);
        set_size(&b, bad[i]);
        ck_assert_int_eq(confsmoe_gate_stats_get(g, CONFSMOE_STATS_TOTAL, (confsmoe_gate_stats *)b.b, NULL, NULL, 0),
                         CONFSMOE_E_VERSION);
        ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(ctx), "confsmoe_gate_stats"));
        ck_assert_uint_eq(size_of(&b), bad[i]);
        ck_assert(all_bytes(b.b + sizeof(size_t), CAP - sizeof(size_t), BYTE_GUARD));
    }
    confsmoe_gate_destroy(g);
    for (int i = 0; i < 2; i++)
        confsmoe_expert_destroy(ex[i]);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

static Suite *params_abi_suite(void)
{
    Suite *s = suite_create("params_abi");
    TCase *tc = tcase_create("sized");
    tcase_add_loop_test(tc, test_sizeof_matches_compiled, 0, N_KINDS);
    tcase_add_test(tc, test_init_macro_writes_own_size);
    tcase_add_loop_test(tc, test_init_min_size_stays_within, 0, N_KINDS);
    tcase_add_loop_test(tc, test_init_too_small_writes_only_the_size, 0, N_KINDS);
    tcase_add_loop_test(tc, test_init_larger_zero_fills, 0, N_KINDS);
    tcase_add_loop_test(tc, test_create_too_small_is_version_error, 0, N_KINDS);
    tcase_add_loop_test(tc, test_create_larger, 0, N_KINDS);
    tcase_add_test(tc, test_create_null_params_defaults);
    tcase_add_test(tc, test_gate_stats_sizes);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run(params_abi_suite()); }
