"""`GatedInterpreter`: the gated early-exit loop over a TFLite bundle.

Per sample: quantize the input with the manifest's parameters, run segment
1, compare its confidence with the exit's threshold (in int8 for int8
bundles, as a microcontroller does), and either stop there or hand the carry
to segment 2, and so on. Only the segments a sample needs are invoked.

Backends run the segment models: `"litert"` (the `ai_edge_litert`
interpreter, the runtime of Android) maps tensors by signature name;
`"micro"` (TFLite Micro through the `tflite_micro` pip package) has no
signatures and uses the positions the exporter resolved by name.
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from keras_earlyexit.runtime.manifest import (
    RUNTIME_ARENA_MARGIN,
    Manifest,
    SegmentInfo,
    TensorInfo,
    quantize_threshold,
    read_manifest,
    read_segment,
)
from keras_earlyexit.runtime.prediction import EarlyExitPrediction

BACKENDS = ("litert", "micro")


class SegmentRunner(Protocol):
    """What a backend provides for one segment model."""

    def set_input(self, tensor: TensorInfo, value: np.ndarray) -> None: ...

    def invoke(self) -> None: ...

    def get_output(self, tensor: TensorInfo) -> np.ndarray: ...


class LiteRTRunner:
    """One segment in the LiteRT interpreter; tensors found by signature name."""

    def __init__(self, data: bytes, num_threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=data, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        runner = self.interpreter.get_signature_runner()
        self._inputs = {n: d["index"] for n, d in runner.get_input_details().items()}
        self._outputs = {n: d["index"] for n, d in runner.get_output_details().items()}
        # The signature runner above is only a name lookup; the loop calls the
        # interpreter directly (one subgraph), which costs less per invoke.
        self.invoke = self.interpreter.invoke

    def set_input(self, tensor: TensorInfo, value: np.ndarray) -> None:
        self.interpreter.set_tensor(self._inputs[tensor.name], value)

    def get_output(self, tensor: TensorInfo) -> np.ndarray:
        return self.interpreter.get_tensor(self._outputs[tensor.name])


class MicroRunner:
    """One segment in the TFLite Micro interpreter (positions from the
    manifest, since TFLM keeps no signatures)."""

    def __init__(self, data: bytes, arena_size: int):
        from tflite_micro.python.tflite_micro import runtime

        self.interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena_size)
        self.invoke = self.interpreter.invoke

    def set_input(self, tensor: TensorInfo, value: np.ndarray) -> None:
        self.interpreter.set_input(value, tensor.position)

    def get_output(self, tensor: TensorInfo) -> np.ndarray:
        return self.interpreter.get_output(tensor.position)


def _micro_arena(info: SegmentInfo) -> int:
    """A segment's TFLite Micro arena: measured at export, or 1 MiB."""
    if info.arena_bytes is None:
        return 1 << 20
    return info.arena_bytes + RUNTIME_ARENA_MARGIN


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float to int8 as TFLite's QUANTIZE op does (round half away from 0)."""
    q = np.asarray(x, np.float32) / np.float32(scale)
    q = np.sign(q) * np.floor(np.abs(q) + 0.5) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize(q, scale: float, zero_point: int) -> np.ndarray:
    return (np.asarray(q, np.float32) - zero_point) * np.float32(scale)


def requantize(q: np.ndarray, source: TensorInfo, target: TensorInfo) -> np.ndarray:
    """An int8 carry from `source`'s parameters to `target`'s (only where the
    exporter could not make them identical; see `export.tflite`)."""
    return quantize(
        dequantize(q, source.scale, source.zero_point), target.scale, target.zero_point
    )


class SampleResult(NamedTuple):
    """Result of `GatedInterpreter.predict_one`."""

    label: int
    exit_index: int
    confidence: float


@dataclass
class RuntimeStats:
    """Counts and timings accumulated by a `GatedInterpreter` (plain lists,
    one entry per exit, cheap to update inside the loop).

    Attributes:
        exit_names: names of the exits.
        exit_counts: samples that left at each exit.
        segment_invocations: invokes of each segment.
        segment_seconds: total time inside each segment's `invoke`.
        exit_seconds: total loop time (invokes, carry hand-off, gate check)
            of the samples that left at each exit.
    """

    exit_names: list[str]
    exit_counts: list[int] = field(default_factory=list)
    segment_invocations: list[int] = field(default_factory=list)
    segment_seconds: list[float] = field(default_factory=list)
    exit_seconds: list[float] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.exit_names)
        self.exit_counts = self.exit_counts or [0] * n
        self.segment_invocations = self.segment_invocations or [0] * n
        self.segment_seconds = self.segment_seconds or [0.0] * n
        self.exit_seconds = self.exit_seconds or [0.0] * n

    @property
    def samples(self) -> int:
        return sum(self.exit_counts)

    @property
    def mean_latency_s(self) -> float:
        """Mean loop time per sample, in seconds."""
        return sum(self.exit_seconds) / max(self.samples, 1)

    @property
    def exit_fractions(self) -> list[float]:
        return [c / max(self.samples, 1) for c in self.exit_counts]

    def __str__(self) -> str:
        rows = [
            f"{'exit':<12} {'samples':>8} {'share':>7} {'latency us':>11} "
            f"{'invoke us':>10}"
        ]
        for k, name in enumerate(self.exit_names):
            latency = self.exit_seconds[k] / max(self.exit_counts[k], 1)
            invoke = self.segment_seconds[k] / max(self.segment_invocations[k], 1)
            rows.append(
                f"{name:<12} {self.exit_counts[k]:>8} "
                f"{self.exit_fractions[k]:>7.1%} {latency * 1e6:>11.1f} "
                f"{invoke * 1e6:>10.1f}"
            )
        rows.append(f"mean latency per sample: {self.mean_latency_s * 1e6:.1f} us")
        return "\n".join(rows)


