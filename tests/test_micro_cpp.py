"""The C++ runner in tflite/micro, built with its Makefile, plain and with
-fsanitize=address,undefined:

- its unit test (arithmetic segments) and the runner over a config
  generated from a real bundle, whose values must match manifest.json;
- with TensorFlow Lite Micro's sources (TFLM_DIR, FLATBUFFERS_DIR,
  GEMMLOWP_DIR, RUY_DIR; `.ci/run` sets them when ../shared/third_party
  exists), the runner on real TFLite Micro: sample by sample equal to
  `GatedInterpreter(backend="micro")` on digits for several gate criteria,
  its error paths, and the firmware example; and a fused file in a plain
  `MicroInterpreter` (FusedRunner), equal to `FusedInterpreter(backend=
  "micro")` and to the segment bundle, with its error paths.

The host TFLite Micro libraries are built once into build/tflite-micro/ of
the project (make skips them when up to date). The C++ code does not depend
on the Keras backend: these tests run in the KERAS_BACKEND=tensorflow
process only. Needs g++ and make.
"""

import fcntl
import hashlib
import os
import re
import shutil
import subprocess

import keras
import numpy as np
import pytest
from _micro_bundle import (
    TOKEN_VOCABULARY,
    patience_int8_bundle,
    patience_int8_fused,
    single_segment_bundle,
    small_c_arrays,
    small_int8_bundle,
    small_int8_fused,
    token_int8_bundle,
    token_int8_fused,
    token_samples,
)

from keras_earlyexit import demo
from keras_earlyexit.export import read_manifest
from keras_earlyexit.runtime.manifest import quantize_threshold

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
MICRO_DIR = os.path.join(ROOT, "tflite", "micro")
LIBRARY_ROOT = os.path.join(ROOT, "build", "tflite-micro")
SANITIZE = "address,undefined"

pytestmark = [
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="the C++ runner does not depend on the Keras backend: its tests "
        "run in the KERAS_BACKEND=tensorflow process",
    ),
    pytest.mark.skipif(
        shutil.which("g++") is None or shutil.which("make") is None,
        reason="g++ and make are needed to build the C++ runner's host tests",
    ),
]

_TFLM_VARIABLES = ("TFLM_DIR", "FLATBUFFERS_DIR", "GEMMLOWP_DIR", "RUY_DIR")


def _make(target: str, build_dir: str, sanitize: str, **variables) -> str:
    command = ["make", "-s", "-j2", "-C", MICRO_DIR, target, f"BUILD={build_dir}"]
    command.append(f"SANITIZE={sanitize}")
    command += [f"{k}={v}" for k, v in variables.items()]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module", params=["plain", "sanitized"])
def sanitize(request, tmp_path_factory) -> str:
    """ "" or SANITIZE: each C++ test runs in both builds."""
    if request.param == "plain":
        return ""
    probe = tmp_path_factory.mktemp("sanitizer_probe")
    source = probe / "probe.cc"
    source.write_text("int main() { return 0; }\n")
    proc = subprocess.run(
        ["g++", f"-fsanitize={SANITIZE}", str(source), "-o", str(probe / "probe")],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"g++ cannot build with -fsanitize={SANITIZE}: {proc.stderr}")
    return SANITIZE


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> str:
    # Per-config programs: outside the source tree, one per test process.
    return str(tmp_path_factory.mktemp("micro_build"))


def _build_dir(build_root: str, name: str, sanitize: str) -> str:
    return os.path.join(build_root, f"{name}-{'sanitized' if sanitize else 'plain'}")


def test_runner_unit_test_passes(build_root, sanitize):
    out = _make("test", _build_dir(build_root, "unit", sanitize), sanitize)
    assert re.search(r"runner_test: all \d+ checks passed", out), out


# Int8 bundles whose generated config config_check reads: max_prob, the
# patience criterion (p = 2) and int32 token inputs with a padding mask.
CONFIG_BUNDLES = {
    "max_prob": small_int8_bundle,
    "patience": patience_int8_bundle,
    "tokens": token_int8_bundle,
}


def _c_arrays(root: str, kind: str, bundle: str) -> str:
    """`to_c_arrays` of `bundle` under `root`, written once per kind."""
    from keras_earlyexit.export.c_arrays import to_c_arrays

    config = os.path.join(root, f"c_arrays_{kind}")
    if not os.path.isdir(config):
        to_c_arrays(bundle, config)
    return config


