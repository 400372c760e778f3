"""What TFLite Micro needs to know about a segment: its ops and its arena.

- `TFLM_BUILTINS` / `resolver_method` / `resolver_ops`: the builtin ops
  TFLite Micro's `MicroMutableOpResolver` provides, under the names of its
  `Add<Name>` methods. `to_c_arrays` uses them for `EARLYEXIT_OPS`, and
  `to_tflite` for `check_micro_ops`, which rejects at export an op that a
  microcontroller could not run, naming the segment and the Keras layer.
- `measure_arena`: the smallest tensor arena each segment allocates and
  invokes with, measured in the TFLite Micro interpreter of the
  `tflite_micro` pip package (reference kernels, host build), in a child
  process because TFLite Micro may crash the process on a too-small arena.

This module imports neither TensorFlow nor Keras.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from keras_earlyexit.export.flatbuffer import OpInfo, list_ops
from keras_earlyexit.runtime.manifest import RUNTIME_ARENA_MARGIN  # noqa: F401
from keras_earlyexit.runtime.micro_arena import ZERO_INPUTS

# `MicroMutableOpResolver::Add<Name>` methods of builtin ops (tflite-micro
# 90b983c, micro_mutable_op_resolver.h). An op's method name is its builtin
# name in CamelCase, except for `RESOLVER_SPELLING`.
TFLM_BUILTINS = frozenset(
    """Abs Add AddN ArgMax ArgMin AssignVariable AveragePool2D BatchMatMul
    BatchToSpaceNd BroadcastArgs BroadcastTo CallOnce Cast Ceil Concatenation
    Conv2D Cos CumSum DepthToSpace DepthwiseConv2D Dequantize Div
    DynamicUpdateSlice Elu EmbeddingLookup Equal Exp ExpandDims Fill Floor FloorDiv
    FloorMod FullyConnected Gather GatherNd Greater GreaterEqual HardSwish If
    L2Normalization L2Pool2D LeakyRelu Less LessEqual Log LogSoftmax LogicalAnd
    LogicalNot LogicalOr Logistic MaxPool2D Maximum Mean Minimum MirrorPad Mul Neg
    NotEqual Pack Pad PadV2 Prelu Quantize ReadVariable ReduceAll ReduceMax
    ReduceMin Relu Relu6 Reshape ResizeBilinear ResizeNearestNeighbor ReverseV2
    Round Rsqrt SelectV2 Shape Sin Slice Softmax SpaceToBatchNd SpaceToDepth Split
    SplitV Sqrt Square SquaredDifference Squeeze StridedSlice Sub Sum Svdf Tanh
    Transpose TransposeConv UnidirectionalSequenceLSTM Unpack VarHandle While
    ZerosLike""".split()
)
RESOLVER_SPELLING = {
    "BATCH_MATMUL": "BatchMatMul",
    "CUMSUM": "CumSum",
    "PADV2": "PadV2",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "UnidirectionalSequenceLSTM",
}


# What to write instead of a layer whose op TFLite Micro lacks.
MICRO_REPLACEMENTS = {
    "GELU": "use activation='relu' instead of 'gelu'",
    # Keras's Embedding wraps negative ids with a SELECT; the exporter
    # drops it for ids that come straight from a model input.
    "SELECT": "an Embedding writes it to wrap negative ids: feed the Embedding "
    "its ids straight from a model input, whose range the runtimes check, "
    "and the export drops it",
}


class UnsupportedOpError(ValueError):
    """A segment uses an op that TFLite Micro has no kernel for."""


def resolver_method(op_name: str) -> str:
    """The `MicroMutableOpResolver::Add<Name>` name of a builtin op name
    (`"CONV_2D"` -> `"Conv2D"`)."""
    if op_name in RESOLVER_SPELLING:
        return RESOLVER_SPELLING[op_name]
    # CONV_2D -> Conv2D, L2_POOL_2D -> L2Pool2D, REDUCE_MAX -> ReduceMax.
    return "".join(
        part if part[0].isdigit() else part[0] + part[1:].lower()
        for part in op_name.split("_")
    )


def resolver_ops(models: list[bytes]) -> list[str]:
    """`MicroMutableOpResolver::Add<Name>` names for the ops of the given
    `.tflite` models, sorted.

    Raises:
        UnsupportedOpError: an op with no TFLite Micro kernel (or a custom
            op).
    """
    names = set()
    for k, data in enumerate(models):
        check_micro_ops(data, k)
        names.update(resolver_method(op.name) for op in list_ops(data))
    return sorted(names)


def check_micro_ops(
    data: bytes,
    segment_index: int,
    layer_names: list[str] | None = None,
    exit_name: str | None = None,
) -> None:
    """Raises if a segment uses an op that TFLite Micro cannot run.

    Args:
        data: the segment's `.tflite` bytes.
        segment_index: 0-based, for the message.
        layer_names: names of the Keras layers of the segment; the layer
            whose name appears in the op's tensor names is named in the
            message (best effort: the converter fuses and renames tensors).
        exit_name: the segment's exit, for the message.

    Raises:
        UnsupportedOpError: naming the op, the segment and, where found, the
            Keras layer.
    """
    blocking: dict[str, list[str]] = {}  # op -> Keras layers
    for op in list_ops(data):
        if op.is_builtin and resolver_method(op.name) in TFLM_BUILTINS:
            continue
        layers = blocking.setdefault(op.name, [])
        layer = layer_of(op, layer_names or [])
        if layer and layer not in layers:
            layers.append(layer)
        elif not layer and not layers:
            layers.append("")
    if not blocking:
        return
    where = f"Segment {segment_index + 1}"
    if exit_name:
        where += f" (exit {exit_name!r})"
    found = []
    for name, layers in blocking.items():
        sources = [repr(layer) for layer in layers if layer]
        source = (
            f"Keras layer {', '.join(sources)}"
            if sources
            else "a layer that could not be identified from the tensor names"
        )
        hint = MICRO_REPLACEMENTS.get(name)
        found.append(f"{name} (from {source}" + (f"; {hint})" if hint else ")"))
    raise UnsupportedOpError(
        f"{where} uses the TFLite op{'s' if len(found) > 1 else ''} "
        f"{'; '.join(found)}; TFLite Micro has no kernel for "
        f"{'them' if len(found) > 1 else 'it'}, so the segment cannot run on a "
        "microcontroller. Rewrite those layers with ops TFLite Micro supports "
        "(the list is keras_earlyexit.export.micro.TFLM_BUILTINS), or, for "
        "LiteRT (Android) only, export with micro=False."
    )


def layer_of(op: OpInfo, layer_names: list[str]) -> str | None:
    """The Keras layer whose name appears in an op's tensor names.

    Converted tensor names are paths such as `"segment_2_1/conv_2_1/Gelu"`
    (Keras adds `_<n>` to name scopes); output names are tried first, then
    input names, path components outer to inner.
    """
    known = set(layer_names)
    for name in op.output_names + op.input_names:
        for fused in name.split(";"):
            for part in fused.split("/"):
                for candidate in (part, re.sub(r"_\d+$", "", part)):
                    if candidate in known:
                        return candidate
    return None


@dataclass
class ArenaUsage:
    """The arena one segment needs in TFLite Micro.

    Attributes:
        arena_bytes: smallest arena (16-byte steps) the segment allocates
            and invokes with, alone on its own `MicroAllocator`.
        head_bytes: of which the activation plan at the arena's head, the
            part that segments sharing one `MicroAllocator` reuse.
    """

    arena_bytes: int
    head_bytes: int


def shared_arena_bytes(usages: list[ArenaUsage]) -> int:
    """Arena for segments on one shared `MicroAllocator` (the C++ runner's
    `TflmEarlyExit`): every segment's persistent tail plus the largest
    head. Each segment's allocator bookkeeping is counted, so it is a
    slight overestimate of the single allocator's."""
    if not usages:
        return 0
    return sum(u.arena_bytes - u.head_bytes for u in usages) + max(
        u.head_bytes for u in usages
    )


