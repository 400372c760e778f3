"""A small int8 bundle and its C arrays, made once per test process and
shared by test_c_arrays.py and test_micro_cpp.py."""

import functools
import os

import keras

import keras_earlyexit as kee
from keras_earlyexit import demo


def _small_int8_export(path: str, fused: bool) -> str:
    """An untrained width-4 digits CNN, exported int8 to `path`. The
    thresholds are low, so that int8 thresholds are reachable and every
    exit (and carry) occurs."""
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=4)
    model.set_thresholds([0.12, 0.11])
    x = demo.load_digits(seed=0).x_val[:64]
    return kee.export.to_tflite(
        model,
        path,
        representative_data=x,
        quantization="int8",
        fused=fused,
        verbose=0,
    )


@functools.cache
def small_int8_bundle(root: str) -> str:
    """The small int8 digits CNN as a bundle under `root`."""
    return _small_int8_export(os.path.join(root, "bundle"), fused=False)


@functools.cache
def small_int8_fused(root: str) -> str:
    """The same model (seed, thresholds, calibration data) as an int8
    fused file under `root`."""
    return _small_int8_export(os.path.join(root, "fused_int8.tflite"), fused=True)


@functools.cache
def small_c_arrays(root: str) -> str:
    from keras_earlyexit.export.c_arrays import to_c_arrays

    return to_c_arrays(small_int8_bundle(root), os.path.join(root, "c_arrays"))


@functools.cache
def single_segment_bundle(root: str) -> str:
    """`small_int8_bundle` cut after its first exit: a valid one-segment
    bundle (a Keras EarlyExitModel always has two exits or more)."""
    import json
    import shutil

    source = small_int8_bundle(root)
    target = os.path.join(root, "single_segment_bundle")
    with open(os.path.join(source, "manifest.json")) as f:
        manifest = json.load(f)
    first = manifest["segments"][0]
    first["carry_out"] = []  # its carry outputs stay, unused
    manifest["segments"] = [first]
    manifest["exit_names"] = [first["exit_name"]]
    os.makedirs(target)
    shutil.copy(os.path.join(source, first["file"]), target)
    with open(os.path.join(target, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return target
