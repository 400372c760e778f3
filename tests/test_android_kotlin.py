"""The Kotlin Android runner (tflite/android) on the host JVM.

LiteRT's Java `Interpreter` needs Android's JNI library, so
`EarlyExitClassifier` is compiled with kotlinc against host stand-ins of the
Android-only API in tflite/android/test/java (`Context`, `AssetManager`,
`AssetFileDescriptor`, and an `Interpreter` whose "models" are small text
files computing outputs from a fixed rule, documented there), with Android's
own org.json (Debian's libandroid-json-java). The stand-ins count open
interpreters and asset handles, so leaks show. Bundle manifests are written
with the package's manifest dataclasses: the class reads the schema's field
names. The driver, tflite/android/test/kotlin/.../HostRunner.kt, answers one
JSON line per command.

`FusedEarlyExitClassifier` reads real fused files written by
`kee.export.to_tflite(model, path, fused=True)`: its metadata, hash, threshold
constants and signature names are those of the real layout. For a real
`.tflite` model the `Interpreter` stand-in hands the bytes to LiteRT's Python
interpreter (tflite/android/test/python/litert_bridge.py), so each sample's
one `runForMultipleInputsOutputs` call is one real LiteRT invoke, compared
with `FusedInterpreter`.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from keras_earlyexit.runtime.fused import (
    FusedExit,
    FusedInterpreter,
    FusedManifest,
    read_fused_manifest,
)
from keras_earlyexit.runtime.manifest import (
    MANIFEST_NAME,
    GateInfo,
    Manifest,
    SegmentInfo,
    TensorInfo,
    quantize_threshold,
    read_manifest,
    sha256_of,
)

ANDROID_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "tflite", "android")
CLASSIFIER = os.path.join(
    ANDROID_DIR, "src/main/kotlin/io/github/kerasearlyexit/EarlyExitClassifier.kt"
)
FUSED_CLASSIFIER = os.path.join(
    ANDROID_DIR, "src/main/kotlin/io/github/kerasearlyexit/FusedEarlyExitClassifier.kt"
)
LITERT_BRIDGE = os.path.join(ANDROID_DIR, "test", "python", "litert_bridge.py")
DRIVER = os.path.join(
    ANDROID_DIR, "test/kotlin/io/github/kerasearlyexit/host/HostRunner.kt"
)
# Android's org.json, as Debian packages it (libandroid-json-java).
ANDROID_JSON_JAR = "/usr/share/java/com.android.json.jar"

MISSING_TOOLS = (
    "kotlinc, a JDK and Android's org.json are needed to build the Kotlin "
    "runner's host test (apt-get install -y kotlin libandroid-json-java)"
)


@pytest.fixture(scope="module")
def classpath(tmp_path_factory) -> str:
    """Compiles the stand-ins, the classifier and the driver (once per module)."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        pytest.skip("backend-independent; runs with KERAS_BACKEND=tensorflow")
    tools = ("kotlinc", "javac", "java")
    if any(shutil.which(t) is None for t in tools) or not os.path.isfile(
        ANDROID_JSON_JAR
    ):
        pytest.skip(MISSING_TOOLS)
    build = tmp_path_factory.mktemp("android_build")
    classes = str(build / "classes")
    jar = str(build / "runner.jar")
    sources = []
    for parent, _, files in os.walk(os.path.join(ANDROID_DIR, "test", "java")):
        sources += [os.path.join(parent, f) for f in files if f.endswith(".java")]
    commands = [
        ["javac", "--release", "8", "-nowarn", "-d", classes, *sorted(sources)],
        ["kotlinc", "-cp", f"{classes}:{ANDROID_JSON_JAR}", "-include-runtime"]
        + ["-d", jar, CLASSIFIER, FUSED_CLASSIFIER, DRIVER],
    ]
    for command in commands:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return f"{jar}:{classes}:{ANDROID_JSON_JAR}"


