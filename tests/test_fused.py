"""The fused gated `.tflite`: `to_tflite(..., fused=True)`, its runtime
(`FusedInterpreter`, LiteRT and TFLite Micro) sample by sample against the
segment bundle of the same model, `set_thresholds` on fused files and
bundles, and the errors for bad thresholds and damaged files."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import keras_earlyexit as kee
from keras_earlyexit import demo
from keras_earlyexit.export import flatbuffer
from keras_earlyexit.export.fused import fuse, model_sha256
from keras_earlyexit.export.micro import TFLM_BUILTINS, resolver_method
from keras_earlyexit.export.thresholds import set_thresholds
from keras_earlyexit.runtime import GatedInterpreter
from keras_earlyexit.runtime.fused import (
    FLOAT_NEVER,
    METADATA_NAME,
    FusedInterpreter,
    FusedModelError,
    _read_constant,
    buffer_span,
    read_fused_manifest,
    with_thresholds,
)
from keras_earlyexit.runtime.manifest import (
    MANIFEST_NAME,
    BundleError,
    quantize_threshold,
    read_manifest,
    read_segment,
)

MODES = ("int8", "float32")


@pytest.fixture(scope="module")
def model(digits) -> kee.EarlyExitModel:
    """A tiny 3-exit digits CNN, trained briefly (its exits need only
    differ; equality with the bundle is what is tested)."""
    keras.utils.set_random_seed(0)
    return _trained(demo.digits_cnn(width=4), digits, epochs=4)


def _trained(model, digits, epochs: int) -> kee.EarlyExitModel:
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss())
    model.fit(digits.x_train, digits.y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def exported(model, digits, tmp_path_factory) -> dict:
    """Per mode: the bundle and the fused file of the same model."""
    root = tmp_path_factory.mktemp("fused")
    out = {}
    for mode in MODES:
        common = dict(representative_data=digits.x_val, quantization=mode, verbose=0)
        bundle = kee.export.to_tflite(model, str(root / mode), **common)
        path = str(root / f"{mode}.tflite")
        if mode == "int8":  # end to end, converting again
            kee.export.to_tflite(model, path, fused=True, **common)
        else:  # what to_tflite(fused=True) does after converting the bundle
            _fuse_bundle(bundle, path, model_sha256(model))
        out[mode] = (bundle, path)
    return out


def _fuse_bundle(bundle: str, path: str, source_sha256: str = "", **kwargs) -> str:
    manifest = read_manifest(bundle)
    segments = [read_segment(bundle, s) for s in manifest.segments]
    with open(path, "wb") as f:
        f.write(fuse(manifest, segments, source_sha256, **kwargs))
    return path


def _spread_thresholds(bundle, x) -> list[float]:
    """Thresholds that send samples to every exit: each is the median of
    the confidences that reach its exit (so some samples tie with it)."""
    thresholds = [1.0, 1.0]
    for k in range(2):
        reach = [1.0] * k + [0.0] * (2 - k)
        result = GatedInterpreter(bundle, thresholds=reach).predict(x)
        thresholds[k] = float(np.sort(result.confidences)[len(x) // 2])
    return thresholds


def _assert_same(fused, bundle):
    np.testing.assert_array_equal(fused.classes, bundle.classes)
    np.testing.assert_array_equal(fused.exit_indices, bundle.exit_indices)
    np.testing.assert_array_equal(fused.confidences, bundle.confidences)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["litert", "micro"])
def test_fused_equals_bundle_sample_by_sample(exported, digits, mode, backend):
    bundle, path = exported[mode]
    x = digits.x_test
    spread = _spread_thresholds(bundle, x)
    for thresholds in ([0.0, 0.0], [1.0, 1.0], [1.0, 0.0], spread):
        expected = GatedInterpreter(bundle, backend, thresholds=thresholds).predict(x)
        fused = FusedInterpreter(path, backend, thresholds=thresholds)
        _assert_same(fused.predict(x), expected)
        assert (
            fused.stats.exit_counts
            == np.bincount(expected.exit_indices, minlength=3).tolist()
        )
    # The spread thresholds reach every exit, so every branch was compared.
    assert np.all(np.bincount(expected.exit_indices, minlength=3) > 0)
    assert (
        FusedInterpreter(path, backend).thresholds == read_manifest(bundle).thresholds
    )


def test_one_file_int8_inside_with_named_outputs(exported, model):
    _, path = exported["int8"]
    with open(path, "rb") as f:
        data = f.read()
    manifest = read_fused_manifest(data)
    assert manifest.quantization == "int8"
    assert manifest.exit_names == list(model.exit_names)
    assert manifest.outputs == ["class", "exit_index", "confidence"]
    assert manifest.source_sha256 == model_sha256(model)
    macs = kee.count_macs(model, warn=False)
    assert [e.cumulative_macs for e in manifest.exits] == macs.cumulative_macs
    assert manifest.arena_bytes > manifest.arena_head_bytes > 0
    ops = flatbuffer.list_ops(data)
    names = {op.name for op in ops}
    assert {"IF", "CAST", "GREATER_EQUAL", "ARG_MAX", "DEQUANTIZE"} <= names
    assert all(resolver_method(n) in TFLM_BUILTINS for n in names)
    # Integer inside: floats appear only as DEQUANTIZE outputs and IF
    # results (the float32 confidence).
    for op in ops:
        if op.name not in ("DEQUANTIZE", "IF"):
            assert "FLOAT32" not in op.input_types + op.output_types, op
    runner = Interpreter(model_content=data).get_signature_runner()
    details = runner.get_output_details()
    assert {n: np.dtype(d["dtype"]).name for n, d in details.items()} == {
        "class": "int32",
        "exit_index": "int32",
        "confidence": "float32",
    }
    # Internal tensors are unnamed (flash); inputs and outputs carry their
    # signature names.
    assert {d["name"] for d in details.values()} == set(details)


def test_arena_plan_shares_carries_with_branches(exported):
    """The offline plan puts each IF input where its branches read it, so
    TFLite Micro needs no more activation memory than the largest segment
    alone (plus the exits' few result bytes)."""
    bundle, path = exported["int8"]
    with open(path, "rb") as f:
        data = f.read()
    model = flatbuffer._schema().ModelT.InitFromPackedBuf(data, 0)
    entry = next(m for m in model.metadata if m.name == b"OfflineMemoryAllocation")
    plan = np.frombuffer(model.buffers[entry.buffer].data.tobytes(), "<i4")
    starts = np.cumsum([0] + [len(g.tensors) for g in model.subgraphs])
    assert plan[2] == starts[-1] == len(plan) - 3
    offset = {
        (s, t): plan[3 + starts[s] + t]
        for s in range(len(starts) - 1)
        for t in range(starts[s + 1] - starts[s])
    }
    for s, graph in enumerate(model.subgraphs):
        for op in graph.operators:
            if op.builtinOptionsType == flatbuffer._schema().BuiltinOptions.IfOptions:
                options = op.builtinOptions
                for branch in (options.thenSubgraphIndex, options.elseSubgraphIndex):
                    for i, j in zip(op.inputs[1:], model.subgraphs[branch].inputs):
                        assert offset[s, i] == offset[branch, j] >= 0
    manifest = read_fused_manifest(data)
    heads = [s.arena_head_bytes for s in read_manifest(bundle).segments]
    assert max(heads) <= manifest.arena_head_bytes <= max(heads) + 256


def test_float_threshold_one_never_lets_samples_leave(exported):
    _, path = exported["float32"]
    with open(path, "rb") as f:
        data = f.read()
    manifest = read_fused_manifest(data)
    patched = with_thresholds(data, manifest, [1.0, 0.25])
    values = [_read_constant(patched, e) for e in manifest.exits[:-1]]
    assert values == [FLOAT_NEVER, 0.25]


def test_logits_output_is_the_taken_exits_logits(exported, digits, tmp_path):
    bundle, _ = exported["int8"]
    manifest = read_manifest(bundle)
    segments = [read_segment(bundle, s) for s in manifest.segments]
    path = _fuse_bundle(bundle, str(tmp_path / "logits.tflite"), logits=True)
    fused = FusedInterpreter(path, thresholds=[0.0, 0.0])
    runner = Interpreter(model_content=segments[0]).get_signature_runner()
    head = fused._model.interpreter.get_signature_runner()
    image = manifest.segments[0].inputs[0]
    logits_info = manifest.segments[0].output("logits")
    for sample in digits.x_test[:5]:
        q = kee.runtime.quantize(sample[None], image.scale, image.zero_point)
        got = head(image=q)
        expected = kee.runtime.dequantize(
            runner(image=q)["logits"], logits_info.scale, logits_info.zero_point
        )
        np.testing.assert_array_equal(got["logits"], expected)
        assert got["class"][0] == np.argmax(expected)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="float16 differs from float32 only inside the TensorFlow converter",
)
def test_float16_fused_equals_bundle(model, digits, tmp_path):
    bundle = kee.export.to_tflite(
        model, str(tmp_path / "f16"), quantization="float16", verbose=0
    )
    path = _fuse_bundle(bundle, str(tmp_path / "f16.tflite"))
    thresholds = _spread_thresholds(bundle, digits.x_test)
    _assert_same(
        FusedInterpreter(path, thresholds=thresholds).predict(digits.x_test),
        GatedInterpreter(bundle, thresholds=thresholds).predict(digits.x_test),
    )


