/* Atomic checkpoints under SIGKILL. A forked child saves generation after generation of a
 * model (parameters changed between saves) to one path and is killed in the middle of a
 * save, then the parent shows that the file at the path is a complete checkpoint of the
 * expected generation (loads with bit-identical parameters) and that no leftover temporary
 * file is mistaken for a checkpoint (it is never at the path, and loading one gives either
 * CONFSMOE_E_FORMAT or a complete generation, never partial data).
 *
 * Deterministic kill points, each for every n until the save completes: the n-th allocation
 * of the save, the n-th fwrite of the save (half of its bytes written and flushed first),
 * fsync of the temporary file, just before and just after the rename. The child raises
 * SIGKILL itself through hooks: the allocator of its ctx, and fwrite / fsync / rename,
 * which this executable defines (they take precedence over libc's for the library's calls
 * and forward to the next definition). Then the parent SIGKILLs children at random times. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"

/* ---------------------------------------------------------------- hooks */

enum { HOOK_NONE, HOOK_ALLOC, HOOK_FWRITE, HOOK_FSYNC, HOOK_RENAME_BEFORE, HOOK_RENAME_AFTER, N_HOOKS };
static const char *const hook_names[N_HOOKS] = {"none", "allocation", "fwrite", "fsync", "before rename",
                                                "after rename"};

static volatile int hook_kind;    /* armed in the child during the save to be killed */
static volatile long hook_n;      /* kill at the n-th call of that kind */
static volatile long hook_calls;  /* calls of that kind since armed */

static void die(void)
{
    kill(getpid(), SIGKILL);
    for (;;)
        pause();
}

static int hit(int kind)
{
    return hook_kind == kind && ++hook_calls == hook_n;
}

size_t fwrite(const void *ptr, size_t size, size_t n, FILE *f)
{
    static size_t (*real)(const void *, size_t, size_t, FILE *);
    if (!real)
        *(void **)&real = dlsym(RTLD_NEXT, "fwrite");
    if (hit(HOOK_FWRITE)) {
        /* Half of this write reaches the file, then the process dies. */
        size_t half = size * n / 2;
        if (half)
            real(ptr, 1, half, f);
        fflush(f);
        die();
    }
    return real(ptr, size, n, f);
}

int fsync(int fd)
{
    static int (*real)(int);
    if (!real)
        *(void **)&real = dlsym(RTLD_NEXT, "fsync");
    if (hit(HOOK_FSYNC))
        die();
    return real(fd);
}

int rename(const char *from, const char *to)
{
    static int (*real)(const char *, const char *);
    if (!real)
        *(void **)&real = dlsym(RTLD_NEXT, "rename");
    if (hit(HOOK_RENAME_BEFORE))
        die();
    int r = real(from, to);
    if (hit(HOOK_RENAME_AFTER))
        die();
    return r;
}

static void *kill_alloc(void *user, size_t size, size_t alignment)
{
    (void)user;
    if (hit(HOOK_ALLOC))
        die();
    void *p = NULL;
    return posix_memalign(&p, alignment, size) == 0 ? p : NULL;
}

static void kill_free(void *user, void *p)
{
    (void)user;
    free(p);
}

/* ---------------------------------------------------------------- the model */

static const int64_t FEAT[2] = {9, 5};

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_optim *optim;
} rig;

static int rig_open(rig *r, int64_t d, int with_allocator)
{
    static const confsmoe_allocator hooked = {kill_alloc, kill_free, NULL};
    memset(r, 0, sizeof *r);
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.seed = 5;
    cp.allocator = with_allocator ? &hooked : NULL;
    if (confsmoe_ctx_create(&cp, &r->ctx) != CONFSMOE_OK)
        return 0;
    confsmoe_model_params p;
    test_model_params(&p, 2, FEAT, d, 3);
    if (confsmoe_model_create(r->ctx, &p, &r->model) != CONFSMOE_OK ||
        confsmoe_optim_create(r->ctx, NULL, &r->optim) != CONFSMOE_OK)
        return 0;
    for (int32_t i = 0; i < confsmoe_model_n_params(r->model); i++)
        if (confsmoe_optim_add(r->optim, confsmoe_model_param(r->model, i), confsmoe_model_grad(r->model, i)) !=
            CONFSMOE_OK)
            return 0;
    return 1;
}

static void rig_close(rig *r)
{
    confsmoe_optim_destroy(r->optim);
    confsmoe_model_destroy(r->model);
    confsmoe_ctx_destroy(r->ctx);
}

/* Generation g: every parameter value is a function of (g, parameter, index). */
static float gen_value(long g, int32_t i, int64_t j) { return (float)g + 0.01f * (float)i + 1e-4f * (float)(j % 997); }

static void set_generation(confsmoe_model *m, long g)
{
    for (int32_t i = 0; i < confsmoe_model_n_params(m); i++) {
        confsmoe_tensor *t = confsmoe_model_param(m, i);
        float *v = confsmoe_tensor_data(t);
        for (int64_t j = 0; j < confsmoe_tensor_numel(t); j++)
            v[j] = gen_value(g, i, j);
    }
}