# Run in a fresh interpreter with only `tflite_micro` imported (no
# TensorFlow, no Keras: fast to start, safe to fork). Each trial arena runs
# in a forked child, since a too-small arena can crash TFLite Micro.
_CHILD = (
    r"""
import ctypes, json, os, re, sys, tempfile
sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # no local shadowing
from tflite_micro.python.tflite_micro import runtime

libc = ctypes.CDLL(None)

"""
    + ZERO_INPUTS
    + r"""

def trial(data, size, report=None):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = os.open(report or os.devnull, os.O_WRONLY | os.O_CREAT)
            os.dup2(out, 1)
            os.dup2(out, 2)
            interpreter = runtime.Interpreter.from_bytes(data, arena_size=size)
            zero_inputs(interpreter)
            interpreter.invoke()
            if report:
                interpreter.print_allocations()
            code = 0
        except BaseException:
            pass
        libc.fflush(None)  # os._exit skips C stdio flushing
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status == 0

def measure(data):
    big = max(1 << 20, 16 * len(data))
    while not trial(data, big):
        big *= 4
        if big > 1 << 30:
            raise SystemExit("no arena up to 1 GiB works")
    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        trial(data, big, f.name)
        text = open(f.name).read()
    def field(name):
        m = re.search(r"Arena allocation " + name + r" (\d+) bytes", text)
        return int(m.group(1)) if m else 0
    lo, head = field("total"), field("head")
    hi = lo + 2048
    while not trial(data, hi):
        lo, hi = hi, min(2 * hi, big)
    while hi - lo > 16:
        mid = (lo + hi) // 2 // 16 * 16
        if mid <= lo:
            break
        if trial(data, mid):
            hi = mid
        else:
            lo = mid
    return {"arena_bytes": -(-hi // 16) * 16, "head_bytes": head}

for path in sys.argv[1:]:
    print(json.dumps(measure(open(path, "rb").read())), flush=True)
"""
)


