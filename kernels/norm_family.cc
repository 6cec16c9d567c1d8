// The small-batch normalizers beside GN as CPU kernels: FilterResponseNorm (+ TLU), EvoNorm-S0,
// EvoNorm-B0, each a forward op and a closed-form backward op, and BatchRenorm's corrections r and
// d. ops.py says what each layer computes (its TensorFlow-op reference, differentiated by
// autodiff); these compute the same numbers to float32 rounding in one op per direction.
//
// Built like group_norm.cc, whose way of streaming the tensor they share: the input is viewed as
// [N, S, C] (S = positions), channels contiguous; a work unit is one example's block of whole
// groups (FRN and EvoNorm-B0: a group per channel), so small batches of large maps still use every
// core. Statistics are float32, accumulated in float over blocks of rows and in double across
// them, per channel from values shifted by the channel's first value (a variance of the shifted
// values keeps a centred variance's precision when the mean is large). A forward op reads its
// input once for the statistics and once to write the output; a backward op reads dy and x once
// for its sums and once to write dx. Inputs and outputs are float32, bfloat16 or float16,
// converted to float32 per value.
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "Eigen/Core"
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

absl::Status SameAsInput(InferenceContext* c, int input, int outputs) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(input), 3, &x));
  for (int i = 0; i < outputs; ++i) c->set_output(i, x);
  return absl::OkStatus();
}

// [N, k] where k is C (`groups` 0) or the groups attribute.
ShapeHandle PerExample(InferenceContext* c, ShapeHandle x, int groups) {
  return c->Matrix(c->Dim(x, 0), groups ? c->MakeDim(groups) : c->Dim(x, 2));
}

REGISTER_OP("GnFilterResponseNorm")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("tau: float")
    .Input("epsilon: float")
    .Output("y: T")
    .Output("rstd: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("tlu: bool")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(SameAsInput(c, 0, 1));
      c->set_output(1, PerExample(c, c->input(0), 0));
      return absl::OkStatus();
    });

REGISTER_OP("GnFilterResponseNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("tau: float")
    .Input("rstd: float")
    .Output("dx: T")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Output("dtau: float")
    .Output("depsilon: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("tlu: bool")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(SameAsInput(c, 1, 1));
      for (int i = 1; i < 4; ++i) c->set_output(i, c->Vector(c->Dim(c->input(1), 2)));
      c->set_output(4, c->Scalar());
      return absl::OkStatus();
    });

REGISTER_OP("GnEvoNormS0")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("v: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("rstd: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("groups: int >= 1")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(SameAsInput(c, 0, 1));
      int groups;
      TF_RETURN_IF_ERROR(c->GetAttr("groups", &groups));
      c->set_output(1, PerExample(c, c->input(0), groups));
      c->set_output(2, PerExample(c, c->input(0), groups));
      return absl::OkStatus();
    });

REGISTER_OP("GnEvoNormS0Grad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: float")
    .Input("v: float")
    .Input("mean: float")
    .Input("rstd: float")
    .Output("dx: T")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Output("dv: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("groups: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(SameAsInput(c, 1, 1));
      for (int i = 1; i < 4; ++i) c->set_output(i, c->Vector(c->Dim(c->input(1), 2)));
      return absl::OkStatus();
    });

// ghosts = 0: inference, the moving variance normalizes; ghosts = k: training, each of k
// consecutive equal slices of the batch has its own batch variance.
REGISTER_OP("GnEvoNormB0")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("v: float")
    .Input("moving_variance: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("instance_std: float")
    .Output("batch_mean: float")
    .Output("batch_std: float")
    .Output("batch_variance: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("ghosts: int >= 0")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(SameAsInput(c, 0, 1));
      int ghosts;
      TF_RETURN_IF_ERROR(c->GetAttr("ghosts", &ghosts));
      c->set_output(1, PerExample(c, c->input(0), 0));
      c->set_output(2, PerExample(c, c->input(0), 0));
      const ShapeHandle batch = c->Matrix(std::max(ghosts, 1), c->Dim(c->input(0), 2));
      for (int i = 3; i < 6; ++i) c->set_output(i, batch);
      return absl::OkStatus();
    });

REGISTER_OP("GnEvoNormB0Grad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: float")
    .Input("v: float")
    .Input("mean: float")
    .Input("instance_std: float")
    .Input("batch_mean: float")
    .Input("batch_std: float")
    .Output("dx: T")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Output("dv: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("ghosts: int >= 0")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(SameAsInput(c, 1, 1));
      for (int i = 1; i < 4; ++i) c->set_output(i, c->Vector(c->Dim(c->input(1), 2)));
      return absl::OkStatus();
    });

REGISTER_OP("GnRenormCorrections")
    .Input("x: T")
    .Input("moving_mean: float")
    .Input("moving_variance: float")
    .Input("r_max: float")
    .Input("d_max: float")
    .Output("r: float")
    .Output("d: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      c->set_output(0, c->Vector(c->Dim(x, 2)));
      c->set_output(1, c->Vector(c->Dim(x, 2)));
      return absl::OkStatus();
    });

// Streaming, as in group_norm.cc ------------------------------------------------------------------

// Rows summed in float before the sums move to double.
constexpr int64_t kRowsPerFlush = 64;
// Inner loops run over lines of at least this many values where the rows are narrower.
constexpr int64_t kMinLineWidth = 256;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One work unit's rows (S rows of `channel_width` values, `channels` apart) as the lines its inner
// loops run over: a unit that spans whole rows is contiguous, so narrow rows are taken several at
// a time. Value j of a line is channel j % channel_width.
struct Lines {
  int64_t rows, channel_width, rows_per_line, width, stride, count;

  Lines(int64_t rows_, int64_t channel_width_, int64_t channels)
      : rows(rows_), channel_width(channel_width_),
        rows_per_line(channel_width_ == channels
                          ? std::max<int64_t>(1, kMinLineWidth / channels) : 1),
        width(channel_width_ * rows_per_line), stride(channels * rows_per_line),
        count(CeilDiv(rows_, rows_per_line)) {}

  int64_t Length(int64_t i) const {
    return std::min(rows_per_line, rows - i * rows_per_line) * channel_width;
  }

  // Per-channel values repeated for every row of a line.
  std::vector<float> Tiled(const std::vector<float>& per_channel) const {
    std::vector<float> tiled;
    tiled.reserve(width);
    for (int64_t r = 0; r < rows_per_line; ++r)
      tiled.insert(tiled.end(), per_channel.begin(), per_channel.end());
    return tiled;
  }
};

