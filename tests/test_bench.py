"""benchmarks/bench.py runs and reports what it promises (its timings are not asserted)."""
import json
import os
import shutil
import subprocess
import sys

import kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*argv):
    return subprocess.run([sys.executable, "benchmarks/bench.py", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_the_sections():
    result = run_bench("--help")
    assert result.returncode == 0
    for section in ("norm", "step", "input", "convert", "scale", "memory", "GN_FAST_OPS=0",
                    "GN_CPP_KERNELS=0"):
        assert section in result.stdout


def test_json_report_of_the_convert_section():
    result = run_bench("--sections", "convert", "--quick", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fast_ops"] is True
    built = shutil.which(kernels.compiler()) is not None
    assert report["group_norm_kernels"].startswith("C++" if built else "TensorFlow-op kernels")
    assert report["convert"]["images"] == 70_000 and report["convert"]["seconds"] > 0
    assert report["targets"] == {}
