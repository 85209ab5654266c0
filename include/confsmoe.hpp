/*
 * confsmoe.hpp: a header-only C++17 wrapper of confsmoe.h (docs/API.md, "C++").
 *
 * In the style of ONNX Runtime's onnxruntime_cxx_api.h, each method calls one C function
 * and turns a failed status into an exception. The wrapper checks by itself only what the
 * C API cannot see: the length of a host buffer or of a list of model inputs, the element
 * type of typed data access, a parameter index.
 * - Owners (Context, Tensor, Saved, Expert, Gate, Imputer, Optim, Model) hold one handle
 *   and destroy it in their destructor. They move and never copy; get() gives the raw
 *   handle, release() gives it up, and `explicit operator bool` says whether one is held.
 *   Passing nullptr to a constructor makes an empty owner, as a move leaves its source.
 * - Views (TensorView, ConstTensorView, GateView) wrap handles that the C API lends
 *   (a layer's parameters, the model's gate) and never destroy them. A Tensor converts to
 *   a TensorView, a const Tensor only to a ConstTensorView: inputs take ConstTensorView.
 * - Errors: a failed call throws confsmoe::Error, carrying the status and the message of
 *   confsmoe_ctx_last_error() of the handle's ctx (or "function: status text" without one).
 * - Each object keeps a plain pointer to its ctx, for those messages only. It relies on the
 *   C library keeping a ctx alive while objects created from it are, so owners may be
 *   destroyed in any order.
 * - Options are the C structs themselves; default_X_params() returns one filled by
 *   confsmoe_X_params_init().
 * - Data is never copied behind the caller's back: Tensor::wrap uses the caller's memory,
 *   data<T>() is a Span over the tensor's own, and copy_in / copy_out copy when called.
 */
#ifndef CONFSMOE_HPP
#define CONFSMOE_HPP