// `sums_count` per-channel sums over a unit's rows: add(line, length, acc) adds one line's terms
// to the float accumulators acc[k * lines.width + j], j < length, for sum k.
template <typename AddLine>
void ChannelSums(const Lines& lines, int64_t sums_count, AddLine add, std::vector<double>* sums) {
  std::vector<double> line_sums(sums_count * lines.width, 0.0);
  std::vector<float> acc(sums_count * lines.width);
  const int64_t lines_per_flush = std::max<int64_t>(1, kRowsPerFlush / lines.rows_per_line);
  for (int64_t first = 0; first < lines.count; first += lines_per_flush) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = first; i < std::min(lines.count, first + lines_per_flush); ++i)
      add(i, lines.Length(i), acc.data());
    for (size_t j = 0; j < acc.size(); ++j) line_sums[j] += acc[j];
  }
  sums->assign(sums_count * lines.channel_width, 0.0);
  for (int64_t k = 0; k < sums_count; ++k)
    for (int64_t r = 0; r < lines.rows_per_line; ++r)
      for (int64_t c = 0; c < lines.channel_width; ++c)
        (*sums)[k * lines.channel_width + c] +=
            line_sums[(k * lines.rows_per_line + r) * lines.channel_width + c];
}

// N examples, S positions, C channels in G groups of `group_width`; one work unit is one
// example's block of `groups_per_block` whole groups, an example split only where there are fewer
// than two examples per thread, into blocks of at least 64 channels.
struct Layout {
  int64_t examples, positions, channels, groups, group_width, groups_per_block, blocks;

  Layout(const Tensor& x, int64_t groups_, int threads)
      : examples(x.dim_size(0)), positions(x.dim_size(1)), channels(x.dim_size(2)),
        groups(groups_), group_width(channels / groups_) {
    const int64_t blocks_wanted = CeilDiv(2 * threads, std::max<int64_t>(1, examples));
    groups_per_block = std::min(groups, std::max(CeilDiv(groups, blocks_wanted),
                                                 CeilDiv(64, group_width)));
    blocks = CeilDiv(groups, groups_per_block);
  }

  // Runs fn(example, first group, group count) for every unit on the op's thread pool; `cost` is
  // about the cycles per value of the unit's work.
  template <typename Fn>
  void ForEachUnit(OpKernelContext* context, int64_t cost, Fn fn) const {
    const int64_t unit_cost = cost * positions * groups_per_block * group_width;
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    workers->ParallelFor(examples * blocks, unit_cost, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t first_group = (unit % blocks) * groups_per_block;
        fn(unit / blocks, first_group, std::min(groups_per_block, groups - first_group));
      }
    });
  }
};

int Threads(OpKernelContext* context) {
  return context->device()->tensorflow_cpu_worker_threads()->workers->NumThreads();
}

absl::Status CheckShapes(const Tensor& x, int64_t groups, std::initializer_list<const Tensor*>
                         per_channel) {
  if (x.dims() != 3) return absl::InvalidArgumentError("norm family kernel: x must be [N, S, C]");
  if (x.dim_size(2) == 0)
    return absl::InvalidArgumentError("norm family kernel: x has no channels");
  if (x.dim_size(2) % groups != 0)
    return absl::InvalidArgumentError("norm family kernel: channels not divisible by groups");
  for (const Tensor* t : per_channel)
    if (t->dims() != 1 || t->dim_size(0) != x.dim_size(2))
      return absl::InvalidArgumentError("norm family kernel: per-channel weights must be [C]");
  return absl::OkStatus();
}

absl::Status CheckPerExample(const Tensor& t, int64_t rows, int64_t columns) {
  if (t.dims() != 2 || t.dim_size(0) != rows || t.dim_size(1) != columns)
    return absl::InvalidArgumentError("norm family kernel: statistics of the wrong shape");
  return absl::OkStatus();
}

using Array = Eigen::Array<float, Eigen::Dynamic, 1>;
using In = Eigen::Map<const Array>;
using Out = Eigen::Map<Array>;
template <typename T>
using Line = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using ConstLine = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

// A line of T values as floats: the values themselves for float, else converted into `buffer`
// (Eigen's vectorized conversion).
template <typename T>
const float* Floats(const T* line, int64_t length, std::vector<float>* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return line;
  } else {
    Out(buffer->data(), length) = ConstLine<T>(line, length).template cast<float>();
    return buffer->data();
  }
}

// Where a line's float results are written: the output line itself for float, else `buffer`,
// which Store then converts into the output.
template <typename T>
float* Target(T* line, std::vector<float>* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return line;
  } else {
    return buffer->data();
  }
}

// Converts a line's float results into the output (rounding to nearest even, as static_cast).
template <typename T>
void Store(const float* values, int64_t length, T* line) {
  if constexpr (!std::is_same_v<T, float>)
    Line<T>(line, length) = In(values, length).template cast<T>();
}

// A line's scratch values, aligned for Eigen's vectors: Eigen computes the values before the
// first aligned one of its destination one at a time, which for exp means a scalar libm call.
using Scratch = std::vector<float, Eigen::aligned_allocator<float>>;

// sigmoid(slope * x) of a line. Eigen's vectorized logistic, TensorFlow's sigmoid, ends in a
// division, which on AVX-512 CPUs takes most of EvoNorm-S0's time; there, sixteen values at a
// time are e / (1 + e) with e = exp(z) (Cephes's polynomial, as Eigen's exp) and the reciprocal
// an estimate refined by one Newton step: within 3 float32 ulps of sigmoid (Eigen's logistic:
// 6). z is capped at 16.6355324, where sigmoid rounds to 1 (as Eigen caps it), and at -86, below
// which sigmoid is taken as exp(-86) < 5e-38; a NaN stays NaN. The last values of a line, and
// CPUs without AVX-512, take Eigen's.
void Sigmoid(const float* slope, const float* x, int64_t n, Scratch* scratch) {
  float* out = scratch->data();
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 high = _mm512_set1_ps(16.6355324f), low = _mm512_set1_ps(-86.0f);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), round = _mm512_set1_ps(12582912.0f);
  const __m512 ln2_high = _mm512_set1_ps(-0.693359375f), ln2_low = _mm512_set1_ps(2.12194440e-4f);
  const __m512 p0 = _mm512_set1_ps(1.9875691500e-4f), p1 = _mm512_set1_ps(1.3981999507e-3f),
               p2 = _mm512_set1_ps(8.3334519073e-3f), p3 = _mm512_set1_ps(4.1665795894e-2f),
               p4 = _mm512_set1_ps(1.6666665459e-1f), p5 = _mm512_set1_ps(5.0000001201e-1f);
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  for (; j + 16 <= n; j += 16) {
    __m512 z = _mm512_mul_ps(_mm512_loadu_ps(slope + j), _mm512_loadu_ps(x + j));
    z = _mm512_max_ps(low, _mm512_min_ps(high, z));  // the second operand where one is NaN
    // z = k ln 2 + r, k = round(z / ln 2), read from the low bits of t
    const __m512 t = _mm512_fmadd_ps(z, log2e, round);
    const __m512 k = _mm512_sub_ps(t, round);
    const __m512 r = _mm512_fmadd_ps(k, ln2_low, _mm512_fmadd_ps(k, ln2_high, z));
    __m512 p = _mm512_fmadd_ps(p0, r, p1);
    p = _mm512_fmadd_ps(p, r, p2);
    p = _mm512_fmadd_ps(p, r, p3);
    p = _mm512_fmadd_ps(p, r, p4);
    p = _mm512_fmadd_ps(p, r, p5);
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, one));  // exp(r)
    const __m512 e = _mm512_castsi512_ps(_mm512_add_epi32(
        _mm512_castps_si512(p), _mm512_slli_epi32(_mm512_castps_si512(t), 23)));  // 2^k exp(r)
    const __m512 d = _mm512_add_ps(e, one);
    __m512 inverse = _mm512_rcp14_ps(d);
    inverse = _mm512_mul_ps(inverse, _mm512_fnmadd_ps(d, inverse, two));
    _mm512_store_ps(out + j, _mm512_mul_ps(e, inverse));
  }
