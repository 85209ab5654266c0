/* Checkpoints: the model's parameters (and optionally the optimizer's state) as a
 * safetensors file, through the model's uniform parameter view.
 *
 * File layout, all little-endian:
 *   "<param name>"          F32, the parameter's shape
 *   "optim.<name>.m"        F32, same shape: Adam's first moment or SGD's momentum buffer
 *   "optim.<name>.v"        F32, same shape: Adam's second moment (Adam only)
 *   "optim.<name>.step"     I64 [1]: updates applied to that parameter
 *   __metadata__            format, version, the model's "model.modality_tokens" (S_m of
 *                           each modality, comma separated), and the optimizer's kind and
 *                           hyperparameters (informative: load checks only the kind and the
 *                           tokens)
 *
 * Load policy: every model parameter must be present with F32 dtype and the same
 * shape. A tensor whose name is neither a model parameter nor "optim.*" is rejected,
 * so that a checkpoint of a differently configured model (more experts, more
 * modalities) cannot load silently. With o == NULL the "optim.*" tensors are
 * ignored; with o != NULL each must be the state of a model parameter, and every
 * optimizer slot that tracks a model parameter must find its state. Slots tracking
 * other tensors are neither saved nor loaded. The positional embedding's shape [L, d]
 * fixes only L = sum_m S_m: "model.modality_tokens", when the file has it, must equal the
 * model's S_m (files written before 0.3.0 lack it and load on the shapes alone).
 *
 * Messages go to the ctx of the model's parameters. Big-endian hosts are not
 * supported (CONFSMOE_E_UNSUPPORTED): the format is little-endian and the data
 * is copied without swapping. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "model.h"
#include "optim_state.h"
#include "safetensors.h"

#define WHO_CAP 256
#define OPTIM_PREFIX "optim."
#define FORMAT_NAME "confsmoe"
#define TOKENS_KEY "model.modality_tokens"

enum { MOMENT_M, MOMENT_V, STEP, N_STATE_KINDS };
static const char *const state_suffix[N_STATE_KINDS] = {"m", "v", "step"};

static bool host_is_little_endian(void)
{
    const uint32_t one = 1;
    unsigned char first;
    memcpy(&first, &one, 1);
    return first == 1;
}

/* The model struct is private to model.c; its parameters carry its ctx. */
static confsmoe_ctx *model_ctx(confsmoe_model *model)
{
    confsmoe_tensor *t = confsmoe_model_n_params(model) > 0 ? confsmoe_model_param(model, 0) : NULL;
    return t ? t->ctx : NULL;
}

static const char *kind_name(confsmoe_optim_kind kind)
{
    return kind == CONFSMOE_OPTIM_ADAM ? "adam" : "sgd";
}

/* Common argument checks; on success *ctx_out is where messages go. */
static confsmoe_status check_args(const char *fn, confsmoe_model *model, const confsmoe_optim *o, const char *path,
                                  confsmoe_ctx **ctx_out)
{
    confsmoe_ctx *ctx = model ? model_ctx(model) : NULL;
    if (!ctx && o)
        ctx = csm_optim_ctx(o);
    *ctx_out = ctx;
    if (!model)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: model is NULL", fn);
    if (!ctx)
        return CONFSMOE_E_INVALID_ARGUMENT;  /* a model without parameters: nowhere to report */
    if (!path || !path[0])
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: path is %s", fn, path ? "empty" : "NULL");
    if (!host_is_little_endian())
        return csm_fail(ctx, CONFSMOE_E_UNSUPPORTED, "%s: checkpoints need a little-endian host", fn);
    const int32_t n = confsmoe_model_n_params(model);
    for (int32_t i = 0; i < n; i++) {
        const confsmoe_tensor *t = confsmoe_model_param(model, i);
        const char *name = confsmoe_model_param_name(model, i);
        if (!t || !name || t->dtype != CONFSMOE_F32)
            return csm_fail(ctx, CONFSMOE_E_INTERNAL, "%s: model parameter %" PRId32 " is missing or not f32", fn, i);
    }
    return CONFSMOE_OK;
}

