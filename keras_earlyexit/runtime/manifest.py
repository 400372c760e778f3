"""The bundle manifest: what a gated runtime needs to know about each segment.

A bundle is a directory with one `.tflite` file per exit segment and
`manifest.json`. This module defines the manifest's schema and reads it;
it imports neither Keras, TensorFlow nor a TFLite runtime, so the export
code (which writes manifests, `export.manifest`) and every runtime share it.

Schema (`format_version` 1):

```
{
  "format": "keras-earlyexit-tflite",
  "format_version": 1,
  "quantization": "int8" | "float16" | "dynamic" | "float32",
  "model_name": str, "num_classes": int, "criterion": str,
  "patience": int | null,              # criterion "patience" only, see below
  "exit_names": [str, ...],
  "boundary": str,                     # how int8 carries cross segments
  "segments": [{
    "index": int, "exit_name": str,
    "file": "segment_1.tflite", "sha256": hex, "size_bytes": int,
    "inputs": [TENSOR, ...],           # segment 1: model inputs; later: carry
    "outputs": [TENSOR, ...],          # carry tensors, "logits", "confidence"
    "carry_out": [str, ...],           # output names the next segment reads
    "macs": int, "cumulative_macs": int,
    "gate": {"criterion": str, "temperature": float, "threshold": float,
             "threshold_quantized": int | null},
    "arena_bytes": int | null,         # optional, see below
    "arena_head_bytes": int | null
  }, ...]
}
TENSOR = {"name": str, "position": int, "shape": [int, ...], "dtype": str,
          "scale": float | null, "zero_point": int | null,
          "value_range": [int, int] | null}  # optional, see below
```

Tensors are matched by `name` (the TFLite signature name); `position` is the
tensor's place in the subgraph's input or output list, resolved by name at
export time, for runtimes without signatures (TFLite Micro, C++). Segment
1's `inputs` are listed in the Keras model's input order (that of a list
of arrays passed to `predict`), which may differ from their positions. A carry
tensor has the same name as an output of segment k and an input of segment
k+1. `threshold_quantized` is the smallest int8 confidence whose dequantized
value reaches `threshold`, so an integer-only loop compares
`confidence_q >= threshold_quantized` (a value of 128 means "never").

`arena_bytes` is the smallest TFLite Micro tensor arena the segment
allocates and invokes with on its own, measured at export (int8 bundles,
`export.micro.measure_arena`); `arena_head_bytes` is the part of it that
holds activations, which segments on one shared `MicroAllocator` reuse.
Both are optional additions to version 1: they are null, or absent in
bundles written before them, when not measured.

`criterion` is the criterion of every gate. With `"patience"` (PABEE,
`runtime.patience`), the top-level `patience` is the number p of exits in
a row that must predict the same class: a sample leaves non-final exit k
when its streak (exits in a row, ending at k, whose class, the argmax of
their `logits`, is the same; 1 at exit 0) reaches p and its `confidence`
(the top-1 probability) passes the gate's `threshold`, a confidence floor
(0.0: none; int8 segments compare `threshold_quantized` as for any
criterion). The loop that runs the segments keeps the class and streak of
each sample; the segments are those of any criterion. `patience` is an
integer in [1, number of exits] for `"patience"`, and null (or absent, in
bundles written before it) for every other criterion: an optional
addition to version 1.

`value_range` (optional addition to version 1) is the inclusive range
`[low, high]` of the values an integer model input may take, where the
exporter knows it (token ids that feed an embedding of `n` rows:
`[0, n - 1]`); runtimes refuse values outside it before a segment runs.
Null or absent: only the dtype's range applies. Integer inputs (token ids,
padding masks) are never quantized: they have no `scale`.

A bundle may come from elsewhere, so reading checks every field (type,
range, consistency with the other fields) and raises `BundleError` naming
the first bad one (`segments[1].inputs[0].scale`); fields it does not know
are ignored, so that later additions to version 1 stay readable. Segment
`file`s are plain file names inside the bundle (symlinks leading out are
refused), read only at their listed `size_bytes` and sha256.
"""

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np

FORMAT = "keras-earlyexit-tflite"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUANTIZATION_MODES = ("int8", "float16", "dynamic", "float32")
# A quantized threshold above every int8 value: no sample leaves.
NEVER_QUANTIZED = 128
# Headroom a host runtime adds to a measured arena: the pip interpreter
# aligns a malloc'd arena, so the usable bytes vary by up to 15 per run.
RUNTIME_ARENA_MARGIN = 1024


class BundleError(ValueError):
    """A bundle directory that cannot be used: missing, corrupted or of an
    unsupported format version."""