#endif
  if (j < n) Out(out + j, n - j) = Eigen::logistic(In(slope + j, n - j) * In(x + j, n - j));
}

// Per-channel mean and biased variance of `width` channels over `rows` rows from their sums of
// d = x - shift and d * d (`sums` = [sum d | sum d * d]).
void ChannelMoments(const std::vector<double>& sums, const std::vector<float>& shift,
                    int64_t width, int64_t rows, double* mean, double* variance) {
  for (int64_t c = 0; c < width; ++c) {
    const double mean_d = sums[c] / rows;
    mean[c] = shift[c] + mean_d;
    variance[c] = std::max(0.0, sums[width + c] / rows - mean_d * mean_d);
  }
}

// Both shifted sums of a unit's rows, the shift being each channel's value in the first row.
template <typename T>
void ShiftedSums(const T* x, const Lines& lines, std::vector<float>* shift,
                 std::vector<double>* sums) {
  shift->resize(lines.channel_width);
  for (int64_t c = 0; c < lines.channel_width; ++c)
    (*shift)[c] = lines.rows > 0 ? static_cast<float>(x[c]) : 0.0f;
  const std::vector<float> shift_line = lines.Tiled(*shift);
  ChannelSums(lines, 2, [&](int64_t i, int64_t length, float* acc) {
    const T* line = x + i * lines.stride;
    float* acc_squares = acc + lines.width;
#pragma GCC ivdep
    for (int64_t j = 0; j < length; ++j) {
      const float d = static_cast<float>(line[j]) - shift_line[j];
      acc[j] += d;
      acc_squares[j] += d * d;
    }
  }, sums);
}

// Per-example, per-channel mean and biased variance ([N * C] each) of x [N, S, C].
template <typename T>
void ExampleMoments(OpKernelContext* context, const Tensor& x_tensor, std::vector<double>* mean,
                    std::vector<double>* variance) {
  const Layout layout(x_tensor, x_tensor.dim_size(2), Threads(context));
  const int64_t C = layout.channels, S = layout.positions;
  const T* x_all = x_tensor.flat<T>().data();
  mean->assign(layout.examples * C, 0.0);
  variance->assign(layout.examples * C, 0.0);
  layout.ForEachUnit(context, 1, [&](int64_t example, int64_t begin, int64_t width) {
    const Lines lines(S, width, C);
    std::vector<float> shift;
    std::vector<double> sums;
    ShiftedSums(x_all + example * S * C + begin, lines, &shift, &sums);
    ChannelMoments(sums, shift, width, S, mean->data() + example * C + begin,
                   variance->data() + example * C + begin);
  });
}

// The mean and biased variance over each ghost batch's examples and positions, from the
// examples' own (equal counts): the variance is the mean of the examples' variances plus the
// variance of their means.
void GhostMoments(const std::vector<double>& mean, const std::vector<double>& variance,
                  int64_t examples, int64_t channels, int64_t ghosts,
                  std::vector<double>* ghost_mean,
                  std::vector<double>* ghost_variance) {
  const int64_t per_ghost = examples / ghosts;
  ghost_mean->assign(ghosts * channels, 0.0);
  ghost_variance->assign(ghosts * channels, 0.0);
  for (int64_t g = 0; g < ghosts; ++g)
    for (int64_t c = 0; c < channels; ++c) {
      double total = 0;
      for (int64_t n = g * per_ghost; n < (g + 1) * per_ghost; ++n) total += mean[n * channels + c];
      const double batch_mean = total / per_ghost;
      double spread = 0;
      for (int64_t n = g * per_ghost; n < (g + 1) * per_ghost; ++n) {
        const double offset = mean[n * channels + c] - batch_mean;
        spread += variance[n * channels + c] + offset * offset;
      }
      (*ghost_mean)[g * channels + c] = batch_mean;
      (*ghost_variance)[g * channels + c] = spread / per_ghost;
    }
}

// Sums parts [N, C] over the examples into out [C], in double, in example order.
void SumOverExamples(const std::vector<double>& parts, int64_t examples, int64_t channels,
                     float* out) {
  for (int64_t c = 0; c < channels; ++c) {
    double total = 0;
    for (int64_t n = 0; n < examples; ++n) total += parts[n * channels + c];
    out[c] = static_cast<float>(total);
  }
}

// FilterResponseNorm: y = max(x * gamma * rstd + beta, tau), rstd = 1 / sqrt(mean of x^2 over the
// positions + epsilon) per example and channel; without `tlu`, no max.
template <typename T>
class FilterResponseNormOp : public OpKernel {
 public:
  explicit FilterResponseNormOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("tlu", &tlu_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x_tensor = context->input(0);
    OP_REQUIRES_OK(context, CheckShapes(x_tensor, 1, {&context->input(1), &context->input(2),
                                                      &context->input(3)}));
    const Layout layout(x_tensor, x_tensor.dim_size(2), Threads(context));
    const int64_t C = layout.channels, S = layout.positions;
    Tensor *y_tensor, *rstd_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, x_tensor.shape(), &y_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({layout.examples, C}),
                                                     &rstd_tensor));
    const T* x_all = x_tensor.flat<T>().data();
    T* y_all = y_tensor->flat<T>().data();
    const float* gamma = context->input(1).flat<float>().data();
    const float* beta = context->input(2).flat<float>().data();
    const float* tau = context->input(3).flat<float>().data();
    const float epsilon = context->input(4).scalar<float>()();
    float* rstd_out = rstd_tensor->flat<float>().data();
    const bool tlu = tlu_;

    layout.ForEachUnit(context, 2, [&](int64_t example, int64_t begin, int64_t width) {
      const Lines lines(S, width, C);
      const T* x = x_all + example * S * C + begin;
      T* y = y_all + example * S * C + begin;
      std::vector<double> sums;
      ChannelSums(lines, 1, [&](int64_t i, int64_t length, float* acc) {
        const T* line = x + i * lines.stride;
#pragma GCC ivdep
        for (int64_t j = 0; j < length; ++j) {
          const float value = static_cast<float>(line[j]);
          acc[j] += value * value;
        }
      }, &sums);
      std::vector<float> scale(width), offset(width), floor(width);
      for (int64_t c = 0; c < width; ++c) {
        const float rstd = 1.0f / std::sqrt(static_cast<float>(sums[c] / S) + epsilon);
        rstd_out[example * C + begin + c] = rstd;
        scale[c] = gamma[begin + c] * rstd;
        offset[c] = beta[begin + c];
        floor[c] = tau[begin + c];
      }
      const std::vector<float> scale_line = lines.Tiled(scale), offset_line = lines.Tiled(offset),
                               floor_line = lines.Tiled(floor);
      std::vector<float> in_buffer(lines.width), out_buffer(lines.width);
      for (int64_t i = 0; i < lines.count; ++i) {
        const int64_t n = lines.Length(i);
        const float* in = Floats(x + i * lines.stride, n, &in_buffer);
        float* out = Target(y + i * lines.stride, &out_buffer);
        if (tlu)
          Out(out, n) = (In(in, n) * In(scale_line.data(), n) + In(offset_line.data(), n))
                            .max(In(floor_line.data(), n));
        else
          Out(out, n) = In(in, n) * In(scale_line.data(), n) + In(offset_line.data(), n);
        Store(out, n, y + i * lines.stride);
      }
    });
  }

 private:
  bool tlu_;
};