@pytest.mark.parametrize("mode", MODES)
def test_set_thresholds_round_trip_on_fused_file(exported, digits, tmp_path, mode):
    bundle, path = exported[mode]
    copy = str(tmp_path / "copy.tflite")
    shutil.copy(path, copy)
    thresholds = _spread_thresholds(bundle, digits.x_test)
    assert set_thresholds(copy, thresholds) == thresholds
    with open(copy, "rb") as f:
        manifest = read_fused_manifest(f.read())  # hash updated
    assert manifest.thresholds == thresholds
    for exit, t in zip(manifest.exits, thresholds):
        if mode == "int8":
            expected = quantize_threshold(
                t, exit.confidence_scale, exit.confidence_zero_point
            )
            assert exit.gate.threshold_quantized == expected
    reloaded = FusedInterpreter(copy)
    assert reloaded.thresholds == thresholds
    _assert_same(
        reloaded.predict(digits.x_test),
        GatedInterpreter(bundle, thresholds=thresholds).predict(digits.x_test),
    )


def test_set_thresholds_round_trip_on_bundle(exported, digits, tmp_path):
    bundle, _ = exported["int8"]
    copy = str(tmp_path / "bundle")
    shutil.copytree(bundle, copy)
    set_thresholds(copy, [0.25, 1.0])
    manifest = read_manifest(copy)
    assert manifest.thresholds == [0.25, 1.0]
    assert manifest.segments[1].gate.threshold_quantized == 128
    confidence = manifest.segments[0].output("confidence")
    assert manifest.segments[0].gate.threshold_quantized == quantize_threshold(
        0.25, confidence.scale, confidence.zero_point
    )
    assert GatedInterpreter(copy).thresholds == [0.25, 1.0]
    assert os.listdir(copy) == os.listdir(bundle)  # no temporary file left


