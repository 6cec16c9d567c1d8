// Group Normalization forward and backward as two CPU kernels.
//
// The graph-op version of GN (group_norm.py, forward / backward) is about twenty small
// TensorFlow ops per direction; at the sizes of a batch-2 step each op costs more to launch than
// to run. Here each direction is one op that reads its inputs twice (once for the statistics, once
// to write the output) and writes the output once. The input is viewed as [N, S, C]
// (S = positions), channels contiguous; groups are runs of C / G channels. Work is split over
// (example, block of whole groups), so small batches of large maps still use every core.
// Statistics are float32 (accumulated in float over blocks of rows and in double across them);
// inputs and outputs are float32, bfloat16 or float16.
#include <algorithm>
#include <cmath>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("GnGroupNorm")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("rstd: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("groups: int >= 1")
    .Attr("epsilon: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      int groups;
      TF_RETURN_IF_ERROR(c->GetAttr("groups", &groups));
      c->set_output(0, x);
      c->set_output(1, c->Matrix(c->Dim(x, 0), groups));
      c->set_output(2, c->Matrix(c->Dim(x, 0), groups));
      return absl::OkStatus();
    });

REGISTER_OP("GnGroupNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: float")
    .Input("mean: float")
    .Input("rstd: float")
    .Output("dx: T")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Attr("T: {float, bfloat16, half}")
    .Attr("groups: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &x));
      c->set_output(0, x);
      c->set_output(1, c->Vector(c->Dim(x, 2)));
      c->set_output(2, c->Vector(c->Dim(x, 2)));
      return absl::OkStatus();
    });

// Rows summed in float before the sums move to double: short enough that float keeps ~1e-6
// relative precision, long enough that the double additions cost nothing.
constexpr int64_t kRowsPerFlush = 64;
// Inner loops run over lines of at least this many values where the rows are narrower.
constexpr int64_t kMinLineWidth = 256;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One work unit's rows (S rows of `channel_width` values, `channels` apart) as the lines its inner
// loops run over. A unit that spans whole rows is contiguous, so its narrow rows are taken several
// at a time: the loops then pay their setup once per line instead of once per narrow row. Value j
// of a line is channel j % channel_width.
struct Lines {
  int64_t rows, channel_width, rows_per_line, width, stride, count;

  Lines(int64_t rows_, int64_t channel_width_, int64_t channels)
      : rows(rows_), channel_width(channel_width_),
        rows_per_line(channel_width_ == channels
                          ? std::max<int64_t>(1, kMinLineWidth / channels) : 1),
        width(channel_width_ * rows_per_line), stride(channels * rows_per_line),
        count(CeilDiv(rows_, rows_per_line)) {}

  // The number of values in line i (the last line may hold fewer rows).
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

struct GroupMoments {
  double mean, variance;
};

// Group g's mean and (biased) variance from its channels' sums of d = x - shift[c] and of d * d
// over `positions` rows (`sums` = [sum d | sum d * d], `width` channels each): per channel,
// sum (x - mean)^2 = sum d^2 + 2 (shift - mean) sum d + positions (shift - mean)^2.
GroupMoments Moments(const std::vector<double>& sums, const std::vector<float>& shift, int64_t g,
                     int64_t group_width, int64_t width, int64_t positions) {
  const double group_size = static_cast<double>(positions * group_width);
  double total = 0;
  for (int64_t c = g * group_width; c < (g + 1) * group_width; ++c)
    total += sums[c] + positions * static_cast<double>(shift[c]);
  const double mean = total / group_size;
  double squares = 0;
  for (int64_t c = g * group_width; c < (g + 1) * group_width; ++c) {
    const double offset = shift[c] - mean;
    squares += sums[width + c] + 2 * offset * sums[c] + positions * offset * offset;
  }
  return {mean, std::max(0.0, squares / group_size)};
}

// Shape of the work: N examples, S positions, C channels in G groups of `group_width`; one work
// unit is one example's block of `groups_per_block` whole groups. Whole rows stream fastest, so an
// example is split only where there are fewer than two examples per thread, into blocks of at
// least 64 channels.
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