// With z = x * gamma * rstd + beta and dz = dy where z >= tau (all of dy without the TLU), else
// 0, as tf.maximum's gradient: dtau = sum (dy - dz), dbeta = sum dz, dgamma = sum rstd * A,
// depsilon = sum -rstd^3 gamma A / 2 and dx = dz gamma rstd - x gamma rstd^3 A / S, where
// A = sum over the positions of dz * x, per example and channel.
template <typename T>
class FilterResponseNormGradOp : public OpKernel {
 public:
  explicit FilterResponseNormGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("tlu", &tlu_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& dy_tensor = context->input(0);
    const Tensor& x_tensor = context->input(1);
    OP_REQUIRES_OK(context, CheckShapes(x_tensor, 1, {&context->input(2), &context->input(3),
                                                      &context->input(4)}));
    OP_REQUIRES(context, dy_tensor.shape() == x_tensor.shape(),
                absl::InvalidArgumentError("norm family kernel: dy and x shapes differ"));
    const Layout layout(x_tensor, x_tensor.dim_size(2), Threads(context));
    const int64_t N = layout.examples, C = layout.channels, S = layout.positions;
    OP_REQUIRES_OK(context, CheckPerExample(context->input(5), N, C));
    Tensor *dx_tensor, *outputs[4];
    OP_REQUIRES_OK(context, context->allocate_output(0, x_tensor.shape(), &dx_tensor));
    for (int i = 0; i < 3; ++i)
      OP_REQUIRES_OK(context, context->allocate_output(i + 1, TensorShape({C}), &outputs[i]));
    OP_REQUIRES_OK(context, context->allocate_output(4, TensorShape({}), &outputs[3]));
    const T* dy_all = dy_tensor.flat<T>().data();
    const T* x_all = x_tensor.flat<T>().data();
    T* dx_all = dx_tensor->flat<T>().data();
    const float* gamma = context->input(2).flat<float>().data();
    const float* beta = context->input(3).flat<float>().data();
    const float* tau = context->input(4).flat<float>().data();
    const float* rstd_in = context->input(5).flat<float>().data();
    const bool tlu = tlu_;
    std::vector<double> dgamma_parts(N * C), dbeta_parts(N * C), dtau_parts(N * C),
        depsilon_parts(N * C);

    layout.ForEachUnit(context, 3, [&](int64_t example, int64_t begin, int64_t width) {
      const Lines lines(S, width, C);
      const int64_t offset = example * S * C + begin;
      const T *dy = dy_all + offset, *x = x_all + offset;
      T* dx = dx_all + offset;
      std::vector<float> scale(width), shift(width), floor(width);
      for (int64_t c = 0; c < width; ++c) {
        scale[c] = gamma[begin + c] * rstd_in[example * C + begin + c];
        shift[c] = beta[begin + c];
        floor[c] = tau[begin + c];
      }
      const std::vector<float> scale_line = lines.Tiled(scale), shift_line = lines.Tiled(shift),
                               floor_line = lines.Tiled(floor);
      const float *scale_at = scale_line.data(), *shift_at = shift_line.data(),
                  *floor_at = floor_line.data();
      std::vector<float> x_buffer(lines.width), dy_buffer(lines.width);
      std::vector<double> sums;  // [sum dz * x | sum dz | sum (dy - dz)]
      ChannelSums(lines, 3, [&](int64_t i, int64_t n, float* acc) {
        const float* x_line = Floats(x + i * lines.stride, n, &x_buffer);
        const float* dy_line = Floats(dy + i * lines.stride, n, &dy_buffer);
        float *acc_dz = acc + lines.width, *acc_tau = acc + 2 * lines.width;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          const bool keep = !tlu || x_line[j] * scale_at[j] + shift_at[j] >= floor_at[j];
          const float dz = keep ? dy_line[j] : 0.0f;
          acc[j] += dz * x_line[j];
          acc_dz[j] += dz;
          acc_tau[j] += dy_line[j] - dz;
        }
      }, &sums);
      std::vector<float> a(width), b(width);
      for (int64_t c = 0; c < width; ++c) {
        const int64_t at = example * C + begin + c;
        const double rstd = rstd_in[at], g = gamma[begin + c], sum_dz_x = sums[c];
        dgamma_parts[at] = rstd * sum_dz_x;
        dbeta_parts[at] = sums[width + c];
        dtau_parts[at] = sums[2 * width + c];
        depsilon_parts[at] = -0.5 * rstd * rstd * rstd * g * sum_dz_x;
        a[c] = static_cast<float>(g * rstd);
        b[c] = static_cast<float>(-g * rstd * rstd * rstd * sum_dz_x / S);
      }
      const std::vector<float> a_line = lines.Tiled(a), b_line = lines.Tiled(b);
      const float *a_at = a_line.data(), *b_at = b_line.data();
      std::vector<float> out_buffer(lines.width);
      for (int64_t i = 0; i < lines.count; ++i) {
        const int64_t n = lines.Length(i);
        const float* x_line = Floats(x + i * lines.stride, n, &x_buffer);
        const float* dy_line = Floats(dy + i * lines.stride, n, &dy_buffer);
        float* out = Target(dx + i * lines.stride, &out_buffer);
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          const bool keep = !tlu || x_line[j] * scale_at[j] + shift_at[j] >= floor_at[j];
          out[j] = (keep ? dy_line[j] : 0.0f) * a_at[j] + x_line[j] * b_at[j];
        }
        Store(out, n, dx + i * lines.stride);
      }
    });

    SumOverExamples(dgamma_parts, N, C, outputs[0]->flat<float>().data());
    SumOverExamples(dbeta_parts, N, C, outputs[1]->flat<float>().data());
    SumOverExamples(dtau_parts, N, C, outputs[2]->flat<float>().data());
    double depsilon = 0;
    for (double part : depsilon_parts) depsilon += part;
    outputs[3]->scalar<float>()() = static_cast<float>(depsilon);
  }

 private:
  bool tlu_;
};

