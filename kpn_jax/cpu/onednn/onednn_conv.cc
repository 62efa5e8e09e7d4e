// 2-D convolutions (float32, NHWC input, HWIO kernel) through oneDNN, as XLA FFI handlers.
//
// On AVX-512 CPUs XLA:CPU runs 3x3 and 7x7 convolutions and their gradients up to 1.7x
// slower than oneDNN, the library PyTorch uses on CPU. kpn_jax/cpu/onednn/__init__.py
// builds this file on first use and
// registers three targets:
//
//   kpn_onednn_conv_forward        (x [N,H,W,C], w [KH,KW,C,O])   -> y [N,OH,OW,O]
//   kpn_onednn_conv_backward_data  (dy [N,OH,OW,O], w)            -> dx [N,H,W,C]
//   kpn_onednn_conv_backward_weights (x, dy)                      -> dw [KH,KW,C,O]
//
// with attributes `stride` and `padding` (the same on both axes; the padding after the
// image is whatever the shapes imply, as lax.conv_general_dilated's output shape fixes it).
// Arrays are used in place: only the kernel is reordered into the layout oneDNN picks.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "dnnl_c_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define KPN_DNNL(call)                                                                  \
  do {                                                                                  \
    dnnl_status_t status_ = (call);                                                     \
    if (status_ != dnnl_success)                                                        \
      return ffi::Error::Internal(std::string("oneDNN call ") + #call +                 \
                                  " failed with status " + std::to_string(status_)); \
  } while (0)

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Sizes of one convolution: x [n, h, w, c], kernel [kh, kw, c, o], y [n, oh, ow, o].
struct Shape {
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride, padding;
  auto key() const { return std::make_tuple(n, h, w, c, kh, kw, o, oh, ow, stride, padding); }
};

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    dnnl_engine_create(&e, dnnl_cpu, 0);
    return e;
  }();
  return engine;
}

// oneDNN streams are not meant to be shared between threads; XLA runs independent
// operations on several threads at once.
dnnl_stream_t ThreadStream() {
  thread_local dnnl_stream_t stream = [] {
    dnnl_stream_t s = nullptr;
    dnnl_stream_create(&s, Engine(), dnnl_stream_default_flags);
    return s;
  }();
  return stream;
}

// A 64-byte aligned per-thread buffer that only grows: the reordered kernel and the
// primitive's scratchpad ('user' scratchpad mode makes primitives safe to execute from
// several threads at once).
struct ThreadBuffer {
  std::vector<char> bytes;
  void* get(size_t size) {
    if (bytes.size() < size + 64) bytes.resize(size + 64);
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(bytes.data()) + 63) &
                                   ~static_cast<uintptr_t>(63));
  }
};

struct MemoryDesc {
  dnnl_memory_desc_t md = nullptr;
  ~MemoryDesc() {
    if (md) dnnl_memory_desc_destroy(md);
  }
};

struct Memory {
  dnnl_memory_t mem = nullptr;
  ~Memory() {
    if (mem) dnnl_memory_destroy(mem);
  }
};

// NHWC activations and HWIO kernels, described by strides (oneDNN's logical order is
// NCHW / OIHW whatever the layout).
dnnl_status_t ActivationDesc(dnnl_memory_desc_t* md, int64_t n, int64_t h, int64_t w, int64_t c) {
  dnnl_dims_t dims = {n, c, h, w};
  dnnl_dims_t strides = {h * w * c, 1, w * c, c};
  return dnnl_memory_desc_create_with_strides(md, 4, dims, dnnl_f32, strides);
}

dnnl_status_t KernelDesc(dnnl_memory_desc_t* md, const Shape& s) {
  dnnl_dims_t dims = {s.o, s.c, s.kh, s.kw};
  dnnl_dims_t strides = {1, s.o, s.kw * s.c * s.o, s.c * s.o};
  return dnnl_memory_desc_create_with_strides(md, 4, dims, dnnl_f32, strides);
}

