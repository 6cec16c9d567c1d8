"""export.py and predict.py on tiny GN and BN runs of the bundled sample: the SavedModel in a
fresh process that cannot import this repo, TFLite and .keras parity with the checkpoint, and
predict.py on PNG and JPEG files against the checkpoint's own predictions."""
import functools
import json
import os
import subprocess
import sys
import warnings

import imageio.v3 as iio
import keras
import numpy as np
import pytest
import tensorflow as tf

import export
import input_ops
import predict
import runs
from datasets import registry
from test_train_eval import train

NORMS = ("group", "batch")


@pytest.fixture(scope="module")
def sample():
    return input_ops.load("sample", registry.DEFAULT_DATA_DIR)[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{norm type: (run directory, export directory)}, every format exported."""
    runs_and_exports = {}
    for norm_type in NORMS:
        folder = tmp_path_factory.mktemp(norm_type)
        run_dir = train(folder, "--norm_type", norm_type)
        export.main(["--checkpoint", run_dir, "--output", str(folder / "export")])
        runs_and_exports[norm_type] = run_dir, str(folder / "export")
    return runs_and_exports


@functools.lru_cache
def restored_network(run_dir):
    """The run's network restored from its latest checkpoint, with the fast kernels."""
    prefix = tf.train.latest_checkpoint(run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    return runs.restore_model(prefix, config, runs.network_shape(config))


def checkpoint_probabilities(run_dir, images):
    """The softmax of the checkpoint's logits for uint8 `images`."""
    logits = restored_network(run_dir).predict(images.astype(np.float32) / 255, batch_size=250,
                                               verbose=0)
    return tf.nn.softmax(logits).numpy()


FRESH_PROCESS = """
import importlib.util, json, sys
import numpy as np
import tensorflow as tf
assert importlib.util.find_spec("ops") is None and importlib.util.find_spec("export") is None
images = np.load(sys.argv[1])
for saved_model_dir, output in zip(sys.argv[2::2], sys.argv[3::2]):
    saved_model = tf.saved_model.load(saved_model_dir)
    serve = saved_model.signatures["serving_default"]
    outputs = [serve(images=tf.constant(images[i:i + 250])) for i in range(0, len(images), 250)]
    names = saved_model.signatures["class_names"]()["class_names"].numpy()
    np.savez(output, class_names=[name.decode() for name in names],
             probabilities=np.concatenate([o["probabilities"].numpy() for o in outputs]),
             classes=np.concatenate([o["classes"].numpy() for o in outputs]))
"""


def test_saved_model_in_a_fresh_process_without_the_repo(exported, sample, tmp_path):
    """python -I from another directory: the repo is not importable and its C++ ops are never
    loaded; the SavedModels of the GN and the BN run still load and give their checkpoints'
    predictions on every test image."""
    np.save(tmp_path / "images.npy", sample.test_images)
    arguments = []
    for norm_type in NORMS:
        arguments += [os.path.join(exported[norm_type][1], "saved_model"),
                      str(tmp_path / f"{norm_type}.npz")]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS, str(tmp_path / "images.npy"), *arguments],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    for norm_type in NORMS:
        outputs = np.load(tmp_path / f"{norm_type}.npz")
        expected = checkpoint_probabilities(exported[norm_type][0], sample.test_images)
        assert list(outputs["class_names"]) == sample.class_names
        assert outputs["probabilities"].shape == (1000, 10)
        assert outputs["probabilities"].dtype == np.float32
        np.testing.assert_array_equal(outputs["classes"], expected.argmax(-1))
        np.testing.assert_allclose(outputs["probabilities"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_matches_the_checkpoint(norm_type, exported, sample):
    run_dir, export_dir = exported[norm_type]
    interpreter = tf.lite.Interpreter(model_path=os.path.join(export_dir, "model.tflite"))
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [1000, 28, 28, 1])
    interpreter.allocate_tensors()
    outputs = interpreter.get_signature_runner("serving_default")(images=sample.test_images)
    expected = checkpoint_probabilities(run_dir, sample.test_images)
    np.testing.assert_array_equal(outputs["classes"], expected.argmax(-1))
    np.testing.assert_allclose(outputs["probabilities"], expected, rtol=0, atol=1e-4)


def test_litert_reads_the_tflite_file_where_installed(exported, sample):
    """With the ai-edge-litert package, export.py and predict.py read model.tflite with LiteRT's
    interpreter, TensorFlow's recommendation."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    run_dir, export_dir = exported["group"]
    path = os.path.join(export_dir, "model.tflite")
    assert isinstance(export.tflite_interpreter(path), litert.Interpreter)
    np.testing.assert_allclose(export.tflite_probabilities(path)(sample.test_images),
                               checkpoint_probabilities(run_dir, sample.test_images),
                               rtol=0, atol=1e-4)


def test_tensorflows_interpreter_without_litert_and_without_its_warning(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        interpreter = export.tflite_interpreter(
            os.path.join(exported["group"][1], "model.tflite"))
    assert isinstance(interpreter, tf.lite.Interpreter)
    assert not [w for w in caught if "deprecated" in str(w.message)], caught


def test_keras_file_is_the_network(exported, sample):
    run_dir, export_dir = exported["group"]
    network = keras.saving.load_model(os.path.join(export_dir, "model.keras"))
    images = sample.test_images[:100]
    logits = network.predict(images.astype(np.float32) / 255, verbose=0)
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(),
                               checkpoint_probabilities(run_dir, images), rtol=0, atol=1e-6)


def test_export_directory(exported, sample):
    run_dir, export_dir = exported["batch"]
    with open(os.path.join(export_dir, "export.json")) as f:
        info = json.load(f)
    assert info["checkpoint"] == tf.train.latest_checkpoint(run_dir) and info["step"] == 6
    assert info["image_shape"] == [28, 28, 1] and info["class_names"] == sample.class_names
    assert info["num_classes"] == 10 and info["central_fraction"] == 1
    assert info["files"] == {"saved_model": "saved_model", "tflite": "model.tflite",
                             "keras": "model.keras"}
    assert all(0 <= d < 1e-4 for d in info["largest_probability_difference"].values())
    with open(os.path.join(export_dir, "labels.txt")) as f:
        assert f.read().splitlines() == sample.class_names
    saved_model = os.path.join(export_dir, "saved_model", "saved_model.pb")
    with open(saved_model, "rb") as f:
        assert b"GnGroupNorm" not in f.read()


@pytest.mark.parametrize("formats", [["saved_model"], ["tflite"], ["keras"],
                                     ["saved_model", "tflite"], ["saved_model", "keras"],
                                     ["tflite", "keras"]])
def test_each_set_of_formats_writes_those_alone_and_needs_no_dataset(formats, exported, tmp_path,
                                                                     capsys, monkeypatch):
    """--format writes the files asked for alone (a SavedModel written only to convert to TFLite
    is removed), and the run's config.json, not its dataset, tells the image shape and class
    names."""
    run_dir, _ = exported["group"]
    monkeypatch.setattr(input_ops, "load", lambda *args: pytest.fail("the dataset was read"))
    export.main(["--checkpoint", run_dir, "--output", str(tmp_path / "out"), "--format",
                 *formats])
    files = {"saved_model": "saved_model", "tflite": "model.tflite", "keras": "model.keras"}
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["export.json", "labels.txt", *(files[name] for name in formats)])
    with open(tmp_path / "out" / "export.json") as f:
        assert sorted(json.load(f)["files"]) == sorted(formats)
    assert files[formats[0]] in capsys.readouterr().out


# predict.py -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_files(sample, tmp_path_factory):
    """(folder, files, pixels as decoded): 10 test images as gray PNG, 10 as gray JPEG in a
    subfolder."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "jpeg").mkdir()
    files, pixels = [], []
    for i, image in enumerate(sample.test_images[:20]):
        path = folder / (f"{i:02d}.png" if i < 10 else f"jpeg/{i:02d}.jpg")
        iio.imwrite(path, image[..., 0], **({} if i < 10 else {"quality": 95}))
        files.append(str(path))
        decoded = tf.io.decode_image(tf.io.read_file(str(path)), channels=1).numpy()
        pixels.append(decoded)
    return str(folder), files, np.stack(pixels)


@pytest.mark.parametrize("source", ["checkpoint", "saved_model", "tflite"])
def test_predict_matches_the_checkpoint(source, exported, image_files, capsys):
    """The classes predict.py gives for PNG and JPEG files are the checkpoint's for those images
    as TensorFlow's own decoders read them, whichever form of the network reads them; for the
    PNGs (lossless, so both decoders agree) the probabilities too."""
    run_dir, export_dir = exported["group"]
    folder, files, pixels = image_files
    model = {"checkpoint": ["--checkpoint", run_dir], "saved_model": ["--model", export_dir],
             "tflite": ["--model", os.path.join(export_dir, "model.tflite")]}[source]
    predict.main([*model, folder, "--top_k", "3", "--json", "--batch_size", "8"])  # 8, 8, 4
    output = json.loads(capsys.readouterr().out)
    source_named = tf.train.latest_checkpoint(run_dir) if source == "checkpoint" else model[1]
    assert output["model"] == source_named
    assert [p["file"] for p in output["predictions"]] == sorted(files)  # the folder, recursively
    by_file = {p["file"]: p["top_k"] for p in output["predictions"]}
    with open(os.path.join(run_dir, "config.json")) as f:
        class_names = json.load(f)["class_names"]
    for path, probabilities in zip(files, checkpoint_probabilities(run_dir, pixels)):
        top = by_file[path]
        assert top[0]["index"] == probabilities.argmax(), path
        assert top[0]["class"] == class_names[probabilities.argmax()]
        if path.endswith(".png"):
            assert [t["index"] for t in top] == list(np.argsort(-probabilities)[:3])
            np.testing.assert_allclose([t["probability"] for t in top],
                                       np.sort(probabilities)[::-1][:3], rtol=0, atol=1e-4)


def test_predict_converts_and_resizes_once_noted(exported, sample, tmp_path, capsys):
    """An RGB image twice the size, with bars beside it, becomes the gray 28x28 image the network
    takes; stderr says once per kind what was done; the text report lists top-k per file."""
    _, export_dir = exported["group"]
    image = sample.test_images[0]
    large = np.kron(image, np.ones((2, 2, 1), np.uint8))
    bars = np.full((56, 14, 1), 255, np.uint8)
    rgb = np.repeat(np.concatenate([bars, large, bars], axis=1), 3, axis=-1)
    for name in ("a.png", "b.bmp", "c.gif"):
        iio.imwrite(tmp_path / name, rgb)
    iio.imwrite(tmp_path / "d.png", image[..., 0])
    predict.main(["--model", export_dir, str(tmp_path), "--top_k", "2"])
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "note: 3 of 4 images converted to grayscale, as the network takes",
        "note: 3 of 4 images resized to 28x28 (shorter side, then the centre)"]
    lines = captured.out.splitlines()
    assert [line.split()[0] for line in lines] == [str(tmp_path / n) for n in
                                                   ("a.png", "b.bmp", "c.gif", "d.png")]
    assert all(line.count("%") == 2 for line in lines)


def test_image_conversions():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
    rgb, converted = predict.to_channels(gray, 3)
    assert converted and rgb.shape == (3, 4, 3) and (rgb == gray).all()
    back, _ = predict.to_channels(np.concatenate([rgb, np.zeros_like(gray)], -1), 1)  # RGBA
    np.testing.assert_array_equal(back, gray)
    same, resized = predict.to_size(gray, (3, 4))
    assert not resized and same is gray
    wide = np.zeros((10, 30, 1), np.uint8)
    wide[:, 10:20] = 200  # the central square, between black bars
    crop, resized = predict.to_size(wide, (5, 5))
    assert resized and crop.shape == (5, 5, 1)
    assert (crop[:, 1:4] == 200).all() and (crop > 150).all()  # antialiasing blends the edges
    framed = np.zeros((10, 10, 1), np.uint8)
    framed[3:7, 3:7] = 100  # a streamed run: the shorter side becomes 4 / 0.4 = 10 px, 4 kept
    crop, resized = predict.to_size(framed, (4, 4), central_fraction=0.4)
    assert resized and (crop == 100).all()


def test_predict_refuses_an_undecodable_file(exported, tmp_path, capsys):
    _, export_dir = exported["group"]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(SystemExit) as exit_info:
        predict.util.run_cli(lambda: predict.main(["--model", export_dir,
                                                   str(tmp_path / "broken.png")]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'broken.png'} cannot be read as an image (not a PNG, JPEG, BMP or "
        "GIF file, or a damaged one) — pass image files")


def test_predict_refuses_an_export_json_without_what_it_reads(tmp_path, capsys):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "export.json").write_text(json.dumps({"files": {}}))
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(SystemExit):
        predict.util.run_cli(lambda: predict.main(["--model", str(tmp_path / "export"),
                                                   str(tmp_path / "a.png")]))
    assert capsys.readouterr().err.strip() == (
        f"error: --model {tmp_path / 'export'}: its export.json lacks image_shape, num_classes, "
        "class_names, central_fraction — export the run again")