// EvoNorm-S0: y = x * sigmoid(v * x) * gamma * rstd + beta, rstd = 1 / sqrt(variance of the
// example's group + epsilon). Sigmoid is Eigen's vectorized logistic, TensorFlow's own.
template <typename T>
class EvoNormS0Op : public OpKernel {
 public:
  explicit EvoNormS0Op(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("groups", &groups_));
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x_tensor = context->input(0);
    OP_REQUIRES_OK(context, CheckShapes(x_tensor, groups_, {&context->input(1),
                                                            &context->input(2),
                                                            &context->input(3)}));
    const Layout layout(x_tensor, groups_, Threads(context));
    const int64_t C = layout.channels, S = layout.positions, gw = layout.group_width;
    Tensor *y_tensor, *mean_tensor, *rstd_tensor;
    const TensorShape stats_shape({layout.examples, layout.groups});
    OP_REQUIRES_OK(context, context->allocate_output(0, x_tensor.shape(), &y_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, stats_shape, &mean_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(2, stats_shape, &rstd_tensor));
    const T* x_all = x_tensor.flat<T>().data();
    T* y_all = y_tensor->flat<T>().data();
    const float* gamma = context->input(1).flat<float>().data();
    const float* beta = context->input(2).flat<float>().data();
    const float* v = context->input(3).flat<float>().data();
    float* mean_out = mean_tensor->flat<float>().data();
    float* rstd_out = rstd_tensor->flat<float>().data();
    const float epsilon = epsilon_;

    layout.ForEachUnit(context, 4, [&](int64_t example, int64_t first_group, int64_t count) {
      const int64_t begin = first_group * gw, width = count * gw;
      const T* x = x_all + example * S * C + begin;
      T* y = y_all + example * S * C + begin;
      const Lines lines(S, width, C);
      std::vector<float> shift;
      std::vector<double> sums, mean(width), variance(width);
      ShiftedSums(x, lines, &shift, &sums);
      ChannelMoments(sums, shift, width, S, mean.data(), variance.data());
      std::vector<float> scale(width), offset(width), slope(width);
      for (int64_t g = 0; g < count; ++g) {
        // The group's moments from its channels': mean of means, mean of (variance + square of
        // the mean's distance from the group's).
        double total = 0, spread = 0;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) total += mean[c];
        const double group_mean = total / gw;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c)
          spread += variance[c] + (mean[c] - group_mean) * (mean[c] - group_mean);
        const float rstd = 1.0f / std::sqrt(static_cast<float>(spread / gw) + epsilon);
        mean_out[example * layout.groups + first_group + g] = static_cast<float>(group_mean);
        rstd_out[example * layout.groups + first_group + g] = rstd;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) {
          scale[c] = gamma[begin + c] * rstd;
          offset[c] = beta[begin + c];
          slope[c] = v[begin + c];
        }
      }
      const std::vector<float> scale_line = lines.Tiled(scale), offset_line = lines.Tiled(offset),
                               slope_line = lines.Tiled(slope);
      const float *scale_at = scale_line.data(), *offset_at = offset_line.data();
      std::vector<float> in_buffer(lines.width), out_buffer(lines.width);
      Scratch s(lines.width);
      for (int64_t i = 0; i < lines.count; ++i) {
        const int64_t n = lines.Length(i);
        const float* in = Floats(x + i * lines.stride, n, &in_buffer);
        float* out = Target(y + i * lines.stride, &out_buffer);
        Sigmoid(slope_line.data(), in, n, &s);
        const float* s_at = s.data();
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) out[j] = in[j] * s_at[j] * scale_at[j] + offset_at[j];
        Store(out, n, y + i * lines.stride);
      }
    });
  }

 private:
  int64_t groups_;
  float epsilon_;
};

// With s = sigmoid(v x), the gate q = x s, per example and channel Q = sum dy q, R = sum dy x^2
// s (1 - s) over the positions, and per group B = -rstd^3 / M sum_c gamma_c Q_c (M the group's
// values): dgamma = sum rstd Q, dbeta = sum dy, dv = sum gamma rstd R and
// dx = dy gamma rstd (s + v x s (1 - s)) + (x - mean) B.
template <typename T>
class EvoNormS0GradOp : public OpKernel {
 public:
  explicit EvoNormS0GradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("groups", &groups_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& dy_tensor = context->input(0);
    const Tensor& x_tensor = context->input(1);
    OP_REQUIRES_OK(context, CheckShapes(x_tensor, groups_, {&context->input(2),
                                                            &context->input(3)}));
    OP_REQUIRES(context, dy_tensor.shape() == x_tensor.shape(),
                absl::InvalidArgumentError("norm family kernel: dy and x shapes differ"));
    const Layout layout(x_tensor, groups_, Threads(context));
    const int64_t N = layout.examples, C = layout.channels, S = layout.positions,
                  gw = layout.group_width;
    OP_REQUIRES_OK(context, CheckPerExample(context->input(4), N, layout.groups));
    OP_REQUIRES_OK(context, CheckPerExample(context->input(5), N, layout.groups));
    Tensor *dx_tensor, *outputs[3];
    OP_REQUIRES_OK(context, context->allocate_output(0, x_tensor.shape(), &dx_tensor));
    for (int i = 0; i < 3; ++i)
      OP_REQUIRES_OK(context, context->allocate_output(i + 1, TensorShape({C}), &outputs[i]));
    const T* dy_all = dy_tensor.flat<T>().data();
    const T* x_all = x_tensor.flat<T>().data();
    T* dx_all = dx_tensor->flat<T>().data();
    const float* gamma = context->input(2).flat<float>().data();
    const float* v = context->input(3).flat<float>().data();
    const float* mean_in = context->input(4).flat<float>().data();
    const float* rstd_in = context->input(5).flat<float>().data();
    std::vector<double> dgamma_parts(N * C), dbeta_parts(N * C), dv_parts(N * C);

    layout.ForEachUnit(context, 6, [&](int64_t example, int64_t first_group, int64_t count) {
      const int64_t begin = first_group * gw, width = count * gw;
      const int64_t offset = example * S * C + begin;
      const T *dy = dy_all + offset, *x = x_all + offset;
      T* dx = dx_all + offset;
      const Lines lines(S, width, C);
      std::vector<float> slope(width);
      for (int64_t c = 0; c < width; ++c) slope[c] = v[begin + c];
      const std::vector<float> slope_line = lines.Tiled(slope);
      const float* slope_at = slope_line.data();
      std::vector<float> a(width), center(width), b(width);
      for (int64_t c = 0; c < width; ++c) {
        const int64_t stat = example * layout.groups + first_group + c / gw;
        a[c] = gamma[begin + c] * rstd_in[stat];
        center[c] = mean_in[stat];
      }
      const std::vector<float> a_line = lines.Tiled(a), center_line = lines.Tiled(center);
      const float *a_at = a_line.data(), *center_at = center_line.data();
      std::vector<float> x_buffer(lines.width), dy_buffer(lines.width);
      Scratch s(lines.width);
      // The first pass, which computes sigmoid, leaves dy gamma rstd (s + v x s (1 - s)) of
      // every value where the second adds (x - mean) B: in dx itself for float32, else in this
      // unit's own float buffer. Sigmoid is the costliest step, and a unit's values stay in the
      // cache between the passes.
      std::unique_ptr<float[]> partial_buffer(
          std::is_same_v<T, float> ? nullptr : new float[lines.count * lines.width]);
      auto partial = [&](int64_t i) {
        if constexpr (std::is_same_v<T, float>) {
          return dx + i * lines.stride;
        } else {
          return partial_buffer.get() + i * lines.width;
        }
      };
      std::vector<double> sums;  // [sum dy q | sum dy x^2 s (1 - s) | sum dy]
      ChannelSums(lines, 3, [&](int64_t i, int64_t n, float* acc) {
        const float* x_line = Floats(x + i * lines.stride, n, &x_buffer);
        const float* dy_line = Floats(dy + i * lines.stride, n, &dy_buffer);
        Sigmoid(slope_at, x_line, n, &s);
        const float* s_at = s.data();
        float* partial_line = partial(i);
        float *acc_r = acc + lines.width, *acc_dy = acc + 2 * lines.width;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          const float x_s = x_line[j] * s_at[j], dy_x_s = dy_line[j] * x_s;
          const float x_s_rest = x_s * (1.0f - s_at[j]);
          acc[j] += dy_x_s;
          acc_r[j] += dy_line[j] * x_line[j] * x_s_rest;
          acc_dy[j] += dy_line[j];
          partial_line[j] = dy_line[j] * a_at[j] * (s_at[j] + slope_at[j] * x_s_rest);
        }
      }, &sums);
      for (int64_t g = 0; g < count; ++g) {
        const int64_t stat = example * layout.groups + first_group + g;
        const double rstd = rstd_in[stat];
        double gamma_q = 0;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) {
          const int64_t at = example * C + begin + c;
          dgamma_parts[at] = rstd * sums[c];
          dv_parts[at] = gamma[begin + c] * rstd * sums[width + c];
          dbeta_parts[at] = sums[2 * width + c];
          gamma_q += gamma[begin + c] * sums[c];
        }
        const double group_b = -rstd * rstd * rstd * gamma_q / static_cast<double>(S * gw);
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) b[c] = static_cast<float>(group_b);
      }
      const std::vector<float> b_line = lines.Tiled(b);
      const float* b_at = b_line.data();
      for (int64_t i = 0; i < lines.count; ++i) {
        const int64_t n = lines.Length(i);
        const float* x_line = Floats(x + i * lines.stride, n, &x_buffer);
        float* partial_line = partial(i);
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j)
          partial_line[j] += (x_line[j] - center_at[j]) * b_at[j];
        Store(partial_line, n, dx + i * lines.stride);
      }
    });

    SumOverExamples(dgamma_parts, N, C, outputs[0]->flat<float>().data());
    SumOverExamples(dbeta_parts, N, C, outputs[1]->flat<float>().data());
    SumOverExamples(dv_parts, N, C, outputs[2]->flat<float>().data());
  }

 private:
  int64_t groups_;
};