/* The model parameter index of each optimizer slot, or -1 for a tensor the model does not own. */
static int32_t *map_slots_to_params(confsmoe_ctx *ctx, confsmoe_model *model, const confsmoe_optim *o)
{
    const size_t n_slots = csm_optim_n_slots(o);
    int32_t *param_of = csm_calloc(ctx, n_slots ? n_slots : 1, sizeof *param_of);
    if (!param_of)
        return NULL;
    const int32_t n = confsmoe_model_n_params(model);
    for (size_t j = 0; j < n_slots; j++) {
        const confsmoe_tensor *p = csm_optim_slot(o, j).param;
        param_of[j] = -1;
        for (int32_t i = 0; i < n && param_of[j] < 0; i++)
            if (confsmoe_model_param(model, i) == p)
                param_of[j] = i;
    }
    return param_of;
}

/* ---------------------------------------------------------------- save */

static void format_float(char *buf, size_t cap, float v) { snprintf(buf, cap, "%.9g", (double)v); }

/* What save writes: the entries point into the model, the optimizer and the arrays here. */
typedef struct {
    csm_st_entry *entries;
    size_t n, cap;
    char **names;          /* [cap] the "optim.*" names, NULL for parameters */
    int64_t *steps;        /* [slots] copies of the step counts */
    int32_t *param_of;     /* [slots] see map_slots_to_params */
} save_plan;

static void save_plan_free(confsmoe_ctx *ctx, save_plan *plan)
{
    if (plan->names)
        for (size_t i = 0; i < plan->cap; i++)
            csm_free(ctx, plan->names[i]);
    csm_free(ctx, plan->names);
    csm_free(ctx, plan->entries);
    csm_free(ctx, plan->steps);
    csm_free(ctx, plan->param_of);
}

static confsmoe_status plan_save(confsmoe_ctx *ctx, const char *who, confsmoe_model *model, const confsmoe_optim *o,
                                 save_plan *plan)
{
    const int32_t n_params = confsmoe_model_n_params(model);
    const size_t n_slots = o ? csm_optim_n_slots(o) : 0;
    /* Room for every parameter and three state tensors per slot. */
    plan->cap = (size_t)n_params + N_STATE_KINDS * n_slots;
    plan->entries = csm_calloc(ctx, plan->cap, sizeof *plan->entries);
    plan->names = csm_calloc(ctx, plan->cap, sizeof *plan->names);
    plan->steps = csm_calloc(ctx, n_slots ? n_slots : 1, sizeof *plan->steps);
    plan->param_of = o ? map_slots_to_params(ctx, model, o) : NULL;
    if (!plan->entries || !plan->names || !plan->steps || (o && !plan->param_of))
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);

    for (int32_t i = 0; i < n_params; i++) {
        const confsmoe_tensor *t = confsmoe_model_param(model, i);
        plan->entries[plan->n++] = (csm_st_entry){confsmoe_model_param_name(model, i), CSM_ST_F32, t->ndim,
                                                  t->dims, t->data, t->nbytes};
    }
    static const int64_t step_dims[1] = {1};
    for (size_t j = 0; j < n_slots; j++) {
        if (plan->param_of[j] < 0)
            continue;
        const csm_optim_slot_state st = csm_optim_slot(o, j);
        const char *param_name = confsmoe_model_param_name(model, plan->param_of[j]);
        plan->steps[j] = st.steps;
        const void *state[N_STATE_KINDS] = {st.m, st.v, &plan->steps[j]};
        for (int k = 0; k < N_STATE_KINDS; k++) {
            if (!state[k])
                continue;  /* no second moment under SGD */
            size_t len = strlen(OPTIM_PREFIX) + strlen(param_name) + 1 + strlen(state_suffix[k]) + 1;
            char *name = csm_alloc(ctx, len);
            if (!name)
                return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);
            snprintf(name, len, OPTIM_PREFIX "%s.%s", param_name, state_suffix[k]);
            plan->names[plan->n] = name;
            if (k == STEP)
                plan->entries[plan->n++] = (csm_st_entry){name, CSM_ST_I64, 1, step_dims, state[k], sizeof(int64_t)};
            else
                plan->entries[plan->n++] = (csm_st_entry){name, CSM_ST_F32, st.param->ndim, st.param->dims,
                                                          state[k], st.param->nbytes};
        }
    }
    return CONFSMOE_OK;
}

/* "S_0,S_1,...": the model's tokens per modality, allocated from ctx (NULL when out of memory). */
static char *checkpoint_format_tokens(confsmoe_ctx *ctx, const confsmoe_model *model)
{
    const size_t cap = (size_t)model->p.n_modalities * 21 + 1; /* an int64 and a comma each */
    char *text = csm_alloc(ctx, cap);
    if (!text)
        return NULL;
    size_t at = 0;
    text[0] = '\0';
    for (int32_t m = 0; m < model->p.n_modalities; m++)
        at += (size_t)snprintf(text + at, cap - at, "%s%" PRId64, m ? "," : "", model->tokens[m]);
    return text;
}