def _run(classpath: str, root: str, *commands: str) -> list[dict]:
    """Runs the driver on `commands`; one reply per command."""
    proc = subprocess.run(
        [
            "java",
            f"-Dkee.litert.python={sys.executable}",
            f"-Dkee.litert.bridge={LITERT_BRIDGE}",
            "-cp",
            classpath,
            "io.github.kerasearlyexit.host.HostRunnerKt",
            root,
        ],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(replies) == len(commands), proc.stdout
    return replies


def _ok(reply: dict) -> dict:
    assert "error" not in reply, reply
    return reply


def _assert_same_results(results: list[dict], expected) -> None:
    """Replies' labels, exits and confidences are a Python runtime's."""
    np.testing.assert_array_equal([r["label"] for r in results], expected.classes)
    np.testing.assert_array_equal([r["exit"] for r in results], expected.exit_indices)
    np.testing.assert_array_equal(
        np.float32([r["confidence"] for r in results]), expected.confidences
    )


def _tensor(name, position, shape, dtype="int8", scale=None, zero_point=None):
    return TensorInfo(name, position, list(shape), dtype, scale, zero_point)


def _model_line(kind: str, t: TensorInfo, rule: str = "") -> str:
    """One tensor of a stand-in model (format: tflite/android/test/java/
    org/tensorflow/lite/Interpreter.java)."""
    quantization = f"{t.scale!r} {t.zero_point}" if t.quantized else "0 0"
    shape = "x".join(map(str, t.shape))
    return f"{kind} {t.name} {t.dtype} {shape} {quantization} {rule}".rstrip()


def _write_bundle(root, name, segments, num_classes, thresholds, quantization):
    """A bundle of stand-in models. `segments`: per segment, the inputs and
    the outputs as (tensor, stand-in rule); the manifest lists tensors in the
    order given, the model by position."""
    directory = os.path.join(root, name)
    os.makedirs(directory)
    infos = []
    for k, (inputs, outputs) in enumerate(segments):
        lines = [_model_line("input", t) for t in sorted(inputs, key=_position)]
        lines += [
            _model_line("output", t, rule)
            for t, rule in sorted(outputs, key=lambda o: o[0].position)
        ]
        data = ("\n".join(lines) + "\n").encode()
        file = f"segment_{k + 1}.tflite"
        with open(os.path.join(directory, file), "wb") as f:
            f.write(data)
        tensors = [t for t, _ in outputs]
        confidence = next(t for t in tensors if t.name == "confidence")
        threshold = thresholds[k] if k < len(thresholds) else 0.0
        quantized = None
        if confidence.quantized:
            quantized = quantize_threshold(
                threshold, confidence.scale, confidence.zero_point
            )
        carry = [t.name for t in tensors if t.name not in ("logits", "confidence")]
        infos.append(
            SegmentInfo(
                index=k,
                exit_name=f"exit_{k + 1}",
                file=file,
                sha256=sha256_of(data),
                size_bytes=len(data),
                inputs=inputs,
                outputs=tensors,
                carry_out=carry,
                macs=0,
                cumulative_macs=0,
                gate=GateInfo("max_prob", 1.0, threshold, quantized),
            )
        )
    manifest = Manifest(
        quantization=quantization,
        model_name=name,
        num_classes=num_classes,
        criterion="max_prob",
        exit_names=[s.exit_name for s in infos],
        boundary="stand-in",
        segments=infos,
    )
    with open(os.path.join(directory, MANIFEST_NAME), "w") as f:
        f.write(manifest.to_json())
    return directory


def _position(t: TensorInfo) -> int:
    return t.position


S_IN = 1 / 16  # every value of the int8 samples below is a multiple of it
S_CONF = 1 / 256


def _int8_segments(final_zero_point: int = -2):
    """Three int8 segments over x = [c1, c2, l1, l2, l3]: exit k's confidence
    is c_k and its class l_k. Segment 1 hands x on with the parameters of
    segment 2's input (a shared buffer); segment 2 with other parameters than
    segment 3 takes (a requantized carry). Outputs sit at other positions
    than their manifest order."""

    def heads(conf_element: int, label_element: int, first: int):
        return [
            (
                _tensor("logits", first, (1, 4), scale=1 / 128, zero_point=-128),
                f"onehot 0 {label_element}",
            ),
            (
                _tensor("confidence", first + 1, (1,), scale=S_CONF, zero_point=-128),
                f"take 0 {conf_element}",
            ),
        ]

    x = _tensor("x", 0, (1, 5), scale=S_IN, zero_point=0)
    h = _tensor("h", 0, (1, 5), scale=S_IN, zero_point=0)
    g_out = _tensor("g", 2, (1, 5), scale=1 / 32, zero_point=3)
    g_in = _tensor("g", 0, (1, 5), scale=S_IN, zero_point=final_zero_point)
    return [
        ([x], [(dataclasses.replace(h, position=2), "copy 0"), *heads(0, 2, 0)]),
        ([h], [*heads(1, 3, 0), (g_out, "copy 0")]),
        ([g_in], heads(0, 4, 0)),
    ]


def _float_segments():
    """Two float segments over x = [c1, l1, l2]."""
    x = _tensor("x", 0, (1, 3), "float32")
    return [
        (
            [x],
            [
                (_tensor("h", 0, (1, 3), "float32"), "copy 0"),
                (_tensor("logits", 1, (1, 3), "float32"), "onehot 0 1"),
                (_tensor("confidence", 2, (1,), "float32"), "take 0 0"),
            ],
        ),
        (
            [_tensor("h", 0, (1, 3), "float32")],
            [
                (_tensor("logits", 0, (1, 3), "float32"), "onehot 0 2"),
                (_tensor("confidence", 1, (1,), "float32"), "take 0 0"),
            ],
        ),
    ]


def _two_input_segments():
    """Inputs a = [confidence, unused] and b = [l1, l2, c2]; the manifest
    lists a first, the model takes b at position 0."""
    a = _tensor("a", 1, (1, 2), "float32")
    b = _tensor("b", 0, (1, 3), "float32")
    h = _tensor("h", 0, (1, 3), "float32")
    return [
        (
            [a, b],
            [
                (h, "copy 0"),
                (_tensor("logits", 1, (1, 3), "float32"), "onehot 0 0"),
                (_tensor("confidence", 2, (1,), "float32"), "take 1 0"),
            ],
        ),
        (
            [h],
            [
                (_tensor("logits", 0, (1, 3), "float32"), "onehot 0 1"),
                (_tensor("confidence", 1, (1,), "float32"), "take 0 2"),
            ],
        ),
    ]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("assets"))
    _write_bundle(root, "int8", _int8_segments(), 4, [0.5, 0.75], "int8")
    _write_bundle(root, "float", _float_segments(), 3, [0.5], "float32")
    _write_bundle(root, "two_inputs", _two_input_segments(), 3, [0.5], "float32")
    return root


def _edit_manifest(root: str, source: str, name: str, edit) -> None:
    """Copies bundle `source` to `name` and applies `edit` to its manifest."""
    shutil.copytree(os.path.join(root, source), os.path.join(root, name))
    path = os.path.join(root, name, MANIFEST_NAME)
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _classify(*inputs) -> str:
    return "classify " + json.dumps([list(map(float, x)) for x in inputs])


