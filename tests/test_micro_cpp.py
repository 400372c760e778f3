"""The C++ runner in tflite/micro: its host unit test (arithmetic segments),
and the runner compiled with a config generated from a real bundle, whose
values must match manifest.json. Needs g++ and make."""

import os
import shutil
import subprocess

import pytest
from _micro_bundle import small_c_arrays, small_int8_bundle

from keras_earlyexit.export import read_manifest

MICRO_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "tflite", "micro")

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or shutil.which("make") is None,
    reason="g++ and make are needed to build the C++ runner's host tests",
)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> str:
    # Outside the source tree; one per test process (backend).
    return str(tmp_path_factory.mktemp("micro_build"))


def _make(target: str, build_dir: str, **variables) -> str:
    command = ["make", "-s", "-C", MICRO_DIR, target, f"BUILD={build_dir}"]
    command += [f"{k}={v}" for k, v in variables.items()]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_runner_unit_test_passes(build_dir):
    out = _make("test", build_dir)
    assert "runner_test: all" in out and "checks passed" in out, out


def test_runner_with_a_generated_config(build_dir, tmp_path_factory):
    root = str(tmp_path_factory.getbasetemp())
    manifest = read_manifest(small_int8_bundle(root))
    out = _make("config_check", build_dir, CONFIG_DIR=small_c_arrays(root))
    lines = [line.split() for line in out.splitlines()]
    model = next(line for line in lines if line[0] == "model")
    assert int(model[1]) == len(manifest.segments)
    assert int(model[2]) == manifest.num_classes
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
            assert float(got[7]) == pytest.approx(t.scale, rel=1e-6)
            assert int(got[8]) == t.zero_point
    assert "init ok" in out
    # The routing over the real config, computed here from the manifest: for
    # each k, confidences one step below the thresholds before k, at it at k.
    quantized = [s.gate.threshold_quantized for s in manifest.segments]
    routes = [line for line in lines if line[0] == "route"]
    assert len(routes) == len(quantized)
    for k, route in enumerate(routes):
        expected = len(quantized) - 1
        for j, q in enumerate(quantized[:-1]):
            confidence = min(max(q - 1 if j < k else q, -128), 127)
            if confidence >= q:
                expected = j
                break
        assert int(route[2]) == expected, (k, route)
    assert {int(r[2]) for r in routes} != {len(quantized) - 1}, (
        "the test bundle should let some sample leave early"
    )


_TFLM_VARIABLES = ("TFLM_DIR", "FLATBUFFERS_DIR", "GEMMLOWP_DIR", "RUY_DIR")
needs_tflm_sources = pytest.mark.skipif(
    not all(os.environ.get(k) for k in _TFLM_VARIABLES),
    reason="set TFLM_DIR, FLATBUFFERS_DIR, GEMMLOWP_DIR and RUY_DIR to source "
    "trees of tflite-micro, flatbuffers (v25.9), gemmlowp and ruy to build the "
    "runner with TensorFlow Lite Micro",
)


def _tflm_variables() -> dict:
    return {k: os.environ[k] for k in _TFLM_VARIABLES}


@needs_tflm_sources
def test_tflm_adapter_compiles_against_tflite_micro(build_dir, tmp_path_factory):
    root = str(tmp_path_factory.getbasetemp())
    _make("syntax", build_dir, CONFIG_DIR=small_c_arrays(root), **_tflm_variables())


@needs_tflm_sources
def test_tflm_runner_matches_the_python_micro_backend(build_dir, tmp_path_factory):
    """The C++ runner on TensorFlow Lite Micro takes the same exits, classes
    and confidences as `GatedInterpreter(backend="micro")`, sample by sample.
    Builds a small TFLM library unless TFLM_LIB names a prebuilt one."""
    pytest.importorskip("tflite_micro")
    import numpy as np

    import keras_earlyexit as kee
    from keras_earlyexit import demo
    from keras_earlyexit.runtime.gated import quantize

    root = str(tmp_path_factory.getbasetemp())
    bundle = small_int8_bundle(root)
    variables = _tflm_variables()
    library = os.environ.get("TFLM_LIB")
    if not library:
        _make("tflm_lib", build_dir, **variables)
        library = os.path.join(build_dir, "libtflm.a")
    _make(
        "host_main",
        build_dir,
        CONFIG_DIR=small_c_arrays(root),
        TFLM_LIB=library,
        **variables,
    )
    x = demo.load_digits(seed=0).x_test
    spec = read_manifest(bundle).segments[0].inputs[0]
    samples = os.path.join(root, "samples.bin")
    quantize(x, spec.scale, spec.zero_point).tofile(samples)
    proc = subprocess.run(
        [os.path.join(build_dir, "host_main"), samples],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.array([line.split() for line in proc.stdout.splitlines()], float)
    expected = kee.runtime.GatedInterpreter(bundle, backend="micro").predict(x)
    assert len(got) == len(x)
    np.testing.assert_array_equal(got[:, 0], expected.classes)
    np.testing.assert_array_equal(got[:, 1], expected.exit_indices)
    np.testing.assert_allclose(got[:, 2], expected.confidences, rtol=1e-6)
    assert len(np.unique(expected.exit_indices)) == 3  # every exit and carry