// One primitive per (kind, shape), created once and executed from any thread.
struct Primitive {
  dnnl_primitive_t conv = nullptr;
  MemoryDesc activations, outputs;  // x or dx, and y or dy: NHWC
  // The kernel layout the primitive chose, and the reorder between it and HWIO
  // (HWIO -> chosen before forward / backward-data, chosen -> HWIO after backward-weights).
  MemoryDesc kernel_hwio, kernel_chosen, scratchpad;
  dnnl_primitive_t kernel_reorder = nullptr;
  size_t kernel_bytes = 0, scratchpad_bytes = 0;
  std::string implementation;
};

std::mutex cache_mutex;
std::map<std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, int64_t>,
         std::unique_ptr<Primitive>>
    cache;

ffi::Error Create(Kind kind, const Shape& s, Primitive* p) {
  MemoryDesc kernel_any;
  KPN_DNNL(ActivationDesc(&p->activations.md, s.n, s.h, s.w, s.c));
  KPN_DNNL(ActivationDesc(&p->outputs.md, s.n, s.oh, s.ow, s.o));
  const_dnnl_memory_desc_t src = p->activations.md, dst = p->outputs.md;
  KPN_DNNL(KernelDesc(&p->kernel_hwio.md, s));
  dnnl_dims_t kernel_dims = {s.o, s.c, s.kh, s.kw};
  KPN_DNNL(dnnl_memory_desc_create_with_tag(&kernel_any.md, 4, kernel_dims, dnnl_f32,
                                            dnnl_format_tag_any));
  dnnl_dims_t strides = {s.stride, s.stride}, dilations = {0, 0};
  dnnl_dims_t padding_l = {s.padding, s.padding};
  dnnl_dims_t padding_r = {(s.oh - 1) * s.stride + s.kh - s.h - s.padding,
                           (s.ow - 1) * s.stride + s.kw - s.w - s.padding};
  dnnl_primitive_attr_t attr = nullptr;
  KPN_DNNL(dnnl_primitive_attr_create(&attr));
  std::unique_ptr<dnnl_primitive_attr, dnnl_status_t (*)(dnnl_primitive_attr_t)> attr_guard(
      attr, dnnl_primitive_attr_destroy);
  KPN_DNNL(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));

  dnnl_primitive_desc_t forward_pd = nullptr, pd = nullptr;
  KPN_DNNL(dnnl_convolution_forward_primitive_desc_create(
      &forward_pd, Engine(), dnnl_forward_training, dnnl_convolution_direct, src,
      kernel_any.md, nullptr, dst, strides, dilations, padding_l, padding_r, attr));
  std::unique_ptr<dnnl_primitive_desc, dnnl_status_t (*)(dnnl_primitive_desc_t)> forward_guard(
      forward_pd, dnnl_primitive_desc_destroy);
  dnnl_query_t kernel_query = dnnl_query_weights_md;
  if (kind == kForward) {
    forward_guard.release();
    pd = forward_pd;
  } else if (kind == kBackwardData) {
    KPN_DNNL(dnnl_convolution_backward_data_primitive_desc_create(
        &pd, Engine(), dnnl_convolution_direct, src, kernel_any.md, dst, strides,
        dilations, padding_l, padding_r, forward_pd, attr));
  } else {
    KPN_DNNL(dnnl_convolution_backward_weights_primitive_desc_create(
        &pd, Engine(), dnnl_convolution_direct, src, kernel_any.md, nullptr, dst, strides,
        dilations, padding_l, padding_r, forward_pd, attr));
    kernel_query = dnnl_query_diff_weights_md;
  }
  std::unique_ptr<dnnl_primitive_desc, dnnl_status_t (*)(dnnl_primitive_desc_t)> pd_guard(
      pd, dnnl_primitive_desc_destroy);

  const char* implementation = nullptr;
  if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &implementation) ==
          dnnl_success &&
      implementation != nullptr) {
    p->implementation = implementation;
  }
  const_dnnl_memory_desc_t chosen = dnnl_primitive_desc_query_md(pd, kernel_query, 0);
  KPN_DNNL(dnnl_memory_desc_clone(&p->kernel_chosen.md, chosen));
  KPN_DNNL(dnnl_memory_desc_clone(&p->scratchpad.md,
                                  dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0)));
  p->scratchpad_bytes = dnnl_memory_desc_get_size(p->scratchpad.md);
  p->kernel_bytes = dnnl_memory_desc_get_size(chosen);
  if (!dnnl_memory_desc_equal(chosen, p->kernel_hwio.md)) {
    dnnl_primitive_desc_t reorder_pd = nullptr;
    if (kind == kBackwardWeights) {
      KPN_DNNL(dnnl_reorder_primitive_desc_create(&reorder_pd, chosen, Engine(),
                                                  p->kernel_hwio.md, Engine(), nullptr));
    } else {
      KPN_DNNL(dnnl_reorder_primitive_desc_create(&reorder_pd, p->kernel_hwio.md, Engine(),
                                                  chosen, Engine(), nullptr));
    }
    std::unique_ptr<dnnl_primitive_desc, dnnl_status_t (*)(dnnl_primitive_desc_t)>
        reorder_guard(reorder_pd, dnnl_primitive_desc_destroy);
    KPN_DNNL(dnnl_primitive_create(&p->kernel_reorder, reorder_pd));
  }
  KPN_DNNL(dnnl_primitive_create(&p->conv, pd));
  return ffi::Error::Success();
}

