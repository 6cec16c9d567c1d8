"""Precise BN (runs.precise_batch_norm, evaler.py --precise_bn): population statistics against a
NumPy reference, recovery of BN statistics left at their initial values, and no effect on GN."""
import json

import keras
import numpy as np
import pytest

import evaler
import input_ops
import runs
from test_train_eval import train

CONFIG = {"batch_size": 16, "seed": 3, "augment": False}


@pytest.fixture(scope="module")
def sample():
    return input_ops.load("sample", "./datasets")[1]


def test_population_statistics_match_numpy(sample):
    """With BN on the raw images, the statistics are those of all the examples of the K batches:
    their mean and their (biased) variance."""
    inputs = keras.Input(sample.image_shape)
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    assert runs.precise_batch_norm(model, CONFIG, sample, num_batches=5) == 1
    batches = input_ops.train_dataset(sample, CONFIG["batch_size"], CONFIG["seed"],
                                      CONFIG["augment"]).take(5)
    images = np.concatenate([b.numpy() for b, _ in batches]).astype(np.float64)
    layer = model.layers[-1]
    np.testing.assert_allclose(layer.moving_mean.numpy(), images.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), images.var(axis=(0, 1, 2)),
                               rtol=1e-4)


def test_precise_bn_restores_statistics_left_at_their_initial_values(tmp_path, sample):
    run_dir = train(tmp_path, "--norm_type", "batch")
    config = json.load(open(f"{run_dir}/config.json"))
    prefix = f"{run_dir}/model-6"
    dataset = input_ops.eval_dataset(sample, 100)
    trained = runs.evaluate(runs.restore_model(prefix, config, sample), dataset, 10)[1]
    model = runs.restore_model(prefix, config, sample)
    for layer in runs.batch_norm_layers(model):
        layer.moving_mean.assign(np.zeros_like(layer.moving_mean.numpy()))
        layer.moving_variance.assign(np.ones_like(layer.moving_variance.numpy()))
    reset = runs.evaluate(model, dataset, 10)[1]
    assert runs.precise_batch_norm(model, config, sample, num_batches=20) == 4
    precise = runs.evaluate(model, dataset, 10)[1]
    assert reset < trained - 0.1, (reset, trained)
    assert precise > trained - 0.03, (precise, trained)


@pytest.mark.parametrize("norm_type", ["group", "none"])
def test_precise_bn_leaves_other_networks_unchanged(norm_type, tmp_path, capsys):
    run_dir = train(tmp_path, "--norm_type", norm_type)
    evaler.main(["--checkpoint", run_dir, "--json"])
    plain = json.loads(capsys.readouterr().out)
    evaler.main(["--checkpoint", run_dir, "--json", "--precise_bn", "5"])
    precise = json.loads(capsys.readouterr().out)
    assert precise.pop("precise_bn") == 0 and plain.pop("precise_bn") == 0
    assert precise == plain


def test_evaler_reports_precise_bn(tmp_path, capsys):
    run_dir = train(tmp_path, "--norm_type", "batch")
    evaler.main(["--checkpoint", run_dir, "--precise_bn", "4"])
    assert "(BN: precise statistics over 4 batches)" in capsys.readouterr().out
