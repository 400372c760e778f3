"""`kee.runtime.GatedInterpreter`: loading checks, input checks, the gated
loop's per-sample exits, statistics and backends (real LiteRT and TFLite
Micro interpreters on real bundles)."""

import json
import os
import shutil

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit.runtime import BundleError, GatedInterpreter
from keras_earlyexit.runtime.manifest import TensorInfo


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
    # Over seeds 0-19 (TensorFlow): 0.942-0.981, mean 0.971.
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
    with pytest.raises(ValueError, match="threshold"):
        everyone_first.set_thresholds([0.5])


def test_num_threads_gives_the_same_result(bundle, interpreter, digits):
    two = GatedInterpreter(bundle, num_threads=2).predict(digits.x_test[:50])
    one = interpreter.predict(digits.x_test[:50])
    np.testing.assert_array_equal(two.classes, one.classes)
    np.testing.assert_array_equal(two.exit_indices, one.exit_indices)


def test_micro_backend_runs_the_same_bundle(bundle, interpreter, digits):
    micro = GatedInterpreter(bundle, backend="micro").predict(digits.x_test[:100])
    litert = interpreter.predict(digits.x_test[:100])
    # Counted in samples (integers: no float rounding at the bar). Over
    # training seeds 0-19 of the conftest model (TensorFlow), of these 100
    # samples: classes differ 0-1 (mean 0.05), exits 0 (0-1 of the 360 test
    # samples). Bars: 2 and 5.
    assert np.sum(micro.classes != litert.classes) <= 2
    assert np.sum(micro.exit_indices != litert.exit_indices) <= 5


def test_wrong_input_shape_or_dtype_is_a_clear_error(interpreter, digits):
    with pytest.raises(ValueError, match=r"shape \(8, 8, 1\)"):
        interpreter.predict(digits.x_test[:, :4])
    with pytest.raises(ValueError, match=r"floats.*astype\('float32'\) / 255"):
        interpreter.predict((digits.x_test * 255).astype("uint8"))
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


# Bundles from elsewhere: every mutation below is refused with a BundleError
# naming the field, on both backends, before any interpreter is created.


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> str:
    from _micro_bundle import small_int8_bundle

    return small_int8_bundle(str(tmp_path_factory.mktemp("small")))


def _outside_copy(bundle, name, tmp_path) -> str:
    """A real segment file placed outside the bundle (same bytes and sha256,
    so that only its place is wrong)."""
    outside = tmp_path / "elsewhere.tflite"
    shutil.copy(os.path.join(bundle, name), outside)
    return str(outside)


def _set(path, value):
    def mutate(m, bundle, tmp_path):
        *parents, last = path
        target = m
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


def _delete(path):
    def mutate(m, bundle, tmp_path):
        *parents, last = path
        target = m
        for key in parents:
            target = target[key]
        del target[last]

    return mutate


def _absolute_file(m, bundle, tmp_path):
    m["segments"][0]["file"] = _outside_copy(bundle, "segment_1.tflite", tmp_path)


def _symlink_out(m, bundle, tmp_path):
    outside = _outside_copy(bundle, "segment_2.tflite", tmp_path)
    os.remove(os.path.join(bundle, "segment_2.tflite"))
    os.symlink(outside, os.path.join(bundle, "segment_2.tflite"))


def _manifest_symlink_out(m, bundle, tmp_path):
    outside = tmp_path / "manifest.json"
    outside.write_text(json.dumps(m))
    os.remove(os.path.join(bundle, "manifest.json"))
    os.symlink(outside, os.path.join(bundle, "manifest.json"))


def _replace_segment(data: bytes):
    """Segment 1 replaced by `data`, with a manifest that matches its size
    and sha256 (as an attacker would write it)."""

    def mutate(m, bundle, tmp_path):
        import hashlib

        with open(os.path.join(bundle, "segment_1.tflite"), "wb") as f:
            f.write(data)
        m["segments"][0]["size_bytes"] = len(data)
        m["segments"][0]["sha256"] = hashlib.sha256(data).hexdigest()

    return mutate


def _swap_output_positions(m, bundle, tmp_path):
    outputs = m["segments"][0]["outputs"]
    outputs[0]["position"], outputs[1]["position"] = (
        outputs[1]["position"],
        outputs[0]["position"],
    )


def _rename_carry(m, bundle, tmp_path):
    name = m["segments"][0]["carry_out"][0]
    m["segments"][0]["carry_out"] = ["renamed"]
    for t in m["segments"][0]["outputs"] + m["segments"][1]["inputs"]:
        if t["name"] == name:
            t["name"] = "renamed"