ffi::Error Get(Kind kind, const Shape& s, Primitive** out) {
  auto key = std::tuple_cat(std::make_tuple(static_cast<int>(kind)), s.key());
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    auto p = std::make_unique<Primitive>();
    ffi::Error error = Create(kind, s, p.get());
    if (error.failure()) return error;
    it = cache.emplace(key, std::move(p)).first;
  }
  *out = it->second.get();
  return ffi::Error::Success();
}

// activations: x (forward, backward-weights) or dx (backward-data); kernel: w or dw;
// outputs: y (forward) or dy (backward).
ffi::Error Run(Kind kind, const Shape& s, void* activations, void* kernel, void* outputs) {
  Primitive* p = nullptr;
  ffi::Error error = Get(kind, s, &p);
  if (error.failure()) return error;
  thread_local ThreadBuffer kernel_buffer, scratchpad_buffer;
  Memory src, dst, kernel_hwio, kernel_chosen, scratchpad;
  KPN_DNNL(dnnl_memory_create(&src.mem, p->activations.md, Engine(), activations));
  KPN_DNNL(dnnl_memory_create(&dst.mem, p->outputs.md, Engine(), outputs));
  KPN_DNNL(dnnl_memory_create(&kernel_hwio.mem, p->kernel_hwio.md, Engine(), kernel));
  KPN_DNNL(dnnl_memory_create(&scratchpad.mem, p->scratchpad.md, Engine(),
                              scratchpad_buffer.get(p->scratchpad_bytes)));
  dnnl_memory_t conv_kernel = kernel_hwio.mem;
  if (p->kernel_reorder != nullptr) {
    KPN_DNNL(dnnl_memory_create(&kernel_chosen.mem, p->kernel_chosen.md, Engine(),
                                kernel_buffer.get(p->kernel_bytes)));
    conv_kernel = kernel_chosen.mem;
  }
  dnnl_stream_t stream = ThreadStream();
  if (p->kernel_reorder != nullptr && kind != kBackwardWeights) {
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, kernel_hwio.mem}, {DNNL_ARG_TO, conv_kernel}};
    KPN_DNNL(dnnl_primitive_execute(p->kernel_reorder, stream, 2, args));
  }
  const int activation_arg = kind == kBackwardData ? DNNL_ARG_DIFF_SRC : DNNL_ARG_SRC;
  const int kernel_arg = kind == kBackwardWeights ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS;
  const int output_arg = kind == kForward ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST;
  dnnl_exec_arg_t args[4] = {{activation_arg, src.mem},
                             {kernel_arg, conv_kernel},
                             {output_arg, dst.mem},
                             {DNNL_ARG_SCRATCHPAD, scratchpad.mem}};
  KPN_DNNL(dnnl_primitive_execute(p->conv, stream, 4, args));
  if (p->kernel_reorder != nullptr && kind == kBackwardWeights) {
    dnnl_exec_arg_t back[2] = {{DNNL_ARG_FROM, conv_kernel}, {DNNL_ARG_TO, kernel_hwio.mem}};
    KPN_DNNL(dnnl_primitive_execute(p->kernel_reorder, stream, 2, back));
  }
  KPN_DNNL(dnnl_stream_wait(stream));
  return ffi::Error::Success();
}