BAD_THRESHOLDS = [
    ([0.5], "Expected 2 thresholds"),
    ([0.5, 0.5, 0.5], "Expected 2 thresholds"),
    ([float("nan"), 0.5], "NaN"),
    ([0.5, -0.1], "outside \\[0, 1\\]"),
    ([1.5, 0.5], "outside \\[0, 1\\]"),
    (["high", 0.5], "numbers in \\[0, 1\\]"),
]


@pytest.mark.parametrize("thresholds, message", BAD_THRESHOLDS)
def test_bad_thresholds_change_nothing(exported, tmp_path, thresholds, message):
    bundle, path = exported["int8"]
    copy = str(tmp_path / "bundle")
    shutil.copytree(bundle, copy)
    for target, watched in ((path, path), (copy, os.path.join(copy, MANIFEST_NAME))):
        with open(watched, "rb") as f:
            before = f.read()
        with pytest.raises(ValueError, match=message):
            set_thresholds(target, thresholds)
        with open(watched, "rb") as f:
            assert f.read() == before
    with pytest.raises(ValueError, match=message):
        FusedInterpreter(path, thresholds=thresholds)


def _damaged_copies(path, tmp_path) -> dict:
    """Fused files damaged in different ways, with the error expected."""
    with open(path, "rb") as f:
        data = f.read()
    start = data.index(b'{"quantization"')
    model = flatbuffer._schema().ModelT.InitFromPackedBuf(data, 0)
    sizes = [0 if b.data is None else len(b.data) for b in model.buffers]
    largest = buffer_span(data, int(np.argmax(sizes)))  # the biggest weights
    weight = largest[0] + largest[1] // 2
    cases = {
        "weight": (
            data[:weight] + bytes([data[weight] ^ 1]) + data[weight + 1 :],
            "modified after export",
        ),
        "manifest": (
            data.replace(b'"exit_1"', b'"exit_X"', 1),
            "modified after export",
        ),
        "json": (data[:start] + b"}" + data[start + 1 :], "not valid JSON"),
        "name": (
            data.replace(METADATA_NAME.encode(), b"keras_earlyexiX", 1),
            f"no '{METADATA_NAME}' metadata",
        ),
        "version": (
            data.replace(b'"format_version":1', b'"format_version":9', 1),
            "format_version 9",
        ),
    }
    out = {}
    for name, (damaged, message) in cases.items():
        assert damaged != data and len(damaged) == len(data), name
        out[name] = (str(tmp_path / f"{name}.tflite"), message)
        with open(out[name][0], "wb") as f:
            f.write(damaged)
    return out


