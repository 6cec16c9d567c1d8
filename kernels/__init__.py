"""GroupNorm's CPU kernels (group_norm.cc), compiled on first use against the installed TensorFlow.

The shared library is built once with the C++ compiler ($CXX, else g++) and TensorFlow's own
compile and link flags, for this CPU's vector instructions (`NATIVE_FLAGS`; where the compiler
refuses them, for any x86-64), and cached as build/group_norm-<hash>.so in the repository; the
hash covers the source, TensorFlow's version, the flags and the CPU's instruction sets, so a
change to any of them builds a new one. When no compiler is found or the build fails,
`group_norm_library()` logs one warning and returns None, and GroupNorm runs its TensorFlow-op
kernels instead (same numbers, slower). Those, the plain reference and the calls into the C++ ops
are group_norm.py.
"""
import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import tensorflow as tf

from kernels import cpu

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "group_norm.cc")
BUILD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build")

log = logging.getLogger("gn")


def compiler():
    return os.environ.get("CXX", "g++")


# The kernels' loops run over independent lanes, so wider vectors (AVX2, AVX-512) compute the same
# sums in the same order: with contraction into fused multiply-adds off, the native build gives
# the portable build's numbers bit for bit, only faster. TensorFlow's bundled Eigen headers do not
# compile for AVX-512 FP16, hence -mno-avx512fp16 (which compilers before GCC 12 do not know: they
# fall back to the portable build).
NATIVE_FLAGS = ("-march=native", "-mno-avx512fp16", "-ffp-contract=off")


def _compile_command(output, native=True, source=None):
    return [compiler(), "-shared", "-fPIC", "-O3", "-w", *(NATIVE_FLAGS if native else ()),
            *tf.sysconfig.get_compile_flags(), source or SOURCE, "-o", output,
            *tf.sysconfig.get_link_flags()]


def library_path(source=None, stem="group_norm"):
    """build/<stem>-<hash of the source, TensorFlow version, compile command and the CPU's
    instruction sets>.so"""
    source = source or SOURCE
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        digest.update(f.read())
    digest.update(tf.__version__.encode())
    digest.update(" ".join(_compile_command("", source=source)).encode())
    digest.update(" ".join(sorted(cpu.this_cpu().flags)).encode())
    return os.path.join(BUILD_DIR, f"{stem}-{digest.hexdigest()[:16]}.so")


def build(path, source=None):
    """Compiles `source` (default: GroupNorm's kernels) into `path` (through a temporary name, so
    that an interrupted or concurrent build never leaves a partial library under the final name),
    for this CPU, else for any x86-64, and removes the libraries of earlier sources or TensorFlow
    versions beside it (those of the same stem, the name before the hash)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(descriptor)
    try:
        result = subprocess.run(_compile_command(temporary, source=source), capture_output=True,
                                text=True)
        if result.returncode:
            result = subprocess.run(_compile_command(temporary, native=False, source=source),
                                    capture_output=True, text=True)
        if result.returncode:
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            raise RuntimeError((errors or result.stderr.splitlines() or ["no output"])[0])
        os.replace(temporary, path)
        stem = os.path.basename(path).rsplit("-", 1)[0]
        for stale in glob.glob(os.path.join(os.path.dirname(path), f"{stem}-*.so")):
            if stale != path:
                os.remove(stale)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_library(source, stem, without_it):
    """The op library compiled from `source` (build/<stem>-<hash>.so), built if needed; None,
    after one warning that says what runs `without_it`, when it cannot be built or loaded."""
    path = library_path(source, stem)
    try:
        if not os.path.exists(path):
            if shutil.which(compiler()) is None:
                raise RuntimeError(f"no C++ compiler '{compiler()}' found (install g++ or set CXX)")
            log.info("compiling %s into %s (once, about 20-30 s)", os.path.basename(source), path)
            build(path, source)
        return tf.load_op_library(path)
    except (OSError, RuntimeError, tf.errors.NotFoundError) as error:
        log.warning("%s: the C++ kernels could not be built (%s)", without_it, error)
        return None


@functools.cache
def group_norm_library():
    """The loaded op library (ops `gn_group_norm`, `gn_group_norm_grad`), built if needed; None,
    after one warning, when it cannot be built or loaded."""
    return load_library(SOURCE, "group_norm", "GroupNorm runs its slower TensorFlow-op kernels")
