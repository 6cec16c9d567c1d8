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
from kernels import cpu

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
    assert report["cpu"] == cpu.describe()  # every number names its CPU
    built = shutil.which(kernels.compiler()) is not None
    assert report["kernels"].startswith("kernels: GroupNorm C++" if built else
                                        "kernels: GroupNorm TensorFlow-op kernels")
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


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "benchmarks",
                                                                         "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_ratio_is_the_median_of_the_ratios_within_each_round():
    bench = load_bench()
    times = {"a": [1.0, 4.0, 4.0], "b": [2.0, 8.0, 1.0], "c": [1.0, 0.0, 0.0]}
    assert bench.ratio(times, ["a"], ["b"]) == 0.5  # the ratio of the medians would be 2
    assert bench.ratio(times, ["a", "c"], ["b"]) == 1.0  # rounds: 1.0, 0.5, 4.0
    assert bench.ratio(times, ["b"], ["a"]) == 2.0


def test_targets_are_read_from_their_sections_and_judged_against_their_limits():
    bench = load_bench()
    norm = [{"dtype": "float32", "shape": list(shape), "gn_over_bn": 0.5 + i / 10,
             "gn_over_keras_gn": 0.3 + i / 10, "gn_over_fused_bn": 0.6 + i / 10,
             "our_bn_over_fused_bn": 0.9 + i / 10, "family_over_gn": 1.6 - i / 10}
            for i, shape in enumerate(bench.NORM_SHAPES)]
    norm.append({"dtype": "bfloat16", "shape": [32, 32, 32, 64], "gn_over_bn": 9.0,
                 "gn_over_keras_gn": 9.0, "gn_over_fused_bn": 9.0, "our_bn_over_fused_bn": 9.0,
                 "family_over_gn": 9.0})
    step = [{"model": "conv", "batch": 32, "gn_over_bn": 0.9, "step_over_forward": 5.0,
             "over_torch": 0.7},
            {"model": "resnet20", "batch": 2, "gn_over_bn": 1.2, "step_over_forward": 9.0},
            {"model": "resnet", "batch": 2, "gn_over_bn": 3.0, "step_over_forward": 9.0}]
    values = bench.target_values({"norm": norm, "step": step,
                                  "memory": {"peak_over_limit": 1.0,
                                             "seconds_to_first_update": 6.5}})
    assert values == pytest.approx({
        "gn_over_bn_layer": 0.5, "gn_over_keras_gn_layer": 0.4, "gn_over_fused_bn_layer": 0.8,
        "our_bn_over_fused_bn_layer": 1.1, "family_over_gn_layer": 1.6, "gn_over_bn_step": 1.2, "step_over_forward": 5.0, "step_over_torch": 0.7,
        "peak_memory": 1.0, "seconds_to_first_update": 6.5})
    lines = {line.split(":")[0].strip(): line for line in bench.target_lines(values)}
    assert len(lines) == len(values)  # the input section was not run
    verdicts = {key: lines[bench.TARGETS[key][0]].endswith(") met") for key in values}
    assert verdicts == {"gn_over_bn_layer": True, "gn_over_keras_gn_layer": True,
                        "gn_over_fused_bn_layer": True, "our_bn_over_fused_bn_layer": False,
                        "family_over_gn_layer": False, "gn_over_bn_step": False,
                        "step_over_forward": True, "step_over_torch": True,
                        "peak_memory": True, "seconds_to_first_update": False}
    assert "seconds from the HDF5 read to the first update, Tiny-ImageNet-sized file: 6.50 " \
           "(target <= 5.0) NOT met" in lines[bench.TARGETS["seconds_to_first_update"][0]]