def test_missing_or_tampered_metadata_is_refused(exported, tmp_path):
    _, path = exported["int8"]
    for name, (damaged, message) in _damaged_copies(path, tmp_path).items():
        with open(damaged, "rb") as f:
            before = f.read()
        for call in (FusedInterpreter, lambda p: set_thresholds(p, [0.5, 0.5])):
            with pytest.raises(FusedModelError, match=message):
                call(damaged)
        with open(damaged, "rb") as f:
            assert f.read() == before, name
    bundle, _ = exported["int8"]
    plain = os.path.join(bundle, "segment_1.tflite")  # a model without manifest
    with pytest.raises(FusedModelError, match="not a fused model"):
        FusedInterpreter(plain)
    with pytest.raises(BundleError, match="does not exist"):
        set_thresholds(str(tmp_path / "missing.tflite"), [0.5, 0.5])


def test_export_path_rules(model, digits, tmp_path):
    with pytest.raises(ValueError, match="fused=True"):
        kee.export.to_tflite(model, str(tmp_path / "m.tflite"), verbose=0)
    with pytest.raises(ValueError, match="ending in '.tflite'"):
        kee.export.to_tflite(model, str(tmp_path / "m"), fused=True, verbose=0)
    user_file = tmp_path / "user.tflite"
    user_file.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not a fused model"):
        kee.export.to_tflite(
            model, str(user_file), representative_data=digits.x_val, fused=True
        )
    assert user_file.read_bytes() == b"not ours"
    assert sorted(os.listdir(tmp_path)) == ["user.tflite"]


def test_op_without_tflite_micro_kernel_fails_the_fused_export(tmp_path, rng):
    """The segments' op check runs for fused files too: GELU (no TFLite
    Micro kernel) fails the int8 export naming op and layer, and no file is
    written."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    e1 = kee.ExitBranch(10, name="exit_1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="gelu", name="gelu_conv")(
        x
    )
    model = kee.EarlyExitModel(inputs, [e1, kee.ExitBranch(10, name="final")(x)])
    x = rng.random((16, 8, 8, 1), dtype=np.float32)
    path = tmp_path / "gelu.tflite"
    with pytest.raises(kee.export.UnsupportedOpError, match="GELU.*'gelu_conv'"):
        kee.export.to_tflite(
            model, str(path), representative_data=x, fused=True, verbose=0
        )
    assert os.listdir(tmp_path) == []


def test_runtime_argument_and_input_errors(exported, digits):
    bundle, path = exported["int8"]
    with pytest.raises(ValueError, match="Unknown backend"):
        FusedInterpreter(path, backend="gpu")
    with pytest.raises(FusedModelError, match="is not a file"):
        FusedInterpreter(bundle)
    interpreter = FusedInterpreter(path)
    with pytest.raises(ValueError, match="expects a batch of samples of shape"):
        interpreter.predict(digits.x_test[:, :4])
    with pytest.raises(ValueError, match="takes floats on the scale"):
        interpreter.predict(digits.x_test.astype(np.int32))
    label, exit_index, confidence = interpreter.predict_one(digits.x_test[0])
    batch = interpreter.predict(digits.x_test[:1])
    assert (label, exit_index, confidence) == (
        batch.classes[0],
        batch.exit_indices[0],
        batch.confidences[0],
    )
    assert "mean latency" in str(interpreter.stats)


def test_runtime_runs_without_keras(exported, digits, tmp_path):
    """A device host runs the fused file with NumPy and an interpreter only:
    a child process where importing Keras or a backend fails."""
    _, path = exported["int8"]
    np.save(tmp_path / "x.npy", digits.x_test[:20])
    child = f"""
