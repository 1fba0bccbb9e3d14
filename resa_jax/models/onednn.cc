// 2-D convolutions for XLA:CPU through oneDNN (the library PyTorch's CPU convolutions use),
// as three XLA FFI handlers: the forward, the gradient with respect to the input and the
// gradient with respect to the weights, of an NHWC x HWIO -> NHWC float32 convolution
// with strides and explicit padding (no dilation, one feature group).
//
// resa_jax/models/onednn.py compiles this file on first use and registers the handlers
// as the FFI targets ResaConvForward, ResaConvBackwardData and ResaConvBackwardWeights.
// Activations stay NHWC, oneDNN's own layout for its AVX-512/AVX2 kernels; the weights
// go to the blocked layout oneDNN asks for (a reorder of the small weight tensor each
// call).  The primitives, the reorders and the blocked weight buffers are made once per
// shape and kept.  One call runs at a time: oneDNN parallelises each call over every core
// (OpenMP), and XLA runs independent operations on several threads at once; two calls
// at once would put two thread teams on the same cores, whose spinning barriers were
// measured to slow a ResNet-18 step tenfold.  A oneDNN error comes back to XLA as the
// call's error (an exception in Python), never as an abort of the process.
#include <cstdint>
#include <exception>
#include <string>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

// One convolution: input (n, h, w, c), weights (kh, kw, c, o), output (n, oh, ow, o).
struct Shape {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  auto Key() const { return std::tie(n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr); }
  bool operator<(const Shape& other) const { return Key() < other.Key(); }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Activations(int64_t n, int64_t c, int64_t h, int64_t w, Tag tag) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, tag);
}

memory::desc Weights(const Shape& s, Tag tag) {
  return memory::desc({s.o, s.c, s.kh, s.kw}, memory::data_type::f32, tag);
}

struct Primitives {
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_backward_data::primitive_desc backward_data_pd;
  dnnl::convolution_backward_weights::primitive_desc backward_weights_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data backward_data;
  dnnl::convolution_backward_weights backward_weights;
  // Blocked weights of each primitive where its layout is not HWIO (else empty), and the
  // reorders to and from HWIO.
  memory forward_weights, backward_data_weights, diff_weights;
  dnnl::primitive to_forward, to_backward_data, from_diff_weights;
};

// `wanted` weights: a kept buffer and the reorder between it and HWIO, if they differ.
void Blocked(const memory::desc& wanted, const Shape& s, bool into, memory* kept,
             dnnl::primitive* reorder) {
  auto hwio = Weights(s, Tag::hwio);
  if (wanted == hwio) return;
  *kept = memory(wanted, Engine());
  memory user(hwio, Engine(), nullptr);
  *reorder = into ? dnnl::reorder(user, *kept) : dnnl::reorder(*kept, user);
}

Primitives& ForShape(const Shape& s) {
  static std::map<Shape, std::unique_ptr<Primitives>> made;  // under Serial()
  auto found = made.find(s);
  if (found != made.end()) return *found->second;
  memory::dims strides = {s.sh, s.sw}, pad_l = {s.pt, s.pl}, pad_r = {s.pb, s.pr};
  auto src = Activations(s.n, s.c, s.h, s.w, Tag::nhwc);
  auto dst = Activations(s.n, s.o, s.oh, s.ow, Tag::nhwc);
  auto wei = Weights(s, Tag::any);
  auto direct = dnnl::algorithm::convolution_direct;
  auto forward_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, direct, src, wei, dst,
                                      strides, pad_l, pad_r), Engine());
  auto backward_data_pd = dnnl::convolution_backward_data::primitive_desc(
      dnnl::convolution_backward_data::desc(direct, src, wei, dst, strides, pad_l, pad_r),
      Engine(), forward_pd);
  auto backward_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      dnnl::convolution_backward_weights::desc(direct, src, wei, dst, strides, pad_l, pad_r),
      Engine(), forward_pd);
  auto p = std::make_unique<Primitives>(Primitives{
      forward_pd, backward_data_pd, backward_weights_pd,
      dnnl::convolution_forward(forward_pd), dnnl::convolution_backward_data(backward_data_pd),
      dnnl::convolution_backward_weights(backward_weights_pd)});
  Blocked(forward_pd.weights_desc(), s, true, &p->forward_weights, &p->to_forward);
  Blocked(backward_data_pd.weights_desc(), s, true, &p->backward_data_weights,
          &p->to_backward_data);
  Blocked(backward_weights_pd.diff_weights_desc(), s, false, &p->diff_weights,
          &p->from_diff_weights);
  Primitives& result = *p;
  made.emplace(s, std::move(p));
  return result;
}