/* The generation the model's parameters hold, or -1 if they are not exactly one. */
static long generation_of(confsmoe_model *m)
{
    const float *v0 = confsmoe_tensor_data(confsmoe_model_param(m, 0));
    long g = (long)v0[0];
    for (int32_t i = 0; i < confsmoe_model_n_params(m); i++) {
        confsmoe_tensor *t = confsmoe_model_param(m, i);
        const float *v = confsmoe_tensor_data(t);
        for (int64_t j = 0; j < confsmoe_tensor_numel(t); j++) {
            const float want = gen_value(g, i, j);
            if (memcmp(&v[j], &want, sizeof want) != 0)
                return -1;
        }
    }
    return g;
}

/* ---------------------------------------------------------------- the child */

/* Saves generations 0, 1, ... to path, reporting each completed one on fd; the save of
 * generation kill_gen runs with the hook armed. Returns (exit status 0) if it was never hit. */
static void child_main(const char *path, int fd, int64_t d, int kind, long n, long kill_gen, long gens)
{
    rig r;
    if (!rig_open(&r, d, 1))
        _exit(3);
    for (long g = 0; g < gens; g++) {
        set_generation(r.model, g);
        if (g == kill_gen) {
            hook_calls = 0;
            hook_n = n;
            hook_kind = kind;
        }
        if (confsmoe_checkpoint_save(r.model, r.optim, path) != CONFSMOE_OK)
            _exit(4);
        hook_kind = HOOK_NONE;
        if (write(fd, &g, sizeof g) != (ssize_t)sizeof g)
            _exit(5);
    }
    rig_close(&r);
    _exit(0);
}

typedef struct {
    int status;       /* waitpid status */
    long last_done;   /* last generation the child reported complete, -1 if none */
} outcome;

static outcome run_child(const char *path, int64_t d, int kind, long n, long kill_gen, long gens, int random_kill_us)
{
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(fds[0]);
        child_main(path, fds[1], d, kind, n, kill_gen, gens);
    }
    close(fds[1]);
    long first = -1;
    if (random_kill_us > 0) {
        /* Wait for the first completed save, then kill at a random moment. */
        long g;
        if (read(fds[0], &g, sizeof g) == (ssize_t)sizeof g)
            first = g;
        struct timespec ts = {0, (long)random_kill_us * 1000L};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
    }
    outcome o = {0, first};
    long g;
    while (read(fds[0], &g, sizeof g) == (ssize_t)sizeof g)
        o.last_done = g;
    close(fds[0]);
    ck_assert_int_eq(waitpid(pid, &o.status, 0), pid);
    return o;
}

/* ---------------------------------------------------------------- the parent's checks */

static void scratch_clear(test_scratch *s) { ck_assert(test_clear_dir(s->dir, 0)); }

typedef struct {
    int temp_files;       /* leftover temporary files */
    int temp_partial;     /* ... of which loading failed with CONFSMOE_E_FORMAT */
    int temp_complete;    /* ... of which held a complete generation */
} leftovers;

/* The file at path holds exactly generation want (-1: no file). Every other file in the
 * directory is a temporary file whose load is refused or gives a complete generation in
 * {want, also}; none of them can be found under the checkpoint's name. */
static leftovers check_directory(rig *v, const test_scratch *s, long want, long also)
{
    leftovers out = {0, 0, 0};
    if (want < 0) {
        ck_assert_msg(access(s->path, F_OK) != 0, "a checkpoint exists though no save completed");
    } else {
        set_generation(v->model, 999);
        confsmoe_status st = confsmoe_checkpoint_load(v->model, v->optim, s->path);
        ck_assert_msg(st == CONFSMOE_OK, "the checkpoint does not load: %s", confsmoe_ctx_last_error(v->ctx));
        long got = generation_of(v->model);
        ck_assert_msg(got == want, "the checkpoint holds generation %ld, expected %ld", got, want);
    }
    DIR *d = opendir(s->dir);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || !strcmp(e->d_name, "model.safetensors"))
            continue;
        ck_assert_msg(strncmp(e->d_name, "model.safetensors.tmp.", 22) == 0, "unexpected file %s", e->d_name);
        out.temp_files++;
        char p[512];
        snprintf(p, sizeof p, "%s/%s", s->dir, e->d_name);
        set_generation(v->model, 999);
        confsmoe_status st = confsmoe_checkpoint_load(v->model, v->optim, p);
        if (st == CONFSMOE_OK) {
            long got = generation_of(v->model);
            ck_assert_msg(got == also, "temporary file %s loads as generation %ld (expected %ld)", e->d_name, got,
                          also);
            out.temp_complete++;
        } else {
            ck_assert_msg(st == CONFSMOE_E_FORMAT, "temporary file %s: status %d (%s)", e->d_name, st,
                          confsmoe_ctx_last_error(v->ctx));
            out.temp_partial++;
        }
    }
    closedir(d);
    return out;
}