#include "confsmoe.h"

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace confsmoe {

/* ---------------------------------------------------------------- errors */

class Error : public std::runtime_error {
public:
    Error(confsmoe_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    confsmoe_status status() const noexcept { return status_; }

private:
    confsmoe_status status_;
};

namespace detail {

/* The ctx holds the message of its last error; without a ctx (ctx create, or an empty
 * owner, for which the library has nowhere to write) the status text stands in. */
[[noreturn]] inline void fail(confsmoe_status status, const confsmoe_ctx *ctx, const char *function)
{
    const char *message = ctx ? confsmoe_ctx_last_error(ctx) : "";
    if (message && *message)
        throw Error(status, message);
    throw Error(status, std::string(function) + ": " + confsmoe_status_string(status));
}

inline void check(confsmoe_status status, const confsmoe_ctx *ctx, const char *function)
{
    if (status != CONFSMOE_OK)
        fail(status, ctx, function);
}

} // namespace detail

/* ---------------------------------------------------------------- spans and shapes */

/* A pointer and a length, like C++20's std::span<T>: what data<T>() returns and what
 * copy_in / copy_out / wrap take. It borrows; it never owns or copies. */
template <typename T>
class Span {
public:
    constexpr Span() noexcept = default;
    constexpr Span(T *data, std::size_t size) noexcept : data_(data), size_(size) {}
    /* Any contiguous lvalue container of T (std::vector, std::array, a C array, another
     * Span); a container of U converts where U* converts to T* without slicing (adds const). */
    template <typename Container,
              typename Element = std::remove_pointer_t<decltype(std::data(std::declval<Container &>()))>,
              typename = std::enable_if_t<std::is_convertible<Element (*)[], T (*)[]>::value>>
    constexpr Span(Container &container) noexcept : data_(std::data(container)), size_(std::size(container))
    {
    }

    constexpr T *data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr T &operator[](std::size_t i) const noexcept { return data_[i]; }
    constexpr T *begin() const noexcept { return data_; }
    constexpr T *end() const noexcept { return data_ + size_; }

private:
    T *data_ = nullptr;
    std::size_t size_ = 0;
};

/* The dimensions of a tensor, held by value (at most CONFSMOE_MAX_DIMS): {B, d}, a
 * std::vector<int64_t> or a Span<const int64_t>. */
class Shape {
public:
    Shape(std::initializer_list<int64_t> dims) : Shape(dims.begin(), dims.size()) {}
    Shape(Span<const int64_t> dims) : Shape(dims.data(), dims.size()) {}
    Shape(const std::vector<int64_t> &dims) : Shape(dims.data(), dims.size()) {}

    int32_t ndim() const noexcept { return ndim_; }
    const int64_t *data() const noexcept { return dims_; }
    int64_t operator[](int32_t axis) const noexcept { return dims_[axis]; }
    const int64_t *begin() const noexcept { return dims_; }
    const int64_t *end() const noexcept { return dims_ + ndim_; }
    friend bool operator==(const Shape &a, const Shape &b) noexcept
    {
        if (a.ndim_ != b.ndim_)
            return false;
        for (int32_t i = 0; i < a.ndim_; i++)
            if (a.dims_[i] != b.dims_[i])
                return false;
        return true;
    }
    friend bool operator!=(const Shape &a, const Shape &b) noexcept { return !(a == b); }

private:
    Shape(const int64_t *dims, std::size_t ndim)
    {
        if (ndim > CONFSMOE_MAX_DIMS)
            throw Error(CONFSMOE_E_SHAPE, "confsmoe::Shape: " + std::to_string(ndim) +
                                              " dimensions, more than CONFSMOE_MAX_DIMS (" +
                                              std::to_string(CONFSMOE_MAX_DIMS) + ")");
        ndim_ = static_cast<int32_t>(ndim);
        for (std::size_t i = 0; i < ndim; i++)
            dims_[i] = dims[i];
    }

    int64_t dims_[CONFSMOE_MAX_DIMS] = {};
    int32_t ndim_ = 0;
};

/* ---------------------------------------------------------------- options */

inline confsmoe_ctx_params default_ctx_params()
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    return p;
}

inline confsmoe_gate_params default_gate_params()
{
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    return p;
}

inline confsmoe_imputer_params default_imputer_params()
{
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    return p;
}

inline confsmoe_optim_params default_optim_params()
{
    confsmoe_optim_params p;
    confsmoe_optim_params_init(&p);
    return p;
}

inline confsmoe_model_params default_model_params()
{
    confsmoe_model_params p;
    confsmoe_model_params_init(&p);
    return p;
}

/* ---------------------------------------------------------------- handle holders */

namespace detail {

/* Owns one handle: destroys it at the end, moves, never copies. */
template <typename Handle, void (*Destroy)(Handle *)>
class Owned {
public:
    using handle_type = Handle;

    Owned() noexcept = default;
    ~Owned() { Destroy(handle_); }
    Owned(const Owned &) = delete;
    Owned &operator=(const Owned &) = delete;
    Owned(Owned &&other) noexcept
        : handle_(std::exchange(other.handle_, nullptr)), ctx_(std::exchange(other.ctx_, nullptr))
    {
    }
    Owned &operator=(Owned &&other) noexcept
    {
        if (this != &other) {
            Destroy(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
            ctx_ = std::exchange(other.ctx_, nullptr);
        }
        return *this;
    }

    Handle *get() noexcept { return handle_; }
    const Handle *get() const noexcept { return handle_; }
    /* Gives up the handle without destroying it; the caller destroys it. */
    Handle *release() noexcept
    {
        ctx_ = nullptr;
        return std::exchange(handle_, nullptr);
    }
    explicit operator bool() const noexcept { return handle_ != nullptr; }

protected:
    void reset(Handle *handle, const confsmoe_ctx *ctx) noexcept
    {
        Destroy(handle_);
        handle_ = handle;
        ctx_ = ctx;
    }

    Handle *handle_ = nullptr;
    const confsmoe_ctx *ctx_ = nullptr;
};

/* Lends one handle: copies freely, never destroys. Handle may be const. */
template <typename Handle>
class Borrowed {
public:
    using handle_type = std::remove_const_t<Handle>;

    Borrowed() noexcept = default;
    Borrowed(std::nullptr_t) noexcept {}
    explicit Borrowed(Handle *handle, const confsmoe_ctx *ctx = nullptr) noexcept : handle_(handle), ctx_(ctx) {}

    Handle *get() const noexcept { return handle_; }
    explicit operator bool() const noexcept { return handle_ != nullptr; }

protected:
    Handle *handle_ = nullptr;
    const confsmoe_ctx *ctx_ = nullptr;
};

template <typename T>
struct DtypeOf;
template <>
struct DtypeOf<float> {
    static constexpr confsmoe_dtype value = CONFSMOE_F32;
};
template <>
struct DtypeOf<int32_t> {
    static constexpr confsmoe_dtype value = CONFSMOE_I32;
};
template <>
struct DtypeOf<uint8_t> {
    static constexpr confsmoe_dtype value = CONFSMOE_U8;
};

inline const char *dtype_name(confsmoe_dtype dtype)
{
    switch (dtype) {
    case CONFSMOE_F32: return "f32";
    case CONFSMOE_I32: return "i32";
    case CONFSMOE_U8: return "u8";
    default: return "an unknown dtype";
    }
}

/* What every tensor offers read-only: owners, views and const views. */
template <typename Base>
class ConstTensorMethods : public Base {
public:
    using Base::Base;

    confsmoe_dtype dtype() const noexcept { return confsmoe_tensor_dtype(this->handle_); }
    int32_t ndim() const noexcept { return confsmoe_tensor_ndim(this->handle_); }
    int64_t dim(int32_t axis) const noexcept { return confsmoe_tensor_dim(this->handle_, axis); }
    int64_t numel() const noexcept { return confsmoe_tensor_numel(this->handle_); }
    std::size_t nbytes() const noexcept { return confsmoe_tensor_nbytes(this->handle_); }
    Shape shape() const
    {
        int64_t dims[CONFSMOE_MAX_DIMS] = {};
        const int32_t n = this->handle_ ? ndim() : 0;
        for (int32_t i = 0; i < n; i++)
            dims[i] = dim(i);
        return Span<const int64_t>(dims, static_cast<std::size_t>(n));
    }

    /* The elements, typed: T must match dtype() (float, int32_t or uint8_t). */
    template <typename T>
    Span<const T> data() const
    {
        expect_dtype(DtypeOf<T>::value, "confsmoe_tensor_data");
        // confsmoe_tensor_data takes a mutable handle; nothing is written through it here.
        const auto *elements = static_cast<const T *>(confsmoe_tensor_data(const_cast<confsmoe_tensor *>(this->handle_)));
        return {elements, static_cast<std::size_t>(numel())};
    }

    /* Copies every element out; dst.size() must equal numel(). */
    void copy_out(Span<float> dst) const { copy_out_typed(dst); }
    void copy_out(Span<int32_t> dst) const { copy_out_typed(dst); }
    void copy_out(Span<uint8_t> dst) const { copy_out_typed(dst); }

protected:
    /* The library reports a wrong dtype only where a call takes a tensor; data<T>() and the
     * typed copies check it here, and refuse an empty handle before reading its size. */
    void expect_dtype(confsmoe_dtype expected, const char *function) const
    {
        if (!this->handle_)
            throw Error(CONFSMOE_E_INVALID_ARGUMENT, std::string(function) + ": the tensor handle is empty");
        if (dtype() != expected)
            throw Error(CONFSMOE_E_DTYPE, std::string(function) + ": the tensor is " + dtype_name(dtype()) +
                                              ", not " + dtype_name(expected));
    }

private:
    template <typename T>
    void copy_out_typed(Span<T> dst) const
    {
        expect_dtype(DtypeOf<T>::value, "confsmoe_tensor_copy_out");
        check(confsmoe_tensor_copy_out(this->handle_, dst.data(), dst.size() * sizeof(T)), this->ctx_,
              "confsmoe_tensor_copy_out");
    }
};

/* Tensors that may be written: owners and mutable views. */
template <typename Base>
class TensorMethods : public ConstTensorMethods<Base> {
public:
    using ConstTensorMethods<Base>::ConstTensorMethods;
    using ConstTensorMethods<Base>::data;

    template <typename T>
    Span<T> data()
    {
        this->expect_dtype(DtypeOf<T>::value, "confsmoe_tensor_data");
        return {static_cast<T *>(confsmoe_tensor_data(this->handle_)), static_cast<std::size_t>(this->numel())};
    }

    /* Copies every element in; src.size() must equal numel(). */
    void copy_in(Span<const float> src) { copy_in_typed(src); }
    void copy_in(Span<const int32_t> src) { copy_in_typed(src); }
    void copy_in(Span<const uint8_t> src) { copy_in_typed(src); }

private:
    template <typename T>
    void copy_in_typed(Span<const T> src)
    {
        this->expect_dtype(DtypeOf<T>::value, "confsmoe_tensor_copy_in");
        check(confsmoe_tensor_copy_in(this->handle_, src.data(), src.size() * sizeof(T)), this->ctx_,
              "confsmoe_tensor_copy_in");
    }
};

} // namespace detail

/* ---------------------------------------------------------------- context */

class Context : public detail::Owned<confsmoe_ctx, confsmoe_ctx_destroy> {
public:
    /* A ctx with the default params. */
    Context() : Context(default_ctx_params()) {}
    explicit Context(std::nullptr_t) noexcept {}
    explicit Context(const confsmoe_ctx_params &params)
    {
        confsmoe_ctx *ctx = nullptr;
        detail::check(confsmoe_ctx_create(&params, &ctx), nullptr, "confsmoe_ctx_create");
        reset(ctx, ctx);
    }
    /* Takes ownership of a ctx from the C API. */
    explicit Context(confsmoe_ctx *owned) noexcept { reset(owned, owned); }

    void set_seed(uint64_t seed) { detail::check(confsmoe_ctx_set_seed(handle_, seed), ctx_, "confsmoe_ctx_set_seed"); }
    /* Bytes of kept blocks given back (docs/API.md, "Memory"). */
    std::size_t trim() noexcept { return confsmoe_ctx_trim(handle_); }
    const char *last_error() const noexcept { return confsmoe_ctx_last_error(handle_); }
};

/* ---------------------------------------------------------------- tensors */

/* A borrowed tensor that may be read only. Converts from TensorView and const Tensor. */
class ConstTensorView : public detail::ConstTensorMethods<detail::Borrowed<const confsmoe_tensor>> {
public:
    using ConstTensorMethods::ConstTensorMethods;
};

/* A borrowed tensor that may be written: a layer's parameter or gradient, or a Tensor. */
class TensorView : public detail::TensorMethods<detail::Borrowed<confsmoe_tensor>> {
public:
    using TensorMethods::TensorMethods;
    operator ConstTensorView() const noexcept { return ConstTensorView(handle_, ctx_); }
};

class Tensor : public detail::TensorMethods<detail::Owned<confsmoe_tensor, confsmoe_tensor_destroy>> {
public:
    explicit Tensor(std::nullptr_t) noexcept {}
    /* A zeroed tensor owned by the library. */
    Tensor(Context &ctx, confsmoe_dtype dtype, const Shape &shape)
    {
        confsmoe_tensor *t = nullptr;
        detail::check(confsmoe_tensor_create(ctx.get(), dtype, shape.ndim(), shape.data(), &t), ctx.get(),
                      "confsmoe_tensor_create");
        reset(t, ctx.get());
    }
    /* Takes ownership of a tensor from the C API; ctx (may be NULL) supplies error messages. */
    Tensor(confsmoe_tensor *owned, const confsmoe_ctx *ctx) noexcept { reset(owned, ctx); }

    /* A tensor over the caller's memory, without copying: `data` must hold exactly the
     * shape's elements and outlive the tensor. The dtype follows the element type. */
    static Tensor wrap(Context &ctx, Span<float> data, const Shape &shape) { return wrap_typed(ctx, data, shape); }
    static Tensor wrap(Context &ctx, Span<int32_t> data, const Shape &shape) { return wrap_typed(ctx, data, shape); }
    static Tensor wrap(Context &ctx, Span<uint8_t> data, const Shape &shape) { return wrap_typed(ctx, data, shape); }

    operator TensorView() & noexcept { return TensorView(handle_, ctx_); }
    operator ConstTensorView() const & noexcept { return ConstTensorView(handle_, ctx_); }

private:
    template <typename T>
    static Tensor wrap_typed(Context &ctx, Span<T> data, const Shape &shape)
    {
        confsmoe_tensor *t = nullptr;
        detail::check(confsmoe_tensor_wrap(ctx.get(), detail::DtypeOf<T>::value, shape.ndim(), shape.data(),
                                           data.data(), &t),
                      ctx.get(), "confsmoe_tensor_wrap");
        Tensor tensor(t, ctx.get());
        // The C API cannot see the length of `data`; a shorter buffer would be read past its end.
        if (static_cast<std::size_t>(tensor.numel()) != data.size())
            throw Error(CONFSMOE_E_SHAPE, "confsmoe_tensor_wrap: " + std::to_string(data.size()) +
                                              " elements of data for a shape of " +
                                              std::to_string(tensor.numel()));
        return tensor;
    }
};

/* ---------------------------------------------------------------- saved state */

/* What one training-mode forward kept for its backward. */
class Saved : public detail::Owned<confsmoe_saved, confsmoe_saved_destroy> {
public:
    explicit Saved(std::nullptr_t) noexcept {}
    Saved(confsmoe_saved *owned, const confsmoe_ctx *ctx) noexcept { reset(owned, ctx); }
};

/* ---------------------------------------------------------------- parameters */

namespace detail {

template <typename Handle>
struct ParameterApi;
template <>
struct ParameterApi<confsmoe_expert> {
    static constexpr auto count = confsmoe_expert_n_params;
    static constexpr auto name = confsmoe_expert_param_name;
    static constexpr auto param = confsmoe_expert_param;
    static constexpr auto grad = confsmoe_expert_grad;
    static constexpr auto zero_grad = confsmoe_expert_zero_grad;
    static constexpr const char *prefix = "confsmoe_expert";
};
template <>
struct ParameterApi<confsmoe_gate> {
    static constexpr auto count = confsmoe_gate_n_params;
    static constexpr auto name = confsmoe_gate_param_name;
    static constexpr auto param = confsmoe_gate_param;
    static constexpr auto grad = confsmoe_gate_grad;
    static constexpr auto zero_grad = confsmoe_gate_zero_grad;
    static constexpr const char *prefix = "confsmoe_gate";
};
template <>
struct ParameterApi<confsmoe_imputer> {
    static constexpr auto count = confsmoe_imputer_n_params;
    static constexpr auto name = confsmoe_imputer_param_name;
    static constexpr auto param = confsmoe_imputer_param;
    static constexpr auto grad = confsmoe_imputer_grad;
    static constexpr auto zero_grad = confsmoe_imputer_zero_grad;
    static constexpr const char *prefix = "confsmoe_imputer";
};
template <>
struct ParameterApi<confsmoe_model> {
    static constexpr auto count = confsmoe_model_n_params;
    static constexpr auto name = confsmoe_model_param_name;
    static constexpr auto param = confsmoe_model_param;
    static constexpr auto grad = confsmoe_model_grad;
    static constexpr auto zero_grad = confsmoe_model_zero_grad;
    static constexpr const char *prefix = "confsmoe_model";
};

/* The uniform parameter view of docs/API.md, "Parameters": the tensors belong to the layer. */
template <typename Base>
class ParameterMethods : public Base {
    using Api = ParameterApi<typename Base::handle_type>;

public:
    using Base::Base;

    int32_t n_params() const noexcept { return Api::count(this->handle_); }
    const char *param_name(int32_t i) const { return Api::name(this->handle_, expect_index(i, "_param_name")); }
    TensorView param(int32_t i) { return TensorView(Api::param(this->handle_, expect_index(i, "_param")), this->ctx_); }
    TensorView grad(int32_t i) { return TensorView(Api::grad(this->handle_, expect_index(i, "_grad")), this->ctx_); }
    void zero_grad() noexcept { Api::zero_grad(this->handle_); }

private:
    /* The C accessors return NULL out of range; a view of NULL would fail later and vaguely. */
    int32_t expect_index(int32_t i, const char *suffix) const
    {
        const int32_t n = n_params();
        if (i < 0 || i >= n)
            throw Error(CONFSMOE_E_INVALID_ARGUMENT, std::string(Api::prefix) + suffix + ": index " +
                                                         std::to_string(i) + " is not in [0, " +
                                                         std::to_string(n < 0 ? 0 : n) + ")");
        return i;
    }
};

} // namespace detail

/* ---------------------------------------------------------------- experts */

class Expert : public detail::ParameterMethods<detail::Owned<confsmoe_expert, confsmoe_expert_destroy>> {
public:
    explicit Expert(std::nullptr_t) noexcept {}
    Expert(Context &ctx, int64_t d, int64_t h)
    {
        confsmoe_expert *e = nullptr;
        detail::check(confsmoe_expert_create(ctx.get(), d, h, &e), ctx.get(), "confsmoe_expert_create");
        reset(e, ctx.get());
    }
    Expert(confsmoe_expert *owned, const confsmoe_ctx *ctx) noexcept { reset(owned, ctx); }

    int64_t d() const noexcept { return confsmoe_expert_d(handle_); }
    int64_t h() const noexcept { return confsmoe_expert_h(handle_); }

    /* Inference: x [N, d] -> y [N, d]. */
    void forward(ConstTensorView x, TensorView y)
    {
        detail::check(confsmoe_expert_forward(handle_, x.get(), y.get(), nullptr), ctx_, "confsmoe_expert_forward");
    }
    /* Training: as forward, and returns what backward needs. */
    Saved forward_train(ConstTensorView x, TensorView y)
    {
        confsmoe_saved *saved = nullptr;
        detail::check(confsmoe_expert_forward(handle_, x.get(), y.get(), &saved), ctx_, "confsmoe_expert_forward");
        return Saved(saved, ctx_);
    }
    /* Accumulates the parameter gradients; writes dx [N, d] unless it is empty. */
    void backward(Saved &saved, ConstTensorView dy, TensorView dx = nullptr)
    {
        detail::check(confsmoe_expert_backward(handle_, saved.get(), dy.get(), dx.get()), ctx_,
                      "confsmoe_expert_backward");
    }
};

/* ---------------------------------------------------------------- gates */

namespace detail {

template <typename Base>
class GateMethods : public ParameterMethods<Base> {
public:
    using ParameterMethods<Base>::ParameterMethods;

    int32_t n_experts() const noexcept { return confsmoe_gate_n_experts(this->handle_); }
    int32_t k() const noexcept { return confsmoe_gate_k(this->handle_); }

    /* Inference (confsmoe_gate_forward without saved). labels and present may be empty;
     * topk, slots and loss are optional outputs. */
    void forward(ConstTensorView x, ConstTensorView labels, ConstTensorView present, TensorView y,
                 TensorView topk = nullptr, TensorView slots = nullptr, float *loss = nullptr)
    {
        check(confsmoe_gate_forward(this->handle_, x.get(), labels.get(), present.get(), y.get(), topk.get(),
                                    slots.get(), loss, nullptr),
              this->ctx_, "confsmoe_gate_forward");
    }
    /* Training: as forward, and returns what backward needs. */
    Saved forward_train(ConstTensorView x, ConstTensorView labels, ConstTensorView present, TensorView y,
                        TensorView topk = nullptr, TensorView slots = nullptr, float *loss = nullptr)
    {
        confsmoe_saved *saved = nullptr;
        check(confsmoe_gate_forward(this->handle_, x.get(), labels.get(), present.get(), y.get(), topk.get(),
                                    slots.get(), loss, &saved),
              this->ctx_, "confsmoe_gate_forward");
        return Saved(saved, this->ctx_);
    }
    void backward(Saved &saved, ConstTensorView dy, ConstTensorView dslots, float dloss, TensorView dx = nullptr)
    {
        check(confsmoe_gate_backward(this->handle_, saved.get(), dy.get(), dslots.get(), dloss, dx.get()),
              this->ctx_, "confsmoe_gate_backward");
    }

    /* Utilisation over CONFSMOE_STATS_LAST_CALL or CONFSMOE_STATS_TOTAL. */
    confsmoe_gate_stats stats(int32_t scope) { return stats(scope, {}, {}); }
    /* Also the slots per expert and each expert's mean confidence: each span is empty or has
     * n_experts() entries. */
    confsmoe_gate_stats stats(int32_t scope, Span<int64_t> load, Span<double> mean_confidence)
    {
        if (!load.empty() && !mean_confidence.empty() && load.size() != mean_confidence.size())
            throw Error(CONFSMOE_E_SHAPE, "confsmoe_gate_stats_get: load has " + std::to_string(load.size()) +
                                              " entries and mean_confidence " +
                                              std::to_string(mean_confidence.size()));
        const std::size_t n = load.empty() ? mean_confidence.size() : load.size();
        confsmoe_gate_stats out{};
        out.struct_size = sizeof out;
        check(confsmoe_gate_stats_get(this->handle_, scope, &out, load.empty() ? nullptr : load.data(),
                                      mean_confidence.empty() ? nullptr : mean_confidence.data(),
                                      static_cast<int32_t>(n)),
              this->ctx_, "confsmoe_gate_stats_get");
        return out;
    }
    void stats_reset() noexcept { confsmoe_gate_stats_reset(this->handle_); }

#ifdef CONFSMOE_EXPERIMENTAL
    void set_shard(int64_t first, int64_t total)
    {
        check(confsmoe_gate_set_shard(this->handle_, first, total), this->ctx_, "confsmoe_gate_set_shard");
    }
#endif
};

} // namespace detail

/* A gate the caller does not own: the model's. */
class GateView : public detail::GateMethods<detail::Borrowed<confsmoe_gate>> {
public:
    using GateMethods::GateMethods;
};

class Gate : public detail::GateMethods<detail::Owned<confsmoe_gate, confsmoe_gate_destroy>> {
public:
    explicit Gate(std::nullptr_t) noexcept {}
    /* The experts are borrowed: the gate may be used only while they exist (docs/API.md). */
    Gate(Context &ctx, const confsmoe_gate_params &params, Span<Expert> experts)
    {
        std::vector<confsmoe_expert *> handles;
        handles.reserve(experts.size());
        for (Expert &e : experts)
            handles.push_back(e.get());
        confsmoe_gate *g = nullptr;
        detail::check(confsmoe_gate_create(ctx.get(), &params, handles.data(), static_cast<int32_t>(handles.size()), &g),
                      ctx.get(), "confsmoe_gate_create");
        reset(g, ctx.get());
    }
#ifdef CONFSMOE_EXPERIMENTAL
    /* A gate whose experts run behind `exchange` (confsmoe_gate_create_exchange). */
    Gate(Context &ctx, const confsmoe_gate_params &params, int32_t n_experts, const confsmoe_gate_exchange &exchange)
    {
        confsmoe_gate *g = nullptr;
        detail::check(confsmoe_gate_create_exchange(ctx.get(), &params, n_experts, &exchange, &g), ctx.get(),
                      "confsmoe_gate_create_exchange");
        reset(g, ctx.get());
    }
#endif
    Gate(confsmoe_gate *owned, const confsmoe_ctx *ctx) noexcept { reset(owned, ctx); }
};

/* ---------------------------------------------------------------- imputer */

class Imputer : public detail::ParameterMethods<detail::Owned<confsmoe_imputer, confsmoe_imputer_destroy>> {
public:
    explicit Imputer(std::nullptr_t) noexcept {}
    Imputer(Context &ctx, const confsmoe_imputer_params &params)
    {
        confsmoe_imputer *imp = nullptr;
        detail::check(confsmoe_imputer_create(ctx.get(), &params, &imp), ctx.get(), "confsmoe_imputer_create");
        reset(imp, ctx.get());
    }
    Imputer(confsmoe_imputer *owned, const confsmoe_ctx *ctx) noexcept { reset(owned, ctx); }

    /* Stage 1 for modality m: missing rows of x become means of `draws` pool rows. */
    void fill(int32_t m, ConstTensorView pool, int32_t draws, ConstTensorView avail, TensorView x)
    {
        detail::check(confsmoe_imputer_fill(handle_, m, pool.get(), draws, avail.get(), x.get()), ctx_,
                      "confsmoe_imputer_fill");
    }
    /* Stage 2, inference; out may be h itself. */
    void forward(ConstTensorView h, ConstTensorView slots, ConstTensorView avail, TensorView out)
    {
        detail::check(confsmoe_imputer_forward(handle_, h.get(), slots.get(), avail.get(), out.get(), nullptr), ctx_,
                      "confsmoe_imputer_forward");
    }
    Saved forward_train(ConstTensorView h, ConstTensorView slots, ConstTensorView avail, TensorView out)
    {
        confsmoe_saved *saved = nullptr;
        detail::check(confsmoe_imputer_forward(handle_, h.get(), slots.get(), avail.get(), out.get(), &saved), ctx_,
                      "confsmoe_imputer_forward");
        return Saved(saved, ctx_);
    }
    /* Writes dh and adds into dslots, each unless empty. */
    void backward(Saved &saved, ConstTensorView dout, TensorView dh = nullptr, TensorView dslots = nullptr)
    {
        detail::check(confsmoe_imputer_backward(handle_, saved.get(), dout.get(), dh.get(), dslots.get()), ctx_,
                      "confsmoe_imputer_backward");
    }
};

/* ---------------------------------------------------------------- optimizer */

class Optim : public detail::Owned<confsmoe_optim, confsmoe_optim_destroy> {
public:
    explicit Optim(std::nullptr_t) noexcept {}
    Optim(Context &ctx, const confsmoe_optim_params &params)
    {
        confsmoe_optim *o = nullptr;
        detail::check(confsmoe_optim_create(ctx.get(), &params, &o), ctx.get(), "confsmoe_optim_create");
        reset(o, ctx.get());
    }
    Optim(confsmoe_optim *owned, const confsmoe_ctx *ctx) noexcept { reset(owned, ctx); }

    /* Registers a parameter and its gradient (borrowed: step() needs them to exist). */
    void add(TensorView param, ConstTensorView grad)
    {
        detail::check(confsmoe_optim_add(handle_, param.get(), grad.get()), ctx_, "confsmoe_optim_add");
    }
    /* Registers every parameter of an Expert, Gate, GateView, Imputer or Model. */
    template <typename Layer>
    void add_parameters(Layer &&layer)
    {
        for (int32_t i = 0; i < layer.n_params(); i++)
            add(layer.param(i), layer.grad(i));
    }
    void step() { detail::check(confsmoe_optim_step(handle_), ctx_, "confsmoe_optim_step"); }
    void set_lr(float lr) { detail::check(confsmoe_optim_set_lr(handle_, lr), ctx_, "confsmoe_optim_set_lr"); }
};

/* ---------------------------------------------------------------- model */

/* The total loss and its CE / BCE part, of one training step. */
struct StepLoss {
    float loss;
    float task_loss;
};

class Model : public detail::ParameterMethods<detail::Owned<confsmoe_model, confsmoe_model_destroy>> {
public:
    explicit Model(std::nullptr_t) noexcept {}
    Model(Context &ctx, const confsmoe_model_params &params)
    {
        confsmoe_model *model = nullptr;
        detail::check(confsmoe_model_create(ctx.get(), &params, &model), ctx.get(), "confsmoe_model_create");
        reset(model, ctx.get());
        n_modalities_ = params.n_modalities;
    }
    /* Takes ownership of a model from the C API; the C API cannot tell its modality count. */
    Model(confsmoe_model *owned, const confsmoe_ctx *ctx, int32_t n_modalities) noexcept : n_modalities_(n_modalities)
    {
        reset(owned, ctx);
    }
    int32_t n_modalities() const noexcept { return n_modalities_; }

    /* The stage-1 pool of modality m (copied by the library). */
    void set_pool(int32_t m, ConstTensorView pool)
    {
        detail::check(confsmoe_model_set_pool(handle_, m, pool.get()), ctx_, "confsmoe_model_set_pool");
    }

    /* One training step over n_modalities() inputs; gradients accumulate. logits [B, C] is optional. */
    StepLoss step(Span<const ConstTensorView> inputs, ConstTensorView avail, ConstTensorView labels,
                  TensorView logits = nullptr)
    {
        const std::vector<const confsmoe_tensor *> handles = input_handles(inputs, "confsmoe_model_step");
        StepLoss out{0.0f, 0.0f};
        detail::check(confsmoe_model_step(handle_, handles.data(), avail.get(), labels.get(), logits.get(), &out.loss,
                                          &out.task_loss),
                      ctx_, "confsmoe_model_step");
        return out;
    }
    StepLoss step(std::initializer_list<ConstTensorView> inputs, ConstTensorView avail, ConstTensorView labels,
                  TensorView logits = nullptr)
    {
        return step(Span<const ConstTensorView>(inputs.begin(), inputs.size()), avail, labels, logits);
    }

    /* Inference: logits [B, C]. */
    void predict(Span<const ConstTensorView> inputs, ConstTensorView avail, TensorView logits)
    {
        const std::vector<const confsmoe_tensor *> handles = input_handles(inputs, "confsmoe_model_predict");
        detail::check(confsmoe_model_predict(handle_, handles.data(), avail.get(), logits.get()), ctx_,
                      "confsmoe_model_predict");
    }
    void predict(std::initializer_list<ConstTensorView> inputs, ConstTensorView avail, TensorView logits)
    {
        predict(Span<const ConstTensorView>(inputs.begin(), inputs.size()), avail, logits);
    }

    /* The model's gate, for its utilisation statistics; owned by the model. */
    GateView gate() noexcept { return GateView(confsmoe_model_gate(handle_), ctx_); }

    /* safetensors checkpoints, with the optimizer's state when one is given. */
    void save_checkpoint(const std::string &path)
    {
        detail::check(confsmoe_checkpoint_save(handle_, nullptr, path.c_str()), ctx_, "confsmoe_checkpoint_save");
    }
    void save_checkpoint(const std::string &path, const Optim &optim)
    {
        detail::check(confsmoe_checkpoint_save(handle_, optim.get(), path.c_str()), ctx_, "confsmoe_checkpoint_save");
    }
    void load_checkpoint(const std::string &path)
    {
        detail::check(confsmoe_checkpoint_load(handle_, nullptr, path.c_str()), ctx_, "confsmoe_checkpoint_load");
    }
    void load_checkpoint(const std::string &path, Optim &optim)
    {
        detail::check(confsmoe_checkpoint_load(handle_, optim.get(), path.c_str()), ctx_, "confsmoe_checkpoint_load");
    }

#ifdef CONFSMOE_EXPERIMENTAL
    /* One training step on rows first .. first + B - 1 of a global batch (confsmoe_model_step_shard). */
    StepLoss step_shard(Span<const ConstTensorView> inputs, ConstTensorView avail, ConstTensorView labels,
                        ConstTensorView global_avail, int64_t first, TensorView logits = nullptr)
    {
        const std::vector<const confsmoe_tensor *> handles = input_handles(inputs, "confsmoe_model_step_shard");
        StepLoss out{0.0f, 0.0f};
        detail::check(confsmoe_model_step_shard(handle_, handles.data(), avail.get(), labels.get(), global_avail.get(),
                                                first, logits.get(), &out.loss, &out.task_loss),
                      ctx_, "confsmoe_model_step_shard");
        return out;
    }
#endif

private:
    /* The C API reads one input per modality from a bare array: a shorter list would be read past its end. */
    std::vector<const confsmoe_tensor *> input_handles(Span<const ConstTensorView> inputs, const char *function) const
    {
        if (inputs.size() != static_cast<std::size_t>(n_modalities_))
            throw Error(CONFSMOE_E_SHAPE, std::string(function) + ": " + std::to_string(inputs.size()) +
                                              " inputs for a model of " + std::to_string(n_modalities_) +
                                              " modalities");
        std::vector<const confsmoe_tensor *> handles;
        handles.reserve(inputs.size());
        for (const ConstTensorView &x : inputs)
            handles.push_back(x.get());
        return handles;
    }

    int32_t n_modalities_ = 0;
};

} // namespace confsmoe

#endif /* CONFSMOE_HPP */
