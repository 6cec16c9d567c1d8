"""Which implementation each of the repo's ops runs: the one place that decides.

    op                     implementations, fastest first
    GroupNorm              cpp (kernels/group_norm.cc), tf_ops_xla, tf_ops (closed-form backward
                           as TensorFlow ops, XLA-compiled or not), plain (autodiff)
    BatchNorm in training  cpp (GroupNorm's kernels), fused (FusedBatchNormV3), keras; over
                           ghost batches: cpp, tf_ops, plain
    BatchNorm otherwise    fused, keras
    BatchRenorm            in training BatchNorm's (cpp, fused, keras: plain TensorFlow ops)
                           with r and d folded into its scale and offset, r and d from cpp
                           (kernels/norm_family.cc) where BatchNorm's kernel is cpp or fused,
                           else plain; over ghost batches, plain; otherwise BatchNorm's
    FilterResponseNorm,    cpp (kernels/norm_family.cc: a forward and a closed-form backward op
    EvoNormS0, EvoNormB0   each), plain (TensorFlow ops, differentiated by autodiff)
    Conv2D                 patches (a product of gathered patches, on small maps), onednn
                           (TensorFlow's oneDNN gradient kernels, on large convolutions),
                           tensorflow
    LeakyReLU              output_gradient (its gradient read from its output), keras

Three switches choose among them, each read from the environment once per process
(`from_environment`):

    GN_FAST_OPS=0      the plain TensorFlow ops everywhere (the last of each row above)
    GN_CPP_KERNELS=0   no C++ kernels: GroupNorm's TensorFlow-op kernels, BatchNorm's fused one,
                       the small-batch family's plain ops
    GN_ONEDNN_CONV=0   TensorFlow's own convolution gradients (so does TF_ENABLE_ONEDNN_OPTS=0)

A layer takes the switches in force when it is built (`current()`) and keeps them, so a traced
function never depends on when it was traced. `using(cpp_kernels=False)` around building sets
them for those layers (bench.py compares kernels that way); `plain_ops()` around tracing makes
every layer traced inside plain, whatever it was built with, for graphs that leave the process.
Where an implementation cannot run here (no C++ compiler, a GPU, a function XLA compiles whole,
a dtype it lacks) the next one in its row is taken. THRESHOLDS holds every size at which a
choice turns; docs/performance.md has the measurements behind them.
"""
import contextlib
import dataclasses
import functools
import os
import threading

import tensorflow as tf

import kernels
from kernels import conv as conv_kernels
from kernels import group_norm
from kernels import norm_family

THRESHOLDS = {
    # GroupNorm's TensorFlow-op kernels run XLA-compiled from this many values: launching an XLA
    # computation has a fixed cost on a CPU.
    "group_norm_xla_min_values": 1 << 17,
    # BatchNorm trains on GroupNorm's C++ kernels up to this many values; above it the fused
    # kernel's threads stream the tensor better.
    "batch_norm_cpp_max_values": 1 << 22,
    # Conv2D takes the oneDNN gradients from this many multiply-adds and input channels.
    "onednn_conv_min_multiply_adds": 32 * 2**20,
    "onednn_conv_min_input_channels": 16,
    # Conv2D multiplies gathered patches on maps no larger than its kernel, and on maps of at
    # most this many positions with at least this many channels.
    "patches_conv_max_positions": 64,
    "patches_conv_min_channels": 128,
}


@dataclasses.dataclass(frozen=True)
class Switches:
    """What a process allows: the fast paths at all, the C++ kernels, the oneDNN gradients."""
    fast_ops: bool = True
    cpp_kernels: bool = True
    onednn_conv: bool = True


PLAIN = Switches(fast_ops=False, cpp_kernels=False, onednn_conv=False)


def switched_off(variable):
    """Whether the environment sets `variable` to 0 / false / no / off."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def from_environment():
    """The process's switches, read from the environment at the first question."""
    return Switches(fast_ops=not switched_off("GN_FAST_OPS"),
                    cpp_kernels=not switched_off("GN_CPP_KERNELS"),
                    onednn_conv=not (switched_off("GN_ONEDNN_CONV")
                                     or switched_off("TF_ENABLE_ONEDNN_OPTS")))


_context = threading.local()


def current():
    """The switches for a layer built now: the innermost `using` block's, else the process's."""
    stack = getattr(_context, "using", ())
    return stack[-1] if stack else from_environment()


