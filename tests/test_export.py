"""`kee.export.to_tflite`: bundles per quantization mode, their manifest,
int8 ops, atomic writes.

Runs under every backend: with JAX or PyTorch, the session's model is
trained on that backend and converted through the TensorFlow-backend
subprocess, so these tests are the "trained anywhere, converts" tests.
"""

import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit import demo
from keras_earlyexit.export import manifest as manifest_lib

# Under JAX and PyTorch every conversion is a TensorFlow subprocess; the
# float16 and dynamic modes differ from float32 only inside it, so they are
# converted under the TensorFlow backend only (keeps the suite short).
if keras.backend.backend() == "tensorflow":
    MODES = ("float32", "float16", "dynamic", "int8")
else:
    MODES = ("float32", "int8")
# What conversion does with a graph does not depend on the backend that
# trained the model: these run in the TensorFlow pass only.
tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent conversion detail; runs with KERAS_BACKEND=tensorflow",
)


@pytest.fixture(scope="module")
def bundles(trained_digits_model, digits, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bundles")
    return {
        mode: kee.export.to_tflite(
            trained_digits_model,
            str(root / mode),
            representative_data=digits.x_val,
            quantization=mode,
            verbose=0,
        )
        for mode in MODES
    }


@pytest.fixture(scope="module")
def reference(trained_digits_model, digits):
    return trained_digits_model.predict_early(digits.x_test)


def _gated(bundle, x):
    return kee.runtime.GatedInterpreter(bundle).predict(x)


def test_float32_bundle_takes_the_same_exits_and_classes(
    bundles, reference, trained_digits_model, digits
):
    result = _gated(bundles["float32"], digits.x_test)
    thresholds = trained_digits_model.thresholds + [0.0]
    differ = np.flatnonzero(
        (result.exit_indices != reference.exit_indices)
        | (result.classes != reference.classes)
    )
    for i in differ:  # only exact ties (confidence on the threshold) may differ
        k = min(result.exit_indices[i], reference.exit_indices[i])
        assert abs(reference.confidences[i] - thresholds[k]) < 1e-5, i
    assert len(differ) <= 2
    # Both exits are used, so the carry hand-off is exercised.
    assert len(np.unique(result.exit_indices)) >= 2


@pytest.mark.parametrize("mode", [m for m in MODES if m != "float32"])
def test_quantized_bundle_agrees_with_keras(mode, bundles, reference, digits):
    result = _gated(bundles[mode], digits.x_test)
    # Counted in samples (integers: no float rounding at the bar). int8,
    # the coarsest mode, over training seeds 0-19 of the conftest model on
    # each backend (360 test samples): classes that differ from Keras 0-2
    # (mean 0.55 TensorFlow, 0.55 PyTorch, 0.5 JAX); correct answers gained
    # or lost -2 to +1. Bars: 7 and 3 (98% agree, accuracy within 1 point).
    differ = int(np.sum(result.classes != reference.classes))
    right = int(np.sum(result.classes == digits.y_test))
    keras_right = int(np.sum(reference.classes == digits.y_test))
    assert differ <= 7, differ
    assert abs(right - keras_right) <= 3, (right, keras_right)


# Gates other than plain max_prob: criterion and per-exit temperatures.
GATES = {
    "margin": ("margin", None),
    "entropy": ("entropy", None),
    "temperature": ("max_prob", [0.5, 2.0, 1.0]),
}


@pytest.fixture(scope="module")
def gate_bundles(trained_digits_model, digits, tmp_path_factory) -> dict:
    """Per gate: the trained model behind that gate, thresholds calibrated
    on the validation split, and its int8 bundle."""
    root = tmp_path_factory.mktemp("gates")
    out = {}
    for name, (criterion, temperatures) in GATES.items():
        model = kee.EarlyExitModel(
            trained_digits_model.inputs,
            trained_digits_model.outputs,
            criterion=criterion,
            name=f"digits_{name}",
        )
        if temperatures:
            model.set_temperatures(temperatures)
        calibration = kee.calibrate(
            model, digits.x_val, digits.y_val, max_accuracy_drop=0.02
        )
        model.set_thresholds(calibration.thresholds)
        bundle = kee.export.to_tflite(
            model,
            str(root / name),
            representative_data=digits.x_val,
            verbose=0,
            micro=False,
        )
        out[name] = model, bundle
    return out


@tensorflow_only
@pytest.mark.parametrize("name", GATES)
def test_int8_exits_agree_with_keras_for_every_gate(name, gate_bundles, digits):
    """The int8 gate inside each segment takes the exit Keras takes.

    Measured with the conftest recipe trained from seeds 0-9 (TensorFlow,
    thresholds calibrated to a 2-point drop, 360 test samples): exit
    agreement 0.981-0.992 (margin), 0.981-0.992 (entropy), 0.978-0.994
    (temperatures); class agreement 0.994-1.0. Bars: 0.96 and 0.98.
    """
    model, bundle = gate_bundles[name]
    reference = model.predict_early(digits.x_test)
    result = _gated(bundle, digits.x_test)
    assert len(np.unique(reference.exit_indices)) >= 2  # the gates decide
    exits = np.mean(result.exit_indices == reference.exit_indices)
    classes = np.mean(result.classes == reference.classes)
    assert exits >= 0.96, exits
    assert classes >= 0.98, classes


def _concat_model() -> kee.EarlyExitModel:
    """Segment 2's input feeds a max-pool and a concatenation: int8 ops
    whose inputs and output share one scale and zero-point."""
    inputs = keras.Input((8, 8, 1), name="image")
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_1")(
        inputs
    )
    exit_1 = kee.ExitBranch(10, pooled_size=2, name="exit_1")(a)
    pooled = keras.layers.MaxPooling2D(3, strides=1, padding="same", name="pool")(a)
    x = keras.layers.Concatenate(name="concat")([a, pooled])
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_2")(x)
    final = kee.ExitBranch(10, pooled_size=2, name="final")(x)
    return kee.EarlyExitModel(inputs, [exit_1, final], name="concat_cnn")