enum { KILL_GEN = 1, GENS = 3 };

/* _i: the hook. For n = 1, 2, ... the save of generation KILL_GEN dies at its n-th hooked
 * call; the path still holds generation KILL_GEN - 1 (KILL_GEN after the rename). */
START_TEST(test_kill_points)
{
    const int kind = _i + 1;
    rig v;
    ck_assert(rig_open(&v, 16, 0));
    test_scratch s;
    test_scratch_open(&s, "kill");
    long killed = 0;
    leftovers total = {0, 0, 0};
    for (long n = 1;; n++) {
        ck_assert_msg(n < 100000, "the hook never stopped firing");
        scratch_clear(&s);
        outcome o = run_child(s.path, 16, kind, n, KILL_GEN, GENS, 0);
        if (WIFEXITED(o.status)) {
            ck_assert_msg(WEXITSTATUS(o.status) == 0, "child failed with %d", WEXITSTATUS(o.status));
            ck_assert_int_eq(o.last_done, GENS - 1);
            check_directory(&v, &s, GENS - 1, -2);
            break;  /* n is past the last hooked call of a save */
        }
        ck_assert_msg(WIFSIGNALED(o.status) && WTERMSIG(o.status) == SIGKILL, "child status %d", o.status);
        ck_assert_int_eq(o.last_done, KILL_GEN - 1);
        killed++;
        /* fsync: the 1st is the temporary file's, the 2nd the directory's after the rename. */
        const int renamed = kind == HOOK_RENAME_AFTER || (kind == HOOK_FSYNC && n >= 2);
        const long want = renamed ? KILL_GEN : KILL_GEN - 1;
        leftovers l = check_directory(&v, &s, want, KILL_GEN);
        total.temp_files += l.temp_files;
        total.temp_partial += l.temp_partial;
        total.temp_complete += l.temp_complete;
        if (kind == HOOK_FWRITE)
            ck_assert_int_eq(l.temp_partial, 1);  /* the half-written file is refused */
        if ((kind == HOOK_FSYNC && !renamed) || kind == HOOK_RENAME_BEFORE)
            ck_assert_int_eq(l.temp_complete, 1);
        if (renamed)
            ck_assert_int_eq(l.temp_files, 0);
        /* The library saves over the leftovers and loads its own file. */
        set_generation(v.model, 7);
        ck_assert_int_eq(confsmoe_checkpoint_save(v.model, v.optim, s.path), CONFSMOE_OK);
        check_directory(&v, &s, 7, KILL_GEN);
    }
    ck_assert_int_ge(killed, 1);
    printf("kill points: %-14s %4ld (leftover temp files: %d, refused as truncated: %d, complete: %d)\n",
           hook_names[kind], killed, total.temp_files, total.temp_partial, total.temp_complete);
    fflush(stdout);
    ck_assert(test_rm_dir(s.dir));
    rig_close(&v);
}
END_TEST

/* Random-time SIGKILLs from the parent while the child saves a larger model in a loop. */
START_TEST(test_random_kills)
{
    enum { KILLS = 24 };
    const int64_t d = 64;
    rig v;
    ck_assert(rig_open(&v, d, 0));
    test_scratch s;
    test_scratch_open(&s, "kill");
    unsigned seed = (unsigned)time(NULL);
    const char *env = getenv("CONFSMOE_KILL_SEED");
    if (env)
        seed = (unsigned)strtoul(env, NULL, 10);
    trng r = {seed};
    int mid_save = 0;
    for (int i = 0; i < KILLS; i++) {
        scratch_clear(&s);
        int us = 1 + (int)(trng_u64(&r) % 20000);
        outcome o = run_child(s.path, d, HOOK_NONE, 0, -1, 1000000, us);
        ck_assert_msg(WIFSIGNALED(o.status) && WTERMSIG(o.status) == SIGKILL, "seed %u: child status %d", seed,
                      o.status);
        ck_assert_int_ge(o.last_done, 0);
        /* The last reported generation, or the next one if the kill fell between its rename
         * and the report. */
        set_generation(v.model, 999);
        ck_assert_int_eq(confsmoe_checkpoint_load(v.model, v.optim, s.path), CONFSMOE_OK);
        long got = generation_of(v.model);
        ck_assert_msg(got == o.last_done || got == o.last_done + 1, "seed %u: generation %ld, last reported %ld",
                      seed, got, o.last_done);
        leftovers l = check_directory(&v, &s, got, got + 1);
        mid_save += l.temp_files > 0;
    }
    printf("random kills: %d (seed %u), %d of them during a save (a temporary file was left)\n", KILLS, seed,
           mid_save);
    fflush(stdout);
    ck_assert(test_rm_dir(s.dir));
    rig_close(&v);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("checkpoint_kill");
    TCase *tc = tcase_create("sigkill");
    tcase_set_timeout(tc, 900);
    tcase_add_loop_test(tc, test_kill_points, 0, N_HOOKS - 1);
    tcase_add_test(tc, test_random_kills);
    suite_add_tcase(s, tc);
    return test_run(s);
}
