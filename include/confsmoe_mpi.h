/*
 * libconfsmoe_mpi: data-parallel and expert-parallel training of libconfsmoe over MPI.
 *
 * An optional library beside libconfsmoe (pkg-config confsmoe-mpi; meson -Dmpi=enabled).
 * It is built on confsmoe.h alone, its public API and the hooks declared under
 * CONFSMOE_EXPERIMENTAL, and talks only through the MPI communicator the host gives it.
 * docs/DISTRIBUTED.md has the launch recipes, the layouts and the measured costs.
 *
 * Conventions, on top of confsmoe.h's:
 * - Every function that takes or owns a communicator is collective over it: all ranks call
 *   it, in the same order, with the same shapes where the text says so. A call that fails
 *   on one rank can leave the others waiting in a collective; as in any MPI program, a
 *   host that cannot recover calls MPI_Abort.
 * - The library duplicates the communicator it is given (MPI_Comm_dup), so that its
 *   messages never meet the host's, and sets MPI_ERRORS_RETURN on the duplicate: a failed
 *   MPI call returns CONFSMOE_E_COMM, with MPI's text in confsmoe_mpi_last_error(), instead
 *   of aborting the job.
 * - MPI must be initialised (MPI_Init or MPI_Init_thread) before any call, and finalised
 *   by the host after every object of this library is destroyed.
 * - One release: the library calls libconfsmoe's experimental hooks, which may change in any
 *   release, so it runs only with the libconfsmoe it was built against (confsmoe-mpi.pc pins
 *   it). confsmoe_mpi_dp_create, confsmoe_mpi_gate_create and confsmoe_mpi_gate_stats_get
 *   give CONFSMOE_E_VERSION when the loaded libconfsmoe is another release.
 * - Memory: every block the library holds comes from the ctx of the objects it serves (a
 *   model's, a gate's), so a host allocator (confsmoe_ctx_params.allocator) sees it. Each
 *   block holds a reference to that ctx, as libconfsmoe's objects do: confsmoe.h's
 *   destruction in any order holds here too.
 */
#ifndef CONFSMOE_MPI_H
#define CONFSMOE_MPI_H

#include <mpi.h>

#include "confsmoe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- data parallel */

/* Data parallelism over a communicator of P ranks: each rank holds a whole copy of the
 * model and trains on a shard of every global batch. After a step every rank holds the
 * gradient of the whole global batch, so identical optimizer steps keep the copies equal. */
typedef struct confsmoe_mpi_dp confsmoe_mpi_dp;

/* model is borrowed: once it is destroyed the object may only be destroyed (in either order;
 * docs/API.md, "Objects and ownership"). Its parameters are broadcast from rank 0,
 * so the copies start equal whatever each rank's seed was. bucket_bytes bounds the
 * gradients summed per MPI_Allreduce (0: 16 MiB); the gradients of all parameters go in
 * ceil(total / bucket_bytes) calls, never one per tensor. */
CONFSMOE_API confsmoe_status confsmoe_mpi_dp_create(MPI_Comm comm, confsmoe_model *model, size_t bucket_bytes,
                                                    confsmoe_mpi_dp **out);
CONFSMOE_API void confsmoe_mpi_dp_destroy(confsmoe_mpi_dp *dp);

/* One training step of the global batch whose mask is global_avail u8 [B_global, M] (the
 * same on every rank): this rank trains on its samples first .. first + B - 1 (inputs,
 * avail and labels are those rows; B may be 0), then the gradients of every rank are
 * summed. The gradient of the global batch is added to the model's gradients on every
 * rank (accumulated gradients are kept, as confsmoe_model_step does). loss and task_loss,
 * if not NULL, receive the global batch's losses, the same on every rank; logits [B, C]
 * (or NULL) this rank's. The losses, the gradients and every random draw equal those of
 * confsmoe_model_step on the whole batch in one process, to float rounding (see
 * confsmoe_model_step_shard for the two per-shard exceptions). */
CONFSMOE_API confsmoe_status confsmoe_mpi_dp_step(confsmoe_mpi_dp *dp, const confsmoe_tensor *const *inputs,
                                                  const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                                  const confsmoe_tensor *global_avail, int64_t first,
                                                  confsmoe_tensor *logits, float *loss, float *task_loss);

/* The even split of a global batch of n samples: rank r trains on *first .. *first + *count - 1. */
CONFSMOE_API void confsmoe_mpi_shard(int64_t n, int32_t rank, int32_t size, int64_t *first, int64_t *count);

/* ---------------------------------------------------------------- expert parallel */

/* Expert parallelism: the E experts of one gate are split over the ranks in contiguous
 * blocks (rank r owns experts floor(r E / P) .. floor((r + 1) E / P) - 1; a rank may own
 * none when E < P). Every rank routes its own tokens; each slot's row travels to the rank
 * that owns its expert and the expert's output comes back, one MPI_Alltoallv each way in
 * forward and again in backward (the layout of DeepSpeed-MoE and Tutel). The router, the
 * ConfNets and the target classifier are replicated on every rank. */
