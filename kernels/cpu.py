"""What CPU this is: its model and the vector instruction sets TensorFlow's kernels pick their code
by (AVX2, AVX-512, native bfloat16), read once from the operating system.

Timings and even float32 results differ between CPU kinds, so every measured number says which
CPU it came from (bench.py's first line is `describe()`).
"""
import dataclasses
import functools
import os
import platform

# /proc/cpuinfo flags, as named in the description, in its order.
VECTOR_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512bw": "BW",
                "avx512vl": "VL", "avx512_vnni": "VNNI", "avx512_bf16": "BF16",
                "avx512_fp16": "FP16", "amx_tile": "AMX", "amx_bf16": "AMX-BF16"}
# Flags of native bfloat16 arithmetic: dot products of bfloat16 pairs into float32.
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class Cpu:
    model: str
    flags: frozenset

    @property
    def instruction_set(self):
        """'avx512', 'avx2' or 'other': the widest vector set TensorFlow's CPU kernels use."""
        if "avx512f" in self.flags:
            return "avx512"
        return "avx2" if "avx2" in self.flags else "other"

    @property
    def native_bfloat16(self):
        return any(flag in self.flags for flag in BFLOAT16_FLAGS)


@functools.cache
def this_cpu():
    """The CPU this process runs on, from /proc/cpuinfo (Linux); elsewhere its model as Python
    reports it and no flags."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return Cpu(model or platform.processor() or platform.machine(), flags)


def describe(cpu=None):
    """One line, e.g. 'CPU: Intel(R) Xeon(R) Processor, 2 logical CPUs; AVX2 FMA AVX-512F BW VL
    VNNI BF16 FP16 AMX AMX-BF16; native bfloat16: yes'."""
    cpu = cpu or this_cpu()
    vector = " ".join(name for flag, name in VECTOR_FLAGS.items() if flag in cpu.flags)
    return (f"CPU: {cpu.model}, {os.cpu_count()} logical CPUs; {vector or 'no AVX2'}; native "
            f"bfloat16: {'yes' if cpu.native_bfloat16 else 'no'}")
