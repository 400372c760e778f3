"""Data-parallel training on existing engines: JAX DataParallel over 2 host
devices, tf.distribute.MirroredStrategy over 2 logical CPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "distributed_loss.py"


def _run(mode: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["jax", "tensorflow"])
def test_two_device_loss_equals_single_device(mode):
    if keras.backend.backend() != mode:
        pytest.skip(f"{mode} data parallelism is checked in the {mode} run")
    result = _run(mode)
    assert result["trained"]
    for key, value in result["single"].items():
        np.testing.assert_allclose(result["distributed"][key], value, rtol=1e-5)
