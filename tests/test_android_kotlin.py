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
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from keras_earlyexit.runtime.manifest import (
    MANIFEST_NAME,
    GateInfo,
    Manifest,
    SegmentInfo,
    TensorInfo,
    quantize_threshold,
    sha256_of,
)

ANDROID_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "tflite", "android")
CLASSIFIER = os.path.join(
    ANDROID_DIR, "src/main/kotlin/io/github/kerasearlyexit/EarlyExitClassifier.kt"
)
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
        + ["-d", jar, CLASSIFIER, DRIVER],
    ]
    for command in commands:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return f"{jar}:{classes}:{ANDROID_JSON_JAR}"


def _run(classpath: str, root: str, *commands: str) -> list[dict]:
    """Runs the driver on `commands`; one reply per command."""
    proc = subprocess.run(
        ["java", "-cp", classpath, "io.github.kerasearlyexit.host.HostRunnerKt", root],
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
    data["segments"][0]["inputs"][0]["dtype"] = "int32"


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_threshold_quantized, "gives exit 1 (segment_1.tflite) no threshold_q"),
        (_stale_scale, "says tensor 'g' of segment_2.tflite is int8 of shape [1, 5]"),
        (_position_out_of_range, "inputs of segment_3.tflite at positions [1]"),
        (_logits_size, "segment_1.tflite has 4 logits; manifest.json says num_cl"),
        (_unsupported_dtype, "'x' of segment_1.tflite has dtype int32"),
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


def test_manifest_fields_read_are_in_the_schema():
    """Every manifest key the Kotlin class reads is a field of the schema in
    keras_earlyexit/runtime/manifest.py."""
    with open(CLASSIFIER) as f:
        source = f.read()
    read = set(re.findall(r'\b(?:get\w*|opt\w*|isNull)\("(\w+)"\)', source))
    schema = {
        f.name
        for cls in (Manifest, SegmentInfo, TensorInfo, GateInfo)
        for f in dataclasses.fields(cls)
    }
    assert {"threshold_quantized", "zero_point", "sha256", "exit_names"} <= read
    assert read <= schema, read - schema
