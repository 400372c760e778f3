"""`set_thresholds`: new exit thresholds for an exported model, without
converting again.

A bundle keeps its thresholds (and, for criterion `"patience"`, its
patience) in `manifest.json` (float and quantized); a fused `.tflite` keeps
them as constants of its graph and in its embedded manifest, with the
file's hash. Either is rewritten whole into a temporary
file next to it and renamed into place, so a reader sees the old model or
the new one, never a mixture, and a rejected call changes nothing.
"""

import os

import numpy as np

from keras_earlyexit.export import flatbuffer
from keras_earlyexit.export.fused import finish, write_atomic
from keras_earlyexit.runtime.fused import (
    check_thresholds,
    gate_constant,
    read_fused_manifest,
)
from keras_earlyexit.runtime.gated import check_patience
from keras_earlyexit.runtime.manifest import (
    MANIFEST_NAME,
    BundleError,
    quantize_threshold,
    read_manifest,
)


def set_thresholds(path: str, thresholds, patience: int | None = None) -> list[float]:
    """Rewrites the exit thresholds of a bundle or of a fused file.

    Args:
        path: a bundle directory (`to_tflite(model, directory)`) or a fused
            `.tflite` file (`to_tflite(model, "model.tflite", fused=True)`).
        thresholds: one float in [0, 1] per non-final exit (1.0: no sample
            leaves there). Int8 models get the quantized form of each. For
            criterion `"patience"` these are the confidence floors.
        patience: for models exported with criterion `"patience"`, a new
            patience, an int in [1, number of exits]; default: unchanged.

    Returns:
        The thresholds written.

    Raises:
        ValueError: a wrong count, NaN, or a value outside [0, 1]; a
            patience out of range, or for another criterion.
        BundleError: `path` is not a bundle or a fused model, or fails its
            checks (a `FusedModelError` for fused files). Nothing is
            written then.

    Example:

    ```python
    kee.export.set_thresholds("digits.tflite", [0.8, 0.6])
    kee.runtime.GatedInterpreter("digits.tflite").thresholds  # [0.8, 0.6]
    ```
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _set_bundle(path, thresholds, patience)
    if not os.path.isfile(path):
        raise BundleError(
            f"{path!r} does not exist. Give a bundle directory or a fused "
            ".tflite file written by kee.export.to_tflite."
        )
    return _set_fused(path, thresholds, patience)


def _set_bundle(directory: str, thresholds, patience) -> list[float]:
    manifest = read_manifest(directory)  # checks every segment's sha256
    thresholds = check_thresholds(thresholds, len(manifest.segments))
    if patience is not None:
        manifest.patience = check_patience(
            patience, manifest.criterion, len(manifest.segments)
        )
    for segment, threshold in zip(manifest.segments, thresholds):
        gate = segment.gate
        gate.threshold = threshold
        confidence = segment.output("confidence")
        if confidence.quantized:
            gate.threshold_quantized = quantize_threshold(
                threshold, confidence.scale, confidence.zero_point
            )
    # Only the manifest changes: the segment files and their hashes stay.
    write_atomic(os.path.join(directory, MANIFEST_NAME), manifest.to_json().encode())
    return thresholds


def _set_fused(path: str, thresholds, patience) -> list[float]:
    with open(path, "rb") as f:
        data = f.read()
    manifest = read_fused_manifest(data, path)  # checks format and hash
    thresholds = check_thresholds(thresholds, manifest.num_exits)
    model = flatbuffer._schema().ModelT.InitFromPackedBuf(data, 0)
    if patience is not None:
        manifest.patience = check_patience(
            patience, manifest.criterion, manifest.num_exits
        )
        for exit in manifest.exits[:-1]:
            model.buffers[exit.patience_buffer].data = np.frombuffer(
                np.float32(manifest.patience).tobytes(), np.uint8
            )
    for exit, threshold in zip(manifest.exits, thresholds):
        value = gate_constant(exit, threshold)
        exit.gate.threshold = threshold
        if exit.quantized:
            exit.gate.threshold_quantized = value
        dtype = np.int32 if exit.quantized else np.float32
        model.buffers[exit.threshold_buffer].data = np.frombuffer(
            np.array([value], dtype).tobytes(), np.uint8
        )
    write_atomic(path, finish(model, manifest))
    return thresholds