confsmoe_status confsmoe_checkpoint_save(confsmoe_model *model, const confsmoe_optim *o, const char *path)
{
    static const char fn[] = "checkpoint_save";
    confsmoe_ctx *ctx;
    confsmoe_status s = check_args(fn, model, o, path, &ctx);
    if (s != CONFSMOE_OK)
        return s;
    char who[WHO_CAP];
    snprintf(who, sizeof who, "%s: %s", fn, path);

    char lr[32], beta1[32], beta2[32], eps[32], momentum[32], weight_decay[32];
    char *tokens = checkpoint_format_tokens(ctx, model);
    if (!tokens)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);
    csm_st_meta meta[10] = {{"format", FORMAT_NAME}, {"version", confsmoe_version_string()},
                            {TOKENS_KEY, tokens}};
    size_t n_meta = 3;
    if (o) {
        const confsmoe_optim_params *hp = csm_optim_hparams(o);
        format_float(lr, sizeof lr, hp->lr);
        format_float(beta1, sizeof beta1, hp->beta1);
        format_float(beta2, sizeof beta2, hp->beta2);
        format_float(eps, sizeof eps, hp->eps);
        format_float(momentum, sizeof momentum, hp->momentum);
        format_float(weight_decay, sizeof weight_decay, hp->weight_decay);
        meta[n_meta++] = (csm_st_meta){"optim.kind", kind_name(hp->kind)};
        meta[n_meta++] = (csm_st_meta){"optim.lr", lr};
        meta[n_meta++] = (csm_st_meta){"optim.beta1", beta1};
        meta[n_meta++] = (csm_st_meta){"optim.beta2", beta2};
        meta[n_meta++] = (csm_st_meta){"optim.eps", eps};
        meta[n_meta++] = (csm_st_meta){"optim.momentum", momentum};
        meta[n_meta++] = (csm_st_meta){"optim.weight_decay", weight_decay};
    }
    save_plan plan = {0};
    s = plan_save(ctx, who, model, o, &plan);
    if (s == CONFSMOE_OK)
        s = csm_st_write(ctx, who, path, meta, n_meta, plan.entries, plan.n);
    save_plan_free(ctx, &plan);
    csm_free(ctx, tokens);
    return s;
}

/* ---------------------------------------------------------------- load */

/* Model parameter names, sorted, for lookups by name. */
typedef struct {
    const char *name;
    int32_t index;
} name_entry;

static int compare_name_entries(const void *a, const void *b)
{
    return strcmp(((const name_entry *)a)->name, ((const name_entry *)b)->name);
}

/* The parameter index whose name is exactly key[0..len), or -1. */
static int32_t find_param(const name_entry *sorted, int32_t n, const char *key, size_t len)
{
    int32_t lo = 0, hi = n;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        int c = strncmp(key, sorted[mid].name, len);
        if (c == 0 && sorted[mid].name[len] != '\0')
            c = -1;  /* key is a proper prefix: it sorts before */
        if (c == 0)
            return sorted[mid].index;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return -1;
}

/* The tensor has this dtype and exactly this shape; `whose` names the expected shape in the message. */
static confsmoe_status check_tensor(confsmoe_ctx *ctx, const char *who, const csm_st_tensor *t, csm_st_dtype dtype,
                                    int32_t ndim, const int64_t *dims, const char *whose)
{
    if (t->dtype != dtype)
        return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: tensor \"%s\" is %s, expected %s", who, t->name,
                        csm_st_dtype_name(t->dtype), csm_st_dtype_name(dtype));
    bool same = t->ndim == ndim;
    for (int32_t d = 0; same && d < ndim; d++)
        same = t->dims[d] == dims[d];
    if (!same) {
        char got[160], want[160];
        csm_st_format_dims(got, sizeof got, t->ndim, t->dims);
        csm_st_format_dims(want, sizeof want, ndim, dims);
        return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: tensor \"%s\" has shape %s in the file, %s is %s", who,
                        t->name, got, whose, want);
    }
    return CONFSMOE_OK;
}

