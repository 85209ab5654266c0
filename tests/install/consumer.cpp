// A downstream C++ program, built against the installed tree with pkg-config only.
#include <confsmoe.h>

#include <cstdio>
#include <memory>
#include <vector>

struct ctx_deleter {
    void operator()(confsmoe_ctx *c) const { confsmoe_ctx_destroy(c); }
};
struct expert_deleter {
    void operator()(confsmoe_expert *e) const { confsmoe_expert_destroy(e); }
};
struct tensor_deleter {
    void operator()(confsmoe_tensor *t) const { confsmoe_tensor_destroy(t); }
};

int main()
{
    confsmoe_ctx *raw_ctx = nullptr;
    if (confsmoe_ctx_create(nullptr, &raw_ctx) != CONFSMOE_OK)
        return 1;
    std::unique_ptr<confsmoe_ctx, ctx_deleter> ctx(raw_ctx);

    confsmoe_expert *raw_expert = nullptr;
    if (confsmoe_expert_create(ctx.get(), 4, 4, &raw_expert) != CONFSMOE_OK)
        return 1;
    std::unique_ptr<confsmoe_expert, expert_deleter> expert(raw_expert);

    // Wrap host memory without copying, as an embedding application would.
    std::vector<float> in(2 * 4, 0.5f), out(2 * 4, 0.0f);
    const int64_t dims[2] = {2, 4};
    confsmoe_tensor *raw_x = nullptr, *raw_y = nullptr;
    if (confsmoe_tensor_wrap(ctx.get(), CONFSMOE_F32, 2, dims, in.data(), &raw_x) != CONFSMOE_OK ||
        confsmoe_tensor_wrap(ctx.get(), CONFSMOE_F32, 2, dims, out.data(), &raw_y) != CONFSMOE_OK)
        return 1;
    std::unique_ptr<confsmoe_tensor, tensor_deleter> x(raw_x), y(raw_y);
    if (confsmoe_expert_forward(expert.get(), x.get(), y.get(), nullptr) != CONFSMOE_OK)
        return 1;
    bool written = false;
    for (float v : out)
        written = written || v != 0.0f;
    std::printf("consumer (C++): libconfsmoe %s, y[0] = %g\n", confsmoe_version_string(), out[0]);
    return written ? 0 : 1;
}
