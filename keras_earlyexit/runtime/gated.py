"""`GatedInterpreter`: the gated early-exit loop over a TFLite bundle.

Per sample: quantize the input with the model's parameters, run segment
1, compare its confidence with the exit's threshold (in int8 for int8
bundles, as a microcontroller does), and either stop there or hand the carry
to segment 2, and so on. Only the segments a sample needs are invoked.

A bundle may come from elsewhere: loading checks the manifest field by
field, keeps segment files inside the bundle, checks their size and sha256,
and compares every input's and output's dtype, shape, scale and zero-point
with the `.tflite` file itself (`runtime.tflite_file`).

Backends run the segment models: `"litert"` (the `ai_edge_litert`
interpreter, the runtime of Android) maps tensors by signature name;
`"micro"` (TFLite Micro through the `tflite_micro` pip package) has no
signatures and uses the positions the exporter resolved by name.
"""

import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from keras_earlyexit.runtime.manifest import (
    PATIENCE,
    RUNTIME_ARENA_MARGIN,
    BundleError,
    Manifest,
    SegmentInfo,
    TensorInfo,
    quantize_threshold,
    read_manifest,
    read_segment,
)
from keras_earlyexit.runtime.micro_arena import check_arenas
from keras_earlyexit.runtime.prediction import EarlyExitPrediction
from keras_earlyexit.runtime.tflite_file import check_segment_tensors

BACKENDS = ("litert", "micro")
# The package each backend runs on, and the install extra that brings it.
_PACKAGES = {
    "litert": ("ai_edge_litert", "runtime"),
    "micro": ("tflite_micro", "micro"),
}


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


def prepare_input(array: np.ndarray, spec: TensorInfo) -> np.ndarray:
    """Checks one batch of a model input and converts it to the tensor's dtype.

    The rule shared by the runtimes and `EarlyExitModel.predict_early`:
    float model inputs take finite floats (quantized here for int8
    tensors); integer model inputs (token ids) take integers in range.

    Args:
        array: the batch, `(n, *sample_shape)`.
        spec: the model input's tensor (`TensorInfo`, batch size 1).

    Returns:
        The batch at `spec.dtype`, quantized where `spec` is.

    Raises:
        ValueError: a wrong sample shape (for token ids: sequences longer
            or shorter than the fixed length, naming it), integers for a
            float input (their scale is unknown), floats for an integer
            input, NaN or infinite values (naming the count of samples),
            ids outside the input's `value_range` (or its dtype's range).
    """
    sample_shape = tuple(spec.shape[1:])
    is_ids = not spec.quantized and np.dtype(spec.dtype).kind in "iu"
    if (
        (is_ids or spec.dtype == "bool")
        and array.ndim == len(spec.shape)
        and array.ndim >= 2
        and array.shape[2:] == sample_shape[1:]
        and array.shape[1] != sample_shape[0]
    ):
        length, fixed = array.shape[1], sample_shape[0]
        fix = (
            f"truncate them to {fixed} (x[:, :{fixed}])"
            if length > fixed
            else f"pad them to {fixed} with the padding id, as in training"
        )
        raise ValueError(
            f"Input {spec.name!r} takes sequences of exactly {fixed} tokens (the "
            f"model's maximum, fixed at export); received sequences of "
            f"{length}: {fix}."
        )
    if array.ndim == 0 or tuple(array.shape[1:]) != sample_shape:
        raise ValueError(
            f"Input {spec.name!r} expects a batch of samples of shape "
            f"{sample_shape}, i.e. an array of shape (n, "
            f"{', '.join(map(str, sample_shape))}); received shape {array.shape}."
        )
    if spec.dtype == "bool":  # a mask: bools, or integers 0 and 1
        if array.dtype.kind == "b" or (
            array.dtype.kind in "iu" and np.isin(array, (0, 1)).all()
        ):
            return array.astype(bool, copy=False)
        raise ValueError(
            f"Input {spec.name!r} takes a mask (bool, or integers 0 and 1); "
            f"received dtype {array.dtype}"
            + (" with other values." if array.dtype.kind in "iu" else ".")
        )
    if is_ids:
        # Token ids: integers, passed on unquantized at the model's dtype.
        if array.dtype.kind not in "iu":
            raise ValueError(
                f"Input {spec.name!r} takes integer ids ({spec.dtype}); received "
                f"dtype {array.dtype}. Pass integers, e.g. x.astype('{spec.dtype}')."
            )
        info = np.iinfo(spec.dtype)
        low, high = spec.value_range or (info.min, info.max)
        outside = (array < low) | (array > high)
        if outside.any():
            what = (
                "the ids its embedding table has rows for (manifest value_range)"
                if spec.value_range
                else f"the range of its dtype {spec.dtype}"
            )
            raise ValueError(
                f"Input {spec.name!r} holds {int(outside.sum())} value(s) outside "
                f"[{low}, {high}], {what}; first: {array[outside][0]} in sample "
                f"{int(np.argmax(outside.reshape(len(array), -1).any(axis=1)))}. "
                "Map unknown tokens to a valid id (e.g. an out-of-vocabulary id)."
            )
        return array.astype(spec.dtype, copy=False)
    if array.dtype.kind != "f":
        raise ValueError(
            f"Input {spec.name!r} takes floats on the scale the Keras model was "
            f"trained on; received dtype {array.dtype}. Convert and scale it as "
            "in training (for images trained on [0, 1]: x.astype('float32') / "
            "255); the interpreter quantizes int8 bundles' inputs itself."
        )
    bad = ~np.isfinite(array).all(axis=tuple(range(1, array.ndim)))
    if bad.any():
        raise ValueError(
            f"Input {spec.name!r} holds NaN or infinite values in "
            f"{int(bad.sum())} of {len(array)} samples (first: sample "
            f"{int(np.argmax(bad))}). Non-finite inputs are refused: they have "
            "no int8 value and give a meaningless confidence. Drop or repair "
            "those samples."
        )
    if spec.quantized:
        array = quantize(array, spec.scale, spec.zero_point)
    return array.astype(spec.dtype, copy=False)