@pytest.mark.parametrize("kind", list(CONFIG_BUNDLES))
def test_runner_with_a_generated_config(kind, build_root, sanitize, tmp_path_factory):
    root = str(tmp_path_factory.getbasetemp())
    bundle = CONFIG_BUNDLES[kind](root)
    manifest = read_manifest(bundle)
    build_dir = _build_dir(build_root, f"config_{kind}", sanitize)
    config = (
        small_c_arrays(root) if kind == "max_prob" else _c_arrays(root, kind, bundle)
    )
    out = _make("config_check", build_dir, sanitize, CONFIG_DIR=config)
    lines = [line.split() for line in out.splitlines()]
    model = next(line for line in lines if line[0] == "model")
    assert int(model[1]) == len(manifest.segments)
    assert int(model[2]) == manifest.num_classes
    patience = manifest.patience or 0
    assert ["criterion", manifest.criterion, str(patience), str(patience)] in lines
    # int32 inputs: the manifest's value_range, or all of int32.
    ranges = {
        line[1]: [int(v) for v in line[2:]] for line in lines if line[0] == "range"
    }
    int32_inputs = [t for t in manifest.segments[0].inputs if t.dtype == "int32"]
    assert ranges == {
        t.name: t.value_range or [-(2**31), 2**31 - 1] for t in int32_inputs
    }
    if kind == "tokens":
        assert ranges["tokens"] == [0, TOKEN_VOCABULARY - 1]
    segments = [line for line in lines if line[0] == "segment"]
    tensors = {
        (int(line[1]), line[2], line[3]): line for line in lines if line[0] == "tensor"
    }
    for s, line in zip(manifest.segments, segments):
        k = s.index
        assert line[2] == s.exit_name
        assert int(line[3]) == s.size_bytes
        assert line[4] == "1", "model data lacks the TFL3 identifier"
        assert float(line[5]) == pytest.approx(s.gate.threshold, rel=1e-6)
        assert int(line[6]) == s.gate.threshold_quantized
        assert int(line[7]) == s.macs
        checks = [("input", t) for t in s.inputs]
        checks += [
            ("logits", s.output("logits")),
            ("confidence", s.output("confidence")),
        ]
        if k + 1 < len(manifest.segments):
            for target in manifest.segments[k + 1].inputs:
                checks.append(("carry_source", s.output(target.name)))
                checks.append(("carry_target", target))
        for role, t in checks:
            got = tensors[(k, role, t.name)]
            assert int(got[4]) == t.position, (role, t.name)
            assert [int(d) for d in got[9:]] == t.shape
            assert float(got[7]) == pytest.approx(t.scale or 0.0, rel=1e-6)
            assert int(got[8]) == (t.zero_point or 0)
    assert "init ok" in out
    # The routing over the real config, computed here from the manifest: for
    # each k, confidences one step below the thresholds before k, at it at k.
    # Every exit predicts class 0 there: the streak at exit j is j + 1.
    quantized = [s.gate.threshold_quantized for s in manifest.segments]
    routes = [line for line in lines if line[0] == "route"]
    assert len(routes) == len(quantized)
    for k, route in enumerate(routes):
        expected = len(quantized) - 1
        for j, q in enumerate(quantized[:-1]):
            confidence = min(max(q - 1 if j < k else q, -128), 127)
            if confidence >= q and j + 1 >= patience:
                expected = j
                break
        assert int(route[2]) == expected, (k, route)
    assert {int(r[2]) for r in routes} != {len(quantized) - 1}, (
        "the test bundle should let some sample leave early"
    )