def test_int8_gating_carry_and_requantization(classpath, assets):
    samples = [
        # x = [c1, c2, l1, l2, l3]; thresholds 0.5 and 0.75.
        ([0.5, 0.0, 1, 2, 3], 0, 1, 0.5),
        ([0.4375, 0.75, 1, 2, 3], 1, 2, 0.75),
        ([0.4375, 0.6875, 1, 2, 3], 2, 3, 0.4375),
        # c1 = 1 saturates the int8 confidence at 127: 255/256.
        ([1.0, 0.0, 3, 0, 0], 0, 3, 255 / 256),
    ]
    replies = _run(
        classpath, assets, "open int8", *(_classify(x) for x, *_ in samples), "counts"
    )
    assert _ok(replies[0])["exit_names"] == ["exit_1", "exit_2", "exit_3"]
    assert replies[0]["thresholds"] == [0.5, 0.75]
    for reply, (_, exit_index, label, confidence) in zip(replies[1:], samples):
        assert (_ok(reply)["exit"], reply["label"]) == (exit_index, label)
        assert reply["confidence"] == confidence
    # l3 = 3 reaches exit 3 only through the requantized carry: read with the
    # wrong parameters it would be 6, outside the 4 classes.
    assert replies[-1]["exit_counts"] == [2, 1, 1]


def test_int8_thresholds_are_read_from_the_manifest(classpath, assets):
    """threshold_quantized is used as written, never recomputed: here it asks
    for one int8 level more than the float threshold 0.5 would."""
    q = quantize_threshold(0.5, S_CONF, -128)

    def edit(data):
        data["segments"][0]["gate"]["threshold_quantized"] = q + 1

    _edit_manifest(assets, "int8", "int8_manifest_q", edit)
    at_half = [0.5, 0.0, 1, 2, 3]
    replies = _run(
        classpath,
        assets,
        "open int8_manifest_q",
        _classify(at_half),
        "thresholds [0.5, 0.75]",
        _classify(at_half),
    )
    assert _ok(replies[1])["exit"] == 2
    # setThresholds computes the same value as Python.
    assert _ok(replies[3])["exit"] == 0


def test_threshold_one_means_no_sample_leaves(classpath, assets):
    _edit_manifest(
        assets,
        "float",
        "float_threshold_one",
        lambda data: data["segments"][0]["gate"].update(threshold=1.0),
    )
    saturated = [1.0, 2, 1]
    replies = _run(
        classpath,
        assets,
        "open float_threshold_one",
        _classify(saturated),
        "thresholds [0.5]",
        _classify(saturated),
        "thresholds [1.0]",
        _classify(saturated),
        "open int8",
        "thresholds [1.0, 1.0]",
        _classify([1.0, 1.0, 1, 2, 3]),
    )
    assert (_ok(replies[1])["exit"], replies[1]["label"]) == (1, 1)
    assert (_ok(replies[3])["exit"], replies[3]["label"]) == (0, 2)
    assert _ok(replies[5])["exit"] == 1
    assert (_ok(replies[8])["exit"], replies[8]["label"]) == (2, 3)


def test_float_gate_compares_in_float32(classpath, assets):
    below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    replies = _run(
        classpath,
        assets,
        "open float",
        _classify([0.5, 2, 1]),
        _classify([below, 2, 1]),
    )
    assert (_ok(replies[1])["exit"], replies[1]["confidence"]) == (0, 0.5)
    assert (_ok(replies[2])["exit"], replies[2]["label"]) == (1, 1)


def test_quantize_threshold_matches_python(classpath, assets):
    """setThresholds' integer scan equals manifest.quantize_threshold, on
    random values and on every threshold that is exactly an int8 level, or
    one float32 step either side of it."""
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(300):
        scale = float(np.float32(rng.uniform(1e-3, 0.02)))
        zero_point = int(rng.integers(-128, 128))
        cases.append((float(np.float32(rng.uniform(0, 1))), scale, zero_point))
    for scale, zero_point in [(S_CONF, -128), (1 / 255, -128), (0.0039215684, -128)]:
        for q in range(-128, 128):
            level = np.float32(q - zero_point) * np.float32(scale)
            for t in (
                np.nextafter(level, np.float32(0)),
                level,
                np.nextafter(level, np.float32(2)),
            ):
                if 0 <= t <= 1:
                    cases.append((float(t), scale, zero_point))
    cases += [(0.0, S_CONF, -128), (1.0, S_CONF, -128), (0.9999, 1e-3, 0)]
    (reply,) = _run(classpath, assets, "quantize_threshold " + json.dumps(cases))
    expected = [quantize_threshold(t, s, z) for t, s, z in cases]
    mismatches = [
        (case, got, want)
        for case, got, want in zip(cases, _ok(reply)["q"], expected)
        if got != want
    ]
    assert not mismatches, mismatches[:5]
    assert expected[-3:] == [-128, 128, 128]


def test_several_inputs(classpath, assets):
    a, b = [0.9, 0.0], [2, 1, 0.25]
    low = [0.2, 0.0]
    replies = _run(
        classpath,
        assets,
        "open two_inputs",
        _classify(a, b),
        _classify(low, b),
        "classify_named " + json.dumps({"b": b, "a": low}),
        _classify(a),
        "classify_named " + json.dumps({"a": a}),
        _classify(b, a),
    )
    assert _ok(replies[0])["input_names"] == ["a", "b"]
    assert (_ok(replies[1])["exit"], replies[1]["label"]) == (0, 2)
    assert replies[1]["confidence"] == pytest.approx(0.9, abs=1e-7)
    assert (_ok(replies[2])["exit"], replies[2]["label"]) == (1, 1)
    assert replies[2]["confidence"] == 0.25
    assert (_ok(replies[3])["exit"], replies[3]["label"]) == (1, 1)
    assert replies[4]["error"] == "java.lang.IllegalArgumentException"
    assert "takes 2 input(s) [a, b]; received 1" in replies[4]["message"]
    assert "lack [b]" in replies[5]["message"]
    assert "Input 'a' takes 2 floats" in replies[6]["message"]