@dataclass
class TensorInfo:
    """One input or output tensor of a segment."""

    name: str
    position: int
    shape: list[int]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None
    # Integer inputs: the inclusive range of valid values, where known.
    value_range: list[int] | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None


@dataclass
class GateInfo:
    """The exit gate of a segment: criterion, temperature, threshold."""

    criterion: str
    temperature: float
    threshold: float
    threshold_quantized: int | None = None


@dataclass
class SegmentInfo:
    """One exit segment: its file and its tensors."""

    index: int
    exit_name: str
    file: str
    sha256: str
    size_bytes: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    carry_out: list[str]
    macs: int
    cumulative_macs: int
    gate: GateInfo
    # Optional (see the module docstring): older bundles lack them.
    arena_bytes: int | None = None
    arena_head_bytes: int | None = None

    def output(self, name: str) -> TensorInfo:
        for t in self.outputs:
            if t.name == name:
                return t
        raise BundleError(
            f"Segment {self.index + 1} ({self.file}) has no output named "
            f"{name!r}; it has {[t.name for t in self.outputs]}. The bundle "
            "was not written by this version of keras-earlyexit: convert again."
        )


@dataclass
class Manifest:
    """The contents of `manifest.json`."""

    quantization: str
    model_name: str
    num_classes: int
    criterion: str
    exit_names: list[str]
    boundary: str
    segments: list[SegmentInfo] = field(default_factory=list)
    # Criterion "patience" only (see the module docstring).
    patience: int | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def thresholds(self) -> list[float]:
        """One threshold per non-final exit."""
        return [s.gate.threshold for s in self.segments[:-1]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data) -> "Manifest":
        """A `Manifest` from parsed JSON, checked field by field.

        Raises:
            BundleError: naming the first field that is missing, of the
                wrong type, out of range or inconsistent with the others.
        """
        return _parse_manifest(data)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def quantize_threshold(threshold: float, scale: float, zero_point: int) -> int:
    """The int8 threshold an integer-only loop compares with.

    The smallest `q` in [-128, 127] with
    `float32(q - zero_point) * float32(scale) >= float32(threshold)`, so that
    `confidence_q >= q` decides exactly as the float rule on the dequantized
    confidence does. 128 exceeds every int8 value: no sample leaves, which is
    also what a threshold of 1.0 means. Every runtime that computes it (C++,
    Kotlin) scans the same way in float32.
    """
    if not threshold < 1.0:
        return NEVER_QUANTIZED
    t, s = np.float32(threshold), np.float32(scale)
    levels = (np.arange(-128, 128, dtype=np.int32) - zero_point).astype(np.float32)
    passing = np.flatnonzero(levels * s >= t)
    return int(passing[0]) - 128 if passing.size else NEVER_QUANTIZED


def gate_passes(confidence, threshold: float):
    """The gate rule shared by Keras, the runtimes and the exported graphs: a
    sample leaves when `float32(confidence) >= float32(threshold)`, and never
    at a threshold of 1.0 (a saturated float softmax reaches exactly 1.0)."""
    confidence = np.asarray(confidence, np.float32)
    if not threshold < 1.0:
        return np.zeros(confidence.shape, bool)
    return confidence >= np.float32(threshold)


