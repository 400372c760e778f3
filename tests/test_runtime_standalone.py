"""The runtime on a device host: NumPy and an interpreter, nothing else.

Bundles are made here with Keras; a child process then runs them with
keras, tensorflow, jax and torch made unimportable (a `sys.meta_path`
finder that raises `ImportError` for them, as on a Raspberry Pi with
`pip install keras-earlyexit[runtime]` alone).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_earlyexit as kee
from keras_earlyexit import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("keras", "tensorflow", "jax", "jaxlib", "torch", "tf_keras")

# Installs the finder before anything else is imported.
DEVICE_HOST = f"""
import sys

class DeviceHost:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ImportError(f"No module named {{name!r}} on this device host")
        return None

sys.meta_path.insert(0, DeviceHost())
"""

RUN_BUNDLES = """
import json
import numpy as np
import keras_earlyexit as kee
from keras_earlyexit.runtime import GatedInterpreter

bundles, data = json.loads(sys.argv[1]), np.load(sys.argv[2])
results = {}
for name, path in bundles.items():
    for backend in ("litert", "micro"):
        result = GatedInterpreter(path, backend=backend).predict(data["x"])
        results[f"{name}-{backend}"] = [a.tolist() for a in result]
try:
    kee.EarlyExitModel
    keras_side = "imported"
except ImportError as e:
    keras_side = str(e)
print(json.dumps({
    "results": results,
    "keras_side": keras_side,
    "same_class": kee.runtime.GatedInterpreter is GatedInterpreter,
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED),
}))
"""


def _device_host(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", DEVICE_HOST + f"BLOCKED = {BLOCKED!r}\n" + script]
        + list(args),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    """An untrained width-4 digits CNN as int8 and float32 bundles."""
    root = tmp_path_factory.mktemp("standalone")
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4)
    x = demo.load_digits(seed=0).x_val[:64]
    # Median confidences as thresholds: samples leave at every exit, and
    # carries cross segments (whatever the backend's initial weights).
    logits = model.predict(x, verbose=0)[:2]
    confidences = [keras.ops.convert_to_numpy(keras.ops.softmax(z)) for z in logits]
    model.set_thresholds([float(np.median(c.max(axis=-1))) for c in confidences])
    return {
        mode: kee.export.to_tflite(
            model,
            str(root / mode),
            representative_data=x,
            quantization=mode,
            verbose=0,
        )
        for mode in ("int8", "float32")
    }


def test_import_without_keras_or_a_backend():
    proc = _device_host(
        "import keras_earlyexit as kee\n"
        "import keras_earlyexit.runtime\n"
        "print(kee.__version__, sorted(kee.runtime.BACKENDS))\n"
        "import keras\n"
    )
    # The finder works (the last line fails), after the package imported.
    assert "No module named 'keras' on this device host" in proc.stderr
    assert proc.stdout.split()[0] == kee.__version__


def test_gated_interpreter_runs_without_keras_or_a_backend(bundles, tmp_path):
    pytest.importorskip("tflite_micro")
    x = demo.load_digits(seed=0).x_test[:40]
    np.savez(tmp_path / "x.npz", x=x)
    proc = _device_host(RUN_BUNDLES, json.dumps(bundles), str(tmp_path / "x.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert "No module named 'keras' on this device host" in report["keras_side"]
    assert report["same_class"]
    for name, path in bundles.items():
        for backend in ("litert", "micro"):
            here = kee.runtime.GatedInterpreter(path, backend=backend).predict(x)
            there = report["results"][f"{name}-{backend}"]
            np.testing.assert_array_equal(there[0], here.classes)
            np.testing.assert_array_equal(there[1], here.exit_indices)
            np.testing.assert_allclose(there[2], here.confidences, rtol=1e-6)
    # Samples left at several exits, some after carries crossed segments.
    for result in report["results"].values():
        assert len(set(result[1])) >= 2 and max(result[1]) >= 1