@pytest.mark.parametrize("size", [4, 6, 0])
def test_input_of_the_wrong_size_is_refused(classpath, assets, size):
    replies = _run(
        classpath, assets, "open int8", _classify([0.5] * size), _classify([0.5] * 5)
    )
    assert replies[1]["error"] == "java.lang.IllegalArgumentException"
    assert replies[1]["message"] == (
        f"Input 'x' takes 5 floats (shape [1, 5]); received {size}."
    )
    assert _ok(replies[2])["exit"] == 0


def test_assets_and_interpreters_are_closed(classpath, assets):
    replies = _run(classpath, assets, "open int8", _classify([0.5] * 5), "close")
    assert (_ok(replies[0])["open_assets"], replies[0]["live_interpreters"]) == (0, 3)
    assert (replies[2]["open_assets"], replies[2]["live_interpreters"]) == (0, 0)
    replies = _run(
        classpath, assets, "open int8", "close", "close", _classify([0.5] * 5)
    )
    assert _ok(replies[2])["live_interpreters"] == 0
    assert replies[3]["message"] == "The classifier is closed."


def _drop_threshold_quantized(data):
    data["segments"][0]["gate"]["threshold_quantized"] = None


def _stale_scale(data):
    data["segments"][1]["outputs"][2]["scale"] = 1 / 64


def _position_out_of_range(data):
    data["segments"][2]["inputs"][0]["position"] = 1


def _logits_size(data):
    data["num_classes"] = 5


def _unsupported_dtype(data):
    data["segments"][0]["inputs"][0].update(dtype="int64", scale=None, zero_point=None)


def _int32_for_int8(data):
    data["segments"][0]["inputs"][0].update(dtype="int32", scale=None, zero_point=None)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_threshold_quantized, "gives exit 1 (segment_1.tflite) no threshold_q"),
        (_stale_scale, "says tensor 'g' of segment_2.tflite is int8 of shape [1, 5]"),
        (_position_out_of_range, "inputs of segment_3.tflite at positions [1]"),
        (_logits_size, "segment_1.tflite has 4 logits; manifest.json says num_cl"),
        (_unsupported_dtype, "'x' of segment_1.tflite has dtype int64"),
        (_int32_for_int8, "says tensor 'x' of segment_1.tflite is int32 of shape [1"),
    ],
)
def test_a_failing_constructor_closes_what_it_opened(classpath, assets, edit, message):
    name = f"broken_{edit.__name__}"
    _edit_manifest(assets, "int8", name, edit)
    (reply,) = _run(classpath, assets, f"open {name}")
    assert (reply["live_interpreters"], reply["open_assets"]) == (0, 0)
    assert reply["error"] == "java.lang.IllegalArgumentException"
    assert message in reply["message"]


def test_carry_sizes_must_agree(classpath, assets):
    """Segment 3's model takes a smaller carry than segment 2 gives (each
    model matches its own manifest entry)."""
    name = "carry_size"
    shutil.copytree(os.path.join(assets, "int8"), os.path.join(assets, name))
    path = os.path.join(assets, name, "segment_3.tflite")
    with open(path) as f:
        data = f.read().replace("input g int8 1x5", "input g int8 1x4").encode()
    with open(path, "wb") as f:
        f.write(data)

    def edit(manifest):
        manifest["segments"][2]["inputs"][0]["shape"] = [1, 4]
        manifest["segments"][2]["sha256"] = sha256_of(data)

    _edit_manifest(assets, name, name + "_edited", edit)
    (reply,) = _run(classpath, assets, f"open {name}_edited")
    assert reply["error"] == "java.lang.IllegalArgumentException"
    assert reply["message"].startswith(
        "Carry 'g' is int8 of 5 elements out of segment_2.tflite but int8 of 4 "
        "elements into segment_3.tflite."
    )
    assert (reply["live_interpreters"], reply["open_assets"]) == (0, 0)


@pytest.mark.parametrize("damage", ["missing", "tampered"])
def test_a_damaged_segment_file_is_refused(classpath, assets, damage):
    name = f"damaged_{damage}"
    shutil.copytree(os.path.join(assets, "int8"), os.path.join(assets, name))
    path = os.path.join(assets, name, "segment_3.tflite")
    if damage == "missing":
        os.remove(path)
        message = "assets/damaged_missing/segment_3.tflite cannot be opened"
    else:
        with open(path, "a") as f:
            f.write("# changed\n")
        message = "assets/damaged_tampered/segment_3.tflite is corrupted or was re"
    (reply,) = _run(classpath, assets, f"open {name}")
    assert (reply["live_interpreters"], reply["open_assets"]) == (0, 0)
    assert reply["error"] == "java.lang.IllegalArgumentException"
    assert reply["message"].startswith(message)


def test_bad_arguments_are_refused(classpath, assets):
    replies = _run(
        classpath,
        assets,
        "open int8 0",
        "open int8",
        "thresholds [0.5]",
        "thresholds [0.5, 1.5]",
    )
    assert replies[0]["message"] == "numThreads must be >= 1. Received: 0"
    assert replies[0]["open_assets"] == 0
    expected = "Expected 2 thresholds in [0, 1] (one per non-final exit); received"
    assert replies[2]["message"].startswith(expected)
    assert replies[3]["message"].startswith(expected)


