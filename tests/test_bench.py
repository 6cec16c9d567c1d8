"""benchmarks/bench.py runs and reports what it promises (its timings are not asserted)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import kernels
import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*argv):
    return subprocess.run([sys.executable, "benchmarks/bench.py", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_the_sections():
    result = run_bench("--help")
    assert result.returncode == 0
    for section in ("norm", "step", "input", "convert", "scale", "memory", "GN_FAST_OPS=0",
                    "GN_CPP_KERNELS=0", "GN_ONEDNN_CONV=0", "PyTorch"):
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


needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is optional (pip install torch)")


@needs_torch
@pytest.mark.parametrize("model_name", ["conv", "resnet20"])
@pytest.mark.parametrize("norm_type", ["batch", "group"])
def test_pytorch_nets_have_the_models_parameters(model_name, norm_type):
    """The PyTorch column races the same nets: every parameter tensor's size, in order of count."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import torch_step
    size, channels, groups = torch_step.MODELS[model_name]
    theirs = {"conv": torch_step.conv_net, "resnet20": torch_step.resnet20}[model_name](
        norm_type, groups)
    ours = model_lib.build_model(model_name, (size, size, channels), torch_step.NUM_CLASSES,
                                 norm_type, groups=groups)
    assert (sorted(p.numel() for p in theirs.parameters())
            == sorted(int(np.prod(v.shape)) for v in ours.trainable_variables))


@needs_torch
def test_pytorch_step_prints_its_time():
    result = subprocess.run([sys.executable, "benchmarks/torch_step.py", "--model", "resnet20",
                             "--norm_type", "group", "--batch_size", "2", "--rounds", "2",
                             "--seconds", "0.01"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["rounds"]) == 2 and report["step_ms"] in report["rounds"]
