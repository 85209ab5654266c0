// confsmoe.hpp on its own: a small Conf-SMoE model trained through the wrapper only, the
// layers it wraps, its exceptions, and its ownership rules.
#define CONFSMOE_EXPERIMENTAL
#include <confsmoe.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <vector>

namespace {

int failures = 0;

#define EXPECT(cond)                                                                     \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);     \
            failures++;                                                                  \
        }                                                                                \
    } while (0)

// Runs `call`, which must throw confsmoe::Error with `status` and a message containing `fragment`.
template <typename Call>
void expect_error(int line, Call &&call, confsmoe_status status, const char *fragment)
{
    try {
        call();
    } catch (const confsmoe::Error &e) {
        if (e.status() != status || std::strstr(e.what(), fragment) == nullptr) {
            std::fprintf(stderr, "line %d: Error(%d, \"%s\"), expected status %d and \"%s\"\n", line,
                         static_cast<int>(e.status()), e.what(), static_cast<int>(status), fragment);
            failures++;
        }
        return;
    }
    std::fprintf(stderr, "line %d: no confsmoe::Error thrown, expected status %d\n", line, static_cast<int>(status));
    failures++;
}
#define EXPECT_ERROR(call, status, fragment) expect_error(__LINE__, [&] { call; }, status, fragment)

// ------------------------------------------------------------------ a separable 2-modality task

constexpr int64_t kBatch = 60, kClasses = 3, kFeatures0 = 6, kFeatures1 = 4;

struct Dataset {
    std::vector<float> x0 = std::vector<float>(kBatch * kFeatures0);
    std::vector<float> x1 = std::vector<float>(kBatch * kFeatures1);
    std::vector<uint8_t> avail = std::vector<uint8_t>(kBatch * 2, 1);
    std::vector<int32_t> labels = std::vector<int32_t>(kBatch);
    std::vector<float> pool0, pool1; // the rows in which each modality is present
};

// Class c lifts feature c (and c + 3) of modality 0 and feature c of modality 1 by 1, on
// uniform noise in [-1, 1). Every fifth sample misses modality 0, another fifth modality 1.
Dataset make_dataset()
{
    Dataset data;
    std::mt19937 rng(7);
    const auto noise = [&rng] { return static_cast<float>(rng() >> 8) / 16777216.0f - 0.5f; };
    for (int64_t b = 0; b < kBatch; b++) {
        const int32_t c = static_cast<int32_t>(b % kClasses);
        data.labels[b] = c;
        for (int64_t f = 0; f < kFeatures0; f++)
            data.x0[b * kFeatures0 + f] = (f % kClasses == c ? 1.0f : 0.0f) + 2.0f * noise();
        for (int64_t f = 0; f < kFeatures1; f++)
            data.x1[b * kFeatures1 + f] = (f == c ? 1.0f : 0.0f) + 2.0f * noise();
        data.avail[b * 2 + 0] = b % 5 != 1;
        data.avail[b * 2 + 1] = b % 5 != 3;
        if (data.avail[b * 2 + 0])
            data.pool0.insert(data.pool0.end(), data.x0.data() + b * kFeatures0, data.x0.data() + (b + 1) * kFeatures0);
        if (data.avail[b * 2 + 1])
            data.pool1.insert(data.pool1.end(), data.x1.data() + b * kFeatures1, data.x1.data() + (b + 1) * kFeatures1);
    }
    return data;
}

confsmoe_model_params small_model_params(const int64_t *features)
{
    confsmoe_model_params p = confsmoe::default_model_params();
    p.n_modalities = 2;
    p.features = features;
    p.d = 16;
    p.heads = 2;
    p.n_experts = 4;
    p.k = 2;
    p.n_classes = kClasses;
    p.dropout = 0.0f;
    p.predict_pool_mean = 1; // deterministic predict: the checkpoint check compares logits
    return p;
}

double accuracy(confsmoe::ConstTensorView logits, const std::vector<int32_t> &labels)
{
    const confsmoe::Span<const float> z = logits.data<float>();
    int correct = 0;
    for (int64_t b = 0; b < kBatch; b++) {
        int32_t best = 0;
        for (int32_t c = 1; c < kClasses; c++)
            if (z[b * kClasses + c] > z[b * kClasses + best])
                best = c;
        correct += best == labels[b];
    }
    return static_cast<double>(correct) / kBatch;
}