def test_quantized_thresholds_match_python(build_root, tmp_path_factory):
    """C++ `QuantizeThreshold` (what `SetThresholds` uses) and Python's
    `quantize_threshold` (what the manifest holds) give the same int8
    threshold for every float32 on or next to an int8 level of each exit's
    confidence, and for random ones."""
    root = str(tmp_path_factory.getbasetemp())
    manifest = read_manifest(small_int8_bundle(root))
    build_dir = _build_dir(build_root, "config", "")
    _make("config_check", build_dir, "", CONFIG_DIR=small_c_arrays(root))
    exits = [s.output("confidence") for s in manifest.segments[:-1]]
    candidates = [np.random.default_rng(0).random(500, np.float32)]
    for c in exits:
        levels = (np.arange(-128, 128) - c.zero_point).astype(np.float32)
        levels *= np.float32(c.scale)
        for direction in (-1.0, 0.0, 2.0):
            candidates.append(np.nextafter(levels, np.float32(direction)))
    thresholds = np.concatenate(candidates + [np.float32([0.0, 1.0])])
    thresholds = thresholds[(thresholds >= 0) & (thresholds <= 1)]
    path = os.path.join(root, "thresholds.bin")
    thresholds.astype(np.float32).tofile(path)
    proc = subprocess.run(
        [os.path.join(build_dir, "config_check"), path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    got = [
        tuple(int(v) for v in line.split()[1:])
        for line in proc.stdout.splitlines()
        if line.startswith("quantized ")
    ]
    expected = [
        (k, i, quantize_threshold(float(t), c.scale, c.zero_point))
        for i, t in enumerate(thresholds)
        for k, c in enumerate(exits)
    ]
    assert sorted(got) == sorted(expected)


# --- On real TensorFlow Lite Micro ------------------------------------------
@pytest.fixture(scope="module")
def tflm_variables() -> dict:
    missing = [k for k in _TFLM_VARIABLES if not os.environ.get(k)]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not set: set TFLM_DIR, FLATBUFFERS_DIR, "
            "GEMMLOWP_DIR and RUY_DIR to source trees of tflite-micro, "
            "flatbuffers (v25.9), gemmlowp and ruy to build the runner with "
            "TensorFlow Lite Micro (.ci/run does when ../shared/third_party "
            "exists)"
        )
    return {k: os.path.abspath(os.environ[k]) for k in _TFLM_VARIABLES}


@pytest.fixture(scope="module")
def tflm(tflm_variables, sanitize, build_root) -> dict:
    """Make variables for programs on TFLite Micro: the sources, and the
    host library (and runner objects) built once per source trees and
    sanitizer setting in the project's build folder, reused when up to
    date; a file lock keeps concurrent test runs from building it at once."""
    key = hashlib.sha256(repr(sorted(tflm_variables.items())).encode()).hexdigest()
    variant = "sanitized" if sanitize else "plain"
    library = os.path.join(LIBRARY_ROOT, f"{key[:12]}-{variant}")
    os.makedirs(library, exist_ok=True)
    variables = dict(tflm_variables, TFLM_BUILD=library)
    with open(os.path.join(LIBRARY_ROOT, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _make("tflm_lib", library, sanitize, **variables)
    # Runner objects: per test process, shared by its programs.
    variables["OBJ"] = _build_dir(build_root, "objects", sanitize)
    return variables


def _criterion_bundle(root: str, criterion: str, thresholds: list[float]) -> str:
    """An untrained width-4 digits CNN as an int8 bundle with `criterion`
    and temperatures other than 1 (a MUL before each gate's softmax)."""
    import keras_earlyexit as kee

    path = os.path.join(root, f"{criterion}_bundle")
    if os.path.isdir(path):
        return path
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4, criterion=criterion)
    model.set_temperatures([0.5, 0.8, 1.5])
    model.set_thresholds(thresholds)
    x = demo.load_digits(seed=0).x_val[:64]
    return kee.export.to_tflite(
        model, path, representative_data=x, quantization="int8", verbose=0
    )


BUNDLES = {
    "max_prob": small_int8_bundle,
    # Untrained: low thresholds, so that every exit and carry occurs.
    "entropy": lambda root: _criterion_bundle(root, "entropy", [0.004, 0.003]),
    "margin": lambda root: _criterion_bundle(root, "margin", [0.02, 0.015]),
    "single_segment": single_segment_bundle,
}


def _samples(bundle: str, root: str) -> tuple[np.ndarray, str]:
    from keras_earlyexit.runtime.gated import quantize

    x = demo.load_digits(seed=0).x_test
    spec = read_manifest(bundle).segments[0].inputs[0]
    path = os.path.join(root, "samples.bin")
    quantize(x, spec.scale, spec.zero_point).tofile(path)
    return x, path


def _run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("kind", list(BUNDLES))
def test_tflm_runner_matches_the_python_micro_backend(
    kind, tflm, sanitize, build_root, tmp_path_factory
):
    """The C++ runner on TensorFlow Lite Micro takes the same exits, classes
    and confidences as `GatedInterpreter(backend="micro")`, sample by
    sample, with the bundle's thresholds and with thresholds set before
    Init."""
    pytest.importorskip("tflite_micro")
    from keras_earlyexit.export.c_arrays import to_c_arrays
    from keras_earlyexit.runtime import GatedInterpreter

    root = str(tmp_path_factory.getbasetemp())
    bundle = BUNDLES[kind](root)
    config = os.path.join(root, f"c_arrays_{kind}")
    if not os.path.isdir(config):
        to_c_arrays(bundle, config)
    build_dir = _build_dir(build_root, f"host_main_{kind}", sanitize)
    _make("host_main", build_dir, sanitize, CONFIG_DIR=config, **tflm)
    x, samples = _samples(bundle, str(tmp_path_factory.mktemp(kind)))
    manifest = read_manifest(bundle)
    # The bundle's thresholds, then lower ones (more early exits).
    threshold_sets = [None]
    if len(manifest.segments) > 1:
        threshold_sets.append([t * 0.8 for t in manifest.thresholds])
    for thresholds in threshold_sets:
        command = [os.path.join(build_dir, "host_main"), samples]
        bundle_thresholds = thresholds is None
        if thresholds is not None:
            command.append(",".join(f"{t:.9g}" for t in thresholds))
            thresholds = [float(np.float32(f"{t:.9g}")) for t in thresholds]
        proc = _run(command)
        got = np.array([line.split() for line in proc.stdout.splitlines()], float)
        expected = GatedInterpreter(
            bundle, backend="micro", thresholds=thresholds
        ).predict(x)
        assert len(got) == len(x)
        np.testing.assert_array_equal(got[:, 0], expected.classes)
        np.testing.assert_array_equal(got[:, 1], expected.exit_indices)
        np.testing.assert_allclose(got[:, 2], expected.confidences, rtol=1e-6)
        if bundle_thresholds:  # every exit and every carry is used
            assert len(np.unique(expected.exit_indices)) == len(manifest.segments)


def test_tflm_error_paths(tflm, sanitize, build_root, tmp_path_factory):
    """Arenas too small (16 bytes to kArenaSize - 16, misaligned, null),
    configs that disagree with the model data (scale, zero-point, dtype,
    positions, carry targets, truncated flatbuffers), thresholds set before
    Init and NaN input: each returns a Status, none crashes."""
    root = str(tmp_path_factory.getbasetemp())
    build_dir = _build_dir(build_root, "tflm_test", sanitize)
    out = _make(
        "tflm_test", build_dir, sanitize, CONFIG_DIR=small_c_arrays(root), **tflm
    )
    assert re.search(r"tflm_test: all \d+ checks passed", out), out


@pytest.mark.parametrize("quantization", ["int8", "float32"])
def test_firmware_example_on_tflite_micro(
    quantization, tflm, sanitize, build_root, tmp_path_factory
):
    """examples/main.cc feeds its float sample as the bundle takes it:
    quantized for int8 bundles, as floats for float32 bundles; its answer
    is the Python micro backend's for the same sample."""
    pytest.importorskip("tflite_micro")
    import keras_earlyexit as kee
    from keras_earlyexit.export.c_arrays import to_c_arrays
    from keras_earlyexit.runtime import GatedInterpreter

    root = str(tmp_path_factory.getbasetemp())
    if quantization == "int8":
        bundle = small_int8_bundle(root)
    else:
        bundle = os.path.join(root, "float32_bundle")
        if not os.path.isdir(bundle):
            keras.utils.set_random_seed(0)
            model = demo.digits_cnn(width=4)
            model.set_thresholds([0.12, 0.11])
            x = demo.load_digits(seed=0).x_val[:64]
            kee.export.to_tflite(
                model, bundle, representative_data=x, quantization="float32", verbose=0
            )
    config = os.path.join(root, f"c_arrays_main_{quantization}")
    if not os.path.isdir(config):
        to_c_arrays(bundle, config)
    build_dir = _build_dir(build_root, f"main_{quantization}", sanitize)
    _make("main", build_dir, sanitize, CONFIG_DIR=config, **tflm)
    proc = _run([os.path.join(build_dir, "main")])
    match = re.search(
        r"class (\d+) from exit (\d+) \((\w+)\), confidence ([-\d.e]+)", proc.stderr
    )
    assert match, proc.stderr
    # The example's sample: value i is (i % 7) / 7 in float32.
    sample = (np.arange(64) % 7).astype(np.float32) / np.float32(7)
    expected = GatedInterpreter(bundle, backend="micro").predict_one(
        sample.reshape(8, 8, 1)
    )
    assert int(match.group(1)) == expected.label
    assert int(match.group(2)) == expected.exit_index
    assert float(match.group(4)) == pytest.approx(expected.confidence, abs=1e-6)


def test_fused_file_in_a_plain_micro_interpreter(
    tflm, sanitize, build_root, tmp_path_factory
):
    """The int8 fused file of the digits CNN, as `to_c_arrays` writes it,
    in a plain `MicroInterpreter` with the generated op list (IF included):
    one Invoke per sample gives the classes, exits and confidences of
    `FusedInterpreter(backend="micro")` and of the segment bundle's
    `GatedInterpreter`, sample by sample, from quantized and from float
    samples; FusedRunner's error paths return statuses; a NaN sample stops
    the example with its status."""
    pytest.importorskip("tflite_micro")
    from keras_earlyexit.export.c_arrays import to_c_arrays
    from keras_earlyexit.runtime import FusedInterpreter, GatedInterpreter
    from keras_earlyexit.runtime.gated import quantize

    root = str(tmp_path_factory.getbasetemp())
    fused = small_int8_fused(root)
    config = os.path.join(root, "c_arrays_fused")
    if not os.path.isdir(config):
        to_c_arrays(fused, config)
    with open(os.path.join(config, "earlyexit_fused_config.h")) as f:
        assert "OP(If)" in f.read()
    build_dir = _build_dir(build_root, "fused", sanitize)
    out = _make("fused_test", build_dir, sanitize, CONFIG_DIR=config, **tflm)
    assert re.search(r"fused_test: all \d+ checks passed", out), out
    _make("fused_main", build_dir, sanitize, CONFIG_DIR=config, **tflm)

    interpreter = FusedInterpreter(fused, backend="micro")
    expected = interpreter.predict(x := demo.load_digits(seed=0).x_test)
    bundle = GatedInterpreter(small_int8_bundle(root), backend="micro").predict(x)
    spec = interpreter.manifest.inputs[0]
    samples = str(tmp_path_factory.mktemp("fused_samples"))
    quantized = os.path.join(samples, "int8.bin")
    floats = os.path.join(samples, "float32.bin")
    quantize(x, spec.scale, spec.zero_point).tofile(quantized)
    x.astype(np.float32).tofile(floats)
    program = os.path.join(build_dir, "fused_main")
    for command in ([program, quantized], [program, floats, "--float"]):
        proc = _run(command)
        got = np.array([line.split() for line in proc.stdout.splitlines()], float)
        assert len(got) == len(x)
        for reference in (expected, bundle):
            np.testing.assert_array_equal(got[:, 0], reference.classes)
            np.testing.assert_array_equal(got[:, 1], reference.exit_indices)
            np.testing.assert_array_equal(
                got[:, 2].astype(np.float32), reference.confidences
            )
    assert len(np.unique(expected.exit_indices)) == interpreter.num_exits

    nan_sample = x[:2].astype(np.float32).copy()
    nan_sample[1, 3, 4, 0] = np.nan
    nan_path = os.path.join(samples, "nan.bin")
    nan_sample.tofile(nan_path)
    proc = subprocess.run(
        [program, nan_path, "--float"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stdout.splitlines()) == 1  # the first sample ran
    assert "run failed: " in proc.stderr and "NaN" in proc.stderr, proc.stderr


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _config_header(root: str, kind: str, bundle: str) -> tuple[str, str]:
    """`to_c_arrays` of a bundle, and its earlyexit_config.h."""
    config = _c_arrays(root, kind, bundle)
    return config, _read(os.path.join(config, "earlyexit_config.h"))


def _host_main(tflm, sanitize, build_root, config: str, name: str) -> str:
    build_dir = _build_dir(build_root, f"host_main_{name}", sanitize)
    _make("host_main", build_dir, sanitize, CONFIG_DIR=config, **tflm)
    return os.path.join(build_dir, "host_main")


def _results(proc: subprocess.CompletedProcess) -> np.ndarray:
    return np.array([line.split() for line in proc.stdout.splitlines()], float)


def _assert_same(got: np.ndarray, expected) -> None:
    assert len(got) == len(expected.classes)
    np.testing.assert_array_equal(got[:, 0], expected.classes)
    np.testing.assert_array_equal(got[:, 1], expected.exit_indices)
    np.testing.assert_array_equal(got[:, 2].astype(np.float32), expected.confidences)


def test_patience_bundle_on_tflite_micro(tflm, sanitize, build_root, tmp_path_factory):
    """A patience bundle (p = 2, floors 0.12 and 0.11) through to_c_arrays:
    the C++ runner keeps each sample's class and streak as
    `GatedInterpreter(backend="micro")` does, sample by sample, with the
    manifest's patience and with patience and floors set before Init; a
    patience outside [1, exits] is refused with its status."""
    pytest.importorskip("tflite_micro")
    from keras_earlyexit.runtime import GatedInterpreter

    root = str(tmp_path_factory.getbasetemp())
    bundle = patience_int8_bundle(root)
    config, header = _config_header(root, "patience", bundle)
    assert "inline constexpr int kPatience = 2;" in header
    program = _host_main(tflm, sanitize, build_root, config, "patience")
    x, samples = _samples(bundle, str(tmp_path_factory.mktemp("patience")))
    counts = {}
    for thresholds, patience in [(None, None), (None, 1), ([0.05, 0.05], 3)]:
        command = [program, samples]
        if thresholds is not None:
            command.append(",".join(f"{t:.9g}" for t in thresholds))
        if patience is not None:
            command += ["--patience", str(patience)]
        got = _results(_run(command))
        expected = GatedInterpreter(
            bundle, backend="micro", thresholds=thresholds, patience=patience
        ).predict(x)
        _assert_same(got, expected)
        counts[patience] = np.bincount(expected.exit_indices, minlength=3).tolist()
    # p = 2: no sample leaves exit 0 (a streak of 1), some leave exit 1; p = 1
    # is the floor alone; p = 3: every sample reaches the final exit.
    assert counts[None][0] == 0 and counts[None][1] > 0, counts
    assert counts[1][0] > 0, counts
    assert counts[3] == [0, 0, len(x)], counts
    for bad in ("0", "4", "-1", "two"):
        proc = subprocess.run(
            [program, samples, "--patience", bad], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert "patience: give an int from 1 to the number of exits" in proc.stderr
        assert proc.stdout == ""


def _token_sample_file(bundle: str, x: dict, path: str) -> str:
    """Each sample's inputs in the config's order (segment 1's in the
    manifest), int32 bytes, one sample after the other."""
    names = [t.name for t in read_manifest(bundle).segments[0].inputs]
    np.concatenate([x[name].astype("<i4") for name in names], axis=1).tofile(path)
    return path


def test_token_bundle_on_tflite_micro(tflm, sanitize, build_root, tmp_path_factory):
    """int32 token ids and padding masks through to_c_arrays: the config
    says int32 with the embedding's id range, the C++ runner (the mask
    carried as int32 from segment to segment) equals
    `GatedInterpreter(backend="micro")` sample by sample, an id outside
    [0, 19] stops host_main with its status, and tflm_test's token checks
    (wrong dtype or size, ids out of range, a config that says float32)
    return statuses."""
    pytest.importorskip("tflite_micro")
    from keras_earlyexit.runtime import GatedInterpreter

    root = str(tmp_path_factory.getbasetemp())
    bundle = token_int8_bundle(root)
    config, header = _config_header(root, "tokens", bundle)
    assert "earlyexit::DType::kInt32" in header
    assert f", 0, {TOKEN_VOCABULARY - 1}}}" in header
    program = _host_main(tflm, sanitize, build_root, config, "tokens")
    directory = str(tmp_path_factory.mktemp("tokens"))
    x = token_samples(120, seed=2)
    samples = _token_sample_file(bundle, x, os.path.join(directory, "ids.bin"))
    expected = GatedInterpreter(bundle, backend="micro").predict(x)
    _assert_same(_results(_run([program, samples])), expected)
    assert len(np.unique(expected.exit_indices)) == 3

    bad = {k: v[:3].copy() for k, v in x.items()}
    bad["tokens"][2, 0] = TOKEN_VOCABULARY
    path = _token_sample_file(bundle, bad, os.path.join(directory, "bad.bin"))
    proc = subprocess.run([program, path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stdout.splitlines()) == 2  # the samples before it ran
    assert "run failed: an int32 input value is outside the range" in proc.stderr

    build_dir = _build_dir(build_root, "tflm_test_tokens", sanitize)
    out = _make("tflm_test", build_dir, sanitize, CONFIG_DIR=config, **tflm)
    assert re.search(r"tflm_test: all \d+ checks passed", out), out


def test_patience_fused_file_in_a_plain_micro_interpreter(
    tflm, sanitize, build_root, tmp_path_factory
):
    """The fused file of the patience model computes the streak in its
    graph: FusedRunner reads its class, exit and confidence outputs as
    `FusedInterpreter(backend="micro")` and the patience bundle's
    `GatedInterpreter` give them, sample by sample."""
    pytest.importorskip("tflite_micro")
    from keras_earlyexit.runtime import FusedInterpreter, GatedInterpreter

    root = str(tmp_path_factory.getbasetemp())
    fused = patience_int8_fused(root)
    config = _c_arrays(root, "patience_fused", fused)
    header = _read(os.path.join(config, "earlyexit_fused_config.h"))
    assert "inline constexpr int kPatience = 2;" in header
    build_dir = _build_dir(build_root, "patience_fused", sanitize)
    _make("fused_main", build_dir, sanitize, CONFIG_DIR=config, **tflm)
    from keras_earlyexit.runtime.gated import quantize

    interpreter = FusedInterpreter(fused, backend="micro")
    x = demo.load_digits(seed=0).x_test
    spec = interpreter.manifest.inputs[0]
    samples = str(tmp_path_factory.mktemp("patience_fused") / "int8.bin")
    quantize(x, spec.scale, spec.zero_point).tofile(samples)
    got = _results(_run([os.path.join(build_dir, "fused_main"), samples]))
    expected = interpreter.predict(x)
    _assert_same(got, expected)
    bundle = GatedInterpreter(patience_int8_bundle(root), backend="micro").predict(x)
    _assert_same(got, bundle)
    assert set(expected.exit_indices.tolist()) == {1, 2}


def test_token_fused_file_in_a_plain_micro_interpreter(
    tflm, sanitize, build_root, tmp_path_factory
):
    """The token model's fused file (int32 ids and padding mask) in
    FusedRunner: the config says int32 with the ids' range, each sample's
    class, exit and confidence are those of `FusedInterpreter(backend=
    "micro")` and of the token bundle; an id outside the embedding and
    float samples are refused with their statuses."""
    pytest.importorskip("tflite_micro")
    from keras_earlyexit.runtime import FusedInterpreter, GatedInterpreter

    root = str(tmp_path_factory.getbasetemp())
    fused = token_int8_fused(root)
    config = _c_arrays(root, "tokens_fused", fused)
    header = _read(os.path.join(config, "earlyexit_fused_config.h"))
    assert re.search(
        rf'{{"tokens", \d, earlyexit::DType::kInt32, 2, {{1, 8}}, 32u, 0.0f, 0, 0, '
        rf"{TOKEN_VOCABULARY - 1}}}",
        header,
    ), header
    build_dir = _build_dir(build_root, "tokens_fused", sanitize)
    _make("fused_main", build_dir, sanitize, CONFIG_DIR=config, **tflm)
    program = os.path.join(build_dir, "fused_main")
    interpreter = FusedInterpreter(fused, backend="micro")
    names = [t.name for t in interpreter.manifest.inputs]
    directory = str(tmp_path_factory.mktemp("tokens_fused"))

    def sample_file(x: dict, name: str) -> str:
        path = os.path.join(directory, name)
        np.concatenate([x[n].astype("<i4") for n in names], axis=1).tofile(path)
        return path

    x = token_samples(120, seed=2)
    got = _results(_run([program, sample_file(x, "ids.bin")]))
    _assert_same(got, interpreter.predict(x))
    _assert_same(
        got, GatedInterpreter(token_int8_bundle(root), backend="micro").predict(x)
    )

    bad = {k: v[:2].copy() for k, v in x.items()}
    bad["tokens"][1, 3] = -1
    for command, message in [
        ([program, sample_file(bad, "bad.bin")], "an int32 input value is outside"),
        ([program, sample_file(x, "as_floats.bin"), "--float"], "Run needs a result"),
    ]:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert f"run failed: {message}" in proc.stderr, proc.stderr