def read_manifest(directory: str, verify: bool = True) -> Manifest:
    """Reads and checks a bundle's manifest.

    A bundle may come from elsewhere: every field is checked for type,
    range and consistency, and segment files must lie inside the bundle
    directory (plain file names; symlinks leading out are refused).

    Args:
        directory: the bundle directory written by `to_tflite`.
        verify: also check each segment file's size and sha256.

    Returns:
        The `Manifest`.

    Raises:
        BundleError: no manifest, an unknown format or version, a malformed
            manifest (naming the field), a missing, outside or corrupted
            segment file.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(
            f"{directory!r} is not a keras-earlyexit bundle: {MANIFEST_NAME} "
            "not found. Write one with kee.export.to_tflite(model, directory)."
        )
    _inside(directory, MANIFEST_NAME, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(_MAX_MANIFEST_BYTES + 1))
    except (ValueError, RecursionError) as e:  # JSON, UTF-8 or nesting
        raise BundleError(
            f"{path} is not valid JSON ({str(e)[:200]}). The bundle is "
            "damaged: convert again."
        ) from None
    if not isinstance(data, dict):
        raise BundleError(
            f"{path} must hold a JSON object; found {type(data).__name__}."
        )
    if data.get("format") != FORMAT:
        raise BundleError(
            f"{path} has format {_show(data.get('format'))}; expected {FORMAT!r}."
        )
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {_show(version)}; this keras-earlyexit "
            f"reads version {FORMAT_VERSION}. Convert the model again with this "
            "version, or install the version that wrote the bundle."
        )
    try:
        manifest = Manifest.from_dict(data)
    except BundleError as e:
        raise BundleError(f"{path}: {e}. Convert the model again.") from None
    if verify:
        for s in manifest.segments:
            read_segment(directory, s)
    return manifest


def read_segment(directory: str, segment: SegmentInfo) -> bytes:
    """The bytes of one segment file, checked against the manifest: inside
    the bundle directory, of `size_bytes` bytes, with the listed sha256."""
    where = f"segment {segment.index + 1} ({segment.file})"
    path = _inside(directory, segment.file, where)
    if not os.path.isfile(path):
        raise BundleError(
            f"Segment file {segment.file} listed in the manifest of {directory} "
            "is missing. Copy the whole bundle directory, or convert again."
        )
    size = os.path.getsize(path)
    if size != segment.size_bytes:
        raise BundleError(
            f"Segment file {segment.file} in {directory} holds {size} bytes; "
            f"the manifest lists size_bytes {segment.size_bytes}. It is "
            "truncated or was replaced: copy the bundle again or convert again."
        )
    with open(path, "rb") as f:
        data = f.read(segment.size_bytes + 1)
    # The file's own digest is never shown: it may be a file from elsewhere.
    if len(data) != segment.size_bytes or sha256_of(data) != segment.sha256:
        raise BundleError(
            f"Segment file {segment.file} is corrupted or was replaced: its "
            f"sha256 differs from the one in the manifest of {directory}. Copy "
            "the bundle again or convert again."
        )
    return data


def _inside(directory: str, name: str, what: str) -> str:
    """The path of `name` in `directory`, refused if it resolves outside
    (through a symlink, for instance)."""
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or path == root:
        raise BundleError(
            f"The {what} of bundle {directory} is a link that leads outside the "
            "bundle directory; refusing to read it. A bundle holds its files "
            "itself: copy them in, or convert again."
        )
    return path


# Reading limits and checks for manifests from elsewhere.
_MAX_MANIFEST_BYTES = 16 << 20
_MAX_ARENA_BYTES = 1 << 30  # the runtime allocates what the manifest says
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
INTEGER_DTYPES = ("int8", "uint8", "int16", "int32", "int64")
# The criterion whose gates also need the streak of equal classes.
PATIENCE = "patience"
# Names end up in messages and generated sources: printable, no quotes,
# backslashes or control characters.
_NAME = re.compile(r"[^\x00-\x1f\x7f\"'\\`]{1,256}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed access to one JSON object of a manifest; every error names the
    field by its path (`segments[1].inputs[0].scale`)."""

    def __init__(self, value, path: str):
        if not isinstance(value, dict):
            raise BundleError(
                f"manifest field {path} must be a JSON object; found {_show(value)}"
            )
        self.value = value
        self.path = path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str):
        raise BundleError(
            f"manifest field {self.name(key)} must be {expected}; found "
            f"{_show(self.value[key])}"
        )

    def get(self, key: str, optional: bool = False):
        if key not in self.value:
            if optional:
                return None
            raise BundleError(f"manifest field {self.name(key)} is missing")
        return self.value[key]

    def string(self, key: str, pattern=_NAME, choices=None) -> str:
        value = self.get(key)
        if choices is not None:
            if value not in choices:
                self.fail(key, f"one of {list(choices)}")
        elif not isinstance(value, str) or not pattern.fullmatch(value):
            self.fail(key, "a non-empty string without quotes or control characters")
        return value

    def integer(self, key: str, low: int, high: int | None = None, optional=False):
        value = self.get(key, optional)
        if value is None and optional:
            return None
        if type(value) is not int or value < low or (high is not None and value > high):
            limits = f">= {low}" if high is None else f"in [{low}, {high}]"
            self.fail(key, f"an integer {limits}" + (" or null" if optional else ""))
        return value

    def number(self, key: str, low: float, high: float, low_open: bool = False):
        value = self.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and value <= high
        ok = ok and (value > low if low_open else value >= low)
        if not ok:
            bound = f"> {low}" if low_open else f">= {low}"
            if math.isfinite(high):
                bound += f" and <= {high}"
            self.fail(key, f"a finite number {bound}")
        return float(value)

    def items(self, key: str, non_empty: bool = True) -> list:
        value = self.get(key)
        if not isinstance(value, list) or (non_empty and not value):
            self.fail(key, "a non-empty list" if non_empty else "a list")
        return value

    def strings(self, key: str) -> list[str]:
        values = self.items(key, non_empty=False)
        for i, v in enumerate(values):
            if not isinstance(v, str) or not _NAME.fullmatch(v):
                raise BundleError(
                    f"manifest field {self.name(key)}[{i}] must be a non-empty "
                    f"string without quotes or control characters; found {_show(v)}"
                )
        return list(values)