typedef struct confsmoe_mpi_gate confsmoe_mpi_gate;
/* What one training forward kept for its backward. */
typedef struct confsmoe_mpi_saved confsmoe_mpi_saved;

/* A gate of n_experts experts FFN(d -> expert_hidden -> d) (expert_hidden 0: d). All E
 * experts are drawn on every rank from ctx, in order, before the gate's own parameters, as
 * a host creating E experts and then confsmoe_gate_create would draw them; each rank keeps
 * its own. The ctx must have the same seed on every rank. p->compat is refused on more
 * than one rank (its dispatch spans the whole batch). */
CONFSMOE_API confsmoe_status confsmoe_mpi_gate_create(MPI_Comm comm, confsmoe_ctx *ctx, const confsmoe_gate_params *p,
                                                      int32_t n_experts, int64_t expert_hidden,
                                                      confsmoe_mpi_gate **out);
/* The gate and its confsmoe_mpi_saved handles may be destroyed in any order; a handle whose
 * gate is destroyed accepts only confsmoe_mpi_saved_destroy. */
CONFSMOE_API void confsmoe_mpi_gate_destroy(confsmoe_mpi_gate *g);

/* confsmoe_gate_forward over this rank's N tokens (N may differ from rank to rank); the
 * global batch is the ranks' tokens in rank order. Each token's noise is that of its global
 * index. loss receives the global batch's loss, the same on every rank: the sum over the
 * ranks of each rank's gate loss weighted by its share of the present tokens (confidence
 * gates: L_conf is then the mean over all present slots of all ranks, as in one process) or
 * of the tokens (other gates). A load-balancing loss is per rank, as in DeepSpeed-MoE, and
 * so only this share-weighted mean of the ranks'. saved != NULL: training. */
CONFSMOE_API confsmoe_status confsmoe_mpi_gate_forward(confsmoe_mpi_gate *g, const confsmoe_tensor *x,
                                                       const confsmoe_tensor *labels, const confsmoe_tensor *present,
                                                       confsmoe_tensor *y, confsmoe_tensor *topk,
                                                       confsmoe_tensor *slots, float *loss,
                                                       confsmoe_mpi_saved **saved);
/* confsmoe_gate_backward of this rank's tokens, with dloss the gradient of the global
 * loss. The owned experts' gradients receive the contributions of every rank's tokens; the
 * replicated parameters' gradients only this rank's until confsmoe_mpi_gate_allreduce_grads. */
CONFSMOE_API confsmoe_status confsmoe_mpi_gate_backward(confsmoe_mpi_gate *g, confsmoe_mpi_saved *saved,
                                                        const confsmoe_tensor *dy, const confsmoe_tensor *dslots,
                                                        float dloss, confsmoe_tensor *dx);
CONFSMOE_API void confsmoe_mpi_saved_destroy(confsmoe_mpi_saved *s);

/* Sums the gradients of the replicated parameters (those of confsmoe_mpi_gate_local,
 * bucketed) over the ranks. Call it once per step after the backward calls, with those
 * gradients zeroed at the step's start, so that each rank's hold only its own part. */
CONFSMOE_API confsmoe_status confsmoe_mpi_gate_allreduce_grads(confsmoe_mpi_gate *g);

/* The rank's gate (router, ConfNets, target classifier: the replicated parameters, and
 * its local statistics), owned by g. */
CONFSMOE_API confsmoe_gate *confsmoe_mpi_gate_local(confsmoe_mpi_gate *g);
/* The experts this rank owns: global indices first .. first + count - 1. */
CONFSMOE_API int32_t confsmoe_mpi_gate_first_expert(const confsmoe_mpi_gate *g);
CONFSMOE_API int32_t confsmoe_mpi_gate_n_local_experts(const confsmoe_mpi_gate *g);
/* Local expert i (0 <= i < count), owned by g; NULL out of range. */
CONFSMOE_API confsmoe_expert *confsmoe_mpi_gate_expert(confsmoe_mpi_gate *g, int32_t i);

/* ---------------------------------------------------------------- statistics and errors */

/* confsmoe_gate_stats_get summed over the ranks of comm (collective): tokens and the load
 * of every expert are totals, load entropy, CV^2 and the maximum share are computed from
 * the total loads, mean_confidence[e] is the mean over all ranks' slots of expert e, and
 * conf_loss is the ranks' conf_loss weighted by their tokens. Works on any gate (the
 * gate of a data-parallel model, or confsmoe_mpi_gate_local). */
CONFSMOE_API confsmoe_status confsmoe_mpi_gate_stats_get(MPI_Comm comm, confsmoe_gate *g, int32_t scope,
                                                         confsmoe_gate_stats *out, int64_t *load,
                                                         double *mean_confidence, int32_t n);

/* The detail of this thread's last failed call of libconfsmoe_mpi ("" if none): MPI's error
 * text for CONFSMOE_E_COMM, or the message of the libconfsmoe call that failed (for
 * confsmoe_mpi_dp_step, the model's ctx holds it: confsmoe_ctx_last_error). */
CONFSMOE_API const char *confsmoe_mpi_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* CONFSMOE_MPI_H */
