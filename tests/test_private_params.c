/* The growable parameter lists (lib/params.c), called directly: growth keeps every entry in
 * order, a child's entries are borrowed after the list's own under "<prefix>.<name>", the
 * accessors answer NULL out of range, and an allocation that fails at any point of an append
 * returns CONFSMOE_E_NOMEM with the list and the live blocks as they were. */
#include <stdio.h>

#include "params.h"
#include "testutil.h"

enum { MANY = 1000 };

/* Appends "<stem><i>" [i + 1] for i in [from, to); records the parameters in out[i]. */
static void append_numbered(confsmoe_ctx *ctx, csm_params *list, const char *stem, int32_t from, int32_t to,
                            confsmoe_tensor **out)
{
    char name[32];
    for (int32_t i = from; i < to; i++) {
        snprintf(name, sizeof name, "%s%d", stem, (int)i);
        ck_assert_int_eq(csm_params_new(ctx, list, name, 1, i + 1, 0, &out[i]), CONFSMOE_OK);
        ck_assert_ptr_nonnull(out[i]);
    }
}

START_TEST(test_params_grow_past_capacity_in_order)
{
    confsmoe_ctx *ctx = test_ctx(1);
    csm_params list = {0};
    confsmoe_tensor **param = xcalloc(MANY, sizeof *param);
    append_numbered(ctx, &list, "p", 0, MANY, param);
    ck_assert_int_eq(list.count, MANY);
    ck_assert_int_ge(list.cap, MANY);

    char want[32];
    for (int32_t i = 0; i < MANY; i++) {
        snprintf(want, sizeof want, "p%d", (int)i);
        ck_assert_str_eq(csm_params_name(&list, i), want);
        ck_assert_ptr_eq(csm_params_param(&list, i), param[i]);
        confsmoe_tensor *grad = csm_params_grad(&list, i);
        ck_assert_ptr_nonnull(grad);
        ck_assert_ptr_ne(grad, param[i]);
        ck_assert_ptr_eq(csm_params_grad_of(&list, param[i]), grad);
        ck_assert_int_eq(confsmoe_tensor_ndim(param[i]), 1);
        ck_assert_int_eq(confsmoe_tensor_dim(param[i], 0), i + 1);
        ck_assert_int_eq(confsmoe_tensor_dim(grad, 0), i + 1);
        ck_assert(list.owned[i]);
    }
    free(param);
    csm_params_free(ctx, &list);
    ck_assert_int_eq(list.count, 0);
    ck_assert_ptr_null(list.names);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_params_borrow_appends_after_own_entries)
{
    test_alloc counter = {0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&counter, &holder, 2);
    csm_params child = {0}, list = {0};
    confsmoe_tensor *child_param[20], *own_param[3];
    append_numbered(ctx, &child, "w", 0, 20, child_param);
    append_numbered(ctx, &list, "own", 0, 3, own_param);

    /* 3 + 20 entries: past the first capacity, so the borrow grows the list. */
    ck_assert_int_eq(csm_params_borrow_all(ctx, &list, "expert.7", &child), CONFSMOE_OK);
    ck_assert_int_eq(list.count, 23);
    ck_assert_str_eq(csm_params_name(&list, 0), "own0");
    ck_assert_str_eq(csm_params_name(&list, 2), "own2");
    for (int32_t i = 0; i < 3; i++)
        ck_assert_ptr_eq(csm_params_param(&list, i), own_param[i]);
    char want[32];
    for (int32_t j = 0; j < 20; j++) {
        snprintf(want, sizeof want, "expert.7.w%d", (int)j);
        ck_assert_str_eq(csm_params_name(&list, 3 + j), want);
        ck_assert_ptr_eq(csm_params_param(&list, 3 + j), child_param[j]);
        ck_assert_ptr_eq(csm_params_grad(&list, 3 + j), csm_params_grad(&child, j));
        ck_assert(!list.owned[3 + j]);
    }
    /* The child is unchanged and keeps its tensors when the borrowing list is freed. */
    ck_assert_int_eq(child.count, 20);
    ck_assert_str_eq(csm_params_name(&child, 0), "w0");
    csm_params_free(ctx, &list);
    ck_assert_int_eq(confsmoe_tensor_dim(child_param[19], 0), 20);
    csm_params_free(ctx, &child);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(counter.live, 0);
}
END_TEST

