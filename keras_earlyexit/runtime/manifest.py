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
          "scale": float | null, "zero_point": int | null}
```

Tensors are matched by `name` (the TFLite signature name); `position` is the
tensor's place in the subgraph's input or output list, resolved by name at
export time, for runtimes without signatures (TFLite Micro, C++). A carry
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
"""

import hashlib
import json
import os
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
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def thresholds(self) -> list[float]:
        """One threshold per non-final exit."""
        return [s.gate.threshold for s in self.segments[:-1]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = dict(data)
        segments = []
        for s in data.pop("segments"):
            s = dict(s)
            s["inputs"] = [TensorInfo(**t) for t in s["inputs"]]
            s["outputs"] = [TensorInfo(**t) for t in s["outputs"]]
            s["gate"] = GateInfo(**s["gate"])
            segments.append(SegmentInfo(**s))
        return cls(segments=segments, **data)


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

    Args:
        directory: the bundle directory written by `to_tflite`.
        verify: check each segment file's size and sha256.

    Returns:
        The `Manifest`.

    Raises:
        BundleError: no manifest, an unknown format or version, a missing or
            corrupted segment file.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(
            f"{directory!r} is not a keras-earlyexit bundle: {MANIFEST_NAME} "
            "not found. Write one with kee.export.to_tflite(model, directory)."
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise BundleError(
            f"{path} is not valid JSON ({e}). The bundle is damaged: convert again."
        ) from None
    if data.get("format") != FORMAT:
        raise BundleError(
            f"{path} has format {data.get('format')!r}; expected {FORMAT!r}."
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version!r}; this keras-earlyexit reads "
            f"version {FORMAT_VERSION}. Convert the model again with this "
            "version, or install the version that wrote the bundle."
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as e:
        raise BundleError(
            f"{path} does not follow the manifest schema ({e}). Convert again."
        ) from None
    if verify:
        for s in manifest.segments:
            read_segment(directory, s)
    return manifest


def read_segment(directory: str, segment: SegmentInfo) -> bytes:
    """The bytes of one segment file, checked against the manifest."""
    path = os.path.join(directory, segment.file)
    if not os.path.isfile(path):
        raise BundleError(
            f"Segment file {path} listed in the manifest is missing. Copy the "
            "whole bundle directory, or convert again."
        )
    with open(path, "rb") as f:
        data = f.read()
    digest = sha256_of(data)
    if digest != segment.sha256:
        raise BundleError(
            f"Segment file {path} is corrupted or was replaced: its sha256 is "
            f"{digest[:16]}..., the manifest expects {segment.sha256[:16]}... "
            "Copy the bundle again or convert again."
        )
    return data