void test_train_model()
{
    Dataset data = make_dataset();
    confsmoe_ctx_params cp = confsmoe::default_ctx_params();
    cp.seed = 3;
    confsmoe::Context ctx(cp);

    const int64_t features[2] = {kFeatures0, kFeatures1};
    confsmoe::Model model(ctx, small_model_params(features));
    EXPECT(model.n_modalities() == 2);
    confsmoe::Tensor x0 = confsmoe::Tensor::wrap(ctx, data.x0, {kBatch, kFeatures0});
    confsmoe::Tensor x1 = confsmoe::Tensor::wrap(ctx, data.x1, {kBatch, kFeatures1});
    confsmoe::Tensor avail = confsmoe::Tensor::wrap(ctx, data.avail, {kBatch, 2});
    confsmoe::Tensor labels = confsmoe::Tensor::wrap(ctx, data.labels, {kBatch});
    // wrap shares the caller's memory: no copy.
    EXPECT(x0.data<float>().data() == data.x0.data());
    const int64_t p0 = static_cast<int64_t>(data.pool0.size()) / kFeatures0;
    const int64_t p1 = static_cast<int64_t>(data.pool1.size()) / kFeatures1;
    model.set_pool(0, confsmoe::Tensor::wrap(ctx, data.pool0, {p0, kFeatures0}));
    model.set_pool(1, confsmoe::Tensor::wrap(ctx, data.pool1, {p1, kFeatures1}));

    confsmoe_optim_params op = confsmoe::default_optim_params();
    op.lr = 1e-2f;
    confsmoe::Optim adam(ctx, op);
    adam.add_parameters(model);

    confsmoe::Tensor logits(ctx, CONFSMOE_F32, {kBatch, kClasses});
    model.predict({x0, x1}, avail, logits);
    const double accuracy_before = accuracy(logits, data.labels);

    const int steps = 60;
    float first = 0.0f, last = 0.0f;
    for (int step = 0; step < steps; step++) {
        model.zero_grad();
        const confsmoe::StepLoss loss = model.step({x0, x1}, avail, labels);
        EXPECT(std::isfinite(loss.loss) && loss.task_loss <= loss.loss + 1e-6f);
        adam.step();
        if (step == 0)
            first = loss.loss;
        last = loss.loss;
    }
    model.predict({x0, x1}, avail, logits);
    const double accuracy_after = accuracy(logits, data.labels);
    std::printf("model: loss %.4f -> %.4f over %d Adam steps; training-batch accuracy %.3f -> %.3f (chance %.3f)\n",
                first, last, steps, accuracy_before, accuracy_after, 1.0 / kClasses);
    EXPECT(last < 0.5f * first);
    EXPECT(accuracy_after >= 1.0 / kClasses + 0.4 && accuracy_after >= accuracy_before + 0.2);

    // The model's gate is a view: it saw every token of every step and predict.
    const confsmoe_gate_stats stats = model.gate().stats(CONFSMOE_STATS_TOTAL);
    EXPECT(stats.tokens == (steps + 2) * kBatch * 2);
    EXPECT(model.gate().n_experts() == 4 && model.gate().k() == 2);
    model.gate().set_shard(0, 0); // experimental: ends sharding (none was on)
    EXPECT_ERROR(model.gate().set_shard(5, 2), CONFSMOE_E_INVALID_ARGUMENT, "gate_set_shard");

    // Parameter views name and reach the model's own tensors.
    EXPECT(std::string(model.param_name(0)).rfind("enc.0", 0) == 0);
    EXPECT(model.param(0).dtype() == CONFSMOE_F32 && model.param(0).shape() == model.grad(0).shape());
    EXPECT_ERROR(model.param(model.n_params()), CONFSMOE_E_INVALID_ARGUMENT, "confsmoe_model_param");

    // A checkpoint carries the trained weights into a fresh model: the same logits.
    char dir[] = "/tmp/confsmoe-hpp-XXXXXX";
    EXPECT(mkdtemp(dir) != nullptr);
    const std::string path = std::string(dir) + "/model.safetensors";
    model.save_checkpoint(path, adam);
    confsmoe::Model restored(ctx, small_model_params(features));
    confsmoe::Tensor restored_logits(ctx, CONFSMOE_F32, {kBatch, kClasses});
    restored.set_pool(0, confsmoe::Tensor::wrap(ctx, data.pool0, {p0, kFeatures0}));
    restored.set_pool(1, confsmoe::Tensor::wrap(ctx, data.pool1, {p1, kFeatures1}));
    restored.load_checkpoint(path);
    restored.predict({x0, x1}, avail, restored_logits);
    std::vector<float> expected(kBatch * kClasses), got(kBatch * kClasses);
    logits.copy_out(expected);
    restored_logits.copy_out(got);
    EXPECT(expected == got);
    std::remove(path.c_str());
    rmdir(dir);
    EXPECT_ERROR(restored.load_checkpoint(path), CONFSMOE_E_IO, "checkpoint_load");

    // The wrapper's own check: the C API reads one input per modality from a bare array.
    EXPECT_ERROR(model.step({x0}, avail, labels), CONFSMOE_E_SHAPE, "confsmoe_model_step: 1 inputs");
}

// ------------------------------------------------------------------ the layers