@contextlib.contextmanager
def using(**changes):
    """Layers built inside this block take the current switches with `changes`, e.g.
    `using(cpp_kernels=False)`."""
    outer = getattr(_context, "using", ())
    _context.using = (*outer, dataclasses.replace(current(), **changes))
    try:
        yield
    finally:
        _context.using = outer


def plain_ops_active():
    """True inside `plain_ops()`."""
    return getattr(_context, "plain", False)


@contextlib.contextmanager
def plain_ops():
    """Layers called (or functions traced) inside this block are built from plain TensorFlow ops
    only: no C++ kernel, no XLA-compiled function, no custom gradient. A graph traced here can
    leave the process: a SavedModel loads where this repo's library was never loaded, and TFLite
    converts it. It computes the same numbers as the fast paths (to float32 rounding)."""
    outer = plain_ops_active()
    _context.plain = True
    try:
        yield
    finally:
        _context.plain = outer


def at_call(switches):
    """A layer's switches for the call being traced: its own, or PLAIN inside `plain_ops()`."""
    return PLAIN if plain_ops_active() else switches


# What the machine can run ------------------------------------------------------------------------

def gpu_visible():
    """Whether TensorFlow places ops on a GPU by default here."""
    return bool(tf.config.list_logical_devices("GPU"))


def _cpp_ops_run(switches, library):
    """Whether a C++ op library's kernels run here: switched on, no GPU that would have to hand
    its tensors to them, not inside a function XLA compiles whole, and `library()` built."""
    return (switches.fast_ops and switches.cpp_kernels and not gpu_visible()
            and not in_xla_function() and library() is not None)


def cpp_kernels_run(switches, dtype):
    """Whether GroupNorm's C++ kernels take a tensor of `dtype` here (`_cpp_ops_run`)."""
    return dtype in group_norm.CPP_KERNEL_DTYPES and _cpp_ops_run(switches,
                                                                   kernels.group_norm_library)


def cpp_kernels_available():
    """Whether this process's layers run the C++ kernels on float32 (outside XLA functions)."""
    return cpp_kernels_run(current(), tf.float32)


# The input dtypes TensorFlow's fused batch-norm kernel takes; its statistics are float32.
FUSED_BATCH_NORM_DTYPES = (tf.float32, tf.bfloat16, tf.float16)


def in_xla_function():
    """True while tracing a function that XLA compiles whole (`jit_compile=True`), which cannot
    hold the C++ ops or the oneDNN gradients; also True where this TensorFlow lacks the test, so
    that the layers then keep to ops XLA can compile."""
    test = _xla_context_test()
    return True if test is None else test(tf.compat.v1.get_default_graph())


@functools.cache
def _xla_context_test():
    """TensorFlow's test of whether a graph is being traced for XLA. TensorFlow has no public one;
    Keras 2 used this private one. A release that moves it gets None, after one warning."""
    try:
        from tensorflow.python.ops import control_flow_util
        return control_flow_util.GraphOrParentsInXlaContext
    except (ImportError, AttributeError) as error:
        kernels.log.warning("GroupNorm and BatchNorm run their TensorFlow-op kernels and Conv2D "
                            "TensorFlow's gradients: this TensorFlow cannot tell an XLA-compiled "
                            "function apart (%s)", error)
        return None


# The choices -------------------------------------------------------------------------------------

def group_norm_kernel(switches, inputs, channels_last=True):
    """'cpp', 'tf_ops_xla', 'tf_ops' or 'plain' for GroupNorm on `inputs`."""
    if not (switches.fast_ops and channels_last):
        return "plain"
    if cpp_kernels_run(switches, inputs.dtype):
        return "cpp"
    size = inputs.shape.num_elements()
    large = size is None or size >= THRESHOLDS["group_norm_xla_min_values"]
    return "tf_ops_xla" if large else "tf_ops"


def batch_norm_kernel(switches, inputs, training, plain_layer=False):
    """'cpp', 'fused' or 'keras' for BatchNorm (and BatchRenorm) on `inputs`; `plain_layer`: a
    configuration only Keras's computation (BatchRenorm's plain ops) serves (synchronized,
    renorm, a mask, not 4-D channels last, ghost batches of BatchRenorm)."""
    if not switches.fast_ops or plain_layer or inputs.dtype not in FUSED_BATCH_NORM_DTYPES:
        return "keras"
    if training and _batch_norm_cpp_pays(inputs) and cpp_kernels_run(switches, inputs.dtype):
        return "cpp"
    return "fused"