import sys
class NoKeras:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("keras", "tensorflow", "jax", "torch"):
            raise ImportError(name)
sys.meta_path.insert(0, NoKeras())
import numpy as np
from keras_earlyexit.runtime.fused import FusedInterpreter
x = np.load({str(tmp_path / "x.npy")!r})
for backend in ("litert", "micro"):
    print(FusedInterpreter({path!r}, backend).predict(x).exit_indices.tolist())
"""
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    expected = FusedInterpreter(path).predict(digits.x_test[:20]).exit_indices
    assert out == [str(expected.tolist())] * 2


def test_manifest_is_json_in_the_file(exported):
    _, path = exported["float32"]
    with open(path, "rb") as f:
        data = f.read()
    start = data.index(b'{"quantization"')
    text = data[start : data.index(b"}", data.index(b'"format_version"')) + 1]
    content = json.loads(text)
    assert content["format"] == "keras-earlyexit-fused"
    assert [e["gate"]["threshold_quantized"] for e in content["exits"]] == [None] * 3


def test_gated_interpreter_takes_a_fused_file(exported, digits):
    """The public entry point: `GatedInterpreter(path)` runs a fused file
    and `kee.export.set_thresholds` is the package's name for rewriting it."""
    bundle, path = exported["int8"]
    interpreter = kee.runtime.GatedInterpreter(path, thresholds=[0.0, 0.0])
    assert isinstance(interpreter, FusedInterpreter)
    expected = GatedInterpreter(bundle, thresholds=[0.0, 0.0]).predict(digits.x_test)
    _assert_same(interpreter.predict(digits.x_test), expected)
    assert kee.export.set_thresholds is set_thresholds


def test_fused_file_gets_normal_file_permissions(tmp_path):
    """A new fused file is created as `open()` would create it (the umask
    applies), and a rewrite keeps the mode of the file it replaces."""
    from keras_earlyexit.export.fused import write_atomic

    path = str(tmp_path / "model.tflite")
    old = os.umask(0o022)
    try:
        write_atomic(path, b"first")
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        write_atomic(path, b"second")
        assert os.stat(path).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert open(path, "rb").read() == b"second"
    assert os.listdir(tmp_path) == ["model.tflite"]


# The patience criterion (PABEE): the bundle's loop and the fused graph keep
# each sample's class and streak; both must take the exits of the shared
# NumPy rule (`runtime.patience`) on the artifact's own per-exit outputs.

PABEE_FLOORS = [0.0, 0.3, 0.6]  # exits 2 and 3 also need a confidence floor