@pytest.mark.parametrize(
    "kotlin, schema, used",
    [
        (
            CLASSIFIER,
            (Manifest, SegmentInfo, TensorInfo, GateInfo),
            {"threshold_quantized", "zero_point", "sha256", "exit_names"},
        ),
        (
            FUSED_CLASSIFIER,
            (FusedManifest, FusedExit, TensorInfo, GateInfo),
            {"threshold_quantized", "threshold_buffer", "content_sha256", "outputs"},
        ),
    ],
    ids=["bundle", "fused"],
)
def test_manifest_fields_read_are_in_the_schema(kotlin, schema, used):
    """Every manifest key a Kotlin class reads is a field of its schema
    (keras_earlyexit/runtime/manifest.py, runtime/fused.py)."""
    with open(kotlin) as f:
        source = f.read()
    read = set(re.findall(r'\b(?:get\w*|opt\w*|isNull|stringList)\("(\w+)"\)', source))
    fields = {f.name for cls in schema for f in dataclasses.fields(cls)}
    assert used <= read
    assert read <= fields, read - fields


# The fused model: real files from kee.export.to_tflite(..., fused=True).

FUSED_SAMPLES = 40


def _spread(path: str, x: np.ndarray) -> list[float]:
    """Thresholds that send samples to every exit: each the median of the
    confidences reaching its exit (so some samples tie with it)."""
    gated = _manifest(path).num_exits - 1
    thresholds = []
    for k in range(gated):
        reach = [1.0] * k + [0.0] * (gated - k)
        result = FusedInterpreter(path, thresholds=reach).predict(x)
        confidences = np.sort(result.confidences)
        thresholds.append(float(confidences[len(confidences) // 2]))
    return thresholds


@pytest.fixture(scope="module")
def fused_assets(classpath, tmp_path_factory) -> dict:
    """An int8 and a float32 (with logits) fused digits CNN, thresholds set
    offline with kee.export.set_thresholds, and an int8 two-input model."""
    import keras

    import keras_earlyexit as kee
    from keras_earlyexit import demo

    root = str(tmp_path_factory.mktemp("fused_assets"))
    digits = demo.load_digits(seed=0)
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4)
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss())
    model.fit(digits.x_train, digits.y_train, epochs=2, batch_size=64, verbose=0)
    x = digits.x_test[:FUSED_SAMPLES]
    common = dict(representative_data=digits.x_val, verbose=0)
    int8 = kee.export.to_tflite(
        model, os.path.join(root, "digits_int8.tflite"), fused=True, **common
    )
    float32 = kee.export.to_tflite(
        model,
        os.path.join(root, "digits_float32.tflite"),
        quantization="float32",
        fused=True,
        logits=True,
        **common,
    )
    for path in (int8, float32):
        kee.export.set_thresholds(path, _spread(path, x))

    a = keras.Input((3,), name="a")
    b = keras.Input((5,), name="b")
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    e1 = kee.ExitBranch(4, name="exit_1")(h)
    e2 = kee.ExitBranch(4, name="final")(keras.layers.Dense(8, activation="relu")(h))
    two = kee.EarlyExitModel([a, b], [e1, e2])
    rng = np.random.default_rng(0)
    xs = {"a": rng.normal(size=(64, 3)), "b": rng.normal(size=(64, 5))}
    xs = {k: v.astype("float32") for k, v in xs.items()}
    two_inputs = kee.export.to_tflite(
        two,
        os.path.join(root, "two_inputs.tflite"),
        representative_data=[xs["a"], xs["b"]],
        fused=True,
        verbose=0,
    )
    kee.export.set_thresholds(two_inputs, _spread(two_inputs, xs))
    return {
        "root": root,
        "x": x,
        "xs": {k: v[:12] for k, v in xs.items()},
        "int8": int8,
        "float32": float32,
        "two_inputs": two_inputs,
    }


def _manifest(path: str):
    with open(path, "rb") as f:
        return read_fused_manifest(f.read(), path)


@pytest.mark.parametrize("mode", ["int8", "float32"])
def test_fused_file_runs_as_the_python_runtime(classpath, fused_assets, mode):
    """One call per sample gives FusedInterpreter's class, exit and
    confidence; thresholds come from the file's metadata."""
    path, x = fused_assets[mode], fused_assets["x"]
    expected = FusedInterpreter(path).predict(x)
    name = os.path.basename(path)
    replies = _run(
        classpath,
        fused_assets["root"],
        f"open_fused {name}",
        *(_classify(sample.ravel()) for sample in x),
        "counts",
    )
    manifest = _manifest(path)
    opened = _ok(replies[0])
    assert opened["exit_names"] == manifest.exit_names
    assert opened["input_names"] == [t.name for t in manifest.inputs]
    assert opened["quantization"] == mode
    assert opened["thresholds"] == [float(np.float32(t)) for t in manifest.thresholds]
    if mode == "int8":
        quantized = [e.gate.threshold_quantized for e in manifest.exits[:-1]]
        assert opened["thresholds_quantized"] == quantized
        assert all(q < 128 for q in quantized)
    else:
        assert opened["thresholds_quantized"] is None
    results = [_ok(r) for r in replies[1:-1]]
    _assert_same_results(results, expected)
    counts = np.bincount(expected.exit_indices, minlength=3).tolist()
    assert replies[-1]["exit_counts"] == counts
    assert min(counts) > 0, counts  # every exit is taken
    assert opened["logits"] == (mode == "float32")
    if mode == "float32":
        logits = np.float32([r["logits"] for r in results])
        np.testing.assert_array_equal(logits.argmax(axis=1), expected.classes)


def test_fused_several_inputs_by_name(classpath, fused_assets):
    """int8 two-input model: floats quantized with each input's own
    parameters, filled by name or in inputNames' order (the model's, which
    is not the Keras model's)."""
    path, xs = fused_assets["two_inputs"], fused_assets["xs"]
    expected = FusedInterpreter(path).predict(xs)
    names = [t.name for t in _manifest(path).inputs]
    n = len(xs["a"])
    ordered = [[xs[name][i] for name in names] for i in range(n)]
    named = [{"b": xs["b"][i].tolist(), "a": xs["a"][i].tolist()} for i in range(3)]
    a, b = xs["a"][0].tolist(), xs["b"][0].tolist()
    replies = _run(
        classpath,
        fused_assets["root"],
        "open_fused two_inputs.tflite",
        *(_classify(*sample) for sample in ordered),
        *("classify_named " + json.dumps(sample) for sample in named),
        _classify(a),
        "classify_named " + json.dumps({"a": a}),
        "classify_named " + json.dumps({"a": a, "b": b, "c": [0.0]}),
        _classify(*[{"a": b, "b": a}[name] for name in names]),
    )
    assert _ok(replies[0])["input_names"] == names
    assert sorted(names) == ["a", "b"]
    results = [_ok(r) for r in replies[1 : n + 1]]
    assert [(r["label"], r["exit"]) for r in results] == list(
        zip(expected.classes.tolist(), expected.exit_indices.tolist())
    )
    np.testing.assert_array_equal(
        np.float32([r["confidence"] for r in results]), expected.confidences
    )
    assert set(expected.exit_indices.tolist()) == {0, 1}
    assert [_ok(r) for r in replies[n + 1 : n + 4]] == replies[1:4]
    errors = replies[n + 4 :]
    assert {r["error"] for r in errors} == {"java.lang.IllegalArgumentException"}
    assert errors[0]["message"] == (
        f"The model takes 2 input(s) [{', '.join(names)}]; received 1 array(s)."
    )
    assert errors[1]["message"].startswith("Inputs lack [b]")
    assert errors[2]["message"].startswith("Inputs [c] are not the model's")
    assert errors[3]["message"].startswith(f"Input '{names[0]}' takes ")


@pytest.mark.parametrize(
    "value, size, message",
    [
        ("NaN", 64, "Input 'image' holds NaN at element 5; the model takes finite"),
        ("Infinity", 64, "Input 'image' holds Infinity at element 5; the model"),
        (0.5, 63, "Input 'image' takes 64 floats (shape [1, 8, 8, 1]); received 63."),
        (0.5, 65, "Input 'image' takes 64 floats (shape [1, 8, 8, 1]); received 65."),
    ],
)
def test_fused_refuses_bad_input(classpath, fused_assets, value, size, message):
    sample = fused_assets["x"][0].ravel().tolist()
    bad = (sample + [0.5])[:size]
    if size == 64:
        bad[5] = value
    replies = _run(
        classpath,
        fused_assets["root"],
        "open_fused digits_int8.tflite",
        "classify " + json.dumps([bad]).replace('"', ""),
        "counts",
        _classify(sample),
    )
    assert replies[1]["error"] == "java.lang.IllegalArgumentException"
    assert replies[1]["message"].startswith(message)
    assert replies[2]["exit_counts"] == [0, 0, 0]  # nothing was run
    assert "error" not in replies[3]


def _tamper_weight(data: bytes) -> bytes:
    patched = bytearray(data)
    patched[len(data) // 3] ^= 1
    return bytes(patched)


def _rename_metadata(data: bytes) -> bytes:
    assert data.count(b"keras_earlyexit\0") == 1
    return data.replace(b"keras_earlyexit\0", b"keras_earlyexiX\0")


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _not_a_model(data: bytes) -> bytes:
    return b"# not a model\n" * 4


def _reembed(data: bytes, edit) -> bytes:
    """The file with its manifest edited and hashed again, as the exporter
    writes it: a consistent file whose manifest no longer fits its graph."""
    from keras_earlyexit.export import flatbuffer
    from keras_earlyexit.export.fused import finish

    manifest = read_fused_manifest(data)
    edit(manifest)
    return finish(flatbuffer._schema().ModelT.InitFromPackedBuf(data, 0), manifest)


def _stale_threshold(data: bytes) -> bytes:
    def edit(manifest: FusedManifest):
        manifest.exits[0].gate.threshold_quantized += 1

    return _reembed(data, edit)


def _swap_outputs(data: bytes) -> bytes:
    def edit(manifest: FusedManifest):
        manifest.outputs[:2] = manifest.outputs[1::-1]

    return _reembed(data, edit)


def _stale_input_scale(data: bytes) -> bytes:
    def edit(manifest: FusedManifest):
        manifest.inputs[0].scale *= 2

    return _reembed(data, edit)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_tamper_weight, "was modified after export: its sha256 (own hash exc"),
        (_rename_metadata, "has no 'keras_earlyexit' metadata: it is not a fused"),
        (_truncate, "is damaged: "),
        (_not_a_model, "is not a TFLite model (no 'TFL3' file identifier)."),
        (_stale_threshold, "gate in assets/_stale_threshold.tflite does not comp"),
        # These fail once the interpreter is open: it must be closed.
        (_swap_outputs, "Output 'class' of assets/_swap_outputs.tflite is at po"),
        (_stale_input_scale, "says input 'image' is int8 of shape [1, 8, 8, 1] (sc"),
    ],
)
def test_fused_constructor_refuses_and_closes(classpath, fused_assets, edit, message):
    with open(fused_assets["int8"], "rb") as f:
        data = edit(f.read())
    name = f"{edit.__name__}.tflite"
    with open(os.path.join(fused_assets["root"], name), "wb") as f:
        f.write(data)
    (reply,) = _run(classpath, fused_assets["root"], f"open_fused {name}")
    assert reply["error"] == "java.lang.IllegalArgumentException"
    assert message in reply["message"], reply["message"]
    assert (reply["live_interpreters"], reply["open_assets"]) == (0, 0)


