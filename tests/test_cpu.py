"""kernels/cpu.py: the CPU kind every measured number names, on both kinds the repo meets."""
import os

import pytest

from kernels import cpu

AVX2_EPYC = cpu.Cpu("AMD EPYC 7B13", frozenset({"sse4_2", "avx", "avx2", "fma"}))
AVX512_XEON = cpu.Cpu("Intel(R) Xeon(R) Processor", frozenset(
    {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}))


@pytest.mark.parametrize("machine, instruction_set, bfloat16, vector", [
    (AVX2_EPYC, "avx2", False, "AVX2 FMA"),
    (AVX512_XEON, "avx512", True, "AVX2 FMA AVX-512F BW VL VNNI BF16"),
    (cpu.Cpu("Apple M2", frozenset()), "other", False, "no AVX2"),
])
def test_each_kind_is_named_with_its_vector_sets(machine, instruction_set, bfloat16, vector):
    assert machine.instruction_set == instruction_set
    assert machine.native_bfloat16 == bfloat16
    assert cpu.describe(machine) == (
        f"CPU: {machine.model}, {os.cpu_count()} logical CPUs; {vector}; native bfloat16: "
        f"{'yes' if bfloat16 else 'no'}")


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux reports its CPU there")
def test_this_cpu_is_what_linux_reports():
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    this = cpu.this_cpu()
    assert this.model == model and this.flags == frozenset(flags)
    assert this.instruction_set == ("avx512" if "avx512f" in flags else
                                    "avx2" if "avx2" in flags else "other")