def gather_inputs(x, names: list[str]) -> list:
    """The arrays of `x` in input order: `x` is one array (a single-input
    model), a list in input order, or a dict by input name."""
    if isinstance(x, dict):
        missing = set(names) - set(x)
        if missing:
            raise ValueError(
                f"Input data lacks {sorted(missing)}; the model's inputs are {names}."
            )
        arrays = [x[name] for name in names]
    else:
        arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(arrays) != len(names):
        raise ValueError(
            f"The model takes {len(names)} input(s) {names}; received "
            f"{len(arrays)} array(s)."
        )
    return arrays


def prepare_inputs(x, specs: list[TensorInfo]) -> list[np.ndarray]:
    """A model's input batches from `x` (an array, a list in input order, or
    a dict by input name), each checked by `prepare_input`."""
    arrays = gather_inputs(x, [t.name for t in specs])
    prepared = [prepare_input(np.asarray(a), spec) for a, spec in zip(arrays, specs)]
    if len({len(a) for a in prepared}) > 1:
        raise ValueError("All inputs must hold the same number of samples.")
    return prepared


def check_patience(patience, criterion: str, num_exits: int) -> int:
    """A patience for an exported model of `criterion` with `num_exits`
    exits: an int in [1, num_exits], for criterion `"patience"` only."""
    if criterion != PATIENCE:
        raise ValueError(
            f"patience applies to models exported with criterion {PATIENCE!r}; "
            f"this one's criterion is {criterion!r}."
        )
    if isinstance(patience, (bool, np.bool_)) or not isinstance(
        patience, (int, np.integer)
    ):
        raise ValueError(f"patience must be an int. Received: {patience!r}")
    if not 1 <= patience <= num_exits:
        raise ValueError(
            f"patience must be in [1, {num_exits}] (the number of exits in a row "
            f"that must agree; {num_exits} lets no sample leave early). "
            f"Received: {patience}"
        )
    return int(patience)