absl::Status CheckGhosts(int64_t examples, int64_t ghosts) {
  if (ghosts > 0 && examples % ghosts != 0)
    return absl::InvalidArgumentError("norm family kernel: the batch does not split into the "
                                      "ghost batches");
  return absl::OkStatus();
}

// EvoNorm-B0: y = x / max(batch_std, v x + instance_std) * gamma + beta, instance_std =
// sqrt(the example's variance over the positions + epsilon) and batch_std = sqrt(var_B +
// epsilon), var_B the variance over the ghost batch's examples and positions (in training) or the
// moving variance (ghosts = 0).
template <typename T>
class EvoNormB0Op : public OpKernel {
 public:
  explicit EvoNormB0Op(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("ghosts", &ghosts_));
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x_tensor = context->input(0);
    OP_REQUIRES_OK(context, CheckShapes(x_tensor, 1, {&context->input(1), &context->input(2),
                                                      &context->input(3), &context->input(4)}));
    const Layout layout(x_tensor, x_tensor.dim_size(2), Threads(context));
    const int64_t N = layout.examples, C = layout.channels, S = layout.positions;
    OP_REQUIRES_OK(context, CheckGhosts(N, ghosts_));
    const int64_t rows = std::max<int64_t>(ghosts_, 1);
    Tensor* outputs[6];
    OP_REQUIRES_OK(context, context->allocate_output(0, x_tensor.shape(), &outputs[0]));
    for (int i = 1; i < 3; ++i)
      OP_REQUIRES_OK(context, context->allocate_output(i, TensorShape({N, C}), &outputs[i]));
    for (int i = 3; i < 6; ++i)
      OP_REQUIRES_OK(context, context->allocate_output(i, TensorShape({rows, C}), &outputs[i]));
    const float epsilon = epsilon_;
    float* mean_out = outputs[1]->flat<float>().data();
    float* instance_std = outputs[2]->flat<float>().data();
    float* batch_mean = outputs[3]->flat<float>().data();
    float* batch_std = outputs[4]->flat<float>().data();
    float* batch_variance = outputs[5]->flat<float>().data();

    std::vector<double> mean, variance;
    ExampleMoments<T>(context, x_tensor, &mean, &variance);
    for (int64_t i = 0; i < N * C; ++i) {
      mean_out[i] = static_cast<float>(mean[i]);
      instance_std[i] = std::sqrt(static_cast<float>(variance[i]) + epsilon);
    }
    if (ghosts_ > 0) {
      std::vector<double> ghost_mean, ghost_variance;
      GhostMoments(mean, variance, N, C, ghosts_, &ghost_mean, &ghost_variance);
      for (int64_t i = 0; i < rows * C; ++i) {
        batch_mean[i] = static_cast<float>(ghost_mean[i]);
        batch_variance[i] = static_cast<float>(ghost_variance[i]);
        batch_std[i] = std::sqrt(batch_variance[i] + epsilon);
      }
    } else {
      const float* moving_variance = context->input(4).flat<float>().data();
      for (int64_t c = 0; c < C; ++c) {
        batch_mean[c] = 0.0f;
        batch_variance[c] = moving_variance[c];
        batch_std[c] = std::sqrt(moving_variance[c] + epsilon);
      }
    }