def measure_arena(models: list[bytes], timeout: float = 600) -> list[ArenaUsage]:
    """Measures each model's TFLite Micro arena (see `ArenaUsage`).

    A binary search over arena sizes, each trial in a forked child, in one
    subprocess that imports only `tflite_micro`; about 0.1 s per model.
    Measured on the host (64-bit pointers): structures are smaller on a
    32-bit microcontroller, but optimized kernels (e.g. CMSIS-NN) may ask
    for scratch buffers the reference kernels do not; check on the target.

    Args:
        models: `.tflite` bytes.
        timeout: seconds for the whole measurement.

    Returns:
        One `ArenaUsage` per model.

    Raises:
        ImportError: the `tflite_micro` package is not installed.
        RuntimeError: a model does not run in TFLite Micro at any size.
    """
    import importlib.util

    if importlib.util.find_spec("tflite_micro") is None:
        raise ImportError(
            "Measuring the TFLite Micro arena needs the tflite_micro package: "
            "pip install tflite-micro."
        )
    if not hasattr(os, "fork"):
        raise RuntimeError("Measuring the arena needs os.fork (Linux or macOS).")
    with tempfile.TemporaryDirectory(prefix="kee-arena-") as tmp:
        paths = []
        for k, data in enumerate(models):
            paths.append(os.path.join(tmp, f"model_{k}.tflite"))
            with open(paths[-1], "wb") as f:
                f.write(data)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, *paths],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(models):
        raise RuntimeError(
            f"Measuring the TFLite Micro arena failed for model {len(lines) + 1} "
            f"(exit status {proc.returncode}): "
            f"{(proc.stderr.strip() or proc.stdout.strip())[-1000:]}"
        )
    return [ArenaUsage(**json.loads(line)) for line in lines]