def test_fused_close_and_arguments(classpath, fused_assets):
    sample = fused_assets["x"][0].ravel()
    replies = _run(
        classpath,
        fused_assets["root"],
        "open_fused digits_int8.tflite 0",
        "open_fused missing.tflite",
        "open_fused digits_int8.tflite 2",
        _classify(sample),
        "close",
        "close",
        _classify(sample),
    )
    assert replies[0]["message"] == "numThreads must be >= 1. Received: 0"
    assert replies[1]["message"].startswith(
        "assets/missing.tflite cannot be opened as a file descriptor"
    )
    assert replies[1]["message"].endswith(
        "Copy the .tflite file written by kee.export.to_tflite(..., fused=True) "
        "into assets/."
    )
    assert (_ok(replies[2])["live_interpreters"], replies[2]["open_assets"]) == (1, 0)
    assert _ok(replies[3])["live_interpreters"] == 1
    assert (replies[4]["live_interpreters"], replies[5]["live_interpreters"]) == (0, 0)
    assert replies[6]["message"] == "The classifier is closed."


# Patience (PABEE) and int32 token inputs.


def _patience_manifest(patience, criterion="patience"):
    def edit(data):
        data["criterion"] = criterion
        data["patience"] = patience

    return edit


def test_patience_gating(classpath, assets):
    """Stand-in bundle x = [c1, c2, l1, l2, l3] with criterion "patience":
    a sample leaves exit k only when exits k - p + 1 .. k predict its class
    and its confidence passes the threshold (a floor); setPatience changes
    p, within [1, exits]."""
    _edit_manifest(assets, "int8", "int8_patience", _patience_manifest(2))
    agree = [0.5, 0.75, 1, 1, 3]  # classes 1, 1, 3; both floors reached
    disagree = [0.5, 0.75, 1, 2, 3]  # classes 1, 2, 3
    below_floor = [0.5, 0.6875, 1, 1, 1]  # classes 1, 1, 1; 0.6875 < 0.75
    replies = _run(
        classpath,
        assets,
        "open int8_patience",
        _classify(agree),
        _classify(disagree),
        _classify(below_floor),
        "patience 1",
        _classify(agree),
        "patience 3",
        _classify(agree),
        "patience 0",
        "patience 4",
        "counts",
        "open int8",
        "patience 2",
    )
    assert _ok(replies[0])["patience"] == 2
    results = [(_ok(r)["exit"], r["label"]) for r in replies[1:4]]
    assert results == [(1, 1), (2, 3), (2, 1)]
    assert _ok(replies[4])["patience"] == 1
    assert (_ok(replies[5])["exit"], replies[5]["label"]) == (0, 1)
    assert _ok(replies[7])["exit"] == 2
    expected = "patience must be in [1, 3] (the number of exits in a row"
    assert replies[8]["message"].startswith(expected)
    assert replies[9]["message"].startswith(expected)
    assert replies[10]["exit_counts"] == [1, 1, 3]
    assert _ok(replies[11])["patience"] == 0
    assert replies[12]["message"].startswith(
        "setPatience applies to bundles exported with criterion 'patience'"
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (_patience_manifest(0), "has criterion 'patience' with patience 0; an intege"),
        (_patience_manifest(4), "has criterion 'patience' with patience 4; an intege"),
        (_patience_manifest(None), "has criterion 'patience' with patience null;"),
        (_patience_manifest("2"), "has criterion 'patience' with patience 2; an inte"),
        (_patience_manifest(2, "max_prob"), "gives patience 2 for criterion 'max_pr"),
    ],
    ids=["zero", "above_exits", "missing", "string", "other_criterion"],
)
def test_bad_patience_is_refused(classpath, assets, edit, message):
    name = f"bad_patience_{len(os.listdir(assets))}"
    _edit_manifest(assets, "int8", name, edit)
    (reply,) = _run(classpath, assets, f"open {name}")
    assert reply["error"] == "java.lang.IllegalArgumentException"
    assert message in reply["message"], reply["message"]
    assert (reply["live_interpreters"], reply["open_assets"]) == (0, 0)