@pytest.fixture(scope="module")
def pabee(digits) -> kee.EarlyExitModel:
    """A 4-exit digits CNN with criterion="patience", patience 2, trained
    briefly so that exits disagree and streaks of 1 to 4 occur."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x, exits = inputs, []
    for k, width in enumerate((4, 8, 8, 12)):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        if k == 1:
            x = keras.layers.MaxPooling2D(2)(x)
        name = "final" if k == 3 else f"exit_{k + 1}"
        exits.append(kee.ExitBranch(10, pooled_size=2, name=name)(x))
    model = kee.EarlyExitModel(
        inputs, exits, criterion="patience", patience=2, name="pabee"
    )
    _trained(model, digits, epochs=6).set_thresholds(PABEE_FLOORS)
    return model


@pytest.fixture(scope="module")
def pabee_exported(pabee, digits, tmp_path_factory) -> dict:
    """Per mode: the patience model's bundle and fused file."""
    root = tmp_path_factory.mktemp("pabee")
    out = {}
    for mode in MODES:
        bundle = kee.export.to_tflite(
            pabee,
            str(root / mode),
            representative_data=digits.x_val,
            quantization=mode,
            verbose=0,
        )
        path = str(root / f"{mode}.tflite")
        out[mode] = (bundle, _fuse_bundle(bundle, path, micro=mode == "int8"))
    return out


def _per_exit(interpreter, x) -> tuple[np.ndarray, np.ndarray]:
    """Every exit's classes and confidences `(n, exits)` as the artifact
    computes them: patience 1 (the gates are plain floors) and thresholds
    that force every sample out at exit k."""
    n_exits = interpreter.num_exits
    interpreter.set_patience(1)
    classes, confidences = [], []
    for k in range(n_exits):
        forced = [1.0] * (n_exits - 1)
        if k < n_exits - 1:
            forced[k] = 0.0
        interpreter.set_thresholds(forced)
        result = interpreter.predict(x)
        assert np.all(result.exit_indices == k)
        classes.append(result.classes)
        confidences.append(result.confidences)
    return np.stack(classes, 1), np.stack(confidences, 1)


def _patience_reference(classes, confidences, patience, floors) -> np.ndarray:
    """The exit each sample takes by `runtime.patience`'s rule."""
    from keras_earlyexit.runtime.patience import patience_passes, streaks

    runs = streaks(classes)
    exits = np.full(len(classes), classes.shape[1] - 1)
    for k in reversed(range(classes.shape[1] - 1)):
        leaves = patience_passes(runs[:, k], patience, confidences[:, k], floors[k])
        exits = np.where(leaves, k, exits)
    return exits


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["litert", "micro"])
def test_patience_bundle_and_fused_take_the_rule_s_exits(
    pabee_exported, digits, mode, backend
):
    bundle, path = pabee_exported[mode]
    x = digits.x_test
    classes, confidences = _per_exit(GatedInterpreter(bundle, backend), x)
    rows = np.arange(len(x))
    for patience in (1, 2, 3, 4):
        expected = _patience_reference(classes, confidences, patience, PABEE_FLOORS)
        results = [
            Interpreter(target, backend, patience=patience).predict(x)
            for Interpreter, target in (
                (GatedInterpreter, bundle),
                (FusedInterpreter, path),
            )
        ]
        for result in results:
            np.testing.assert_array_equal(result.exit_indices, expected)
            np.testing.assert_array_equal(result.classes, classes[rows, expected])
            np.testing.assert_array_equal(
                result.confidences, confidences[rows, expected]
            )
        if patience == 2:  # the exported patience: every exit is taken
            assert np.all(np.bincount(expected, minlength=4)[1:] > 0)
        if patience == 4:  # no streak of 4 before the final exit
            assert np.all(expected == 3)


def test_patience_float_bundle_equals_predict_early(pabee, pabee_exported, digits):
    bundle, path = pabee_exported["float32"]
    x = digits.x_test
    keras_result = pabee.predict_early(x)
    # Float32 TFLite and Keras logits differ in their last bits: a sample
    # whose top-2 logits nearly tie, or whose confidence nearly equals a
    # floor, may decide otherwise (none on these digits, in practice).
    logits = np.stack([np.asarray(z) for z in pabee.predict(x, verbose=0)])
    top2 = np.sort(logits, axis=-1)[..., -2:]
    steady = (top2[..., 1] - top2[..., 0] > 1e-4).all(axis=0)
    assert steady.mean() > 0.95
    for target in (bundle, path):
        result = GatedInterpreter(target).predict(x)
        np.testing.assert_array_equal(
            result.exit_indices[steady], keras_result.exit_indices[steady]
        )
        np.testing.assert_array_equal(
            result.classes[steady], keras_result.classes[steady]
        )