  // Runs fn(example, first group, group count) for every unit, on the op's thread pool. The cost
  // is about one cycle per value and pass: handing work to another thread costs tens of
  // microseconds on a shared machine, so small tensors are better done on the calling thread.
  template <typename Fn>
  void ForEachUnit(OpKernelContext* context, int64_t passes, Fn fn) const {
    const int64_t unit_cost = passes * positions * groups_per_block * group_width;
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

absl::Status CheckShapes(const Tensor& x, const Tensor& gamma, int64_t groups) {
  if (x.dims() != 3) return absl::InvalidArgumentError("GroupNorm kernel: x must be [N, S, C]");
  if (x.dim_size(2) == 0) return absl::InvalidArgumentError("GroupNorm kernel: x has no channels");
  if (x.dim_size(2) % groups != 0)
    return absl::InvalidArgumentError("GroupNorm kernel: channels not divisible by groups");
  if (gamma.dims() != 1 || gamma.dim_size(0) != x.dim_size(2))
    return absl::InvalidArgumentError("GroupNorm kernel: gamma and beta must be [C]");
  return absl::OkStatus();
}

template <typename T>
class GroupNormOp : public OpKernel {
 public:
  explicit GroupNormOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("groups", &groups_));
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& gamma_tensor = context->input(1);
    const Tensor& beta_tensor = context->input(2);
    OP_REQUIRES_OK(context, CheckShapes(x, gamma_tensor, groups_));
    OP_REQUIRES_OK(context, CheckShapes(x, beta_tensor, groups_));
    const Layout layout(x, groups_, Threads(context));
    Tensor *y_tensor, *mean_tensor, *rstd_tensor;
    const tensorflow::TensorShape stats_shape({layout.examples, layout.groups});
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &y_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, stats_shape, &mean_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(2, stats_shape, &rstd_tensor));

    const T* x_all = x.flat<T>().data();
    T* y_all = y_tensor->flat<T>().data();
    const float* gamma = gamma_tensor.flat<float>().data();
    const float* beta = beta_tensor.flat<float>().data();
    float* mean_out = mean_tensor->flat<float>().data();
    float* rstd_out = rstd_tensor->flat<float>().data();
    const float epsilon = epsilon_;

    layout.ForEachUnit(context, 2, [&](int64_t example, int64_t first_group, int64_t count) {
      const int64_t begin = first_group * layout.group_width, width = count * layout.group_width;
      const int64_t C = layout.channels, S = layout.positions, gw = layout.group_width;
      const T* x = x_all + example * S * C + begin;
      T* y = y_all + example * S * C + begin;
      const Lines lines(S, width, C);
      std::vector<double> sums;  // [sum d | sum d * d] per channel
      std::vector<float> scale(width), offset(width);

      // Both statistics in one pass: per-channel sums of d = x - shift and of d * d, the shift
      // being the channel's value at the first position. Centred on a value of its own channel,
      // d stays on the scale of the spread, so the variance keeps the precision of a centred
      // one when the mean is large, as E[x^2] - E[x]^2 would not.
      std::vector<float> shift(width);
      for (int64_t c = 0; c < width; ++c) shift[c] = static_cast<float>(x[c]);
      const std::vector<float> shift_line = lines.Tiled(shift);
      ChannelSums(lines, 2, [&](int64_t i, int64_t length, float* acc) {
        const T* line = x + i * lines.stride;
        float* acc_squares = acc + lines.width;
        for (int64_t j = 0; j < length; ++j) {
          const float d = static_cast<float>(line[j]) - shift_line[j];
          acc[j] += d;
          acc_squares[j] += d * d;
        }
      }, &sums);
      for (int64_t g = 0; g < count; ++g) {
        const GroupMoments moments = Moments(sums, shift, g, gw, width, S);
        const float mean = static_cast<float>(moments.mean);
        const float rstd = 1.0f / std::sqrt(static_cast<float>(moments.variance) + epsilon);
        mean_out[example * layout.groups + first_group + g] = mean;
        rstd_out[example * layout.groups + first_group + g] = rstd;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) {
          scale[c] = rstd * gamma[begin + c];
          offset[c] = beta[begin + c] - mean * scale[c];
        }
      }
      const std::vector<float> scale_line = lines.Tiled(scale), offset_line = lines.Tiled(offset);
      for (int64_t i = 0; i < lines.count; ++i) {
        const T* line = x + i * lines.stride;
        T* out = y + i * lines.stride;
        for (int64_t j = 0, length = lines.Length(i); j < length; ++j)
          out[j] = static_cast<T>(static_cast<float>(line[j]) * scale_line[j] + offset_line[j]);
      }
    });
  }

 private:
  int64_t groups_;
  float epsilon_;
};

