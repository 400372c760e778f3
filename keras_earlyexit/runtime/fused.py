"""`FusedInterpreter`: runs a fused gated `.tflite` file, one invoke per sample.

A fused file (written by `kee.export.to_tflite(..., fused=True)`) is one
TFLite model whose own graph gates itself: segment 1 runs, its confidence
is compared with the exit's threshold, and a TFLite IF either returns exit
1's result or runs segment 2 (and its gate and IF), and so on. The graph's
outputs, by signature name, are `"class"` (int32), `"exit_index"` (int32,
0-based), `"confidence"` (float32) and, if exported with them, `"logits"`
(float32, of the exit taken).

The manifest is embedded in the file as TFLite metadata (`METADATA_NAME`):
format version, exits, MACs, thresholds in float and in the form the graph
compares with, the confidence's quantization, input and output tensors, the
source model's hash and the file's own hash (`content_sha256`: of the whole
file, with the 64 characters of that hash written as zeros). Loading checks
all of it, so a file whose metadata is missing, or that was changed in any
byte (graph, weights or manifest) without `kee.export.set_thresholds`, gives
a `FusedModelError`.

Thresholds are constants of the graph: int8 files compare the int8
confidence, cast to int32, with the quantized threshold (128: never);
float files compare the float32 confidence with float32(threshold), or with
`FLOAT_NEVER` (2.0) for a threshold of 1.0, which no sample reaches.

Criterion `"patience"` (the manifest's `patience` is p, as in a bundle's
manifest): the graph keeps each sample's class (ARG_MAX of the exit's
logits) and streak (float32: the exits in a row with that class) from
segment to segment, through the IF inputs, and a sample leaves exit k when
its streak >= p and its confidence passes the floor threshold. p is a
float32 constant of each non-final exit's gate (`patience_buffer`), so that
`kee.export.set_thresholds` can rewrite it too.

Imports neither Keras nor TensorFlow: NumPy, the flatbuffer schema of
`ai_edge_litert` (or of `tflite_micro`) and the interpreter of the backend.
"""

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from keras_earlyexit.runtime.gated import (
    RuntimeStats,
    SampleResult,
    check_arguments,
    check_patience,
    prepare_inputs,
)
from keras_earlyexit.runtime.manifest import (
    PATIENCE,
    QUANTIZATION_MODES,
    RUNTIME_ARENA_MARGIN,
    BundleError,
    GateInfo,
    TensorInfo,
    quantize_threshold,
)
from keras_earlyexit.runtime.prediction import EarlyExitPrediction

FUSED_FORMAT = "keras-earlyexit-fused"
FUSED_FORMAT_VERSION = 1
# Name of the TFLite metadata entry (Model.metadata) holding the manifest.
METADATA_NAME = "keras_earlyexit"
OUTPUT_NAMES = ("class", "exit_index", "confidence", "logits")
# What a float graph compares with for a threshold of 1.0: above every
# confidence (they are clipped to [0, 1]).
FLOAT_NEVER = 2.0
# What the file's hash is computed with in place of itself.
HASH_PLACEHOLDER = "0" * 64
_HASH_KEY = b'"content_sha256":"'


class FusedModelError(BundleError):
    """A fused `.tflite` file that cannot be used: not a fused model,
    missing or tampered metadata, an unsupported format version."""


@dataclass
class FusedExit:
    """One exit of a fused model.

    Attributes:
        index: 0-based exit index (the `exit_index` output).
        exit_name: the Keras exit's name.
        macs: MACs of this exit's segment; `cumulative_macs` up to it.
        gate: criterion, temperature, threshold (float) and, for int8
            files, `threshold_quantized` (the int32 constant compared with).
        confidence_scale, confidence_zero_point: the int8 confidence's
            parameters inside the graph (None for float files).
        threshold_buffer: index of the buffer holding the threshold
            constant (None for the final exit, which has no gate).
        patience_buffer: criterion `"patience"`: index of the buffer
            holding p (float32) that the exit's streak is compared with
            (None for other criteria and for the final exit).
    """

    index: int
    exit_name: str
    macs: int
    cumulative_macs: int
    gate: GateInfo
    confidence_scale: float | None = None
    confidence_zero_point: int | None = None
    threshold_buffer: int | None = None
    patience_buffer: int | None = None

    @property
    def quantized(self) -> bool:
        return self.confidence_scale is not None