void test_expert_and_gate()
{
    confsmoe::Context ctx;
    const int64_t d = 4, n = 5;
    std::vector<confsmoe::Expert> experts;
    experts.emplace_back(ctx, d, 8);
    experts.emplace_back(ctx, d, 8);
    EXPECT(experts[0].d() == d && experts[0].h() == 8 && experts[0].n_params() == 4);
    EXPECT(std::string(experts[0].param_name(2)) == "w2");

    confsmoe::Tensor x(ctx, CONFSMOE_F32, {n, d}), y(ctx, CONFSMOE_F32, {n, d});
    confsmoe::Tensor dy(ctx, CONFSMOE_F32, {n, d}), dx(ctx, CONFSMOE_F32, {n, d});
    std::vector<float> ones(n * d, 1.0f), values(n * d);
    for (std::size_t i = 0; i < values.size(); i++)
        values[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
    x.copy_in(values);
    dy.copy_in(ones);
    EXPECT(x.data<float>()[3] == values[3]);

    // Expert: training forward, backward into dx and the gradients.
    confsmoe::Saved saved = experts[0].forward_train(x, y);
    EXPECT(static_cast<bool>(saved));
    experts[0].backward(saved, dy, dx);
    double grad_norm = 0.0;
    for (float g : experts[0].grad(0).data<float>())
        grad_norm += static_cast<double>(g) * g;
    EXPECT(grad_norm > 0.0);
    experts[0].zero_grad();
    for (float g : experts[0].grad(0).data<float>())
        EXPECT(g == 0.0f);
    EXPECT_ERROR(experts[0].backward(saved, dy, dx), CONFSMOE_E_STATE, "backward already ran");

    // Gate: router softmax over the two experts, k = 1.
    confsmoe_gate_params gp = confsmoe::default_gate_params();
    gp.d = d;
    gp.k = 1;
    gp.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    confsmoe::Gate gate(ctx, gp, experts);
    confsmoe::Tensor topk(ctx, CONFSMOE_I32, {n, 1});
    confsmoe::Saved gate_saved = gate.forward_train(x, nullptr, nullptr, y, topk);
    gate.backward(gate_saved, dy, nullptr, 1.0f, dx);
    std::vector<int64_t> load(2);
    const confsmoe_gate_stats stats = gate.stats(CONFSMOE_STATS_LAST_CALL, load, {});
    EXPECT(stats.tokens == n && load[0] + load[1] == n);
    for (int32_t e : topk.data<int32_t>())
        EXPECT(e == 0 || e == 1);
    std::vector<double> three_confidences(3);
    EXPECT_ERROR(gate.stats(CONFSMOE_STATS_TOTAL, load, three_confidences), CONFSMOE_E_SHAPE, "stats_get");
    gate.stats_reset();
    gate.forward(x, nullptr, nullptr, y); // inference
    EXPECT(gate.stats(CONFSMOE_STATS_TOTAL).tokens == n);

    // Imputer stage 1: with one pool row and one draw, a missing row becomes that row.
    confsmoe_imputer_params ip = confsmoe::default_imputer_params();
    ip.d = d;
    ip.n_modalities = 2;
    confsmoe::Imputer imputer(ctx, ip);
    EXPECT(std::string(imputer.param_name(0)) == "q.w");
    std::vector<float> pool_row = {1.0f, 2.0f, 3.0f};
    std::vector<float> rows = {9.0f, 9.0f, 9.0f, 5.0f, 5.0f, 5.0f};
    std::vector<uint8_t> mask = {1, 1, 0, 1}; // sample 1 misses modality 0
    confsmoe::Tensor pool = confsmoe::Tensor::wrap(ctx, pool_row, {1, 3});
    confsmoe::Tensor filled = confsmoe::Tensor::wrap(ctx, rows, {2, 3});
    imputer.fill(0, pool, 1, confsmoe::Tensor::wrap(ctx, mask, {2, 2}), filled);
    EXPECT((rows == std::vector<float>{9.0f, 9.0f, 9.0f, 1.0f, 2.0f, 3.0f}));
    confsmoe::Tensor mask_copy(ctx, CONFSMOE_U8, {2, 2});
    mask_copy.copy_in(mask);
    std::vector<uint8_t> mask_out(4);
    mask_copy.copy_out(mask_out);
    EXPECT(mask_out == mask);
}

// ------------------------------------------------------------------ errors

void test_errors()
{
    confsmoe::Context ctx;
    confsmoe::Expert expert(ctx, 8, 16);
    confsmoe::Tensor x(ctx, CONFSMOE_F32, {3, 4}), y(ctx, CONFSMOE_F32, {3, 8});
    // The library's message, from the ctx: it names the function and the argument.
    EXPECT_ERROR(expert.forward(x, y), CONFSMOE_E_SHAPE, "expert_forward: x");
    try {
        expert.forward(x, y);
    } catch (const confsmoe::Error &e) {
        EXPECT(std::string(e.what()) == ctx.last_error());
    }
    EXPECT_ERROR(confsmoe::Tensor(ctx, CONFSMOE_F32, {2, -1}), CONFSMOE_E_SHAPE, "tensor_create");
    EXPECT_ERROR(confsmoe::Shape({1, 2, 3, 4, 5}), CONFSMOE_E_SHAPE, "5 dimensions");

    // Checks of the wrapper itself, where the C API cannot see the mistake.
    EXPECT_ERROR(x.data<int32_t>(), CONFSMOE_E_DTYPE, "confsmoe_tensor_data: the tensor is f32, not i32");
    std::vector<float> short_buffer(5);
    EXPECT_ERROR(confsmoe::Tensor::wrap(ctx, short_buffer, {2, 3}), CONFSMOE_E_SHAPE, "5 elements");
    std::vector<float> wrong_size(11);
    EXPECT_ERROR(x.copy_in(wrong_size), CONFSMOE_E_SHAPE, "tensor_copy_in");

    // No ctx to hold a message: the function's name and the status text.
    confsmoe_ctx_params bad = confsmoe::default_ctx_params();
    bad.struct_size = 8;
    EXPECT_ERROR(confsmoe::Context{bad}, CONFSMOE_E_VERSION, "confsmoe_ctx_create: version mismatch");
    confsmoe::Expert empty(nullptr);
    EXPECT_ERROR(empty.forward(x, y), CONFSMOE_E_INVALID_ARGUMENT, "confsmoe_expert_forward: invalid argument");
}

// ------------------------------------------------------------------ ownership

static_assert(!std::is_copy_constructible<confsmoe::Tensor>::value && !std::is_copy_assignable<confsmoe::Model>::value,
              "owners never copy");
static_assert(std::is_nothrow_move_constructible<confsmoe::Gate>::value &&
                  std::is_nothrow_move_assignable<confsmoe::Context>::value,
              "owners move");
static_assert(!std::is_constructible<confsmoe::TensorView, const confsmoe::Tensor &>::value,
              "a const Tensor gives only a ConstTensorView");
static_assert(std::is_constructible<confsmoe::ConstTensorView, const confsmoe::Tensor &>::value,
              "a const Tensor is an input");
static_assert(!std::is_constructible<confsmoe::Context, confsmoe::Tensor>::value, "no conversion between owners");

void test_ownership()
{
    confsmoe::Context ctx;
    confsmoe::Tensor a(ctx, CONFSMOE_F32, {2, 3});
    confsmoe_tensor *const raw = a.get();
    confsmoe::Tensor b(std::move(a));
    EXPECT(!a && a.get() == nullptr && b.get() == raw);
    confsmoe::Tensor c(ctx, CONFSMOE_U8, {1});
    c = std::move(b); // c's own tensor is destroyed
    EXPECT(!b && c.get() == raw && c.dtype() == CONFSMOE_F32);

    confsmoe::Context moved(std::move(ctx));
    EXPECT(!ctx && static_cast<bool>(moved));
    confsmoe::Model model(nullptr);
    EXPECT(!model);

    // A view borrows the handle; release hands it to the caller, who destroys it.
    confsmoe::TensorView view = c;
    EXPECT(view.get() == raw);
    confsmoe_tensor *const released = c.release();
    EXPECT(!c && released == raw);
    confsmoe_tensor_destroy(released);
}

// Owners hold a plain ctx pointer: the library keeps the ctx alive while its objects live, so
// an object may outlive its Context owner and still report the ctx's messages.
void test_teardown_any_order()
{
    confsmoe::Expert expert(nullptr);
    confsmoe::Tensor x(nullptr), y(nullptr);
    {
        confsmoe::Context ctx;
        expert = confsmoe::Expert(ctx, 8, 16);
        x = confsmoe::Tensor(ctx, CONFSMOE_F32, {3, 4});
        y = confsmoe::Tensor(ctx, CONFSMOE_F32, {3, 8});
    }
    EXPECT_ERROR(expert.forward(x, y), CONFSMOE_E_SHAPE, "expert_forward: x has shape [3, 4]");
}

} // namespace

int main()
{
    try {
        test_train_model();
        test_expert_and_gate();
        test_errors();
        test_ownership();
        test_teardown_any_order();
    } catch (const confsmoe::Error &e) {
        std::fprintf(stderr, "unexpected confsmoe::Error(%d): %s\n", static_cast<int>(e.status()), e.what());
        return 1;
    }
    if (failures)
        std::fprintf(stderr, "%d check(s) failed\n", failures);
    else
        std::printf("test_hpp: all checks passed\n");
    return failures ? 1 : 0;
}