std::mutex& Serial() {
  static std::mutex mutex;
  return mutex;
}

Shape ShapeOf(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w,
              ffi::AnyBuffer::Dimensions y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
              int64_t pl, int64_t pr) {
  return Shape{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pb, pl, pr};
}

// The weights as a primitive wants them: the HWIO buffer itself, or its blocked copy.
memory WeightsIn(dnnl::stream& stream, const memory& kept, dnnl::primitive& reorder,
                 const Shape& s, void* data) {
  memory user(Weights(s, Tag::hwio), Engine(), data);
  if (!kept) return user;
  reorder.execute(stream, {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, kept}});
  return kept;
}

// Runs `body` (a handler's work) one call at a time; a oneDNN error becomes the call's.
template <typename Body>
ffi::Error Serially(Body body) {
  std::lock_guard<std::mutex> serial(Serial());
  try {
    body();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 if the kernels oneDNN runs here are its AVX-512 ones (or newer), else 0.
extern "C" int ResaOneDnnAvx512() {
  auto core = static_cast<int>(dnnl::cpu_isa::avx512_core);
  return (static_cast<int>(dnnl::get_effective_cpu_isa()) & core) == core;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  return Serially([&] {
    Shape s = ShapeOf(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
    Primitives& p = ForShape(s);
    dnnl::stream stream(Engine());
    memory weights = WeightsIn(stream, p.forward_weights, p.to_forward, s, w.typed_data());
    p.forward.execute(stream, {
        {DNNL_ARG_SRC, memory(p.forward_pd.src_desc(), Engine(), x.typed_data())},
        {DNNL_ARG_WEIGHTS, weights},
        {DNNL_ARG_DST, memory(p.forward_pd.dst_desc(), Engine(), y->typed_data())}});
    stream.wait();
  });
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  return Serially([&] {
    Shape s = ShapeOf(dx->dimensions(), w.dimensions(), g.dimensions(), sh, sw, pt, pb, pl, pr);
    Primitives& p = ForShape(s);
    dnnl::stream stream(Engine());
    memory weights = WeightsIn(stream, p.backward_data_weights, p.to_backward_data, s,
                               w.typed_data());
    p.backward_data.execute(stream, {
        {DNNL_ARG_DIFF_DST, memory(p.backward_data_pd.diff_dst_desc(), Engine(), g.typed_data())},
        {DNNL_ARG_WEIGHTS, weights},
        {DNNL_ARG_DIFF_SRC,
         memory(p.backward_data_pd.diff_src_desc(), Engine(), dx->typed_data())}});
    stream.wait();
  });
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  return Serially([&] {
    Shape s = ShapeOf(x.dimensions(), dw->dimensions(), g.dimensions(), sh, sw, pt, pb, pl, pr);
    Primitives& p = ForShape(s);
    dnnl::stream stream(Engine());
    memory user(Weights(s, Tag::hwio), Engine(), dw->typed_data());
    memory diff_weights = p.diff_weights ? p.diff_weights : user;
    p.backward_weights.execute(stream, {
        {DNNL_ARG_SRC, memory(p.backward_weights_pd.src_desc(), Engine(), x.typed_data())},
        {DNNL_ARG_DIFF_DST,
         memory(p.backward_weights_pd.diff_dst_desc(), Engine(), g.typed_data())},
        {DNNL_ARG_DIFF_WEIGHTS, diff_weights}});
    if (p.diff_weights) {
      p.from_diff_weights.execute(stream, {{DNNL_ARG_FROM, p.diff_weights}, {DNNL_ARG_TO, user}});
    }
    stream.wait();
  });
}

#define RESA_CONV_BINDING                                                               \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Ret<ffi::Buffer<ffi::F32>>()                                                     \
      .Attr<int64_t>("sh")                                                              \
      .Attr<int64_t>("sw")                                                              \
      .Attr<int64_t>("pt")                                                              \
      .Attr<int64_t>("pb")                                                              \
      .Attr<int64_t>("pl")                                                              \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResaConvForward, Forward, RESA_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResaConvBackwardData, BackwardData, RESA_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResaConvBackwardWeights, BackwardWeights, RESA_CONV_BINDING);