def _parse_tensor(value, path: str) -> TensorInfo:
    f = _Fields(value, path)
    shape = f.items("shape")
    if not all(type(d) is int and d >= 1 for d in shape) or shape[0] != 1:
        f.fail("shape", "a list of integers >= 1 starting with the batch size 1")
    tensor = TensorInfo(
        name=f.string("name"),
        position=f.integer("position", 0),
        shape=list(shape),
        dtype=f.string("dtype", choices=DTYPES),
        scale=None,
        zero_point=None,
    )
    if f.get("scale", optional=True) is not None:
        tensor.scale = f.number("scale", 0.0, math.inf, low_open=True)
    tensor.zero_point = f.integer("zero_point", -128, 127, optional=True)
    if (tensor.scale is None) != (tensor.zero_point is None):
        raise BundleError(
            f"manifest fields {path}.scale and {path}.zero_point must both be "
            "set (an int8 tensor) or both be null"
        )
    if tensor.quantized and tensor.dtype != "int8":
        f.fail("dtype", "'int8' for a tensor with a scale and zero-point")
    tensor.value_range = _parse_value_range(f, tensor)
    return tensor


def _parse_value_range(f: "_Fields", tensor: TensorInfo) -> list[int] | None:
    value = f.get("value_range", optional=True)
    if value is None:
        return None
    if tensor.quantized or tensor.dtype not in INTEGER_DTYPES:
        kind = "quantized int8" if tensor.quantized else tensor.dtype
        f.fail("value_range", f"null for a {kind} tensor")
    info = np.iinfo(tensor.dtype)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(type(v) is int and info.min <= v <= info.max for v in value)
        or value[0] > value[1]
    ):
        f.fail(
            "value_range",
            f"[low, high], integers with low <= high in the range of "
            f"{tensor.dtype} [{info.min}, {info.max}], or null",
        )
    return list(value)


def _parse_tensors(f: _Fields, key: str, non_empty: bool) -> list[TensorInfo]:
    tensors = [
        _parse_tensor(t, f"{f.name(key)}[{i}]")
        for i, t in enumerate(f.items(key, non_empty))
    ]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        f.fail(key, "a list of tensors with distinct names")
    if sorted(t.position for t in tensors) != list(range(len(tensors))):
        f.fail(key, f"a list of tensors with positions 0 to {len(tensors) - 1}")
    return tensors


def _parse_gate(value, path: str, confidence: TensorInfo) -> GateInfo:
    f = _Fields(value, path)
    gate = GateInfo(
        criterion=f.string("criterion"),
        temperature=f.number("temperature", 0.0, math.inf, low_open=True),
        threshold=f.number("threshold", 0.0, 1.0),
        threshold_quantized=f.integer("threshold_quantized", -128, 128, True),
    )
    if confidence.quantized:
        expected = quantize_threshold(
            gate.threshold, confidence.scale, confidence.zero_point
        )
        if gate.threshold_quantized != expected:
            f.fail(
                "threshold_quantized",
                f"{expected} (threshold {gate.threshold} at the confidence's "
                f"scale {confidence.scale} and zero-point {confidence.zero_point})",
            )
    elif gate.threshold_quantized is not None:
        f.fail("threshold_quantized", "null for a float confidence")
    return gate