/* Every tensor name is a model parameter, or (with an optimizer) "optim.<param>.<m|v|step>". */
static confsmoe_status check_names(confsmoe_ctx *ctx, const char *who, const csm_st_file *f,
                                   const name_entry *sorted, int32_t n_params, bool with_optim)
{
    const size_t prefix = strlen(OPTIM_PREFIX);
    for (size_t i = 0; i < f->n_tensors; i++) {
        const char *name = f->tensors[i].name;
        if (strncmp(name, OPTIM_PREFIX, prefix) != 0) {
            if (find_param(sorted, n_params, name, strlen(name)) < 0)
                return csm_fail(ctx, CONFSMOE_E_FORMAT,
                                "%s: tensor \"%s\" is not a parameter of this model (a checkpoint of another "
                                "configuration?)", who, name);
            continue;
        }
        if (!with_optim)
            continue;
        const char *dot = strrchr(name, '.');
        bool known = dot > name + prefix;
        if (known) {
            known = false;
            for (int k = 0; k < N_STATE_KINDS; k++)
                known = known || strcmp(dot + 1, state_suffix[k]) == 0;
        }
        if (known)
            known = find_param(sorted, n_params, name + prefix, (size_t)(dot - name - (ptrdiff_t)prefix)) >= 0;
        if (!known)
            return csm_fail(ctx, CONFSMOE_E_FORMAT,
                            "%s: tensor \"%s\" is not the optimizer state of a parameter of this model", who, name);
    }
    return CONFSMOE_OK;
}

/* The state of optimizer slot j, for model parameter `name`, or an error naming what is wrong. */
static confsmoe_status find_slot_state(confsmoe_ctx *ctx, const char *who, const csm_st_file *f, const char *name,
                                       const csm_optim_slot_state *st, const csm_st_tensor *found[N_STATE_KINDS])
{
    const size_t len = strlen(OPTIM_PREFIX) + strlen(name) + 8;
    char *key = csm_alloc(ctx, len);
    if (!key)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);
    confsmoe_status s = CONFSMOE_OK;
    const int64_t step_dims[1] = {1};
    for (int k = 0; k < N_STATE_KINDS && s == CONFSMOE_OK; k++) {
        found[k] = NULL;
        if (k == MOMENT_V && !st->v)
            continue;
        snprintf(key, len, OPTIM_PREFIX "%s.%s", name, state_suffix[k]);
        found[k] = csm_st_find(f, key);
        if (!found[k])
            s = csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: the optimizer state \"%s\" is missing", who, key);
        else if (k == STEP)
            s = check_tensor(ctx, who, found[k], CSM_ST_I64, 1, step_dims, "a step count");
        else
            s = check_tensor(ctx, who, found[k], CSM_ST_F32, st->param->ndim, st->param->dims, "the parameter");
    }
    if (s == CONFSMOE_OK) {
        int64_t steps;
        memcpy(&steps, found[STEP]->data, sizeof steps);
        if (steps < 0)
            s = csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: tensor \"%s\" holds a negative step count %" PRId64, who,
                         found[STEP]->name, steps);
    }
    csm_free(ctx, key);
    return s;
}

/* Where each model parameter and optimizer state comes from in the file. */
typedef struct {
    name_entry *sorted;                 /* [params] */
    const csm_st_tensor **param_src;    /* [params] */
    const csm_st_tensor **state_src;    /* [slots * N_STATE_KINDS], NULL where unused */
    int32_t *param_of;                  /* [slots] see map_slots_to_params */
} load_plan;

static void load_plan_free(confsmoe_ctx *ctx, load_plan *plan)
{
    csm_free(ctx, plan->param_of);
    csm_free(ctx, plan->state_src);
    csm_free(ctx, plan->param_src);
    csm_free(ctx, plan->sorted);
}

/* The file's S_m, when it records them, are the model's. */
static confsmoe_status check_tokens(confsmoe_ctx *ctx, const char *who, const confsmoe_model *model,
                                    const csm_st_file *f)
{
    const char *stored = csm_st_meta_get(f, TOKENS_KEY);
    if (!stored)
        return CONFSMOE_OK;
    char *want = checkpoint_format_tokens(ctx, model);
    if (!want)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);
    confsmoe_status s = CONFSMOE_OK;
    if (strcmp(stored, want) != 0)
        s = csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: the file's model has %s tokens per modality, this model %s", who,
                     stored, want);
    csm_free(ctx, want);
    return s;
}