// With x_hat = (x - mean) * rstd, g = gamma and <.> the mean over a group's positions and channels:
//   dx = rstd * (g * dy - <g * dy> - x_hat * <g * dy * x_hat>)
// computed as dy * a + (x - mean) * b + c with a per channel and b, c per group.
template <typename T>
class GroupNormGradOp : public OpKernel {
 public:
  explicit GroupNormGradOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("groups", &groups_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& dy_tensor = context->input(0);
    const Tensor& x_tensor = context->input(1);
    const Tensor& gamma_tensor = context->input(2);
    OP_REQUIRES_OK(context, CheckShapes(x_tensor, gamma_tensor, groups_));
    OP_REQUIRES(context, dy_tensor.shape() == x_tensor.shape(),
                absl::InvalidArgumentError("GroupNorm kernel: dy and x shapes differ"));
    const Layout layout(x_tensor, groups_, Threads(context));
    const int64_t C = layout.channels, S = layout.positions, gw = layout.group_width;
    Tensor *dx_tensor, *dgamma_tensor, *dbeta_tensor;
    OP_REQUIRES_OK(context, context->allocate_output(0, x_tensor.shape(), &dx_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(1, gamma_tensor.shape(), &dgamma_tensor));
    OP_REQUIRES_OK(context, context->allocate_output(2, gamma_tensor.shape(), &dbeta_tensor));

    const T* dy_all = dy_tensor.flat<T>().data();
    const T* x_all = x_tensor.flat<T>().data();
    T* dx_all = dx_tensor->flat<T>().data();
    const float* gamma = gamma_tensor.flat<float>().data();
    const float* mean_in = context->input(3).flat<float>().data();
    const float* rstd_in = context->input(4).flat<float>().data();
    // per-example parts of dgamma and dbeta, summed over the examples afterwards
    std::vector<double> dgamma_parts(layout.examples * C), dbeta_parts(layout.examples * C);

    layout.ForEachUnit(context, 2, [&](int64_t example, int64_t first_group, int64_t count) {
      const int64_t begin = first_group * gw, width = count * gw;
      const int64_t offset = example * S * C + begin;
      const T *dy = dy_all + offset, *x = x_all + offset;
      T* dx = dx_all + offset;
      const Lines lines(S, width, C);
      const double group_size = static_cast<double>(S * gw);
      std::vector<double> sums;  // [sum dy | sum dy * x] per channel
      std::vector<float> a(width), center(width), b(width), c_term(width);

      ChannelSums(lines, 2, [&](int64_t i, int64_t length, float* acc) {
        const T *dy_line = dy + i * lines.stride, *x_line = x + i * lines.stride;
        float* acc_dy_x = acc + lines.width;
        for (int64_t j = 0; j < length; ++j) {
          const float d = static_cast<float>(dy_line[j]);
          acc[j] += d;
          acc_dy_x[j] += d * static_cast<float>(x_line[j]);
        }
      }, &sums);
      for (int64_t g = 0; g < count; ++g) {
        const int64_t stat = example * layout.groups + first_group + g;
        const double mean = mean_in[stat], rstd = rstd_in[stat];
        double mean_g_dy = 0, mean_g_dy_x_hat = 0;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) {
          const double sum_dy = sums[c], sum_dy_x_hat = rstd * (sums[width + c] - mean * sum_dy);
          dbeta_parts[example * C + begin + c] = sum_dy;
          dgamma_parts[example * C + begin + c] = sum_dy_x_hat;
          mean_g_dy += gamma[begin + c] * sum_dy;
          mean_g_dy_x_hat += gamma[begin + c] * sum_dy_x_hat;
        }
        mean_g_dy /= group_size;
        mean_g_dy_x_hat /= group_size;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) {
          a[c] = static_cast<float>(rstd * gamma[begin + c]);
          center[c] = static_cast<float>(mean);
          b[c] = static_cast<float>(-rstd * rstd * mean_g_dy_x_hat);
          c_term[c] = static_cast<float>(-rstd * mean_g_dy);
        }
      }
      const std::vector<float> a_line = lines.Tiled(a), center_line = lines.Tiled(center),
                               b_line = lines.Tiled(b), c_line = lines.Tiled(c_term);
      for (int64_t i = 0; i < lines.count; ++i) {
        const T *dy_line = dy + i * lines.stride, *x_line = x + i * lines.stride;
        T* out = dx + i * lines.stride;
        for (int64_t j = 0, length = lines.Length(i); j < length; ++j)
          out[j] = static_cast<T>(static_cast<float>(dy_line[j]) * a_line[j] +
                                  (static_cast<float>(x_line[j]) - center_line[j]) * b_line[j] +
                                  c_line[j]);
      }
    });

    float* dgamma = dgamma_tensor->flat<float>().data();
    float* dbeta = dbeta_tensor->flat<float>().data();
    for (int64_t c = 0; c < C; ++c) {
      double dgamma_c = 0, dbeta_c = 0;
      for (int64_t n = 0; n < layout.examples; ++n) {
        dgamma_c += dgamma_parts[n * C + c];
        dbeta_c += dbeta_parts[n * C + c];
      }
      dgamma[c] = static_cast<float>(dgamma_c);
      dbeta[c] = static_cast<float>(dbeta_c);
    }
  }

 private:
  int64_t groups_;
};

#define REGISTER_GROUP_NORM(T)                                                          \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("GnGroupNorm").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),        \
      GroupNormOp<T>);                                                                  \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("GnGroupNormGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),    \
      GroupNormGradOp<T>);

REGISTER_GROUP_NORM(float)
REGISTER_GROUP_NORM(Eigen::bfloat16)
REGISTER_GROUP_NORM(Eigen::half)

}  // namespace