def test_patience_int8_bundle_agrees_with_keras(pabee, pabee_exported, digits):
    bundle, _ = pabee_exported["int8"]
    result = GatedInterpreter(bundle).predict(digits.x_test)
    keras_result = pabee.predict_early(digits.x_test)
    # Over seeds 0-4 of this fixture: same exit 0.978-0.994, same class
    # 0.972-0.997 (int8 classes, streaks and floors move near ties).
    assert np.mean(result.exit_indices == keras_result.exit_indices) > 0.93
    assert np.mean(result.classes == keras_result.classes) > 0.93


def test_patience_in_the_manifests_and_the_fused_graph(pabee_exported, exported):
    bundle, path = pabee_exported["int8"]
    manifest = read_manifest(bundle)
    assert (manifest.criterion, manifest.patience) == ("patience", 2)
    floors = [s.gate.threshold for s in manifest.segments]
    assert floors == pytest.approx(PABEE_FLOORS + [0.0])  # float32 gate weights
    with open(path, "rb") as f:
        data = f.read()
    fused = read_fused_manifest(data)
    assert (fused.criterion, fused.patience) == ("patience", 2)
    assert [_read_constant(data, e, patience=True) for e in fused.exits[:-1]] == [2] * 3
    assert fused.exits[-1].patience_buffer is None
    names = {op.name for op in flatbuffer.list_ops(data)}
    for op in ("ARG_MAX", "EQUAL", "CAST", "MUL", "ADD", "LOGICAL_AND"):
        assert op in names
    assert all(resolver_method(name) in TFLM_BUILTINS for name in names)
    # Other criteria carry none.
    other, other_path = exported["int8"]
    assert read_manifest(other).patience is None
    with open(other_path, "rb") as f:
        assert read_fused_manifest(f.read()).patience is None


@pytest.mark.parametrize("mode", MODES)
def test_set_thresholds_writes_the_patience(pabee_exported, digits, tmp_path, mode):
    bundle, path = pabee_exported[mode]
    copies = (str(tmp_path / "bundle"), str(tmp_path / "copy.tflite"))
    shutil.copytree(bundle, copies[0])
    shutil.copy(path, copies[1])
    x = digits.x_test[:120]
    expected = GatedInterpreter(bundle, patience=3, thresholds=[0.1, 0.2, 0.3])
    expected = expected.predict(x)
    for copy in copies:
        assert set_thresholds(copy, [0.1, 0.2, 0.3], patience=3) == [0.1, 0.2, 0.3]
        interpreter = GatedInterpreter(copy)
        assert (interpreter.patience, interpreter.thresholds) == (3, [0.1, 0.2, 0.3])
        _assert_same(interpreter.predict(x), expected)
        set_thresholds(copy, [0.1, 0.2, 0.3])  # patience kept
        assert GatedInterpreter(copy).patience == 3
    assert read_manifest(copies[0]).patience == 3


@pytest.mark.parametrize(
    "patience, message",
    [(0, r"in \[1, 4\]"), (5, r"in \[1, 4\]"), (2.0, "must be an int"), (True, "int")],
)
def test_bad_patience_changes_nothing(pabee_exported, tmp_path, patience, message):
    bundle, path = pabee_exported["int8"]
    copy = str(tmp_path / "bundle")
    shutil.copytree(bundle, copy)
    for target, watched in ((path, path), (copy, os.path.join(copy, MANIFEST_NAME))):
        with open(watched, "rb") as f:
            before = f.read()
        with pytest.raises(ValueError, match=message):
            set_thresholds(target, PABEE_FLOORS, patience=patience)
        with open(watched, "rb") as f:
            assert f.read() == before
        with pytest.raises(ValueError, match=message):
            GatedInterpreter(target, patience=patience)


def test_patience_of_another_criterion_is_refused(exported, tmp_path):
    bundle, path = exported["int8"]
    for target in (bundle, path):
        assert GatedInterpreter(target).patience is None
        with pytest.raises(ValueError, match="criterion 'patience'; this one's"):
            GatedInterpreter(target, patience=2)
        with pytest.raises(ValueError, match="criterion 'patience'"):
            set_thresholds(target, [0.5, 0.5], patience=2)