def check_arguments(backend: str, num_threads, arena_size) -> None:
    """Checks the arguments every interpreter takes (bundle or fused file),
    and that the backend's interpreter package is installed."""
    if backend not in BACKENDS:
        raise ValueError(
            f"Unknown backend {backend!r}. Use one of {', '.join(map(repr, BACKENDS))}."
        )
    if type(num_threads) is not int or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1. Received: {num_threads!r}")
    if arena_size is not None:
        if backend != "micro":
            raise ValueError(
                "arena_size is the TFLite Micro arena: it applies to "
                f"backend='micro' only. Received backend={backend!r}."
            )
        if type(arena_size) is not int or arena_size <= 0:
            raise ValueError(
                "arena_size must be a positive int (bytes per segment), or "
                f"None for the size measured at export. Received: {arena_size!r}"
            )
    package, extra = _PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"backend={backend!r} needs the {package} package: pip install "
            f"'keras-earlyexit[{extra}]'."
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

    Given the path of a fused `.tflite` file (`to_tflite(..., fused=True)`)
    instead of a bundle directory, it returns a `FusedInterpreter`: the same
    arguments, `predict` results and `stats`, one invoke per sample.

    Loading checks the manifest (every field, see `runtime.manifest`), each
    segment file's place, size and sha256, and each input's and output's
    dtype, shape, scale and zero-point against the `.tflite` file; a bundle
    that fails raises `BundleError`. Each sample runs segment by segment and
    stops at the first exit whose confidence reaches its threshold; the
    final exit takes the rest. With criterion `"patience"` (PABEE), the
    loop also keeps each sample's class and streak (`runtime.patience`):
    the sample leaves at the first exit where its streak reaches
    `patience` and its confidence its threshold (a floor).

    Inputs follow one rule, shared with `EarlyExitModel.predict_early`:
    - a float model input takes floats on the scale the Keras model was
      trained on (the interpreter quantizes them for int8 bundles); integer
      arrays (e.g. uint8 images in 0..255) are refused, since their scale
      is unknown: convert and scale them as in training;
    - an integer model input (token ids) takes integer arrays, passed on
      unquantized at the model's integer dtype; floats are refused;
    - NaN and infinite values are refused, naming the input and the number
      of samples that hold them: they have no int8 value, and a float model
      gives a meaningless confidence for them.

    Each segment is invoked once at load on zero inputs (first invokes
    allocate and pack weights); that warm-up is not counted in `stats`, so
    the first `predict` is timed like every later one.

    Args:
        directory: the bundle directory.
        backend: `"litert"` (LiteRT, as on Android; needs `ai-edge-litert`)
            or `"micro"` (TFLite Micro; needs `tflite-micro`).
        num_threads: threads per LiteRT interpreter (1 for single-thread
            latency, as on a microcontroller).
        thresholds: one per non-final exit; default: the manifest's.
        arena_size: TFLite Micro tensor arena bytes per segment (`"micro"`
            only), a positive int. Default: the segment's `arena_bytes`
            measured at export plus `RUNTIME_ARENA_MARGIN` (1 KiB), or 1 MiB
            for bundles without measurements. Each arena is tried in a child
            process first (TFLite Micro may crash on a too-small one); an
            arena too small raises `ValueError` saying how many bytes the
            segment needs. Each segment gets its own arena here; the C++
            runner shares one (see `micro.shared_arena_bytes`).
        patience: for bundles exported with criterion `"patience"`, the
            patience to run with; default: the manifest's.

    Example:

    ```python
    interpreter = kee.runtime.GatedInterpreter("digits_int8", num_threads=1)
    result = interpreter.predict(x_test)
    result.classes, result.exit_indices, result.confidences
    print(interpreter.stats)  # exit mix and latency per exit
    interpreter.reset_stats()  # start counting afresh
    ```
    """

    def __new__(cls, path, *args, **kwargs):
        if cls is GatedInterpreter and os.path.isfile(path):
            from keras_earlyexit.runtime.fused import FusedInterpreter

            return FusedInterpreter(path, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        directory: str,
        backend: str = "litert",
        num_threads: int = 1,
        thresholds=None,
        arena_size: int | None = None,
        patience: int | None = None,
    ):
        check_arguments(backend, num_threads, arena_size)
        self.directory = os.path.abspath(directory)
        self.backend = backend
        self.num_threads = num_threads
        self.manifest: Manifest = read_manifest(self.directory, verify=False)
        models = []
        for info in self.manifest.segments:
            models.append(read_segment(self.directory, info))
            check_segment_tensors(info, models[-1])
        if backend == "micro":
            arenas = self._micro_arenas(models, arena_size)
        self._segments = []
        for k, (info, data) in enumerate(zip(self.manifest.segments, models)):
            try:
                if backend == "litert":
                    runner = LiteRTRunner(data, num_threads)
                else:
                    runner = MicroRunner(data, arenas[k])
            except (RuntimeError, ValueError) as e:
                raise BundleError(
                    f"Segment {k + 1} ({info.file}) does not load in {backend!r}: {e}"
                ) from None
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
        self._patience = self.manifest.patience
        if patience is not None:
            self.set_patience(patience)
        self.warmup_seconds = self._warm_up()
        self.stats = RuntimeStats(list(self.manifest.exit_names))

    def _micro_arenas(self, models: list[bytes], arena_size: int | None) -> list[int]:
        """Each segment's TFLite Micro arena, checked to be large enough."""
        segments = self.manifest.segments
        sizes = [arena_size or _micro_arena(s) for s in segments]
        measured = [s.arena_bytes or 0 for s in segments]
        if arena_size is not None and arena_size < max(measured):
            short = next(s for s in segments if arena_size < (s.arena_bytes or 0))
            raise ValueError(
                f"Segment {short.index + 1} (exit {short.exit_name!r}) needs a "
                f"TFLite Micro arena of {short.arena_bytes} bytes (measured at "
                "export); "
                f"arena_size={arena_size} is too small. Pass arena_size >= "
                f"{max(measured) + RUNTIME_ARENA_MARGIN} (the largest segment's "
                "measured arena plus a margin), or None for each segment's own."
            )
        for s, size, needs in zip(segments, sizes, check_arenas(models, sizes)):
            if needs is None:
                continue
            where = f"Segment {s.index + 1} (exit {s.exit_name!r})"
            if arena_size is not None:
                raise ValueError(
                    f"{where} needs a TFLite Micro arena of {needs} bytes; "
                    f"arena_size={arena_size} is too small. Pass arena_size >= "
                    f"{needs}."
                )
            if s.arena_bytes is not None:
                raise BundleError(
                    f"{where} needs a TFLite Micro arena of {needs} bytes, but "
                    f"the manifest's arena_bytes is {s.arena_bytes} (the default "
                    f"arena is that plus {RUNTIME_ARENA_MARGIN}): the manifest "
                    f"is wrong. Convert again, or pass arena_size >= {needs}."
                )
            raise ValueError(
                f"{where} needs a TFLite Micro arena of {needs} bytes, more than "
                f"the default {size} for bundles without measured arenas. Pass "
                f"arena_size >= {needs}."
            )
        return sizes

    def _warm_up(self) -> list[float]:
        """Invokes each segment once on zero inputs, outside `stats`.

        Returns:
            Seconds of each segment's first invoke (allocation, weight
            packing): load cost, not per-sample latency.
        """
        seconds = []
        for segment in self._segments:
            for t in segment.info.inputs:
                segment.runner.set_input(t, np.zeros(t.shape, t.dtype))
            start = time.perf_counter()
            segment.runner.invoke()
            seconds.append(time.perf_counter() - start)
        return seconds

    @property
    def num_exits(self) -> int:
        return len(self._segments)

    @property
    def thresholds(self) -> list[float]:
        """One threshold per non-final exit."""
        return list(self._thresholds)

    def set_thresholds(self, thresholds) -> None:
        """Sets the exit thresholds.

        Args:
            thresholds: floats in [0, 1], one per non-final exit. A sample
                leaves exit k when its confidence >= threshold k; 1.0 means
                no sample leaves. Int8 bundles compare in int8 with the
                quantized threshold (`manifest.quantize_threshold`).
        """
        expected = (
            f"{self.num_exits - 1} threshold(s) in [0, 1] (one per non-final exit)"
        )
        try:
            values = [float(t) for t in thresholds]
        except (TypeError, ValueError):
            raise ValueError(f"Expected {expected}; received {thresholds!r}.") from None
        if len(values) != self.num_exits - 1 or not all(
            0.0 <= t <= 1.0 for t in values
        ):
            raise ValueError(f"Expected {expected}; received {values}.")
        self._thresholds = values
        for segment, t in zip(self._segments, values + [0.0]):
            c = segment.confidence
            if c.quantized:
                segment.threshold = quantize_threshold(t, c.scale, c.zero_point)
            else:  # 1.0 means never: a float softmax reaches exactly 1.0
                segment.threshold = float(np.float32(t)) if t < 1.0 else math.inf

    @property
    def patience(self) -> int | None:
        """Criterion `"patience"`: how many exits in a row must predict a
        sample's class before it leaves (None for other criteria)."""
        return self._patience

    def set_patience(self, patience: int) -> None:
        """Sets the patience of a bundle exported with criterion
        `"patience"` (the manifest's stays as it is; see
        `kee.export.set_thresholds` to rewrite it).

        Args:
            patience: an int in [1, number of exits].
        """
        self._patience = check_patience(
            patience, self.manifest.criterion, self.num_exits
        )

    def reset_stats(self) -> None:
        """Starts `stats` afresh (counts and timings to zero), e.g. after a
        run that should not count. The load-time warm-up is never in it."""
        self.stats = RuntimeStats(list(self.manifest.exit_names))

    def _prepare(self, x) -> list[np.ndarray]:
        """Checks inputs (see the class docstring for the rules) and converts
        them to the dtype segment 1 takes."""
        return prepare_inputs(x, self._segments[0].info.inputs)

    def _run(self, sample: list[np.ndarray]) -> tuple[int, int, float]:
        """The gated loop for one sample (arrays with batch size 1)."""
        start = time.perf_counter()
        last = len(self._segments) - 1
        values = zip(self._segments[0].info.inputs, sample)
        patience, previous, streak = self._patience, -1, 0
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
            leaves = confidence >= segment.threshold
            if patience is not None:
                # The rule of `runtime.patience` (next_streak, then
                # patience_passes), on scalars; the class is the argmax of
                # the logits as the segment outputs them (int8 or float:
                # dequantizing keeps the order and the ties).
                label = int(np.argmax(runner.get_output(segment.logits)))
                streak = streak + 1 if label == previous else 1
                previous = label
                leaves = leaves and streak >= patience
            if k == last or leaves:
                if patience is None:
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