@pytest.fixture(scope="module")
def concat_bundle(digits, tmp_path_factory):
    # Seed 2: on TensorFlow, segment 2's calibrated input scale differs from
    # the carry's by float rounding, so the tied-tensor patch runs.
    keras.utils.set_random_seed(2)
    model = _concat_model()
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss(label_smoothing=0.0))
    model.fit(digits.x_train, digits.y_train, epochs=15, batch_size=32, verbose=0)
    calibration = kee.calibrate(
        model, digits.x_val, digits.y_val, max_accuracy_drop=0.02
    )
    model.set_thresholds(calibration.thresholds)
    bundle = kee.export.to_tflite(
        model,
        str(tmp_path_factory.mktemp("concat") / "bundle"),
        representative_data=digits.x_val,
        verbose=0,
    )
    return model, bundle


@tensorflow_only
def test_int8_boundary_patch_moves_the_tensors_tied_to_the_carry(concat_bundle):
    """Segment 1's carry scale differs from segment 2's calibrated input by
    float rounding: the patch gives the input and every max-pool and
    concatenation tensor tied to it the carry's parameters, so the kernels
    (which require them equal) still prepare and run."""
    from ai_edge_litert.interpreter import Interpreter

    from keras_earlyexit.export.tflite import _match_boundary

    _, bundle = concat_bundle
    first, second = kee.export.read_manifest(bundle).segments
    with open(os.path.join(bundle, second.file), "rb") as f:
        data = f.read()
    carry = first.output(second.inputs[0].name)
    shifted = dataclasses.replace(carry, scale=carry.scale * (1 + 2e-4))
    patched, inputs, _, unmatched = _match_boundary(
        data, second.inputs, [shifted, first.output("logits")]
    )
    assert unmatched == []
    assert inputs[0].scale == pytest.approx(shifted.scale, rel=1e-7)
    interpreter = Interpreter(model_content=patched)
    interpreter.allocate_tensors()
    params = {d["name"]: d["quantization"] for d in interpreter.get_tensor_details()}
    tied = [
        name
        for op in kee.export.list_ops(patched)
        if op.name in ("MAX_POOL_2D", "CONCATENATION")
        for name in op.input_names + op.output_names
    ]
    assert len(tied) == 5  # pool: in, out; concat: 2 in, out
    for name in tied:
        assert params[name][0] == pytest.approx(shifted.scale, rel=1e-7), name
        assert params[name][1] == shifted.zero_point, name
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], np.int8))
    interpreter.invoke()


