// A downstream C++ program, built against the installed tree with pkg-config only, through
// the installed C++ wrapper confsmoe.hpp.
#include <confsmoe.hpp>

#include <cstdio>
#include <cstring>
#include <vector>

int main()
{
    try {
        confsmoe::Context ctx;
        confsmoe::Expert expert(ctx, 4, 4);

        // Wrap host memory without copying, as an embedding application would.
        std::vector<float> in(2 * 4, 0.5f), out(2 * 4, 0.0f);
        confsmoe::Tensor x = confsmoe::Tensor::wrap(ctx, in, {2, 4});
        confsmoe::Tensor y = confsmoe::Tensor::wrap(ctx, out, {2, 4});
        expert.forward(x, y);
        bool written = false;
        for (float v : out)
            written = written || v != 0.0f;

        // A wrong shape throws, with the library's message.
        confsmoe::Tensor narrow(ctx, CONFSMOE_F32, {2, 3});
        bool thrown = false;
        try {
            expert.forward(narrow, y);
        } catch (const confsmoe::Error &e) {
            thrown = e.status() == CONFSMOE_E_SHAPE && std::strstr(e.what(), "expert_forward") != nullptr;
        }
        std::printf("consumer (C++): libconfsmoe %s, y[0] = %g\n", confsmoe_version_string(), out[0]);
        return written && thrown ? 0 : 1;
    } catch (const confsmoe::Error &e) {
        std::fprintf(stderr, "consumer (C++): %s\n", e.what());
        return 1;
    }
}