/* Validates the whole file against the model and the optimizer, changing nothing. */
static confsmoe_status plan_load(confsmoe_ctx *ctx, const char *who, confsmoe_model *model, const confsmoe_optim *o,
                                 const csm_st_file *f, load_plan *plan)
{
    const int32_t n_params = confsmoe_model_n_params(model);
    const size_t n_slots = o ? csm_optim_n_slots(o) : 0;
    plan->sorted = csm_calloc(ctx, (size_t)n_params, sizeof *plan->sorted);
    plan->param_src = csm_calloc(ctx, (size_t)n_params, sizeof *plan->param_src);
    plan->state_src = csm_calloc(ctx, N_STATE_KINDS * (n_slots ? n_slots : 1), sizeof *plan->state_src);
    plan->param_of = o ? map_slots_to_params(ctx, model, o) : NULL;
    if (!plan->sorted || !plan->param_src || !plan->state_src || (o && !plan->param_of))
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);

    for (int32_t i = 0; i < n_params; i++) {
        const confsmoe_tensor *p = confsmoe_model_param(model, i);
        const char *name = confsmoe_model_param_name(model, i);
        plan->sorted[i] = (name_entry){name, i};
        plan->param_src[i] = csm_st_find(f, name);
        if (!plan->param_src[i])
            return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: the model parameter \"%s\" is missing", who, name);
        confsmoe_status s = check_tensor(ctx, who, plan->param_src[i], CSM_ST_F32, p->ndim, p->dims, "the model's");
        if (s != CONFSMOE_OK)
            return s;
    }
    qsort(plan->sorted, (size_t)n_params, sizeof *plan->sorted, compare_name_entries);
    confsmoe_status s = check_names(ctx, who, f, plan->sorted, n_params, o != NULL);
    if (s == CONFSMOE_OK)
        s = check_tokens(ctx, who, model, f);
    if (s != CONFSMOE_OK || !o)
        return s;
    const char *kind = csm_st_meta_get(f, "optim.kind");
    const char *want = kind_name(csm_optim_hparams(o)->kind);
    if (kind && strcmp(kind, want) != 0)
        return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: the file holds %s optimizer state, the optimizer is %s", who,
                        kind, want);
    for (size_t j = 0; j < n_slots && s == CONFSMOE_OK; j++) {
        if (plan->param_of[j] < 0)
            continue;
        const csm_optim_slot_state st = csm_optim_slot(o, j);
        s = find_slot_state(ctx, who, f, confsmoe_model_param_name(model, plan->param_of[j]), &st,
                            &plan->state_src[N_STATE_KINDS * j]);
    }
    return s;
}

/* Copies a validated plan in: nothing here can fail. */
static void commit_load(confsmoe_model *model, confsmoe_optim *o, const load_plan *plan)
{
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++) {
        confsmoe_tensor *p = confsmoe_model_param(model, i);
        if (p->nbytes > 0)
            memcpy(p->data, plan->param_src[i]->data, p->nbytes);
    }
    const size_t n_slots = o ? csm_optim_n_slots(o) : 0;
    for (size_t j = 0; j < n_slots; j++) {
        if (plan->param_of[j] < 0)
            continue;
        const csm_optim_slot_state st = csm_optim_slot(o, j);
        const csm_st_tensor *const *src = &plan->state_src[N_STATE_KINDS * j];
        if (st.param->nbytes > 0) {
            memcpy(st.m, src[MOMENT_M]->data, st.param->nbytes);
            if (st.v)
                memcpy(st.v, src[MOMENT_V]->data, st.param->nbytes);
        }
        int64_t steps;
        memcpy(&steps, src[STEP]->data, sizeof steps);
        csm_optim_set_steps(o, j, steps);
    }
}

confsmoe_status confsmoe_checkpoint_load(confsmoe_model *model, confsmoe_optim *o, const char *path)
{
    static const char fn[] = "checkpoint_load";
    confsmoe_ctx *ctx;
    confsmoe_status s = check_args(fn, model, o, path, &ctx);
    if (s != CONFSMOE_OK)
        return s;
    char who[WHO_CAP];
    snprintf(who, sizeof who, "%s: %s", fn, path);

    csm_st_file f;
    s = csm_st_read(ctx, who, path, &f);
    if (s != CONFSMOE_OK)
        return s;
    load_plan plan = {0};
    s = plan_load(ctx, who, model, o, &f, &plan);
    if (s == CONFSMOE_OK)
        commit_load(model, o, &plan);
    load_plan_free(ctx, &plan);
    csm_st_file_free(ctx, &f);
    return s;
}
