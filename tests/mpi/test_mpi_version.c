/* libconfsmoe_mpi calls libconfsmoe's experimental hooks, so it runs only with the libconfsmoe
 * release it was built against. Run under LD_PRELOAD of fake_version.so, which makes the loaded
 * libconfsmoe report the next minor release: every entry point that makes objects or allocates
 * refuses with CONFSMOE_E_VERSION, names both versions, and allocates nothing. The matching case
 * is every other test of the suite. Run with mpirun -np 1. */
#include "mpitest.h"

static long host_blocks;

static void *count_alloc(void *user, size_t size, size_t alignment)
{
    (void)user;
    void *p = NULL;
    if (posix_memalign(&p, alignment, size) != 0)
        return NULL;
    host_blocks++;
    return p;
}

static void count_free(void *user, void *ptr)
{
    (void)user;
    if (ptr)
        host_blocks--;
    free(ptr);
}

/* The status is E_VERSION and the message names fn and both versions. */
static void expect_refused(const char *fn, confsmoe_status s, const char *built, const char *loaded)
{
    const char *msg = confsmoe_mpi_last_error();
    EXPECT(s == CONFSMOE_E_VERSION, "%s: status %d (%s), want CONFSMOE_E_VERSION", fn, (int)s,
           confsmoe_status_string(s));
    EXPECT(strncmp(msg, fn, strlen(fn)) == 0 && strstr(msg, built) && strstr(msg, loaded),
           "%s: message \"%s\" should name %s, %s and %s", fn, msg, fn, built, loaded);
}

int main(int argc, char **argv)
{
    mt_init(&argc, &argv);
    const uint32_t loaded = confsmoe_version_number();
    EXPECT(loaded == CONFSMOE_VERSION_NUMBER + 100, "confsmoe_version_number() is %u: fake_version.so is not loaded",
           (unsigned)loaded);
    char built_text[64], loaded_text[64];
    snprintf(built_text, sizeof built_text, "built against libconfsmoe %s", CONFSMOE_VERSION_STRING);
    snprintf(loaded_text, sizeof loaded_text, "loaded libconfsmoe is %u.%u.%u", (unsigned)(loaded / 10000),
             (unsigned)(loaded / 100 % 100), (unsigned)(loaded % 100));

    const confsmoe_allocator a = {count_alloc, count_free, NULL};
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.allocator = &a;
    confsmoe_ctx *ctx = NULL;
    MUST(confsmoe_ctx_create(&cp, &ctx), NULL);
    const int64_t features[2] = {3, 2};
    confsmoe_model_params mp;
    confsmoe_model_params_init(&mp);
    mp.n_modalities = 2;
    mp.features = features;
    mp.d = 4;
    mp.heads = 1;
    mp.n_experts = 2;
    mp.n_classes = 2;
    confsmoe_model *model = NULL;
    MUST(confsmoe_model_create(ctx, &mp, &model), ctx);
    const long blocks = host_blocks;

    confsmoe_mpi_dp *dp = (confsmoe_mpi_dp *)&mp;
    expect_refused("mpi_dp_create", confsmoe_mpi_dp_create(MPI_COMM_WORLD, model, 0, &dp), built_text, loaded_text);
    EXPECT(dp == NULL, "mpi_dp_create: out is not NULL after a failure");

    confsmoe_gate_params gp;
    confsmoe_gate_params_init(&gp);
    gp.d = 4;
    gp.n_classes = 2;
    confsmoe_mpi_gate *g = (confsmoe_mpi_gate *)&gp;
    expect_refused("mpi_gate_create", confsmoe_mpi_gate_create(MPI_COMM_WORLD, ctx, &gp, 2, 0, &g), built_text,
                   loaded_text);
    EXPECT(g == NULL, "mpi_gate_create: out is not NULL after a failure");

    confsmoe_gate_stats st = {.struct_size = sizeof st};
    expect_refused("mpi_gate_stats_get",
                   confsmoe_mpi_gate_stats_get(MPI_COMM_WORLD, confsmoe_model_gate(model), CONFSMOE_STATS_TOTAL, &st,
                                               NULL, NULL, 0),
                   built_text, loaded_text);
    EXPECT(host_blocks == blocks, "the refused calls left %ld blocks", host_blocks - blocks);
    if (mt_rank == 0)
        printf("refused: %s\n", confsmoe_mpi_last_error());

    confsmoe_model_destroy(model);
    confsmoe_ctx_destroy(ctx);
    return mt_finish("test_mpi_version");
}