// Checks the shapes against each other (x, kernel, y in the forward's terms).
ffi::Error MakeShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                     ffi::Span<const int64_t> y, int64_t stride, int64_t padding, Shape* s) {
  *s = Shape{x[0], x[1], x[2], x[3], kernel[0], kernel[1], kernel[3], y[1], y[2], stride, padding};
  const int64_t pad_h = (s->oh - 1) * stride + s->kh - s->h - padding;
  const int64_t pad_w = (s->ow - 1) * stride + s->kw - s->w - padding;
  if (stride < 1 || padding < 0 || kernel[2] != s->c || y[0] != s->n || y[3] != s->o ||
      pad_h < 0 || pad_h >= s->kh || pad_w < 0 || pad_w >= s->kw) {
    return ffi::Error::InvalidArgument(
        "kpn_onednn_conv: inconsistent shapes x [" + std::to_string(s->n) + "," +
        std::to_string(s->h) + "," + std::to_string(s->w) + "," + std::to_string(s->c) +
        "], kernel [" + std::to_string(kernel[0]) + "," + std::to_string(kernel[1]) + "," +
        std::to_string(kernel[2]) + "," + std::to_string(kernel[3]) + "], y [" +
        std::to_string(y[0]) + "," + std::to_string(y[1]) + "," + std::to_string(y[2]) + "," +
        std::to_string(y[3]) + "], stride " + std::to_string(stride) + ", padding " +
        std::to_string(padding));
  }
  return ffi::Error::Success();
}

using Array = ffi::Buffer<ffi::F32, 4>;
using Result = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error Forward(Array x, Array kernel, Result y, int64_t stride, int64_t padding) {
  Shape s;
  ffi::Error error = MakeShape(x.dimensions(), kernel.dimensions(), y->dimensions(), stride,
                               padding, &s);
  if (error.failure()) return error;
  return Run(kForward, s, x.untyped_data(), kernel.untyped_data(), y->untyped_data());
}

ffi::Error BackwardData(Array dy, Array kernel, Result dx, int64_t stride, int64_t padding) {
  Shape s;
  ffi::Error error = MakeShape(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride,
                               padding, &s);
  if (error.failure()) return error;
  return Run(kBackwardData, s, dx->untyped_data(), kernel.untyped_data(), dy.untyped_data());
}

ffi::Error BackwardWeights(Array x, Array dy, Result dkernel, int64_t stride, int64_t padding) {
  Shape s;
  ffi::Error error = MakeShape(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride,
                               padding, &s);
  if (error.failure()) return error;
  return Run(kBackwardWeights, s, x.untyped_data(), dkernel->untyped_data(), dy.untyped_data());
}

}  // namespace

#define KPN_BINDING                                                                     \
  ffi::Ffi::Bind().Arg<Array>().Arg<Array>().Ret<Array>().Attr<int64_t>("stride").Attr< \
      int64_t>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(KpnOneDnnConvForward, Forward, KPN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KpnOneDnnConvBackwardData, BackwardData, KPN_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KpnOneDnnConvBackwardWeights, BackwardWeights, KPN_BINDING);

// The implementation oneDNN chose for one convolution (e.g. "brgconv:avx512_core"), for
// benchmarks and tests; "" if the primitive cannot be created. kind: 0 forward,
// 1 backward-data, 2 backward-weights.
extern "C" const char* KpnOneDnnConvImplementation(int kind, int64_t n, int64_t h, int64_t w,
                                                   int64_t c, int64_t kh, int64_t kw, int64_t o,
                                                   int64_t oh, int64_t ow, int64_t stride,
                                                   int64_t padding) {
  Primitive* p = nullptr;
  if (kind < 0 || kind > 2 ||
      Get(static_cast<Kind>(kind), Shape{n, h, w, c, kh, kw, o, oh, ow, stride, padding}, &p)
          .failure()) {
    return "";
  }
  return p->implementation.c_str();
}