@dataclass
class FusedManifest:
    """The manifest embedded in a fused file."""

    quantization: str
    model_name: str
    num_classes: int
    criterion: str
    exit_names: list[str]
    boundary: str
    inputs: list[TensorInfo]
    outputs: list[str]
    exits: list[FusedExit]
    source_sha256: str
    patience: int | None = None
    arena_bytes: int | None = None
    arena_head_bytes: int | None = None
    content_sha256: str = HASH_PLACEHOLDER
    format: str = FUSED_FORMAT
    format_version: int = FUSED_FORMAT_VERSION

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def thresholds(self) -> list[float]:
        """One threshold per non-final exit."""
        return [e.gate.threshold for e in self.exits[:-1]]

    def output_position(self, name: str) -> int:
        """Position of a named output in the main subgraph's outputs."""
        if name not in self.outputs:
            raise FusedModelError(
                f"The fused model has no output named {name!r}; it has {self.outputs}."
            )
        return self.outputs.index(name)

    def to_json(self) -> str:
        # Compact: the text is stored in the model (flash on a device).
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "FusedManifest":
        data = dict(data)
        data["inputs"] = [TensorInfo(**t) for t in data["inputs"]]
        exits = []
        for e in data.pop("exits"):
            e = dict(e)
            e["gate"] = GateInfo(**e["gate"])
            exits.append(FusedExit(**e))
        return cls(exits=exits, **data)


def gate_constant(exit: FusedExit, threshold: float) -> int | float:
    """The value a fused graph's gate compares the confidence with.

    Int8: `quantize_threshold` of the confidence's parameters (128: never).
    Float: float32(threshold), or `FLOAT_NEVER` for 1.0.
    """
    if exit.quantized:
        return quantize_threshold(
            threshold, exit.confidence_scale, exit.confidence_zero_point
        )
    return float(np.float32(threshold)) if threshold < 1.0 else FLOAT_NEVER


def check_thresholds(thresholds, num_exits: int) -> list[float]:
    """Validated thresholds: one float in [0, 1] per non-final exit.

    Raises:
        ValueError: naming the problem (count, NaN, range, type).
    """
    try:
        values = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise ValueError(
            f"thresholds must be a list of {num_exits - 1} numbers in [0, 1] "
            f"(one per non-final exit); received {thresholds!r}."
        ) from None
    if len(values) != num_exits - 1:
        raise ValueError(
            f"Expected {num_exits - 1} thresholds (one per non-final exit of "
            f"this {num_exits}-exit model; the final exit takes every sample "
            f"left); received {len(values)}: {values}."
        )
    for k, t in enumerate(values):
        if math.isnan(t):
            raise ValueError(
                f"Threshold {k} (exit {k}) is NaN. Use a number in [0, 1]: 0 "
                "lets every sample leave, 1.0 none."
            )
        if not 0.0 <= t <= 1.0:
            raise ValueError(
                f"Threshold {k} (exit {k}) is {t}, outside [0, 1]. Confidences "
                "lie in [0, 1]: 0 lets every sample leave, 1.0 none."
            )
    return values


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tflite_micro.tensorflow.lite.micro.python import (
            schema_py_generated as schema,
        )
    return schema


def _root(data) -> object:
    schema = _schema()
    if len(data) < 8 or bytes(data[4:8]) != b"TFL3":
        raise FusedModelError(
            "The data is not a TFLite model (no 'TFL3' file identifier)."
        )
    return schema.Model.GetRootAs(data, 0)


def buffer_span(data, buffer_index: int) -> tuple[int, int]:
    """`(start, length)` of a model buffer's data inside the file bytes."""
    model = _root(data)
    if not 0 <= buffer_index < model.BuffersLength():
        raise FusedModelError(
            f"The model has no buffer {buffer_index}; the metadata does not "
            "match the graph."
        )
    table = model.Buffers(buffer_index)._tab
    offset = table.Offset(4)  # Buffer.data
    if offset == 0:
        return 0, 0
    return table.Vector(offset), table.VectorLen(offset)


def _metadata_buffer(data) -> int | None:
    model = _root(data)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if (entry.Name() or b"").decode() == METADATA_NAME:
            return entry.Buffer()
    return None