def _bump(path, delta):
    def mutate(m, bundle, tmp_path):
        *parents, last = path
        target = m
        for key in parents:
            target = target[key]
        target[last] += delta

    return mutate


def _patience(value):
    def mutate(m, bundle, tmp_path):
        m["criterion"], m["patience"] = "patience", value

    return mutate


SEG = "segments"
MUTATIONS = {
    "list": (lambda m, bundle, tmp_path: [m], "must hold a JSON object"),
    "format_version_bool": (_set(["format_version"], True), "format_version True"),
    "segments_missing": (_delete([SEG]), r"field segments is missing"),
    "segments_dict": (_set([SEG], {}), r"segments must be a non-empty list"),
    "segments_empty": (_set([SEG], []), r"segments must be a non-empty list"),
    "segment_string": (_set([SEG, 0], "x"), r"segments\[0\] must be a JSON object"),
    "num_classes_string": (_set(["num_classes"], "10"), "num_classes must be an int"),
    "quantization_code": (
        _set(["quantization"], 'int8";\nint evil;'),
        "quantization must be one of",
    ),
    "exit_names_short": (_set(["exit_names"], ["exit_1"]), "exit_names must be"),
    "exit_name_quote": (
        _set([SEG, 0, "exit_name"], 'a"b'),
        r"segments\[0\].exit_name must be a non-empty string without quotes",
    ),
    "model_name_int": (_set(["model_name"], 5), "model_name must be a non-empty"),
    "boundary_missing": (_delete(["boundary"]), "boundary is missing"),
    "inputs_missing": (_delete([SEG, 1, "inputs"]), r"segments\[1\].inputs is missing"),
    "inputs_dict": (_set([SEG, 0, "inputs"], {}), r"inputs must be a non-empty list"),
    "tensor_null": (
        _set([SEG, 0, "inputs", 0], None),
        r"segments\[0\].inputs\[0\] must be a JSON object",
    ),
    "scale_zero": (
        _set([SEG, 0, "inputs", 0, "scale"], 0),
        r"segments\[0\].inputs\[0\].scale must be a finite number > 0.0; found 0",
    ),
    "scale_nan": (_set([SEG, 0, "inputs", 0, "scale"], float("nan")), "scale must"),
    "scale_inf": (_set([SEG, 1, "outputs", 0, "scale"], float("inf")), "scale must"),
    "scale_string": (_set([SEG, 0, "inputs", 0, "scale"], "0.5"), "scale must"),
    "zero_point_range": (
        _set([SEG, 0, "inputs", 0, "zero_point"], 300),
        r"zero_point must be an integer in \[-128, 127\]",
    ),
    "zero_point_null": (
        _set([SEG, 0, "inputs", 0, "zero_point"], None),
        "must both be set",
    ),
    "shape_string": (
        _set([SEG, 0, "inputs", 0, "shape"], [1, 8, "8", 1]),
        r"inputs\[0\].shape must be a list of integers",
    ),
    "shape_empty": (_set([SEG, 0, "inputs", 0, "shape"], []), "shape must be a"),
    "dtype_unknown": (_set([SEG, 0, "inputs", 0, "dtype"], "int4"), "dtype must be"),
    "position_negative": (
        _set([SEG, 0, "inputs", 0, "position"], -1),
        r"position must be an integer >= 0",
    ),
    "positions_repeat": (
        _set([SEG, 0, "outputs", 1, "position"], 0),
        r"segments\[0\].outputs must be a list of tensors with positions",
    ),
    "names_repeat": (
        _set([SEG, 0, "outputs", 0, "name"], "confidence"),
        "distinct names",
    ),
    "no_confidence": (
        _delete([SEG, 2, "outputs", 1]),
        r"segments\[2\].outputs must be a list of tensors that includes "
        "'confidence'",
    ),
    "logits_vs_classes": (_set(["num_classes"], 9), r"num_classes \(9\)"),
    "gate_missing": (_delete([SEG, 0, "gate"]), r"segments\[0\].gate is missing"),
    "gate_list": (_set([SEG, 0, "gate"], []), "gate must be a JSON object"),
    "threshold_above_1": (
        _set([SEG, 0, "gate", "threshold"], 1.5),
        r"gate.threshold must be a finite number >= 0.0 and <= 1.0",
    ),
    "threshold_nan": (_set([SEG, 0, "gate", "threshold"], float("nan")), "threshold"),
    "threshold_quantized_off": (
        _bump([SEG, 0, "gate", "threshold_quantized"], -1),
        r"gate.threshold_quantized must be -?\d+ \(threshold",
    ),
    "temperature_zero": (
        _set([SEG, 1, "gate", "temperature"], 0),
        r"segments\[1\].gate.temperature must be a finite number > 0",
    ),
    "index_wrong": (_set([SEG, 1, "index"], 0), r"segments\[1\].index must be"),
    "size_string": (_set([SEG, 0, "size_bytes"], "3696"), "size_bytes must be an int"),
    "size_off": (_bump([SEG, 0, "size_bytes"], 1), "the manifest lists size_bytes"),
    "sha_not_hex": (_set([SEG, 0, "sha256"], "zz"), "sha256 must be 64 lowercase"),
    "sha_other": (_set([SEG, 1, "sha256"], "0" * 64), "segment_2.tflite is corrupted"),
    "file_absolute": (_absolute_file, r"file must be .* \(an absolute path\)"),
    "file_dotdot": (
        _set([SEG, 0, "file"], "../../../../etc/passwd"),
        r"segments\[0\].file must be .* with '..'",
    ),
    "file_symlink_out": (_symlink_out, "leads outside the bundle"),
    "manifest_symlink_out": (_manifest_symlink_out, "leads outside the bundle"),
    "files_repeat": (_set([SEG, 1, "file"], "segment_1.tflite"), "distinct files"),
    "carry_out_wrong": (
        _set([SEG, 0, "carry_out"], ["logits"]),
        r"segments\[0\].carry_out must list the inputs of segment 2",
    ),
    "carry_out_final": (
        _set([SEG, 2, "carry_out"], ["logits"]),
        r"segments\[2\].carry_out must be empty",
    ),
    "carry_dtype": (
        _set(
            [SEG, 1, "inputs", 0],
            {"name": "conv_1", "position": 0, "shape": [1, 8, 8, 4]}
            | {"dtype": "float32", "scale": None, "zero_point": None},
        ),
        "carry 'conv_1' from segment 1 to segment 2 changes from int8",
    ),
    "arena_negative": (
        _set([SEG, 0, "arena_bytes"], -5),
        r"segments\[0\].arena_bytes must be an integer in \[1, \d+\] or null",
    ),
    "arena_huge": (
        _set([SEG, 1, "arena_bytes"], 2**40),
        r"segments\[1\].arena_bytes must be an integer in \[1, 1073741824\] or null",
    ),
    "arena_head_too_big": (_bump([SEG, 0, "arena_head_bytes"], 10**6), "head_bytes"),
    # Patience (criterion "patience" only) and value ranges (integer inputs).
    "patience_missing": (
        _set(["criterion"], "patience"),
        r"field patience is missing: criterion 'patience' needs an integer in "
        r"\[1, 3\]",
    ),
    "patience_zero": (_patience(0), r"patience must be an integer in \[1, 3\]"),
    "patience_too_large": (_patience(4), r"patience must be an integer in \[1, 3\]"),
    "patience_string": (_patience("2"), r"patience must be an integer in \[1, 3\]"),
    "patience_bool": (_patience(True), r"patience must be an integer in \[1, 3\]"),
    "patience_other_criterion": (
        _set(["patience"], 2),
        "patience must be null for criterion 'max_prob'",
    ),
    "value_range_on_floats": (
        _set([SEG, 0, "inputs", 0, "value_range"], [0, 9]),
        r"inputs\[0\].value_range must be null for a quantized int8 tensor",
    ),
    # Well-formed manifests that do not describe the .tflite files.
    "scale_differs": (
        _set([SEG, 0, "inputs", 0, "scale"], 0.5),
        r"Segment 1 \(segment_1.tflite\) input 'image': the manifest gives scale "
        r"0.5, the .tflite file 0.00392",
    ),
    "zero_point_differs": (
        _bump([SEG, 1, "outputs", 0, "zero_point"], 1),
        r"Segment 2 \(segment_2.tflite\) output '\w+': the manifest gives "
        "zero_point",
    ),
    "positions_swapped": (_swap_output_positions, "the manifest gives position"),
    "carry_renamed": (_rename_carry, r"lists outputs \['confidence', 'logits', 're"),
    "not_tflite": (_replace_segment(b"#!/bin/sh\necho hi\n"), "not a TFLite model"),
    "garbage_tflite": (
        _replace_segment(b"\xff\xff\xff\x7fTFL3" + bytes(range(256)) * 4),
        "not a readable TFLite model",
    ),
}