@pytest.fixture(scope="module")
def real_bundles(classpath, tmp_path_factory) -> str:
    """Assets holding real int8 bundles (kee.export.to_tflite): the patience
    digits CNN (p = 2) and the token model (int32 ids and padding mask),
    and the token model's fused file, run by the stand-in through LiteRT."""
    from _micro_bundle import patience_int8_bundle, token_int8_bundle, token_int8_fused

    root = str(tmp_path_factory.getbasetemp())
    assets_root = str(tmp_path_factory.mktemp("real_bundles"))
    shutil.copytree(patience_int8_bundle(root), os.path.join(assets_root, "patience"))
    shutil.copytree(token_int8_bundle(root), os.path.join(assets_root, "tokens"))
    shutil.copy(token_int8_fused(root), os.path.join(assets_root, "tokens.tflite"))
    return assets_root


REAL_SAMPLES = 40


@pytest.mark.parametrize("patience", [None, 1])
def test_patience_bundle_runs_as_the_python_runtime(classpath, real_bundles, patience):
    """The real patience bundle on LiteRT: class, exit and confidence of
    `GatedInterpreter` sample by sample, with the manifest's patience and
    with setPatience."""
    from keras_earlyexit import demo
    from keras_earlyexit.runtime import GatedInterpreter

    x = demo.load_digits(seed=0).x_test[:REAL_SAMPLES]
    bundle = os.path.join(real_bundles, "patience")
    expected = GatedInterpreter(bundle, patience=patience).predict(x)
    commands = ["open patience"] + ([f"patience {patience}"] if patience else [])
    replies = _run(
        classpath,
        real_bundles,
        *commands,
        *(_classify(sample.ravel()) for sample in x),
        "counts",
    )
    assert _ok(replies[0])["patience"] == 2
    results = [_ok(r) for r in replies[len(commands) : -1]]
    _assert_same_results(results, expected)
    counts = np.bincount(expected.exit_indices, minlength=3).tolist()
    assert replies[-1]["exit_counts"] == counts
    # p = 2 keeps every sample past exit 0; p = 1 lets some leave there.
    assert (counts[0] == 0) == (patience is None), counts