START_TEST(test_params_accessors_out_of_range)
{
    confsmoe_ctx *ctx = test_ctx(3);
    csm_params empty = {0}, list = {0};
    ck_assert_ptr_null(csm_params_name(&empty, 0));
    ck_assert_ptr_null(csm_params_param(&empty, 0));
    ck_assert_ptr_null(csm_params_grad(&empty, 0));
    ck_assert_ptr_null(csm_params_grad_of(&empty, NULL));

    confsmoe_tensor *p[2];
    append_numbered(ctx, &list, "q", 0, 2, p);
    const int32_t outside[] = {-1, 2, INT32_MIN, INT32_MAX};
    for (size_t k = 0; k < sizeof outside / sizeof *outside; k++) {
        ck_assert_ptr_null(csm_params_name(&list, outside[k]));
        ck_assert_ptr_null(csm_params_param(&list, outside[k]));
        ck_assert_ptr_null(csm_params_grad(&list, outside[k]));
    }
    /* A tensor that is not in the list has no gradient in it. */
    confsmoe_tensor *stranger = test_tensor(ctx, CONFSMOE_F32, 1, 2, 0, 0, 0);
    ck_assert_ptr_null(csm_params_grad_of(&list, stranger));
    ck_assert_ptr_nonnull(csm_params_name(&list, 1));
    confsmoe_tensor_destroy(stranger);
    csm_params_free(ctx, &list);

    /* The public accessors of a NULL layer, which wrap these: -1 and NULL. */
    ck_assert_int_eq(confsmoe_expert_n_params(NULL), -1);
    ck_assert_ptr_null(confsmoe_expert_param_name(NULL, 0));
    ck_assert_ptr_null(confsmoe_expert_param(NULL, 0));
    ck_assert_ptr_null(confsmoe_expert_grad(NULL, 0));
    ck_assert_int_eq(confsmoe_gate_n_params(NULL), -1);
    ck_assert_ptr_null(confsmoe_gate_param_name(NULL, 0));
    ck_assert_int_eq(confsmoe_imputer_n_params(NULL), -1);
    ck_assert_ptr_null(confsmoe_imputer_param_name(NULL, 0));
    ck_assert_int_eq(confsmoe_model_n_params(NULL), -1);
    ck_assert_ptr_null(confsmoe_model_param_name(NULL, 0));
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* The list's entries as they were: same arrays' contents for the first `count`. */
enum { SNAPSHOT_CAP = 32 };
typedef struct {
    int32_t count;
    char names[SNAPSHOT_CAP][CSM_PARAM_NAME_CAP];
    confsmoe_tensor *param[SNAPSHOT_CAP], *grad[SNAPSHOT_CAP];
} params_snapshot;

static void snapshot_take(params_snapshot *s, const csm_params *list)
{
    ck_assert_int_le(list->count, SNAPSHOT_CAP);
    s->count = list->count;
    for (int32_t i = 0; i < list->count; i++) {
        memcpy(s->names[i], list->names[i], CSM_PARAM_NAME_CAP);
        s->param[i] = list->param[i];
        s->grad[i] = list->grad[i];
    }
}

static void snapshot_check(const params_snapshot *s, const csm_params *list)
{
    ck_assert_int_eq(list->count, s->count);
    for (int32_t i = 0; i < s->count; i++) {
        ck_assert_str_eq(list->names[i], s->names[i]);
        ck_assert_ptr_eq(list->param[i], s->param[i]);
        ck_assert_ptr_eq(list->grad[i], s->grad[i]);
        ck_assert(list->owned[i]);
    }
}

/* Appends "extra" [3, 4], failing its 1st, 2nd, ... allocation until the append succeeds: every
 * failure is CONFSMOE_E_NOMEM with the entries and the number of live blocks unchanged.
 * Returns the number of failures; *cap_failed counts those that left the capacity as it was. */
static int append_failing_each_allocation(confsmoe_ctx *ctx, csm_params *list, test_alloc *counter,
                                          int *cap_failed)
{
    params_snapshot before;
    snapshot_take(&before, list);
    int failures = 0;
    *cap_failed = 0;
    for (long nth = 1;; nth++) {
        ck_assert_int_lt(nth, 64);
        const long live = counter->live;
        const int32_t cap = list->cap;
        counter->fail_at = counter->total + nth;
        confsmoe_tensor *added = NULL;
        confsmoe_status s = csm_params_new(ctx, list, "extra", 2, 3, 4, &added);
        counter->fail_at = 0;
        if (s == CONFSMOE_OK) {
            ck_assert_int_eq(list->count, before.count + 1);
            ck_assert_str_eq(csm_params_name(list, before.count), "extra");
            ck_assert_ptr_eq(csm_params_param(list, before.count), added);
            return failures;
        }
        failures++;
        *cap_failed += list->cap == cap;
        ck_assert_int_eq(s, CONFSMOE_E_NOMEM);
        ck_assert_ptr_null(added);
        snapshot_check(&before, list);
        ck_assert_int_eq(counter->live, live);
    }
}

START_TEST(test_params_failed_append_changes_nothing)
{
    test_alloc counter = {0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&counter, &holder, 4);
    csm_params list = {0};
    confsmoe_tensor *p[16];
    append_numbered(ctx, &list, "p", 0, 16, p);
    ck_assert_int_eq(list.cap, 16);

    /* A full list: the four arrays of the growth fail first, each leaving the capacity at 16;
     * a failure after the growth may keep the larger arrays. */
    int cap_failed = 0;
    const int growth_failures = append_failing_each_allocation(ctx, &list, &counter, &cap_failed);
    ck_assert_int_ge(growth_failures, 4);
    ck_assert_int_ge(cap_failed, 4);
    ck_assert_int_gt(list.cap, 16);

    /* With room: the parameter and its gradient (header and data each). */
    ck_assert_int_lt(list.count, list.cap);
    const int tensor_failures = append_failing_each_allocation(ctx, &list, &counter, &cap_failed);
    ck_assert_int_ge(tensor_failures, 2);
    ck_assert_int_eq(list.count, 18);
    for (int32_t i = 0; i < 16; i++)
        ck_assert_ptr_eq(csm_params_param(&list, i), p[i]);
    csm_params_free(ctx, &list);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(counter.live, 0);
}
END_TEST

START_TEST(test_params_failed_borrow_appends_nothing)
{
    test_alloc counter = {0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&counter, &holder, 5);
    csm_params list = {0}, child = {0};
    confsmoe_tensor *p[16], *c[4];
    append_numbered(ctx, &list, "p", 0, 16, p);
    append_numbered(ctx, &child, "c", 0, 4, c);
    params_snapshot before;
    snapshot_take(&before, &list);

    for (long nth = 1; nth <= 4; nth++) {
        const long live = counter.live;
        counter.fail_at = counter.total + nth;
        ck_assert_int_eq(csm_params_borrow_all(ctx, &list, "child", &child), CONFSMOE_E_NOMEM);
        counter.fail_at = 0;
        snapshot_check(&before, &list);
        ck_assert_int_eq(counter.live, live);
    }
    ck_assert_int_eq(csm_params_borrow_all(ctx, &list, "child", &child), CONFSMOE_OK);
    ck_assert_int_eq(list.count, 20);
    ck_assert_str_eq(csm_params_name(&list, 19), "child.c3");
    ck_assert_ptr_eq(csm_params_param(&list, 19), c[3]);
    csm_params_free(ctx, &list);
    csm_params_free(ctx, &child);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(counter.live, 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("private_params");
    TCase *tc = tcase_create("params");
    tcase_add_test(tc, test_params_grow_past_capacity_in_order);
    tcase_add_test(tc, test_params_borrow_appends_after_own_entries);
    tcase_add_test(tc, test_params_accessors_out_of_range);
    tcase_add_test(tc, test_params_failed_append_changes_nothing);
    tcase_add_test(tc, test_params_failed_borrow_appends_nothing);
    suite_add_tcase(s, tc);
    return test_run(s);
}