@pytest.mark.parametrize("backend", ["litert", "micro"])
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_malformed_or_foreign_bundles_are_refused(
    mutation, backend, small_bundle, tmp_path
):
    if backend == "micro":
        pytest.importorskip("tflite_micro")
    bundle = str(tmp_path / "bundle")
    shutil.copytree(small_bundle, bundle)
    path = os.path.join(bundle, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    mutate, message = MUTATIONS[mutation]
    replaced = mutate(manifest, bundle, tmp_path)
    if not os.path.islink(path):
        with open(path, "w") as f:
            json.dump(manifest if replaced is None else replaced, f)
    with pytest.raises(BundleError, match=message) as error:
        GatedInterpreter(bundle, backend=backend)
    # No file outside the bundle is described by its digest.
    if os.path.exists(tmp_path / "elsewhere.tflite"):
        data = (tmp_path / "elsewhere.tflite").read_bytes()
        import hashlib

        assert hashlib.sha256(data).hexdigest()[:12] not in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
    ],
)
def test_unreadable_manifest_is_refused(content, message, small_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    (bundle / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=message):
        GatedInterpreter(str(bundle))


def test_unknown_manifest_fields_are_ignored(small_bundle, tmp_path):
    """Later additions to format version 1 stay readable."""
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["added_later"] = {"x": 1}
    manifest["segments"][0]["gate"]["added_later"] = [1]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    x = np.zeros((3, 8, 8, 1), np.float32)
    np.testing.assert_array_equal(
        GatedInterpreter(str(bundle)).predict(x).classes,
        GatedInterpreter(small_bundle).predict(x).classes,
    )


# TFLite Micro arenas: too small is a clear error, never a crash.


@pytest.mark.parametrize("arena_size", [0, -1, 1.5, True, "4096"])
def test_arena_size_must_be_a_positive_int(arena_size, small_bundle):
    with pytest.raises(ValueError, match="arena_size must be a positive int"):
        GatedInterpreter(small_bundle, backend="micro", arena_size=arena_size)
    with pytest.raises(ValueError, match="applies to backend='micro' only"):
        GatedInterpreter(small_bundle, arena_size=4096)


def test_too_small_arena_says_what_the_segment_needs(small_bundle, tmp_path):
    pytest.importorskip("tflite_micro")
    segments = kee.runtime.read_manifest(small_bundle).segments
    largest = max(s.arena_bytes for s in segments)
    # Checked up front against the arena measured at export.
    with pytest.raises(
        ValueError,
        match=rf"Segment 1 \(exit 'exit_1'\) needs a TFLite Micro arena of "
        rf"{segments[0].arena_bytes} bytes.*arena_size=2000 is too small. Pass "
        rf"arena_size >= {largest + 1024}",
    ):
        GatedInterpreter(small_bundle, backend="micro", arena_size=2000)
    # Without measurements (older bundles), the arena is tried in a child
    # process, where TFLite Micro crashes on 2000 bytes.
    bundle = tmp_path / "unmeasured"
    shutil.copytree(small_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for segment in manifest["segments"]:
        segment["arena_bytes"] = segment["arena_head_bytes"] = None
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=r"Segment 1 .* needs a TFLite Micro arena of \d+ bytes; "
    ) as error:
        GatedInterpreter(str(bundle), backend="micro", arena_size=2000)
    needs = int(str(error.value).split("arena of ")[1].split()[0])
    assert segments[0].arena_bytes <= needs <= segments[0].arena_bytes + 64
    micro = GatedInterpreter(str(bundle), backend="micro", arena_size=largest + 64)
    assert micro.predict(np.zeros((2, 8, 8, 1), np.float32)).classes.shape == (2,)


def test_wrong_measured_arena_in_the_manifest_is_refused(small_bundle, tmp_path):
    pytest.importorskip("tflite_micro")
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["segments"][0]["arena_bytes"] = 1500
    manifest["segments"][0]["arena_head_bytes"] = 100
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        BundleError,
        match=r"Segment 1 \(exit 'exit_1'\) needs a TFLite Micro arena of \d+ "
        r"bytes, but the manifest's arena_bytes is 1500",
    ):
        GatedInterpreter(str(bundle), backend="micro")


