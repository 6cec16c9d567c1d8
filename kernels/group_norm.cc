// Group Normalization forward and backward as two CPU kernels.
//
// The graph-op version of GN (ops.py, _group_norm_forward / _group_norm_backward) is about twenty
// small TensorFlow ops per direction; at the sizes of a batch-2 step each op costs more to launch
// than to run. Here each direction is one op that reads the input once per statistic and writes
// the output once. The input is viewed as [N, S, C] (S = positions), channels contiguous; groups
// are runs of C / G channels. Work is split over (example, block of whole groups), so small
// batches still use every core. Statistics are float32 (accumulated in float over blocks of rows
// and in double across them); inputs and outputs are float32, bfloat16 or float16.
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

// Per-channel sums over the rows of one example, for the channels [begin, begin + width):
// add(row, acc) adds one row's terms to the float accumulators acc[0..width).
template <typename AddRow>
void ChannelSums(int64_t rows, int64_t width, int64_t sums_count, AddRow add,
                 std::vector<double>* sums) {
  sums->assign(sums_count * width, 0.0);
  std::vector<float> acc(sums_count * width);
  for (int64_t first = 0; first < rows; first += kRowsPerFlush) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t row = first; row < std::min(rows, first + kRowsPerFlush); ++row) add(row, acc.data());
    for (size_t i = 0; i < acc.size(); ++i) (*sums)[i] += acc[i];
  }
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

  static int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

  // Runs fn(example, first group, group count) for every unit, on the op's thread pool.
  template <typename Fn>
  void ForEachUnit(OpKernelContext* context, int64_t passes, Fn fn) const {
    const int64_t unit_cost = 4 * passes * positions * groups_per_block * group_width;
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

    layout.ForEachUnit(context, 3, [&](int64_t example, int64_t first_group, int64_t count) {
      const int64_t begin = first_group * layout.group_width, width = count * layout.group_width;
      const int64_t C = layout.channels, S = layout.positions, gw = layout.group_width;
      const T* x = x_all + example * S * C + begin;
      T* y = y_all + example * S * C + begin;
      const double group_size = static_cast<double>(S * gw);
      std::vector<double> sums;
      std::vector<float> center(width), scale(width), offset(width);

      ChannelSums(S, width, 1, [&](int64_t s, float* acc) {
        const T* row = x + s * C;
        for (int64_t c = 0; c < width; ++c) acc[c] += static_cast<float>(row[c]);
      }, &sums);
      for (int64_t g = 0; g < count; ++g) {
        double total = 0;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) total += sums[c];
        std::fill(center.begin() + g * gw, center.begin() + (g + 1) * gw, total / group_size);
      }
      // The centered variance: unlike E[x^2] - E[x]^2 it keeps its precision when the mean is large.
      ChannelSums(S, width, 1, [&](int64_t s, float* acc) {
        const T* row = x + s * C;
        for (int64_t c = 0; c < width; ++c) {
          const float d = static_cast<float>(row[c]) - center[c];
          acc[c] += d * d;
        }
      }, &sums);
      for (int64_t g = 0; g < count; ++g) {
        double total = 0;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) total += sums[c];
        const float mean = center[g * gw];
        const float rstd = 1.0f / std::sqrt(static_cast<float>(total / group_size) + epsilon);
        mean_out[example * layout.groups + first_group + g] = mean;
        rstd_out[example * layout.groups + first_group + g] = rstd;
        for (int64_t c = g * gw; c < (g + 1) * gw; ++c) {
          scale[c] = rstd * gamma[begin + c];
          offset[c] = beta[begin + c] - mean * scale[c];
        }
      }
      for (int64_t s = 0; s < S; ++s) {
        const T* row = x + s * C;
        T* out = y + s * C;
        for (int64_t c = 0; c < width; ++c)
          out[c] = static_cast<T>(static_cast<float>(row[c]) * scale[c] + offset[c]);
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
      const double group_size = static_cast<double>(S * gw);
      std::vector<double> sums;  // [sum dy | sum dy * x] per channel
      std::vector<float> a(width), center(width), b(width), c_term(width);

      ChannelSums(S, width, 2, [&](int64_t s, float* acc) {
        const T *dy_row = dy + s * C, *x_row = x + s * C;
        for (int64_t c = 0; c < width; ++c) {
          const float d = static_cast<float>(dy_row[c]);
          acc[c] += d;
          acc[width + c] += d * static_cast<float>(x_row[c]);
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
      for (int64_t s = 0; s < S; ++s) {
        const T *dy_row = dy + s * C, *x_row = x + s * C;
        T* out = dx + s * C;
        for (int64_t c = 0; c < width; ++c)
          out[c] = static_cast<T>(static_cast<float>(dy_row[c]) * a[c] +
                                  (static_cast<float>(x_row[c]) - center[c]) * b[c] + c_term[c]);
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