def _values(*inputs) -> str:
    return "classify_values " + json.dumps([np.asarray(v).tolist() for v in inputs])


def test_token_bundle_runs_as_the_python_runtime(classpath, real_bundles):
    """int32 token ids and padding mask as IntArrays (by position and by
    name) give `GatedInterpreter`'s class, exit and confidence on LiteRT,
    sample by sample (the mask carried as int32 between segments)."""
    from _micro_bundle import token_samples

    from keras_earlyexit.runtime import GatedInterpreter

    x = token_samples(REAL_SAMPLES, seed=2)
    bundle = os.path.join(real_bundles, "tokens")
    expected = GatedInterpreter(bundle).predict(x)
    names = [t.name for t in read_manifest(bundle).segments[0].inputs]
    named = [{k: x[k][i].tolist() for k in reversed(names)} for i in range(3)]
    replies = _run(
        classpath,
        real_bundles,
        "open tokens",
        *(_values(*(x[name][i] for name in names)) for i in range(REAL_SAMPLES)),
        *("classify_named_values " + json.dumps(sample) for sample in named),
        "counts",
    )
    assert _ok(replies[0])["input_names"] == names
    results = [_ok(r) for r in replies[1 : REAL_SAMPLES + 1]]
    _assert_same_results(results, expected)
    assert [_ok(r) for r in replies[REAL_SAMPLES + 1 : -1]] == results[:3]
    assert len(set(expected.exit_indices.tolist())) == 3


def test_token_bundle_refuses_bad_input(classpath, real_bundles):
    """Floats for int32 inputs, a wrong length, ids outside the embedding's
    rows, a missing input: each throws the classifier's message before
    anything runs; the classifier stays usable."""
    from _micro_bundle import TOKEN_VOCABULARY, token_samples

    x = token_samples(1, seed=3)
    bundle = os.path.join(real_bundles, "tokens")
    names = [t.name for t in read_manifest(bundle).segments[0].inputs]
    good = {k: v[0].tolist() for k, v in x.items()}

    def sample(**changes):
        values = dict(good, **changes)
        return _values(*(values[name] for name in names))

    ids = list(good["tokens"])
    out_of_range = [TOKEN_VOCABULARY, *ids[1:]]
    negative = [*ids[:3], -1, *ids[4:]]
    replies = _run(
        classpath,
        real_bundles,
        "open tokens",
        _classify(*([float(v) for v in good[name]] for name in names)),
        sample(tokens=ids[:7]),
        sample(tokens=out_of_range),
        sample(tokens=negative),
        _values(*(good[name] for name in names[:1])),
        "counts",
        sample(),
    )
    errors = replies[1:6]
    assert {r["error"] for r in errors} == {"java.lang.IllegalArgumentException"}
    assert errors[0]["message"] == (
        f"Input '{names[0]}' takes 8 int32 values (shape [1, 8]) as an IntArray; "
        "received a FloatArray of 8."
    )
    assert errors[1]["message"] == (
        "Input 'tokens' takes 8 int32 values (shape [1, 8]); received 7."
    )
    assert errors[2]["message"].startswith(
        f"Input 'tokens' holds {TOKEN_VOCABULARY} at element 0; its values are in "
        f"[0, {TOKEN_VOCABULARY - 1}]"
    )
    assert errors[3]["message"].startswith("Input 'tokens' holds -1 at element 3;")
    assert errors[4]["message"] == (
        f"The bundle takes 2 input(s) [{', '.join(names)}]; received 1 array(s)."
    )
    assert replies[6]["exit_counts"] == [0, 0, 0]  # nothing ran
    assert "error" not in replies[7]


def test_token_fused_file_runs_as_the_python_runtime(classpath, real_bundles):
    """The token model's fused file: IntArray inputs, one call per sample,
    `FusedInterpreter`'s class, exit and confidence; floats for an int32
    input and ids outside the embedding are refused."""
    from _micro_bundle import TOKEN_VOCABULARY, token_samples

    x = token_samples(REAL_SAMPLES, seed=2)
    path = os.path.join(real_bundles, "tokens.tflite")
    expected = FusedInterpreter(path).predict(x)
    names = [t.name for t in _manifest(path).inputs]
    bad = {k: v[0].copy() for k, v in x.items()}
    bad["tokens"][5] = TOKEN_VOCABULARY
    replies = _run(
        classpath,
        real_bundles,
        "open_fused tokens.tflite",
        *(_values(*(x[name][i] for name in names)) for i in range(REAL_SAMPLES)),
        _values(*(bad[name] for name in names)),
        _classify(*(x[name][0].astype(float) for name in names)),
        "counts",
    )
    assert _ok(replies[0])["input_names"] == names
    results = [_ok(r) for r in replies[1 : REAL_SAMPLES + 1]]
    _assert_same_results(results, expected)
    assert len(set(expected.exit_indices.tolist())) == 3
    out_of_range, floats = replies[REAL_SAMPLES + 1 : REAL_SAMPLES + 3]
    assert out_of_range["message"].startswith(
        f"Input 'tokens' holds {TOKEN_VOCABULARY} at element 5; its values are in"
    )
    assert floats["message"].startswith(
        f"Input '{names[0]}' takes 8 int32 values (shape [1, 8]) as an IntArray; "
        "received a FloatArray of 8."
    )
    counts = np.bincount(expected.exit_indices, minlength=3).tolist()
    assert replies[-1]["exit_counts"] == counts  # the refused ones did not run