@tensorflow_only
def test_int8_bundle_with_a_concatenation_across_an_exit_agrees_with_keras(
    concat_bundle, digits
):
    """Measured over training seeds 0-9 (TensorFlow, 15 epochs, threshold
    calibrated to a 2-point drop, 360 test samples; the tied-tensor patch
    ran for 4 of them): exit agreement 0.986-0.997 and class agreement
    0.986-1.0, identical in LiteRT and TFLite Micro. Bars: 0.97."""
    model, bundle = concat_bundle
    reference = model.predict_early(digits.x_test)
    assert len(np.unique(reference.exit_indices)) == 2
    backends = ["litert"]
    if importlib.util.find_spec("tflite_micro") is not None:
        backends.append("micro")
    for backend in backends:
        result = kee.runtime.GatedInterpreter(bundle, backend=backend).predict(
            digits.x_test
        )
        exits = np.mean(result.exit_indices == reference.exit_indices)
        classes = np.mean(result.classes == reference.classes)
        assert exits >= 0.97, (backend, exits)
        assert classes >= 0.97, (backend, classes)


def test_manifest_describes_each_segment(bundles, trained_digits_model):
    model = trained_digits_model
    macs = kee.count_macs(model, warn=False)
    for mode, bundle in bundles.items():
        manifest = kee.export.read_manifest(bundle)
        raw = json.loads(open(os.path.join(bundle, "manifest.json")).read())
        assert raw["format_version"] == kee.export.FORMAT_VERSION
        assert manifest.quantization == mode
        assert manifest.exit_names == model.exit_names
        assert manifest.thresholds == pytest.approx(model.thresholds)
        segments = model.segments()
        for k, (info, segment) in enumerate(zip(manifest.segments, segments)):
            data = open(os.path.join(bundle, info.file), "rb").read()
            assert info.sha256 == hashlib.sha256(data).hexdigest()
            assert info.macs == macs.segment_macs[k]
            assert [t.name for t in info.inputs] == [t.name for t in segment.inputs]
            carry = set(info.carry_out)
            assert {t.name for t in info.outputs} == carry | {"logits", "confidence"}
            logits = info.output("logits")
            assert logits.shape == [1, model.num_classes]
            assert info.gate.criterion == model.criterion
            assert info.gate.temperature == pytest.approx(model.gates[k].temperature)
            if k + 1 < len(segments):
                # Carry by name: each next input is an output of this segment.
                assert info.carry_out == [t.name for t in segments[k + 1].inputs]
            expected_dtype = "int8" if mode == "int8" else "float32"
            assert {t.dtype for t in info.inputs + info.outputs} == {expected_dtype}


def test_int8_boundaries_and_thresholds_are_quantized(bundles):
    manifest = kee.export.read_manifest(bundles["int8"])
    assert manifest.boundary.startswith("identical")
    for previous, segment in zip(manifest.segments, manifest.segments[1:]):
        for t in segment.inputs:
            source = previous.output(t.name)
            # Byte-for-byte hand-off: identical parameters on both sides.
            assert (t.scale, t.zero_point) == (source.scale, source.zero_point)
    for segment in manifest.segments:
        c = segment.output("confidence")
        q, threshold = segment.gate.threshold_quantized, segment.gate.threshold
        # q is the smallest int8 confidence whose float value reaches it.
        assert (q - c.zero_point) * c.scale >= threshold - 1e-7
        assert (q - 1 - c.zero_point) * c.scale < threshold


