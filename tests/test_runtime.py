"""`kee.runtime.GatedInterpreter`: loading checks, input checks, the gated
loop's per-sample exits, statistics and backends (real LiteRT and TFLite
Micro interpreters on a real int8 bundle)."""

import json
import os
import shutil

import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit.export import BundleError
from keras_earlyexit.export.manifest import TensorInfo
from keras_earlyexit.runtime import GatedInterpreter


@pytest.fixture(scope="module")
def bundle(trained_digits_model, digits, tmp_path_factory) -> str:
    return kee.export.to_tflite(
        trained_digits_model,
        str(tmp_path_factory.mktemp("runtime") / "int8"),
        representative_data=digits.x_val,
        quantization="int8",
        verbose=0,
    )


@pytest.fixture(scope="module")
def interpreter(bundle) -> GatedInterpreter:
    return GatedInterpreter(bundle)


@pytest.fixture
def copy(bundle, tmp_path) -> str:
    target = str(tmp_path / "copy")
    shutil.copytree(bundle, target)
    return target


def test_predict_returns_per_sample_exits(interpreter, digits):
    interpreter.reset_stats()
    result = interpreter.predict(digits.x_test)
    n = len(digits.x_test)
    for array in result:
        assert array.shape == (n,)
    assert np.mean(result.classes == digits.y_test) > 0.9
    thresholds = interpreter.thresholds + [0.0]
    taken = np.array(thresholds)[result.exit_indices]
    # Dequantized int8 confidence: within one step of the threshold at most.
    assert np.all(result.confidences >= taken - 1 / 128)
    stats = interpreter.stats
    counts = np.bincount(result.exit_indices, minlength=interpreter.num_exits)
    assert stats.exit_counts == counts.tolist()
    # Segment k runs for exactly the samples that reach exit k.
    reached = [int(np.sum(result.exit_indices >= k)) for k in range(len(counts))]
    assert stats.segment_invocations == reached
    assert all(t > 0 for t, c in zip(stats.segment_seconds, reached) if c)
    assert "mean latency" in str(stats)


def test_predict_one_matches_predict(interpreter, digits):
    batch = interpreter.predict(digits.x_test[:5])
    for i in range(5):
        label, exit_index, confidence = interpreter.predict_one(digits.x_test[i])
        assert (label, exit_index) == (batch.classes[i], batch.exit_indices[i])
        assert confidence == pytest.approx(batch.confidences[i])


def test_thresholds_route_samples(bundle, digits):
    everyone_first = GatedInterpreter(bundle, thresholds=[0.0, 0.0])
    assert np.all(everyone_first.predict(digits.x_test[:20]).exit_indices == 0)
    with pytest.raises(ValueError, match="thresholds"):
        everyone_first.set_thresholds([0.5])


def test_num_threads_gives_the_same_result(bundle, interpreter, digits):
    two = GatedInterpreter(bundle, num_threads=2).predict(digits.x_test[:50])
    one = interpreter.predict(digits.x_test[:50])
    np.testing.assert_array_equal(two.classes, one.classes)
    np.testing.assert_array_equal(two.exit_indices, one.exit_indices)


def test_micro_backend_runs_the_same_bundle(bundle, interpreter, digits):
    micro = GatedInterpreter(bundle, backend="micro").predict(digits.x_test[:100])
    litert = interpreter.predict(digits.x_test[:100])
    assert np.mean(micro.classes == litert.classes) >= 0.98
    assert np.mean(micro.exit_indices == litert.exit_indices) >= 0.95


def test_wrong_input_shape_or_dtype_is_a_clear_error(interpreter, digits):
    with pytest.raises(ValueError, match=r"shape \(8, 8, 1\)"):
        interpreter.predict(digits.x_test[:, :4])
    with pytest.raises(ValueError, match="floats"):
        interpreter.predict((digits.x_test * 16).astype("int64"))
    with pytest.raises(ValueError, match="1 input"):
        interpreter.predict([digits.x_test, digits.x_test])
    with pytest.raises(ValueError, match="one sample"):
        interpreter.predict_one(digits.x_test[:2])


def test_corrupted_segment_file_is_refused(copy):
    path = os.path.join(copy, "segment_2.tflite")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(BundleError, match="segment_2.tflite is corrupted"):
        GatedInterpreter(copy)


def test_wrong_format_version_is_refused(copy):
    path = os.path.join(copy, "manifest.json")
    manifest = json.load(open(path))
    manifest["format_version"] = 99
    json.dump(manifest, open(path, "w"))
    with pytest.raises(BundleError, match="format_version 99"):
        GatedInterpreter(copy)


def test_missing_bundle_and_bad_backend(copy, tmp_path):
    with pytest.raises(BundleError, match="manifest.json not found"):
        GatedInterpreter(str(tmp_path))
    os.remove(os.path.join(copy, "segment_3.tflite"))
    with pytest.raises(BundleError, match="missing"):
        GatedInterpreter(copy)
    with pytest.raises(ValueError, match="Unknown backend"):
        GatedInterpreter(copy, backend="gpu")


def test_quantize_and_requantize():
    x = np.array([-1.0, -0.25, 0.0, 0.25, 0.5, 10.0], np.float32)
    q = kee.runtime.quantize(x, 0.5, 0)
    # Round half away from zero, as TFLite's QUANTIZE; clipped to int8.
    np.testing.assert_array_equal(q, [-2, -1, 0, 1, 1, 20])
    source = TensorInfo("c", 0, [1, 6], "int8", scale=0.5, zero_point=0)
    target = TensorInfo("c", 0, [1, 6], "int8", scale=0.25, zero_point=-10)
    np.testing.assert_array_equal(
        kee.runtime.requantize(q, source, target), [-14, -12, -10, -8, -8, 30]
    )
