"""The small-batch normalizers' fast path: FilterResponseNorm, EvoNormS0 and EvoNormB0 as one C++
op per direction (kernels/norm_family.cc: the forward pass and a closed-form backward pass), and
BatchRenorm's corrections r and d as one op reading the batch once. ops.py's layers hold the
reference each computes (TensorFlow ops, differentiated by autodiff) and take these where
kernels/policy.py says; gamma, beta and the other weights arrive here as float32, the input in
one of `DTYPES`, and outputs leave in the input's dtype.

The library is built on first use like GroupNorm's (kernels/__init__.py: the same compiler, flags
and build folder), as build/norm_family-<hash>.so; where it cannot be built or loaded, `library()`
logs one warning and returns None, and the layers run their references.
"""
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

import tensorflow as tf

import kernels
from kernels import cpu
from kernels import group_norm

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "norm_family.cc")
DTYPES = (tf.float32, tf.bfloat16, tf.float16)


def _compile_command(output, native=True):
    return [kernels.compiler(), "-shared", "-fPIC", "-O3", "-w",
            *(kernels.NATIVE_FLAGS if native else ()), *tf.sysconfig.get_compile_flags(), SOURCE,
            "-o", output, *tf.sysconfig.get_link_flags()]


def library_path():
    """build/norm_family-<hash of source, TensorFlow version, compile command and the CPU's
    instruction sets>.so"""
    digest = hashlib.sha256()
    with open(SOURCE, "rb") as source:
        digest.update(source.read())
    digest.update(tf.__version__.encode())
    digest.update(" ".join(_compile_command("")).encode())
    digest.update(" ".join(sorted(cpu.this_cpu().flags)).encode())
    return os.path.join(kernels.BUILD_DIR, f"norm_family-{digest.hexdigest()[:16]}.so")


def build(path):
    """Compiles the kernels into `path` through a temporary name (for this CPU, else for any
    x86-64, as GroupNorm's) and removes the libraries of earlier sources beside it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(descriptor)
    try:
        result = subprocess.run(_compile_command(temporary), capture_output=True, text=True)
        if result.returncode:
            result = subprocess.run(_compile_command(temporary, native=False),
                                    capture_output=True, text=True)
        if result.returncode:
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            raise RuntimeError((errors or result.stderr.splitlines() or ["no output"])[0])
        os.replace(temporary, path)
        for stale in glob.glob(os.path.join(os.path.dirname(path), "norm_family-*.so")):
            if stale != path:
                os.remove(stale)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@functools.cache
def library():
    """The loaded op library, built if needed; None, after one warning, when it cannot be built
    or loaded."""
    path = library_path()
    try:
        if not os.path.exists(path):
            if shutil.which(kernels.compiler()) is None:
                raise RuntimeError(f"no C++ compiler '{kernels.compiler()}' found (install g++ "
                                   "or set CXX)")
            kernels.log.info("compiling the small-batch normalizers' CPU kernels into %s (once, "
                             "about 30 s)", path)
            build(path)
        return tf.load_op_library(path)
    except (OSError, RuntimeError, tf.errors.NotFoundError) as error:
        kernels.log.warning("FilterResponseNorm, EvoNorm and BatchRenorm's corrections run their "
                            "TensorFlow ops: their C++ kernels could not be built (%s)", error)
        return None


def as_kernel_input(inputs):
    """The input a kernel takes: as it arrives in one of DTYPES, else cast to float32 (as the
    references cast every input)."""
    return inputs if inputs.dtype in DTYPES else tf.cast(inputs, tf.float32)


def _to_input_shape(values, inputs):
    return tf.reshape(values, tf.shape(inputs))


def filter_response_norm(inputs, gamma, beta, tau, epsilon, tlu):
    """FRN (+ TLU where `tlu`) of channels-last `inputs`; `epsilon` a float32 scalar tensor (it
    may carry a learned part's gradient), `tau` ignored without the TLU."""
    ops = library()

    @tf.custom_gradient
    def frn(x, gamma, beta, tau, epsilon):
        y, rstd = ops.gn_filter_response_norm(x, gamma, beta, tau, epsilon, tlu=tlu)

        def gradient(d_outputs):
            return ops.gn_filter_response_norm_grad(d_outputs, x, gamma, beta, tau, rstd, tlu=tlu)
        return y, gradient
    outputs = frn(group_norm._positions_by_channels(inputs), gamma, beta, tau, epsilon)
    return _to_input_shape(outputs, inputs)


def evonorm_s0(inputs, gamma, beta, v, groups, epsilon):
    """EvoNorm-S0 of channels-last `inputs` in `groups` groups."""
    ops = library()

    @tf.custom_gradient
    def s0(x, gamma, beta, v):
        y, mean, rstd = ops.gn_evo_norm_s0(x, gamma, beta, v, groups=groups, epsilon=epsilon)

        def gradient(d_outputs):
            return ops.gn_evo_norm_s0_grad(d_outputs, x, gamma, v, mean, rstd, groups=groups)
        return y, gradient
    return _to_input_shape(s0(group_norm._positions_by_channels(inputs), gamma, beta, v), inputs)


def evonorm_b0(inputs, gamma, beta, v, moving_variance, epsilon, ghosts):
    """(outputs, batch variances [ghosts, C]) of EvoNorm-B0 on channels-last `inputs`: in
    training (`ghosts` >= 1) var_B of each ghost batch, with its gradient; in inference
    (`ghosts` 0) the moving variance, and the variances returned are it. No gradient flows
    through the returned variances (they move the moving variance)."""
    ops = library()

    @tf.custom_gradient
    def b0(x, gamma, beta, v):
        y, mean, instance_std, batch_mean, batch_std, batch_variance = ops.gn_evo_norm_b0(
            x, gamma, beta, v, moving_variance, ghosts=ghosts, epsilon=epsilon)

        def gradient(d_outputs, unused_variance_gradient):
            return ops.gn_evo_norm_b0_grad(d_outputs, x, gamma, v, mean, instance_std,
                                           batch_mean, batch_std, ghosts=ghosts)
        return (y, tf.stop_gradient(batch_variance)), gradient
    outputs, variances = b0(group_norm._positions_by_channels(inputs), gamma, beta, v)
    return _to_input_shape(outputs, inputs), variances


def renorm_corrections(inputs, moving_mean, moving_variance, r_max, d_max, epsilon):
    """(r, d), [C] each, of BatchRenorm on one batch of channels-last `inputs`, without gradient."""
    r, d = library().gn_renorm_corrections(group_norm._positions_by_channels(inputs), moving_mean,
                                           moving_variance, r_max, d_max, epsilon=epsilon)
    return tf.stop_gradient(r), tf.stop_gradient(d)


tf.no_gradient("GnRenormCorrections")


def _no_second_order(op, *output_gradients):
    """Second-order gradients are not written for these kernels; GN_CPP_KERNELS=0 gives the
    references, which TensorFlow differentiates twice."""
    raise NotImplementedError(
        f"second-order gradients through {op.type} (FilterResponseNorm, EvoNorm's C++ kernels) "
        "are not implemented; set GN_CPP_KERNELS=0 to run the TensorFlow ops, which support them")


for _op_type in ("GnFilterResponseNormGrad", "GnEvoNormS0Grad", "GnEvoNormB0Grad"):
    tf.RegisterGradient(_op_type)(_no_second_order)