def _parse_segment(value, k: int, num_classes: int) -> SegmentInfo:
    path = f"segments[{k}]"
    f = _Fields(value, path)
    name = f.get("file")
    if not isinstance(name, str) or not _FILE.fullmatch(name):
        why = ""
        if isinstance(name, str) and (os.path.isabs(name) or name[:1] in "/\\"):
            why = " (an absolute path)"
        elif isinstance(name, str) and ".." in name.replace("\\", "/").split("/"):
            why = " (it leads out of the bundle with '..')"
        f.fail("file", "the name of a file inside the bundle directory" + why)
    sha = f.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        f.fail("sha256", "64 lowercase hexadecimal digits")
    outputs = _parse_tensors(f, "outputs", non_empty=True)
    by_name = {t.name: t for t in outputs}
    for required in ("logits", "confidence"):
        if required not in by_name:
            f.fail("outputs", f"a list of tensors that includes {required!r}")
    if int(np.prod(by_name["confidence"].shape)) != 1:
        raise BundleError(
            f"manifest field {path}.outputs 'confidence' must hold one value per "
            f"sample; its shape is {by_name['confidence'].shape}"
        )
    if int(np.prod(by_name["logits"].shape)) != num_classes:
        raise BundleError(
            f"manifest field {path}.outputs 'logits' must hold num_classes "
            f"({num_classes}) values per sample; its shape is "
            f"{by_name['logits'].shape}"
        )
    carry_out = f.strings("carry_out")
    for c in carry_out:
        if c not in by_name:
            f.fail("carry_out", f"names of outputs of the segment ({c!r} is not)")
    segment = SegmentInfo(
        index=f.integer("index", k, k),
        exit_name=f.string("exit_name"),
        file=name,
        sha256=sha,
        size_bytes=f.integer("size_bytes", 1),
        inputs=_parse_tensors(f, "inputs", non_empty=True),
        outputs=outputs,
        carry_out=carry_out,
        macs=f.integer("macs", 0),
        cumulative_macs=f.integer("cumulative_macs", 0),
        gate=_parse_gate(f.get("gate"), f"{path}.gate", by_name["confidence"]),
        arena_bytes=f.integer("arena_bytes", 1, _MAX_ARENA_BYTES, optional=True),
        arena_head_bytes=f.integer(
            "arena_head_bytes", 0, _MAX_ARENA_BYTES, optional=True
        ),
    )
    if (segment.arena_head_bytes or 0) > (segment.arena_bytes or math.inf):
        f.fail("arena_head_bytes", f"<= arena_bytes ({segment.arena_bytes})")
    return segment


def check_patience_field(f: "_Fields", criterion: str, num_exits: int) -> int | None:
    """The top-level `patience` of a bundle or fused manifest: an integer in
    [1, num_exits] for the patience criterion, null for any other."""
    if criterion == PATIENCE:
        if f.get("patience", optional=True) is None:
            raise BundleError(
                f"manifest field {f.name('patience')} is missing: criterion "
                f"{PATIENCE!r} needs an integer in [1, {num_exits}]"
            )
        return f.integer("patience", 1, num_exits)
    if f.get("patience", optional=True) is not None:
        f.fail("patience", f"null for criterion {criterion!r}")
    return None


def _check_carry(previous: SegmentInfo, segment: SegmentInfo) -> None:
    """Segment k's `carry_out` feeds exactly segment k+1's inputs, tensor
    by tensor of the same dtype and shape."""
    path = f"segments[{previous.index}].carry_out"
    names = sorted(t.name for t in segment.inputs)
    if sorted(previous.carry_out) != names:
        raise BundleError(
            f"manifest field {path} must list the inputs of segment "
            f"{segment.index + 1} ({names}); found {_show(previous.carry_out)}"
        )
    for target in segment.inputs:
        source = previous.output(target.name)
        if (source.dtype, source.shape, source.quantized) != (
            target.dtype,
            target.shape,
            target.quantized,
        ):
            raise BundleError(
                f"manifest carry {target.name!r} from segment {previous.index + 1} "
                f"to segment {segment.index + 1} changes from {source.dtype} "
                f"{source.shape} to {target.dtype} {target.shape}"
                + (" (quantized on one side only)" if source.dtype == "int8" else "")
            )


def _parse_manifest(data) -> Manifest:
    f = _Fields(data, "")
    num_classes = f.integer("num_classes", 1)
    segments = [
        _parse_segment(s, k, num_classes) for k, s in enumerate(f.items("segments"))
    ]
    criterion = f.string("criterion")
    manifest = Manifest(
        quantization=f.string("quantization", choices=QUANTIZATION_MODES),
        model_name=f.string("model_name"),
        num_classes=num_classes,
        criterion=criterion,
        exit_names=f.strings("exit_names"),
        boundary=f.string("boundary"),
        segments=segments,
        patience=check_patience_field(f, criterion, len(segments)),
        format=f.string("format", choices=(FORMAT,)),
        format_version=f.integer("format_version", FORMAT_VERSION, FORMAT_VERSION),
    )
    if manifest.exit_names != [s.exit_name for s in segments]:
        f.fail(
            "exit_names", f"the segments' exit names {[s.exit_name for s in segments]}"
        )
    files = [s.file for s in segments]
    if len(set(files)) != len(files):
        f.fail("segments", "a list of segments with distinct files")
    if segments[-1].carry_out:
        raise BundleError(
            f"manifest field segments[{len(segments) - 1}].carry_out must be "
            "empty: the final segment hands nothing on"
        )
    for previous, segment in zip(segments, segments[1:]):
        _check_carry(previous, segment)
    return manifest