def _batch_norm_cpp_pays(inputs):
    """GroupNorm's kernels are the faster for BN in training up to batch_norm_cpp_max_values
    values, and need more than one value per channel: with one, x - mean is 0 and the fused
    kernel's gradients are exact zeros, while the closed form leaves the rounding of dy * x
    magnified by 1 / sqrt(epsilon)."""
    size, channels = inputs.shape.num_elements(), inputs.shape[-1]
    return size is not None and channels < size <= THRESHOLDS["batch_norm_cpp_max_values"]


def ghost_batch_norm_kernel(switches, inputs):
    """'cpp', 'tf_ops' or 'plain' for BatchNorm in training over ghost batches (each ghost
    batch one example of GroupNorm's kernels, a group per channel)."""
    if not switches.fast_ops:
        return "plain"
    return "cpp" if cpp_kernels_run(switches, inputs.dtype) else "tf_ops"


def norm_family_kernel(switches):
    """'cpp' or 'plain' for FilterResponseNorm, EvoNormS0 and EvoNormB0, and for BatchRenorm's
    corrections r and d where BatchNorm's kernels normalize it (any input dtype: the kernels take
    float32, bfloat16 and float16, and the layers cast others to float32, as their references
    do)."""
    return "cpp" if _cpp_ops_run(switches, norm_family.library) else "plain"


def conv_kernel(switches, input_shape, kernel_shape, strides, dtypes):
    """'patches', 'onednn' or 'tensorflow' for a channels-last, undilated, ungrouped, 'same'
    convolution whose input and kernel have `dtypes`."""
    if not switches.fast_ops or gpu_visible():
        return "tensorflow"
    if _small_map(input_shape, kernel_shape):
        return "patches"
    if (switches.onednn_conv and all(dtype == tf.float32 for dtype in dtypes)
            and _onednn_pays(input_shape, kernel_shape, strides) and not in_xla_function()
            and conv_kernels.onednn_gradients_work()):
        return "onednn"
    return "tensorflow"


def _small_map(input_shape, kernel_shape):
    """A known-size map no larger than the kernel, or a small map with many channels."""
    height, width, channels = input_shape[1:]
    if not (height and width):
        return False
    return (height * width <= kernel_shape[0] * kernel_shape[1]
            or (height * width <= THRESHOLDS["patches_conv_max_positions"]
                and channels >= THRESHOLDS["patches_conv_min_channels"]))


def _onednn_pays(input_shape, kernel_shape, strides):
    """Whether the oneDNN gradients are the faster for this convolution (known static shapes)."""
    batch, height, width, in_channels = input_shape
    if batch is None or height is None or width is None:
        return False
    kernel_height, kernel_width, _, filters = kernel_shape
    outputs = batch * -(-height // strides[0]) * -(-width // strides[1])
    multiply_adds = outputs * kernel_height * kernel_width * in_channels * filters
    return (multiply_adds >= THRESHOLDS["onednn_conv_min_multiply_adds"]
            and in_channels >= THRESHOLDS["onednn_conv_min_input_channels"])


def leaky_relu_kernel(switches):
    """'output_gradient' or 'keras'."""
    return "output_gradient" if switches.fast_ops else "keras"


def describe():
    """One line: the kernels this process's layers use, e.g. for `--verbose`."""
    switches = current()
    if not switches.fast_ops:
        return "kernels: plain TensorFlow ops everywhere (GN_FAST_OPS=0)"
    cpp = cpp_kernels_run(switches, tf.float32)  # eager here: no XLA function
    gn_text = ("GroupNorm C++" if cpp else
               f"GroupNorm TensorFlow-op kernels (XLA-compiled from "
               f"{THRESHOLDS['group_norm_xla_min_values']:,} values)")
    bn_text = ("BatchNorm C++ in training up to "
               f"{THRESHOLDS['batch_norm_cpp_max_values']:,} values, fused otherwise"
               if cpp else "BatchNorm fused")
    onednn = (switches.onednn_conv and not gpu_visible()
              and conv_kernels.onednn_gradients_work())
    conv_text = "Conv2D patches on small maps" + (
        f", oneDNN gradients from {THRESHOLDS['onednn_conv_min_multiply_adds']:,} multiply-adds"
        if onednn else ", TensorFlow's gradients")
    family_text = ("FRN, EvoNorm and BatchRenorm's r and d C++"
                   if norm_family_kernel(switches) == "cpp" else
                   "FRN, EvoNorm and BatchRenorm's r and d TensorFlow ops")
    return (f"kernels: {gn_text}; {bn_text} (BatchRenorm the same); {family_text}; "
            f"{conv_text}; LeakyReLU gradient from its output")