class _Segment:
    """A loaded segment: its manifest entry, runner and gate threshold."""

    def __init__(self, info: SegmentInfo, runner: SegmentRunner):
        self.info = info
        self.runner = runner
        self.logits = info.output("logits")
        self.confidence = info.output("confidence")
        self.threshold: float | int = 0.0
        # (output of this segment, input of the next, requantize?)
        self.carry: list[tuple[TensorInfo, TensorInfo, bool]] = []


class GatedInterpreter:
    """Runs a bundle written by `kee.export.to_tflite` with per-sample exits.

    Loading checks the manifest's format version and every segment file's
    sha256. Each sample runs segment by segment and stops at the first exit
    whose confidence reaches its threshold; the final exit takes the rest.

    Args:
        directory: the bundle directory.
        backend: `"litert"` (LiteRT, as on Android) or `"micro"` (TFLite
            Micro).
        num_threads: threads per LiteRT interpreter (1 for single-thread
            latency, as on a microcontroller).
        thresholds: one per non-final exit; default: the manifest's.
        arena_size: TFLite Micro tensor arena bytes per segment. Default:
            the segment's `arena_bytes` measured at export plus
            `RUNTIME_ARENA_MARGIN` (1 KiB), or 1 MiB for bundles without
            measurements. Each segment gets its own arena here; the C++
            runner shares one (see `micro.shared_arena_bytes`).

    Example:

    ```python
    interpreter = kee.runtime.GatedInterpreter("digits_int8", num_threads=1)
    result = interpreter.predict(x_test)
    result.classes, result.exit_indices, result.confidences
    print(interpreter.stats)  # exit mix and latency per exit
    ```
    """

    def __init__(
        self,
        directory: str,
        backend: str = "litert",
        num_threads: int = 1,
        thresholds=None,
        arena_size: int | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(
                f"Unknown backend {backend!r}. Use one of "
                f"{', '.join(map(repr, BACKENDS))}."
            )
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(
                f"num_threads must be an int >= 1. Received: {num_threads!r}"
            )
        self.directory = os.path.abspath(directory)
        self.backend = backend
        self.num_threads = num_threads
        self.manifest: Manifest = read_manifest(self.directory, verify=False)
        self._segments = []
        for info in self.manifest.segments:
            data = read_segment(self.directory, info)
            if backend == "litert":
                runner = LiteRTRunner(data, num_threads)
            else:
                runner = MicroRunner(data, arena_size or _micro_arena(info))
            self._segments.append(_Segment(info, runner))
        for previous, segment in zip(self._segments, self._segments[1:]):
            for target in segment.info.inputs:
                source = previous.info.output(target.name)
                same = (source.scale, source.zero_point) == (
                    target.scale,
                    target.zero_point,
                )
                previous.carry.append((source, target, not same))
        self.set_thresholds(
            self.manifest.thresholds if thresholds is None else thresholds
        )
        self.stats = RuntimeStats(list(self.manifest.exit_names))

    @property
    def num_exits(self) -> int:
        return len(self._segments)

    @property
    def thresholds(self) -> list[float]:
        """One threshold per non-final exit."""
        return list(self._thresholds)

    def set_thresholds(self, thresholds) -> None:
        """Sets the exit thresholds (floats in [0, 1], one per non-final
        exit); int8 bundles compare in int8 with the quantized values."""
        thresholds = [float(t) for t in thresholds]
        if len(thresholds) != self.num_exits - 1 or not all(
            0.0 <= t <= 1.0 for t in thresholds
        ):
            raise ValueError(
                f"Expected {self.num_exits - 1} thresholds in [0, 1] (one per "
                f"non-final exit); received {thresholds}."
            )
        self._thresholds = thresholds
        for segment, t in zip(self._segments, thresholds + [0.0]):
            c = segment.confidence
            if c.quantized:
                segment.threshold = quantize_threshold(t, c.scale, c.zero_point)
            else:  # 1.0 means never: a float softmax reaches exactly 1.0
                segment.threshold = t if t < 1.0 else math.inf

    def reset_stats(self) -> None:
        self.stats = RuntimeStats(list(self.manifest.exit_names))

    def _prepare(self, x) -> list[np.ndarray]:
        """Checks inputs and converts them to the dtype segment 1 takes."""
        specs = self._segments[0].info.inputs
        if isinstance(x, dict):
            missing = {t.name for t in specs} - set(x)
            if missing:
                raise ValueError(
                    f"Input data lacks {sorted(missing)}; the bundle's inputs "
                    f"are {[t.name for t in specs]}."
                )
            arrays = [x[t.name] for t in specs]
        else:
            arrays = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(arrays) != len(specs):
            raise ValueError(
                f"The bundle takes {len(specs)} input(s) "
                f"{[t.name for t in specs]}; received {len(arrays)} array(s)."
            )
        prepared = []
        for array, spec in zip(arrays, specs):
            array = np.asarray(array)
            sample_shape = tuple(spec.shape[1:])
            if array.ndim == 0 or tuple(array.shape[1:]) != sample_shape:
                raise ValueError(
                    f"Input {spec.name!r} expects a batch of samples of shape "
                    f"{sample_shape}, i.e. an array of shape (n, "
                    f"{', '.join(map(str, sample_shape))}); received shape "
                    f"{array.shape}."
                )
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(
                    f"Input {spec.name!r} must hold floats on the scale the "
                    f"Keras model was trained on; received dtype {array.dtype}. "
                    "Convert with x.astype('float32'); the interpreter "
                    "quantizes int8 bundles' inputs itself."
                )
            if spec.quantized:
                array = quantize(array, spec.scale, spec.zero_point)
            prepared.append(array.astype(spec.dtype, copy=False))
        if len({len(a) for a in prepared}) > 1:
            raise ValueError("All inputs must hold the same number of samples.")
        return prepared

    def _run(self, sample: list[np.ndarray]) -> tuple[int, int, float]:
        """The gated loop for one sample (arrays with batch size 1)."""
        start = time.perf_counter()
        last = len(self._segments) - 1
        values = zip(self._segments[0].info.inputs, sample)
        for k, segment in enumerate(self._segments):
            runner = segment.runner
            for tensor, value in values:
                runner.set_input(tensor, value)
            t0 = time.perf_counter()
            runner.invoke()
            self.stats.segment_seconds[k] += time.perf_counter() - t0
            self.stats.segment_invocations[k] += 1
            # A Python scalar: int8 bundles compare ints, float bundles floats.
            confidence = runner.get_output(segment.confidence).item(0)
            if k == last or confidence >= segment.threshold:
                label = int(np.argmax(runner.get_output(segment.logits)))
                c = segment.confidence
                if c.quantized:
                    confidence = (confidence - c.zero_point) * c.scale
                self.stats.exit_counts[k] += 1
                self.stats.exit_seconds[k] += time.perf_counter() - start
                return label, k, float(confidence)
            values = []
            for source, target, needs_requantization in segment.carry:
                value = runner.get_output(source)
                if needs_requantization:
                    value = requantize(value, source, target)
                values.append((target, value))
        raise AssertionError("unreachable: the final exit takes every sample")

    def predict(self, x, verbose: int = 0) -> EarlyExitPrediction:
        """Gated inference on a batch, sample by sample.

        Args:
            x: float array `(n, *input_shape)` (or a list / dict of arrays
                for several inputs).
            verbose: 1 shows a progress bar.

        Returns:
            `EarlyExitPrediction` with NumPy arrays `.classes`,
            `.exit_indices` (0-based) and `.confidences`.
        """
        arrays = self._prepare(x)
        n = len(arrays[0])
        classes = np.zeros(n, np.int64)
        exits = np.zeros(n, np.int64)
        confidences = np.zeros(n, np.float32)
        for i in range(n):
            classes[i], exits[i], confidences[i] = self._run(
                [a[i : i + 1] for a in arrays]
            )
            if verbose and (i % 64 == 63 or i == n - 1):
                print(
                    f"\rGatedInterpreter.predict: {i + 1}/{n}", end="", file=sys.stderr
                )
        if verbose:
            print(file=sys.stderr)
        return EarlyExitPrediction(classes, exits, confidences)

    def predict_one(self, x) -> SampleResult:
        """Gated inference on one sample (shape `input_shape`, or a batch of
        one). Returns `(label, exit_index, confidence)`."""
        specs = self._segments[0].info.inputs
        arrays = list(x) if isinstance(x, (list, tuple)) else [x]
        if isinstance(x, dict):
            arrays = [x[t.name] for t in specs if t.name in x]
        arrays = [
            np.asarray(a)[None] if np.ndim(a) == len(t.shape) - 1 else a
            for a, t in zip(arrays, specs)
        ]
        prepared = self._prepare(arrays)
        if len(prepared[0]) != 1:
            raise ValueError(
                f"predict_one takes one sample; received {len(prepared[0])}. "
                "Use predict for batches."
            )
        return SampleResult(*self._run(prepared))

    def __repr__(self) -> str:
        return (
            f"GatedInterpreter({self.directory!r}, backend={self.backend!r}, "
            f"quantization={self.manifest.quantization!r}, "
            f"exits={self.manifest.exit_names})"
        )