def hash_span(data, metadata_span: tuple[int, int]) -> tuple[int, int]:
    """`(start, 64)`: where the manifest's `content_sha256` value lies in
    the file bytes."""
    start, length = metadata_span
    text = bytes(data[start : start + length])
    at = text.find(_HASH_KEY)
    if at < 0 or text.find(_HASH_KEY, at + 1) >= 0:
        raise FusedModelError(
            "The fused model's manifest has no single content_sha256 entry: "
            "its metadata was altered. Export the model again."
        )
    return start + at + len(_HASH_KEY), len(HASH_PLACEHOLDER)


def content_sha256(data, hash_at: tuple[int, int]) -> str:
    """sha256 of the file with its own hash value (at `hash_at`) written as
    zeros: covers the graph, the weights, the thresholds and the manifest."""
    start, length = hash_at
    digest = hashlib.sha256()
    digest.update(memoryview(data)[:start])
    digest.update(HASH_PLACEHOLDER.encode())
    digest.update(memoryview(data)[start + length :])
    return digest.hexdigest()


def is_fused_model(path: str) -> bool:
    """Whether `path` is a file that carries a keras-earlyexit manifest."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _metadata_buffer(data) is not None
    except Exception:  # not a flatbuffer at all
        return False


def read_fused_manifest(data, source: str = "the model") -> FusedManifest:
    """Reads and checks the manifest embedded in a fused file's bytes.

    Checks the format and version, the file's hash and that the graph's
    threshold constants are the ones the manifest names.

    Args:
        data: the `.tflite` bytes.
        source: the file's name, for messages.

    Returns:
        The `FusedManifest`.

    Raises:
        FusedModelError: not a TFLite model, no keras-earlyexit metadata, an
            unknown format or version, or bytes that differ from those the
            manifest was written for.
    """
    buffer = _metadata_buffer(data)
    if buffer is None:
        raise FusedModelError(
            f"{source} has no {METADATA_NAME!r} metadata: it is not a fused "
            "model written by keras-earlyexit (or its metadata was removed). "
            "Write one with kee.export.to_tflite(model, 'model.tflite', "
            "fused=True); a bundle directory is read with GatedInterpreter."
        )
    span = buffer_span(data, buffer)
    start, length = span
    try:
        content = json.loads(bytes(data[start : start + length]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FusedModelError(
            f"The {METADATA_NAME!r} metadata of {source} is not valid JSON "
            f"({e}): the file is damaged. Export it again."
        ) from None
    if not isinstance(content, dict) or content.get("format") != FUSED_FORMAT:
        raise FusedModelError(
            f"The {METADATA_NAME!r} metadata of {source} is not a fused-model "
            f"manifest (format {FUSED_FORMAT!r} expected)."
        )
    version = content.get("format_version")
    if version != FUSED_FORMAT_VERSION:
        raise FusedModelError(
            f"{source} has fused format_version {version!r}; this "
            f"keras-earlyexit reads version {FUSED_FORMAT_VERSION}. Export the "
            "model again with this version, or install the version that "
            "wrote it."
        )
    try:
        manifest = FusedManifest.from_dict(content)
    except (KeyError, TypeError) as e:
        raise FusedModelError(
            f"The manifest in {source} does not follow the fused schema ({e}). "
            "Export the model again."
        ) from None
    digest = content_sha256(data, hash_span(data, span))
    if digest != manifest.content_sha256:
        raise FusedModelError(
            f"{source} was modified after export: its sha256 (own hash "
            f"excluded) is {digest[:16]}..., its manifest expects "
            f"{manifest.content_sha256[:16]}... Change thresholds only with "
            "kee.export.set_thresholds; otherwise copy or export it again."
        )
    if manifest.quantization not in QUANTIZATION_MODES:
        raise FusedModelError(
            f"{source} has unknown quantization {manifest.quantization!r}."
        )
    for exit, threshold in zip(manifest.exits, manifest.thresholds):
        stored = _read_constant(data, exit)
        if stored != gate_constant(exit, threshold):
            raise FusedModelError(
                f"Exit {exit.index}'s gate in {source} compares with {stored}, "
                f"but its manifest threshold {threshold} gives "
                f"{gate_constant(exit, threshold)}. Export the model again."
            )
    _check_patience(data, manifest, source)
    return manifest


def _check_patience(data, manifest: FusedManifest, source: str) -> None:
    """The manifest's patience: an int in [1, exits] for criterion
    `"patience"`, compared with by every non-final gate; else None."""
    if manifest.criterion != PATIENCE:
        if manifest.patience is not None or any(
            e.patience_buffer is not None for e in manifest.exits
        ):
            raise FusedModelError(
                f"{source} has criterion {manifest.criterion!r} but a patience; "
                "its manifest was altered. Export the model again."
            )
        return
    p = manifest.patience
    if type(p) is not int or not 1 <= p <= manifest.num_exits:
        raise FusedModelError(
            f"{source} has criterion {PATIENCE!r} and patience {p!r}; an int in "
            f"[1, {manifest.num_exits}] was expected. Export the model again."
        )
    for exit in manifest.exits[:-1]:
        stored = _read_constant(data, exit, patience=True)
        if stored != p:
            raise FusedModelError(
                f"Exit {exit.index}'s gate in {source} requires a streak of "
                f"{stored}, but the manifest's patience is {p}. Export the "
                "model again."
            )


def _constant_dtype(exit: FusedExit) -> np.dtype:
    return np.dtype(np.int32 if exit.quantized else np.float32)


def _read_constant(data, exit: FusedExit, patience: bool = False) -> int | float:
    """The threshold constant of an exit's gate, or with `patience` its
    patience constant (float32)."""
    buffer = exit.patience_buffer if patience else exit.threshold_buffer
    dtype = np.dtype(np.float32) if patience else _constant_dtype(exit)
    if type(buffer) is not int:
        raise FusedModelError(
            f"Exit {exit.index}'s gate names no constant buffer ({buffer!r}). "
            "Export the model again."
        )
    start, length = buffer_span(data, buffer)
    if length != dtype.itemsize:
        raise FusedModelError(
            f"Exit {exit.index}'s constant buffer {buffer} holds {length} bytes; a "
            f"{dtype.name} scalar was expected. Export the model again."
        )
    return np.frombuffer(bytes(data[start : start + length]), dtype)[0].item()


def with_thresholds(
    data, manifest: FusedManifest, thresholds, patience: int | None = None
) -> bytes:
    """The model bytes with the gates' threshold constants (and, for
    criterion `"patience"`, their patience) replaced in place (every other
    byte unchanged).

    The embedded manifest is not updated, so the result is for an
    interpreter in memory; `kee.export.set_thresholds` rewrites a file with
    its manifest and hash.
    """
    thresholds = check_thresholds(thresholds, manifest.num_exits)
    patched = bytearray(data)
    for exit, threshold in zip(manifest.exits, thresholds):
        start, length = buffer_span(patched, exit.threshold_buffer)
        value = np.array([gate_constant(exit, threshold)], _constant_dtype(exit))
        patched[start : start + length] = value.tobytes()
        if patience is not None:
            start, length = buffer_span(patched, exit.patience_buffer)
            patched[start : start + length] = np.float32(patience).tobytes()
    return bytes(patched)


class _Model:
    """One interpreter holding the fused model: `set_input(key, value)`,
    `invoke()`, `get_output(key)`, with the keys of the model's inputs and
    of its `class`, `exit_index` and `confidence` outputs."""

    inputs: list[int]
    outputs: list[int]

    def run(self, sample: list[np.ndarray]) -> tuple:
        """One invoke: `(class, exit_index, confidence)` as NumPy scalars
        (cheaper to read than Python numbers, on the per-sample path)."""
        for key, value in zip(self.inputs, sample):
            self.set_input(key, value)
        self.invoke()
        get, (label, exit_index, confidence) = self.get_output, self.outputs
        return get(label)[0], get(exit_index)[0], get(confidence)[0]


class _LiteRTModel(_Model):
    """The fused model in the LiteRT interpreter; tensors by signature name.

    LiteRT's IF kernel releases the memory of the branch it ran after every
    invoke (`Subgraph::ReleaseMemory` in kernels/if.cc), so the next invoke
    plans and prepares that branch again: about 20 us per segment on the
    digits CNN. `experimental_preserve_all_tensors` skips the release (each
    tensor keeps its own memory instead of sharing an arena, a few KB for
    small models), which makes the fused model as fast as its ops.
    """

    def __init__(self, data: bytes, manifest: FusedManifest, num_threads: int):
        from ai_edge_litert.interpreter import Interpreter

        with warnings.catch_warnings():
            # The option warns that it is meant for debugging (memory use).
            warnings.filterwarnings("ignore", message=".*preserve_all_tensors")
            interpreter = Interpreter(
                model_content=data,
                num_threads=num_threads,
                experimental_preserve_all_tensors=True,
            )
        interpreter.allocate_tensors()
        runner = interpreter.get_signature_runner()
        inputs = runner.get_input_details()
        outputs = runner.get_output_details()
        self.inputs = [inputs[t.name]["index"] for t in manifest.inputs]
        self.outputs = [outputs[n]["index"] for n in OUTPUT_NAMES[:3]]
        self.interpreter = interpreter
        self.set_input = interpreter.set_tensor
        self.invoke = interpreter.invoke
        self.get_output = interpreter.get_tensor


class _MicroModel(_Model):
    """The fused model in the TFLite Micro interpreter (positions from the
    manifest, since TFLite Micro keeps no signatures)."""

    def __init__(self, data: bytes, manifest: FusedManifest, arena_size: int):
        from tflite_micro.python.tflite_micro import runtime

        interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena_size)
        self.inputs = [t.position for t in manifest.inputs]
        self.outputs = [manifest.output_position(n) for n in OUTPUT_NAMES[:3]]
        self.interpreter = interpreter
        self.invoke = interpreter.invoke
        self.get_output = interpreter.get_output

    def set_input(self, position: int, value: np.ndarray) -> None:
        self.interpreter.set_input(value, position)


class FusedStats(RuntimeStats):
    """Counts and timings of a `FusedInterpreter`: as `RuntimeStats`, but
    one invoke runs all the segments a sample needs, so the time is per
    exit taken (`exit_seconds`) and `segment_seconds` stays 0."""

    def __str__(self) -> str:
        rows = [f"{'exit':<12} {'samples':>8} {'share':>7} {'latency us':>11}"]
        for k, name in enumerate(self.exit_names):
            latency = self.exit_seconds[k] / max(self.exit_counts[k], 1)
            rows.append(
                f"{name:<12} {self.exit_counts[k]:>8} "
                f"{self.exit_fractions[k]:>7.1%} {latency * 1e6:>11.1f}"
            )
        rows.append(f"mean latency per sample: {self.mean_latency_s * 1e6:.1f} us")
        return "\n".join(rows)


class FusedInterpreter:
    """Runs a fused gated `.tflite` file: one invoke per sample.

    Loading reads and checks the embedded manifest (`read_fused_manifest`).
    The graph itself runs only the segments a sample needs and returns its
    class, exit index and confidence.

    Args:
        path: the `.tflite` file written by `kee.export.to_tflite(...,
            fused=True)`.
        backend: `"litert"` (LiteRT, as on Android) or `"micro"` (TFLite
            Micro).
        num_threads: LiteRT threads (1 for single-thread latency).
        thresholds: one per non-final exit; default: the file's. Other
            values are written into a copy of the model in memory; the
            file is changed only by `kee.export.set_thresholds`.
        arena_size: TFLite Micro tensor arena bytes. Default: the arena
            measured at export plus `RUNTIME_ARENA_MARGIN`, or 1 MiB.
        patience: for files exported with criterion `"patience"`, the
            patience to run with (written into the copy in memory, as
            thresholds are); default: the file's.

    Example:

    ```python
    interpreter = FusedInterpreter("digits_int8.tflite", backend="micro")
    result = interpreter.predict(x_test)
    result.classes, result.exit_indices, result.confidences
    ```
    """

    def __init__(
        self,
        path: str,
        backend: str = "litert",
        num_threads: int = 1,
        thresholds=None,
        arena_size: int | None = None,
        patience: int | None = None,
    ):
        check_arguments(backend, num_threads, arena_size)
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise FusedModelError(
                f"{self.path} is not a file. Write a fused model with "
                "kee.export.to_tflite(model, 'model.tflite', fused=True)."
            )
        with open(self.path, "rb") as f:
            self._data = f.read()
        self.manifest = read_fused_manifest(self._data, self.path)
        self.backend = backend
        self.num_threads = num_threads
        self.arena_size = arena_size
        self._thresholds = self.manifest.thresholds
        self._patience = self.manifest.patience
        if patience is not None:
            self._patience = check_patience(
                patience, self.manifest.criterion, self.num_exits
            )
        self._model = None
        self.set_thresholds(self._thresholds if thresholds is None else thresholds)
        self.reset_stats()

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits

    @property
    def thresholds(self) -> list[float]:
        """One threshold per non-final exit."""
        return list(self._thresholds)

    def set_thresholds(self, thresholds) -> None:
        """Sets the exit thresholds (floats in [0, 1], one per non-final
        exit) of the model in memory; reloads the interpreter if they
        change."""
        thresholds = check_thresholds(thresholds, self.num_exits)
        if self._model is not None and thresholds == self._thresholds:
            return
        data = self._data
        if (thresholds, self._patience) != (
            self.manifest.thresholds,
            self.manifest.patience,
        ):
            data = with_thresholds(data, self.manifest, thresholds, self._patience)
        if self.backend == "litert":
            self._model = _LiteRTModel(data, self.manifest, self.num_threads)
        else:
            arena = self.arena_size
            if arena is None:
                measured = self.manifest.arena_bytes
                arena = measured + RUNTIME_ARENA_MARGIN if measured else 1 << 20
            self._model = _MicroModel(data, self.manifest, arena)
        self._thresholds = thresholds

    @property
    def patience(self) -> int | None:
        """Criterion `"patience"`: how many exits in a row must predict a
        sample's class before it leaves (None for other criteria)."""
        return self._patience

    def set_patience(self, patience: int) -> None:
        """Sets the patience (an int in [1, number of exits]) of a file
        exported with criterion `"patience"`, in the model in memory;
        reloads the interpreter if it changes."""
        patience = check_patience(patience, self.manifest.criterion, self.num_exits)
        if patience != self._patience:
            self._patience = patience
            self._model = None
            self.set_thresholds(self._thresholds)

    def reset_stats(self) -> None:
        self.stats = FusedStats(list(self.manifest.exit_names))

    def _prepare(self, x) -> list[np.ndarray]:
        """Checks inputs (the rules of `GatedInterpreter`) and converts them
        to the dtype the model takes."""
        return [
            np.ascontiguousarray(a) for a in prepare_inputs(x, self.manifest.inputs)
        ]

    def _record(self, exits: np.ndarray, seconds: np.ndarray) -> None:
        """Adds samples' exits and times to `stats` (after the loop, so that
        the loop itself stays short)."""
        stats = self.stats
        for k in range(self.num_exits):
            stats.exit_counts[k] += int(np.sum(exits == k))
            stats.exit_seconds[k] += float(np.sum(seconds[exits == k]))
            stats.segment_invocations[k] += int(np.sum(exits >= k))

    def predict(self, x, verbose: int = 0) -> EarlyExitPrediction:
        """Gated inference on a batch, one invoke per sample.

        Args:
            x: float array `(n, *input_shape)` (or a list / dict of arrays
                for several inputs).
            verbose: unused; accepted for the same call as
                `GatedInterpreter.predict`.

        Returns:
            `EarlyExitPrediction` with NumPy arrays `.classes`,
            `.exit_indices` (0-based) and `.confidences`.
        """
        del verbose
        arrays = self._prepare(x)
        n = len(arrays[0])
        classes = np.zeros(n, np.int64)
        exits = np.zeros(n, np.int64)
        confidences = np.zeros(n, np.float32)
        seconds = np.zeros(n)
        run, clock = self._model.run, time.perf_counter
        for i in range(n):
            start = clock()
            classes[i], exits[i], confidences[i] = run([a[i : i + 1] for a in arrays])
            seconds[i] = clock() - start
        self._record(exits, seconds)
        return EarlyExitPrediction(classes, exits, confidences)

    def predict_one(self, x) -> SampleResult:
        """Gated inference on one sample (shape `input_shape`, or a batch of
        one). Returns `(label, exit_index, confidence)`."""
        arrays = list(x) if isinstance(x, (list, tuple)) else [x]
        if isinstance(x, dict):
            arrays = [x[t.name] for t in self.manifest.inputs if t.name in x]
        arrays = [
            np.asarray(a)[None] if np.ndim(a) == len(t.shape) - 1 else a
            for a, t in zip(arrays, self.manifest.inputs)
        ]
        if len(self._prepare(arrays)[0]) != 1:
            raise ValueError(
                f"predict_one takes one sample; received {len(arrays[0])}. "
                "Use predict for batches."
            )
        result = self.predict(arrays)
        return SampleResult(
            int(result.classes[0]),
            int(result.exit_indices[0]),
            float(result.confidences[0]),
        )

    def __repr__(self) -> str:
        return (
            f"FusedInterpreter({self.path!r}, backend={self.backend!r}, "
            f"quantization={self.manifest.quantization!r}, "
            f"exits={self.manifest.exit_names})"
        )