# Inputs: one rule with EarlyExitModel.predict_early.


def test_non_finite_inputs_are_refused(interpreter, digits):
    x = digits.x_test[:20].copy()
    x[3, 0, 0, 0] = np.nan
    x[7, 4, 4, 0] = np.inf
    x[7, 5, 5, 0] = -np.inf
    with pytest.raises(
        ValueError,
        match=r"Input 'image' holds NaN or infinite values in 2 of 20 samples "
        r"\(first: sample 3\)",
    ):
        interpreter.predict(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        interpreter.predict_one(x[3])


@pytest.fixture(scope="module")
def token_model():
    """A two-exit model on integer token ids (Embedding), float32 bundle."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(20, 8)(tokens)
    e1 = kee.ExitBranch(3, name="exit_1")(x)
    x = keras.layers.Conv1D(8, 3, padding="same", activation="relu")(x)
    e2 = kee.ExitBranch(3, name="final")(x)
    model = kee.EarlyExitModel(tokens, [e1, e2])
    model.set_thresholds([0.34])
    return model


def test_integer_ids_pass_unquantized_to_integer_inputs(token_model, tmp_path):
    bundle = kee.export.to_tflite(
        token_model, str(tmp_path / "tokens"), quantization="float32", verbose=0
    )
    interpreter = GatedInterpreter(bundle)
    ids = np.random.default_rng(0).integers(0, 20, (40, 6))
    for dtype in ("int64", "int32", "uint8"):
        result = interpreter.predict(ids.astype(dtype))
        expected = token_model.predict_early(ids.astype("int32"), batch_size=40)
        np.testing.assert_array_equal(result.classes, expected.classes)
        np.testing.assert_array_equal(result.exit_indices, expected.exit_indices)
    assert len(set(result.exit_indices.tolist())) == 2  # both exits taken
    with pytest.raises(ValueError, match=r"'tokens' takes integer ids \(int32\)"):
        interpreter.predict(ids.astype("float32"))
    # The embedding has 20 rows: the manifest's value_range is [0, 19].
    assert interpreter.manifest.segments[0].inputs[0].value_range == [0, 19]
    for bad in (2**40, 20, -1):
        outside = ids.copy()
        outside[5, 2] = bad
        with pytest.raises(
            ValueError,
            match=rf"'tokens' holds 1 value\(s\) outside \[0, 19\], the ids its "
            rf"embedding table has rows for .*first: {bad} in sample 5",
        ):
            interpreter.predict(outside)
    with pytest.raises(ValueError, match="takes integer ids"):
        interpreter.predict(ids > 5)  # bool


@pytest.mark.parametrize(
    "thresholds",
    [[0.5], [0.5, 0.5, 0.5], [float("nan"), 0.5], [1.5, 0.5]]
    + [[-0.1, 0.5], ["high", 0.5], 0.5, None],
)
def test_bad_thresholds_are_refused(thresholds, interpreter):
    with pytest.raises(ValueError, match=r"Expected 2 threshold\(s\) in \[0, 1\]"):
        interpreter.set_thresholds(thresholds)


@pytest.fixture(scope="module")
def saturated_float32_bundle(tmp_path_factory) -> str:
    """Untrained width-4 digits CNN whose non-final gates have temperature
    0.001: their float32 softmax saturates to exactly 1.0."""
    from keras_earlyexit import demo

    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4)
    model.set_temperatures([0.001, 0.001, 1.0])
    return kee.export.to_tflite(
        model,
        str(tmp_path_factory.mktemp("runtime") / "float32"),
        quantization="float32",
        verbose=0,
    )


def test_threshold_one_means_no_sample_leaves_a_float_bundle(
    saturated_float32_bundle, digits
):
    interpreter = GatedInterpreter(saturated_float32_bundle, thresholds=[0.0, 0.0])
    first = interpreter.predict(digits.x_test)
    assert np.mean(first.confidences == 1.0) > 0.5  # saturated
    interpreter.set_thresholds([0.999, 0.999])
    assert np.mean(interpreter.predict(digits.x_test).exit_indices == 0) > 0.5
    interpreter.set_thresholds([1.0, 1.0])
    interpreter.reset_stats()
    result = interpreter.predict(digits.x_test)
    assert np.all(result.exit_indices == 2)
    assert interpreter.stats.exit_counts == [0, 0, len(digits.x_test)]


def test_stats_count_no_warm_up(small_bundle):
    """Each segment's first invoke (allocation, weight packing) happens at
    load and stays out of `stats`."""
    for backend in ("litert", "micro"):
        interpreter = GatedInterpreter(
            small_bundle, backend=backend, thresholds=[0.0, 0.0]
        )
        assert len(interpreter.warmup_seconds) == 3
        assert all(s > 0 for s in interpreter.warmup_seconds)
        assert interpreter.stats.segment_invocations == [0, 0, 0]
        interpreter.predict(np.zeros((1, 8, 8, 1), np.float32))
        assert interpreter.stats.segment_invocations == [1, 0, 0]
        assert interpreter.stats.exit_counts == [1, 0, 0]
        interpreter.reset_stats()
        assert interpreter.stats.samples == 0
        assert interpreter.stats.segment_seconds == [0.0, 0.0, 0.0]