    const T* x_all = x_tensor.flat<T>().data();
    T* y_all = outputs[0]->flat<T>().data();
    const float* gamma = context->input(1).flat<float>().data();
    const float* beta = context->input(2).flat<float>().data();
    const float* v = context->input(3).flat<float>().data();
    const int64_t per_ghost = ghosts_ > 0 ? N / ghosts_ : N;
    layout.ForEachUnit(context, 2, [&](int64_t example, int64_t begin, int64_t width) {
      const Lines lines(S, width, C);
      const T* x = x_all + example * S * C + begin;
      T* y = y_all + example * S * C + begin;
      const float* batch_std_row = batch_std + (example / per_ghost) * C + begin;
      std::vector<float> floor(width), slope(width), shift(width), scale(width), offset(width);
      for (int64_t c = 0; c < width; ++c) {
        floor[c] = batch_std_row[c];
        slope[c] = v[begin + c];
        shift[c] = instance_std[example * C + begin + c];
        scale[c] = gamma[begin + c];
        offset[c] = beta[begin + c];
      }
      const std::vector<float> floor_line = lines.Tiled(floor), slope_line = lines.Tiled(slope),
                               shift_line = lines.Tiled(shift), scale_line = lines.Tiled(scale),
                               offset_line = lines.Tiled(offset);
      std::vector<float> in_buffer(lines.width), out_buffer(lines.width);
      for (int64_t i = 0; i < lines.count; ++i) {
        const int64_t n = lines.Length(i);
        const float* in = Floats(x + i * lines.stride, n, &in_buffer);
        float* out = Target(y + i * lines.stride, &out_buffer);
        Out(out, n) = In(in, n) /
                      In(floor_line.data(), n).max(In(slope_line.data(), n) * In(in, n) +
                                                   In(shift_line.data(), n)) *
                      In(scale_line.data(), n) + In(offset_line.data(), n);
        Store(out, n, y + i * lines.stride);
      }
    });
  }

 private:
  int64_t ghosts_;
  float epsilon_;
};

// With den = max(batch_std, r), r = v x + instance_std, u = dy gamma and q = -u x / den^2, as
// tf.maximum's gradient batch_std takes q where batch_std >= r and r takes it elsewhere (qr):
// dgamma = sum dy x / den, dbeta = sum dy, dv = sum qr x, and
//   dx = u / den + v qr + (x - mean) KI + (x - batch_mean) KA
// with KI = sum over the positions of qr / (instance_std S) per example and channel and, in
// training, KA = the ghost batch's sum of batch_std's q / (batch_std * its values) per channel.
template <typename T>
class EvoNormB0GradOp : public OpKernel {
 public:
  explicit EvoNormB0GradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("ghosts", &ghosts_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& dy_tensor = context->input(0);
    const Tensor& x_tensor = context->input(1);
    OP_REQUIRES_OK(context, CheckShapes(x_tensor, 1, {&context->input(2), &context->input(3)}));
    OP_REQUIRES(context, dy_tensor.shape() == x_tensor.shape(),
                absl::InvalidArgumentError("norm family kernel: dy and x shapes differ"));
    const Layout layout(x_tensor, x_tensor.dim_size(2), Threads(context));
    const int64_t N = layout.examples, C = layout.channels, S = layout.positions;
    OP_REQUIRES_OK(context, CheckGhosts(N, ghosts_));
    const int64_t rows = std::max<int64_t>(ghosts_, 1);
    OP_REQUIRES_OK(context, CheckPerExample(context->input(4), N, C));
    OP_REQUIRES_OK(context, CheckPerExample(context->input(5), N, C));
    OP_REQUIRES_OK(context, CheckPerExample(context->input(6), rows, C));
    OP_REQUIRES_OK(context, CheckPerExample(context->input(7), rows, C));
    Tensor *dx_tensor, *outputs[3];
    OP_REQUIRES_OK(context, context->allocate_output(0, x_tensor.shape(), &dx_tensor));
    for (int i = 0; i < 3; ++i)
      OP_REQUIRES_OK(context, context->allocate_output(i + 1, TensorShape({C}), &outputs[i]));
    const T* dy_all = dy_tensor.flat<T>().data();
    const T* x_all = x_tensor.flat<T>().data();
    T* dx_all = dx_tensor->flat<T>().data();
    const float* gamma = context->input(2).flat<float>().data();
    const float* v = context->input(3).flat<float>().data();
    const float* mean = context->input(4).flat<float>().data();
    const float* instance_std = context->input(5).flat<float>().data();
    const float* batch_mean = context->input(6).flat<float>().data();
    const float* batch_std = context->input(7).flat<float>().data();
    const int64_t per_ghost = ghosts_ > 0 ? N / ghosts_ : N;
    // per example and channel: [sum dy x / den | sum dy | sum qr x | sum qr | sum q of batch_std]
    std::vector<double> parts(5 * N * C);
    double* const part[5] = {parts.data(), parts.data() + N * C, parts.data() + 2 * N * C,
                             parts.data() + 3 * N * C, parts.data() + 4 * N * C};

    // Per-channel values of a unit, tiled over its lines.
    struct Terms {
      std::vector<float> floor, slope, shift, scale;
    };
    auto unit_terms = [&](const Lines& lines, int64_t example, int64_t begin, int64_t width) {
      const float* batch_std_row = batch_std + (example / per_ghost) * C + begin;
      std::vector<float> floor(width), slope(width), shift(width), scale(width);
      for (int64_t c = 0; c < width; ++c) {
        floor[c] = batch_std_row[c];
        slope[c] = v[begin + c];
        shift[c] = instance_std[example * C + begin + c];
        scale[c] = gamma[begin + c];
      }
      return Terms{lines.Tiled(floor), lines.Tiled(slope), lines.Tiled(shift), lines.Tiled(scale)};
    };

    layout.ForEachUnit(context, 4, [&](int64_t example, int64_t begin, int64_t width) {
      const Lines lines(S, width, C);
      const int64_t offset = example * S * C + begin;
      const T *dy = dy_all + offset, *x = x_all + offset;
      const Terms terms = unit_terms(lines, example, begin, width);
      std::vector<float> x_buffer(lines.width), dy_buffer(lines.width);
      std::vector<double> sums;
      const float *floor = terms.floor.data(), *slope = terms.slope.data(),
                  *shift = terms.shift.data(), *scale = terms.scale.data();
      ChannelSums(lines, 5, [&](int64_t i, int64_t n, float* acc) {
        const float* x_line = Floats(x + i * lines.stride, n, &x_buffer);
        const float* dy_line = Floats(dy + i * lines.stride, n, &dy_buffer);
        float *acc_dy = acc + lines.width, *acc_qr_x = acc + 2 * lines.width,
              *acc_qr = acc + 3 * lines.width, *acc_qb = acc + 4 * lines.width;
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          const float r = slope[j] * x_line[j] + shift[j];
          const bool batch = floor[j] >= r;
          const float inverse = 1.0f / std::max(floor[j], r);
          const float x_over = x_line[j] * inverse;
          const float q = -(dy_line[j] * scale[j]) * x_over * inverse;
          const float q_batch = batch ? q : 0.0f, q_r = batch ? 0.0f : q;
          acc[j] += dy_line[j] * x_over;
          acc_dy[j] += dy_line[j];
          acc_qr_x[j] += q_r * x_line[j];
          acc_qr[j] += q_r;
          acc_qb[j] += q_batch;
        }
      }, &sums);
      for (int k = 0; k < 5; ++k)
        std::copy(sums.begin() + k * width, sums.begin() + (k + 1) * width,
                  part[k] + example * C + begin);
    });