def test_int8_bundle_has_int8_builtins_only(bundles):
    manifest = kee.export.read_manifest(bundles["int8"])
    for segment in manifest.segments:
        data = open(os.path.join(bundles["int8"], segment.file), "rb").read()
        ops = kee.export.list_ops(data)
        assert ops and all(op.is_builtin for op in ops)
        names = {op.name for op in ops}
        assert not names & {"DEQUANTIZE", "FLEX", "CUSTOM"}, names
        for op in ops:
            assert "FLOAT32" not in op.input_types + op.output_types, op


def test_int8_bundles_carry_measured_arenas(bundles):
    """Int8 bundles (meant for TFLite Micro by default) record each
    segment's arena; float bundles are not measured."""
    for mode, bundle in bundles.items():
        for segment in kee.export.read_manifest(bundle).segments:
            if mode == "int8":
                assert 0 < segment.arena_head_bytes < segment.arena_bytes
                assert segment.arena_bytes % 16 == 0
            else:
                assert segment.arena_bytes is segment.arena_head_bytes is None


@tensorflow_only
def test_op_without_tflite_micro_kernel_names_segment_and_layer(tmp_path, rng):
    """GELU converts to an int8 TFLite builtin that TFLite Micro lacks: an
    int8 export fails naming the op, the segment and the Keras layer; with
    micro=False (LiteRT only) the same model converts."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    e1 = kee.ExitBranch(10, name="exit_1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="gelu", name="gelu_conv")(
        x
    )
    model = kee.EarlyExitModel(inputs, [e1, kee.ExitBranch(10, name="final")(x)])
    x = rng.random((16, 8, 8, 1), dtype=np.float32)
    with pytest.raises(kee.export.UnsupportedOpError) as error:
        kee.export.to_tflite(
            model, str(tmp_path / "micro"), representative_data=x, verbose=0
        )
    message = str(error.value)
    for part in ("GELU", "Segment 2 (exit 'final')", "'gelu_conv'", "micro=False"):
        assert part in message, message
    assert not os.path.exists(tmp_path / "micro")
    bundle = kee.export.to_tflite(
        model, str(tmp_path / "litert"), representative_data=x, verbose=0, micro=False
    )
    assert kee.export.read_manifest(bundle).segments[1].arena_bytes is None


def test_bad_arguments_are_rejected(trained_digits_model, tmp_path, digits):
    with pytest.raises(ValueError, match="Unknown quantization"):
        kee.export.to_tflite(
            trained_digits_model, str(tmp_path / "b"), quantization="int4"
        )
    with pytest.raises(ValueError, match="representative_data"):
        kee.export.to_tflite(trained_digits_model, str(tmp_path / "b"))
    with pytest.raises(ValueError, match="shape"):
        kee.export.to_tflite(
            trained_digits_model,
            str(tmp_path / "b"),
            representative_data=digits.x_val[:, :4],
        )
    with pytest.raises(ValueError, match="EarlyExitModel"):
        kee.export.to_tflite(
            keras.Sequential([keras.layers.Dense(2)]), str(tmp_path / "b")
        )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="has no manifest.json"):
        kee.export.to_tflite(
            trained_digits_model, str(tmp_path / "notes"), quantization="float32"
        )
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def _snapshot(directory) -> dict:
    return {
        name: hashlib.sha256(
            open(os.path.join(directory, name), "rb").read()
        ).hexdigest()
        for name in sorted(os.listdir(directory))
    }


@tensorflow_only
def test_interrupted_conversion_keeps_the_previous_bundle(
    bundles, trained_digits_model, tmp_path
):
    """Kills a conversion after it wrote its first segment: the bundle it
    was replacing is untouched and still loads, and the next export removes
    what the killed one left."""
    bundle = tmp_path / "bundle"
    os.rename(bundles["float32"], bundle)  # this module's last use of it
    before = _snapshot(bundle)
    model_path = str(tmp_path / "model.keras")
    trained_digits_model.save(model_path)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    command = [
        sys.executable,
        "-m",
        "keras_earlyexit.export",
        model_path,
        str(bundle),
        "--quantization",
        "float32",
        "--verbose",
        "0",
    ]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.glob(".bundle.tmp-*/segment_1.tflite")]
            if partial:
                break
            time.sleep(0.02)
        assert partial, "the conversion never wrote a segment"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _snapshot(bundle) == before
    manifest = kee.export.read_manifest(str(bundle))  # checks every sha256
    assert manifest.quantization == "float32"
    assert len(list(tmp_path.glob(".bundle.tmp-*"))) == 1
    kee.export.to_tflite(
        trained_digits_model, str(bundle), quantization="float32", verbose=0
    )
    assert sorted(os.listdir(tmp_path)) == ["bundle", "model.keras"]
    assert _snapshot(bundle) == before  # the same model converts the same


@tensorflow_only
def test_non_finite_calibration_data_is_refused(trained_digits_model, tmp_path):
    # The converter would silently fall back to float kernels on a NaN range.
    x = np.full((4, 8, 8, 1), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        kee.export.to_tflite(
            trained_digits_model, str(tmp_path / "b"), representative_data=x, verbose=0
        )
    assert os.listdir(tmp_path) == []


def test_quantize_threshold_edges():
    assert manifest_lib.quantize_threshold(0.0, 1 / 256, -128) == -128
    assert manifest_lib.quantize_threshold(1.0, 1 / 256, -128) == 128  # never
    assert manifest_lib.quantize_threshold(0.5, 1 / 256, -128) == 0


@tensorflow_only
def test_conversion_is_quiet_and_labelled_when_verbose(digits, tmp_path, capfd):
    """The converter's MLIR/absl logs and `fully_quantize` lines never reach
    the terminal; verbose=1 prints a label and a progress bar only."""
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4)
    capfd.readouterr()
    kee.export.to_tflite(model, str(tmp_path / "f"), quantization="float32", verbose=0)
    assert capfd.readouterr() == ("", "")
    kee.export.to_tflite(
        model, str(tmp_path / "q"), representative_data=digits.x_val[:16], verbose=1
    )
    out, err = capfd.readouterr()
    assert out.startswith("Converting 'digits_cnn' to 3 int8 TFLite segments in "), out
    assert "3/3" in out and "/segment" in out, out
    assert err == "", err


def test_native_output_shows_only_when_the_block_fails(capfd):
    from keras_earlyexit.export.tflite import native_output_captured

    libc = ctypes.CDLL(None)
    with native_output_captured():
        os.write(2, b"I0000 reader.cc:83] Reading SavedModel\n")
        libc.printf(b"fully_quantize: 0, inference_type: 6\n")  # C stdio, buffered
    assert capfd.readouterr() == ("", "")
    with pytest.raises(RuntimeError, match="conversion failed"):
        with native_output_captured():
            libc.printf(b"error: 'tfl.custom' op is neither a custom op nor flex\n")
            raise RuntimeError("conversion failed")
    assert "neither a custom op nor flex" in capfd.readouterr().err


def test_patience_model_converts_from_any_backend(digits, tmp_path):
    """A criterion="patience" model (trained on this backend, converted
    in the TensorFlow subprocess elsewhere) keeps its patience and floors,
    and its float32 bundle takes predict_early's exits."""
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4, criterion="patience", patience=2)
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss())
    model.fit(digits.x_train, digits.y_train, epochs=4, batch_size=64, verbose=0)
    model.set_thresholds([0.0, 0.1])
    bundle = kee.export.to_tflite(
        model, str(tmp_path / "pabee"), quantization="float32", verbose=0
    )
    manifest = kee.export.read_manifest(bundle)
    assert (manifest.criterion, manifest.patience) == ("patience", 2)
    assert manifest.thresholds == pytest.approx([0.0, 0.1])
    result = _gated(bundle, digits.x_test)
    expected = model.predict_early(digits.x_test)
    assert np.all(np.bincount(result.exit_indices, minlength=3)[1:] > 0)
    # Float32 logits differ in their last bits between TFLite and the
    # backends: a near tie may flip a class and a streak (measured: all 360
    # equal for training seeds 0-19 on TensorFlow, PyTorch and JAX). Bars:
    # 7 of 360 (98% agree).
    assert np.sum(result.exit_indices != expected.exit_indices) <= 7
    assert np.sum(result.classes != expected.classes) <= 7