    SumOverExamples(std::vector<double>(part[0], part[1]), N, C, outputs[0]->flat<float>().data());
    SumOverExamples(std::vector<double>(part[1], part[2]), N, C, outputs[1]->flat<float>().data());
    SumOverExamples(std::vector<double>(part[2], part[3]), N, C, outputs[2]->flat<float>().data());
    std::vector<float> instance_k(N * C), batch_k(rows * C, 0.0f);
    for (int64_t i = 0; i < N * C; ++i)
      instance_k[i] = static_cast<float>(part[3][i] / (instance_std[i] * static_cast<double>(S)));
    if (ghosts_ > 0)
      for (int64_t g = 0; g < rows; ++g)
        for (int64_t c = 0; c < C; ++c) {
          double total = 0;
          for (int64_t n = g * per_ghost; n < (g + 1) * per_ghost; ++n) total += part[4][n * C + c];
          batch_k[g * C + c] = static_cast<float>(
              total / (batch_std[g * C + c] * static_cast<double>(per_ghost * S)));
        }

    layout.ForEachUnit(context, 3, [&](int64_t example, int64_t begin, int64_t width) {
      const Lines lines(S, width, C);
      const int64_t offset = example * S * C + begin;
      const T *dy = dy_all + offset, *x = x_all + offset;
      T* dx = dx_all + offset;
      const Terms terms = unit_terms(lines, example, begin, width);
      const int64_t ghost_row = (example / per_ghost) * C + begin;
      std::vector<float> center(width), k_instance(width), batch_center(width), k_batch(width);
      for (int64_t c = 0; c < width; ++c) {
        center[c] = mean[example * C + begin + c];
        k_instance[c] = instance_k[example * C + begin + c];
        batch_center[c] = ghosts_ > 0 ? batch_mean[ghost_row + c] : 0.0f;
        k_batch[c] = batch_k[ghost_row + c];
      }
      const std::vector<float> center_line = lines.Tiled(center),
                               k_instance_line = lines.Tiled(k_instance),
                               batch_center_line = lines.Tiled(batch_center),
                               k_batch_line = lines.Tiled(k_batch);
      const float *floor = terms.floor.data(), *slope = terms.slope.data(),
                  *shift = terms.shift.data(), *scale = terms.scale.data(),
                  *center_at = center_line.data(), *k_instance_at = k_instance_line.data(),
                  *batch_center_at = batch_center_line.data(), *k_batch_at = k_batch_line.data();
      std::vector<float> x_buffer(lines.width), dy_buffer(lines.width), out_buffer(lines.width);
      for (int64_t i = 0; i < lines.count; ++i) {
        const int64_t n = lines.Length(i);
        const float* x_line = Floats(x + i * lines.stride, n, &x_buffer);
        const float* dy_line = Floats(dy + i * lines.stride, n, &dy_buffer);
        float* out = Target(dx + i * lines.stride, &out_buffer);
#pragma GCC ivdep
        for (int64_t j = 0; j < n; ++j) {
          const float r = slope[j] * x_line[j] + shift[j];
          const bool batch = floor[j] >= r;
          const float inverse = 1.0f / std::max(floor[j], r);
          const float u_over = dy_line[j] * scale[j] * inverse;
          const float q_r = batch ? 0.0f : -u_over * x_line[j] * inverse;
          out[j] = u_over + slope[j] * q_r + (x_line[j] - center_at[j]) * k_instance_at[j] +
                   (x_line[j] - batch_center_at[j]) * k_batch_at[j];
        }
        Store(out, n, dx + i * lines.stride);
      }
    });
  }

 private:
  int64_t ghosts_;
};

// BatchRenorm's corrections of one batch against the moving statistics:
// r = clip(sqrt(var_B + epsilon) / sigma, 1 / r_max, r_max), d = clip((mu_B - moving_mean) /
// sigma, -d_max, d_max), sigma = sqrt(moving_variance + epsilon), mu_B and var_B (biased) over
// the batch's examples and positions.
template <typename T>
class RenormCorrectionsOp : public OpKernel {
 public:
  explicit RenormCorrectionsOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x_tensor = context->input(0);
    OP_REQUIRES_OK(context, CheckShapes(x_tensor, 1, {&context->input(1), &context->input(2)}));
    const int64_t N = x_tensor.dim_size(0), C = x_tensor.dim_size(2);
    OP_REQUIRES(context, N > 0, absl::InvalidArgumentError("norm family kernel: an empty batch"));
    Tensor *r_tensor, *d_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({C}), &r_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({C}), &d_tensor));
    std::vector<double> mean, variance, batch_mean, batch_variance;
    ExampleMoments<T>(context, x_tensor, &mean, &variance);
    GhostMoments(mean, variance, N, C, 1, &batch_mean, &batch_variance);
    const float* moving_mean = context->input(1).flat<float>().data();
    const float* moving_variance = context->input(2).flat<float>().data();
    const float r_max = context->input(3).scalar<float>()();
    const float d_max = context->input(4).scalar<float>()();
    float* r = r_tensor->flat<float>().data();
    float* d = d_tensor->flat<float>().data();
    for (int64_t c = 0; c < C; ++c) {
      const float sigma = std::sqrt(moving_variance[c] + epsilon_);
      const float ratio = std::sqrt(static_cast<float>(batch_variance[c]) + epsilon_) / sigma;
      const float shift = (static_cast<float>(batch_mean[c]) - moving_mean[c]) / sigma;
      r[c] = std::min(std::max(ratio, 1.0f / r_max), r_max);
      d[c] = std::min(std::max(shift, -d_max), d_max);
    }
  }

 private:
  float epsilon_;
};

#define REGISTER_NORM_FAMILY(T)                                                                \
  REGISTER_KERNEL_BUILDER(Name("GnFilterResponseNorm").Device(tensorflow::DEVICE_CPU)          \
                              .TypeConstraint<T>("T"), FilterResponseNormOp<T>);              \
  REGISTER_KERNEL_BUILDER(Name("GnFilterResponseNormGrad").Device(tensorflow::DEVICE_CPU)      \
                              .TypeConstraint<T>("T"), FilterResponseNormGradOp<T>);          \
  REGISTER_KERNEL_BUILDER(Name("GnEvoNormS0").Device(tensorflow::DEVICE_CPU)                   \
                              .TypeConstraint<T>("T"), EvoNormS0Op<T>);                       \
  REGISTER_KERNEL_BUILDER(Name("GnEvoNormS0Grad").Device(tensorflow::DEVICE_CPU)               \
                              .TypeConstraint<T>("T"), EvoNormS0GradOp<T>);                   \
  REGISTER_KERNEL_BUILDER(Name("GnEvoNormB0").Device(tensorflow::DEVICE_CPU)                   \
                              .TypeConstraint<T>("T"), EvoNormB0Op<T>);                       \
  REGISTER_KERNEL_BUILDER(Name("GnEvoNormB0Grad").Device(tensorflow::DEVICE_CPU)               \
                              .TypeConstraint<T>("T"), EvoNormB0GradOp<T>);                   \
  REGISTER_KERNEL_BUILDER(Name("GnRenormCorrections").Device(tensorflow::DEVICE_CPU)           \
                              .TypeConstraint<T>("T"), RenormCorrectionsOp<T>);

REGISTER_NORM_FAMILY(float)
REGISTER_NORM_FAMILY(Eigen::bfloat16)
REGISTER_NORM_FAMILY(Eigen::half)

}  // namespace
