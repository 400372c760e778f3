"""`to_c_arrays`: a bundle as C++ sources for the TFLite Micro runner.

Writes, for a bundle made by `to_tflite`:

- `segment_<k>_model_data.cc/.h`: each segment's `.tflite` bytes as
  `alignas(16) const unsigned char g_segment_<k>_model_data[]` (TFLite Micro
  reads the flatbuffer in place, from flash) and its length as a constant;
- `earlyexit_config.h`: an `earlyexit::ModelConfig` for the runner in
  `tflite/micro/` (per segment: input, logits, confidence and carry tensors
  with their positions, shapes, dtypes and int8 parameters; thresholds in
  float and int8; MACs; the patience of criterion `"patience"`), the tensor
  arena size, the carry buffer size, and `EARLYEXIT_OPS(OP)`, the
  `MicroMutableOpResolver` ops the segments use.

Integer model inputs (token ids, padding masks) are int32 in the config,
each with the range of values the runner lets through: the manifest's
`value_range`, narrowed to the rows of every embedding table (GATHER) the
input reaches in the graph, because TFLite Micro reads the table with the
ids unchecked.

For a fused file (`to_tflite(..., fused=True)`; its embedded manifest is
checked first, hash included), writes `fused_model_data.cc/.h`, the file
as one aligned array, and `earlyexit_fused_config.h`: an
`earlyexit::FusedConfig` for `tflite/micro/fused_runner.h` (inputs with
positions, shapes, dtypes and int8 parameters; positions of the `class`,
`exit_index` and `confidence` outputs), the exits' names, thresholds and
MACs as the manifest holds them, the arena size (the arena measured at
export plus `RUNTIME_ARENA_MARGIN`) and `EARLYEXIT_FUSED_OPS(OP)`, the
ops of all subgraphs, IF included.

The arena size of a bundle is, in order of preference: `arena_size`
given by the caller; the arena measured at export in TFLite Micro (field
`arena_bytes` of int8 bundles; one `MicroAllocator` shared by all segments:
every segment's persistent part plus the largest activation plan, see
`micro.shared_arena_bytes`); or `estimate_arena_size`, an upper bound from
the flatbuffers that assumes no memory reuse inside a segment (bundles
exported without measurement).
"""

import math
import os
import re
import shutil
import textwrap

import numpy as np

from keras_earlyexit.export.flatbuffer import list_ops
from keras_earlyexit.export.manifest import (
    QUANTIZATION_MODES,
    TEMP_MARKER,
    BundleError,
    Manifest,
    SegmentInfo,
    TensorInfo,
    clean_leftovers,
    make_temp_dir,
    name_list,
    read_manifest,
    read_segment,
    replace_directory,
    resolve_target,
)
from keras_earlyexit.export.micro import (
    ArenaUsage,
    resolver_method,
    resolver_ops,
    shared_arena_bytes,
)
from keras_earlyexit.runtime.manifest import PATIENCE, RUNTIME_ARENA_MARGIN

# Kept for callers of the former private name.
_resolver_method = resolver_method

CONFIG_NAME = "earlyexit_config.h"
# Of a fused file: one model array and its config header.
FUSED_STEM = "fused_model_data"
FUSED_CONFIG_NAME = "earlyexit_fused_config.h"
# TFLite Micro's tensor arena and flatbuffer alignment.
ALIGNMENT = 16
MAX_RANK = 6
_DTYPES = {
    "int8": ("earlyexit::DType::kInt8", 1),
    "float32": ("earlyexit::DType::kFloat32", 4),
    "int32": ("earlyexit::DType::kInt32", 4),
}
# What the runner's gate and ArgMax read.
_GATE_DTYPES = ("int8", "float32")
_INT32_MIN = -(2**31)


def to_c_arrays(
    directory: str,
    out_dir: str,
    arena_size: int | None = None,
    namespace: str = "earlyexit_config",
) -> str:
    """Writes a bundle's segments, or a fused file, as C arrays plus a config
    header.

    Each segment file is checked against the manifest's sha256 first; a
    fused file against its embedded manifest. The
    sources are written to a temporary directory next to `out_dir` and
    renamed into place: a failure leaves no partial output, and a previous
    output at `out_dir` stays intact until the new one is complete. Only
    files that `to_c_arrays` generated (recognised by name and first line)
    are ever replaced or removed.

    Args:
        directory: a bundle written by `kee.export.to_tflite` (int8 for
            integer-only microcontrollers; float bundles also work), or a
            fused `.tflite` file (`to_tflite(..., fused=True)`).
        out_dir: directory to create or replace; not the bundle nor a
            directory holding it. An existing directory is replaced when it
            is empty or holds only a previous output. One that holds a
            previous output (`earlyexit_config.h`) beside your own files
            (e.g. `main.cc`) gets its generated files replaced, stale ones
            removed and yours kept. Any other non-empty directory is
            refused. A symlink is kept and its target written.
        arena_size: TFLite Micro tensor arena bytes for all segments
            together (they share one arena), or for the fused model.
            Default for a fused file: `fused_arena_size`. For a bundle:
            `bundle_arena_size`,
            the arena measured at export (host, reference kernels; targets
            with optimized kernels such as CMSIS-NN may need scratch on
            top: check with `RecordingMicroAllocator`), or the conservative
            `estimate_arena_size` for bundles without measurements.
        namespace: C++ namespace of the config constants.

    Returns:
        `out_dir`, absolute.

    Example:

    ```python
    bundle = kee.export.to_tflite(model, "digits_int8", representative_data=x)
    kee.export.to_c_arrays(bundle, "firmware/src/model")
    fused = kee.export.to_tflite(
        model, "digits.tflite", representative_data=x, fused=True
    )
    kee.export.to_c_arrays(fused, "firmware/src/fused_model")
    ```
    """
    if arena_size is not None and (not isinstance(arena_size, int) or arena_size <= 0):
        raise ValueError(
            f"arena_size must be a positive int (bytes). Received: {arena_size!r}"
        )
    if not re.fullmatch(r"[A-Za-z_]\w*", namespace):
        raise ValueError(f"namespace must be a C++ identifier. Received: {namespace!r}")
    directory = os.path.abspath(directory)
    # Every value is checked or escaped here, before anything is written.
    if os.path.isfile(directory):
        sources = _fused_sources(directory, arena_size, namespace)
    else:
        sources = _bundle_sources(directory, arena_size, namespace)

    target = resolve_target(out_dir)
    merge = _check_out_dir(directory, target)
    clean_leftovers(target, _not_generated)
    tmp = make_temp_dir(target)
    try:
        for name, text in sources.items():
            _write(tmp, name, text)
        if merge:
            _merge_generated(tmp, target)
        else:
            replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(out_dir)


def _bundle_sources(directory: str, arena_size: int | None, namespace: str) -> dict:
    manifest = read_manifest(directory, verify=False)
    if not manifest.segments:
        raise BundleError(f"The manifest in {directory} lists no segments.")
    models = [read_segment(directory, s) for s in manifest.segments]
    ops = resolver_ops(models)
    if arena_size is None:
        arena_size = bundle_arena_size(manifest) or estimate_arena_size(models)
    return _generate(
        manifest, models, os.path.basename(directory), ops, arena_size, namespace
    )


def _fused_sources(path: str, arena_size: int | None, namespace: str) -> dict:
    """The fused file's array and `earlyexit_fused_config.h`."""
    from keras_earlyexit.runtime.fused import read_fused_manifest

    with open(path, "rb") as f:
        data = f.read()
    # Checks the format, the file's own hash and the threshold constants.
    manifest = read_fused_manifest(data, path)
    ops = resolver_ops([data])
    if arena_size is None:
        arena_size = fused_arena_size(manifest) or estimate_arena_size([data])
    name = os.path.basename(path)
    return {
        f"{FUSED_STEM}.h": _array_header(
            FUSED_STEM, name, manifest.content_sha256, data
        ),
        f"{FUSED_STEM}.cc": _array_source(
            FUSED_STEM, name, manifest.content_sha256, data
        ),
        FUSED_CONFIG_NAME: _fused_config_header(
            manifest,
            name,
            ops,
            arena_size,
            namespace,
            _input_ranges("The fused model", manifest.inputs, data),
        ),
    }


# What `to_c_arrays` writes: these names, each file opening with the banner;
# a config header marks a directory as a previous output.
_CONFIG_NAMES = (CONFIG_NAME, FUSED_CONFIG_NAME)
_GENERATED_NAME = re.compile(
    r"(segment_\d+|fused)_model_data\.(cc|h)|"
    + "|".join(re.escape(n) for n in _CONFIG_NAMES)
)
_GENERATED_BANNER = b"// Generated by keras_earlyexit.export.to_c_arrays"


def _is_generated(path: str) -> bool:
    """Whether `path` is a file that `to_c_arrays` wrote."""
    if not _GENERATED_NAME.fullmatch(os.path.basename(path)):
        return False
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(len(_GENERATED_BANNER)) == _GENERATED_BANNER


def _not_generated(directory: str) -> str | None:
    """Why `directory` is not (only) a previous `to_c_arrays` output."""
    foreign = [
        name
        for name in sorted(os.listdir(directory))
        if not _is_generated(os.path.join(directory, name))
    ]
    if foreign:
        return f"it holds files to_c_arrays did not generate: {name_list(foreign)}"
    return None


def _check_out_dir(bundle: str, out_dir: str) -> bool:
    """Refuses an output directory that would lose a file; returns whether
    to merge into it (a previous output beside the user's own files)
    rather than replace it whole. `bundle`: the bundle or fused file."""
    kind = "fused model" if os.path.isfile(bundle) else "bundle"
    bundle = os.path.realpath(bundle)
    out = os.path.realpath(out_dir)
    if out == bundle or bundle.startswith(out + os.sep):
        raise ValueError(
            f"out_dir {out_dir} is or contains the {kind} {bundle} that "
            "to_c_arrays reads. Write the C sources to a directory of their "
            f"own, e.g. {os.path.join(out_dir, 'model')}."
        )
    if out.startswith(bundle + os.sep):
        raise ValueError(
            f"out_dir {out_dir} is inside the bundle {bundle}; a bundle holds "
            "only its manifest and segments. Write the C sources elsewhere."
        )
    fix = (
        "to_c_arrays replaces only its own output: choose a new or empty "
        "directory (and add it to your firmware's sources)."
    )
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory. {fix}")
    if not os.path.isdir(out_dir) or _not_generated(out_dir) is None:
        return False
    names = sorted(os.listdir(out_dir))
    clashes = [
        n
        for n in names
        if _GENERATED_NAME.fullmatch(n) and not _is_generated(os.path.join(out_dir, n))
    ]
    if clashes:
        raise FileExistsError(
            f"Refusing to write into {out_dir}: {name_list(clashes)} "
            "have the names of generated files but were not generated by "
            f"to_c_arrays. Rename them, or {fix[0].lower()}{fix[1:]}"
        )
    if not any(_is_generated(os.path.join(out_dir, n)) for n in _CONFIG_NAMES):
        raise FileExistsError(
            f"Refusing to replace {out_dir}: {_not_generated(out_dir)}, and "
            f"no previous output ({' or '.join(_CONFIG_NAMES)}). {fix}"
        )
    return True


def _merge_generated(tmp: str, out_dir: str) -> None:
    """Moves the files generated in `tmp` into `out_dir`, which also holds
    the user's files: generated files are replaced one by one (the config
    header last), stale generated ones removed, the others kept."""
    os.remove(os.path.join(tmp, TEMP_MARKER))
    new = sorted(os.listdir(tmp), key=lambda name: name in _CONFIG_NAMES)
    for name in new:
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name not in new and _is_generated(path):
            os.remove(path)
    os.rmdir(tmp)


def read_c_array(path: str) -> bytes:
    """The bytes of a `segment_<k>_model_data.cc` written by `to_c_arrays`.

    Raises:
        ValueError: the file holds no such array, or its length constant
            (in the matching `.h`) disagrees with the array.
    """
    with open(path) as f:
        text = f.read()
    match = re.search(r"\[\]\s*=\s*\{([^}]*)\}", text)
    if match is None:
        raise ValueError(f"{path} holds no C array written by to_c_arrays.")
    values = re.findall(r"0x([0-9a-fA-F]{2})", match.group(1))
    data = bytes(int(v, 16) for v in values)
    header = os.path.splitext(path)[0] + ".h"
    if os.path.isfile(header):
        with open(header) as f:
            length = re.search(r"_len\s*=\s*(\d+)", f.read())
        if length is None or int(length.group(1)) != len(data):
            raise ValueError(
                f"{header} declares a length different from the {len(data)} "
                f"bytes of {path}: the two files come from different exports."
            )
    return data


def read_c_arrays(out_dir: str) -> list[bytes]:
    """The segment models in a `to_c_arrays` output, in segment order."""
    files = [
        f for f in os.listdir(out_dir) if re.fullmatch(r"segment_\d+_model_data\.cc", f)
    ]
    files.sort(key=lambda f: int(f.split("_")[1]))
    return [read_c_array(os.path.join(out_dir, f)) for f in files]


def bundle_arena_size(manifest: Manifest) -> int | None:
    """The shared arena (bytes, a multiple of 16) of the segments of a
    bundle measured at export, or None when a segment has no measurement
    (float bundles, bundles from older versions)."""
    usages = [
        ArenaUsage(s.arena_bytes, s.arena_head_bytes)
        for s in manifest.segments
        if s.arena_bytes is not None and s.arena_head_bytes is not None
    ]
    if not usages or len(usages) != len(manifest.segments):
        return None
    return _align(shared_arena_bytes(usages))


def fused_arena_size(manifest) -> int | None:
    """The tensor arena (bytes, a multiple of 16) of a fused file: the
    arena measured at export in TFLite Micro plus `RUNTIME_ARENA_MARGIN`
    (what `FusedInterpreter(backend="micro")` gives it), or None when the
    file has no measurement (float files exported without `micro=True`)."""
    measured = manifest.arena_bytes
    if measured is None:
        return None
    _c_int(measured, "arena_bytes", 1, _INT32_MAX - RUNTIME_ARENA_MARGIN - 16)
    return _align(measured + RUNTIME_ARENA_MARGIN)


def estimate_arena_size(models: list[bytes]) -> int:
    """A conservative tensor arena size for segments sharing one arena.

    TFLite Micro keeps persistent data (tensor structs, node data,
    per-channel quantization) at the arena's tail for every segment, and
    plans activations at the head, which segments sharing one
    `MicroAllocator` reuse. The estimate sums each segment's persistent part
    and takes the largest activation part; it counts every activation tensor
    as live at once (no reuse inside a segment) and adds scratch for
    optimized convolution kernels, then a quarter on top.

    Args:
        models: the segments' `.tflite` bytes.

    Returns:
        Bytes, a multiple of 1 KiB.
    """
    from ai_edge_litert import schema_py_generated as schema

    type_sizes = {
        schema.TensorType.FLOAT32: 4,
        schema.TensorType.INT32: 4,
        schema.TensorType.INT64: 8,
        schema.TensorType.INT16: 2,
        schema.TensorType.FLOAT16: 2,
    }
    conv_like = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}
    persistent, heads = 2048, []  # 2048: allocator and planner objects
    for data in models:
        model = schema.Model.GetRootAs(data, 0)
        ops = list_ops(data)
        head = tail = 0
        for s in range(model.SubgraphsLength()):
            graph = model.Subgraphs(s)
            for i in range(graph.TensorsLength()):
                tensor = graph.Tensors(i)
                buffer = model.Buffers(tensor.Buffer())
                elements = int(np.prod(tensor.ShapeAsNumpy()))
                if buffer.DataLength() == 0 and buffer.Size() == 0:
                    size = elements * type_sizes.get(tensor.Type(), 1)
                    head += _align(size) + 64  # 64: planning bookkeeping
                tail += 32  # TfLiteEvalTensor
            io = graph.InputsLength() + graph.OutputsLength()
            tail += 128 * io + 1024  # TfLiteTensor + quantization; subgraph
            for o in range(graph.OperatorsLength()):
                op = graph.Operators(o)
                tail += 256  # node, registration and kernel op data
                if ops[o].name in conv_like:
                    weights = graph.Tensors(int(op.InputsAsNumpy()[1]))
                    shape = weights.ShapeAsNumpy()
                    tail += 8 * int(shape[0])  # per-channel multiplier, shift
                    head += _align(4 * int(np.prod(shape[1:])))  # im2col scratch
        persistent += tail
        heads.append(head)
    total = (persistent + max(heads, default=0)) * 5 // 4
    return -(-total // 1024) * 1024


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _write(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def _stem(k: int) -> str:
    return f"segment_{k + 1}_model_data"


# Generated sources take manifest values only through the functions below,
# which check or escape each one: a bundle may come from elsewhere, and a
# value written verbatim could inject code into the firmware.
_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _c_int(value, field: str, low: int, high: int) -> str:
    """An integer literal; `value` must be an int in [low, high]."""
    if type(value) is not int or not low <= value <= high:
        raise BundleError(
            f"manifest field {field} must be an integer in [{low}, {high}] to be "
            f"written into C++; found {value!r}. Convert the model again."
        )
    return str(value)


def _c_float(value, field: str, low: float, high: float, low_open=False) -> str:
    """A float literal that reads back as the same float32; `value` must be a
    number in [low, high] (or (low, high]) that is finite in float32."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and abs(value) <= _FLOAT32_MAX
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise BundleError(
            f"manifest field {field} must be a finite number in {bounds} to be "
            f"written into C++; found {value!r}. Convert the model again."
        )
    text = f"{np.float32(value):.9g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text + "f"


def _c_string(value, field: str) -> str:
    """A C++ string literal holding `value`'s UTF-8 bytes: printable ASCII as
    it is, everything else (quotes, backslashes, line breaks, `?` of
    trigraphs, non-ASCII) as 3-digit octal escapes."""
    if not isinstance(value, str) or "\x00" in value:
        raise BundleError(
            f"manifest field {field} must be a string without NUL characters; "
            f"found {value!r}."
        )
    out = []
    for b in value.encode("utf-8", "surrogatepass"):
        c = chr(b)
        out.append(c if 0x20 <= b < 0x7F and c not in '"\\?' else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _comment(value) -> str:
    """`value` as text safe inside a `//` comment: printable ASCII only (no
    line break or trailing backslash can end the comment), others as `?`."""
    text = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in str(value))
    return text[:200]


def _check_tensor(owner: str, t: TensorInfo, field: str) -> None:
    """`owner`: "Segment 2", "The fused model", for messages."""
    if t.dtype not in _DTYPES:
        raise BundleError(
            f"{owner} tensor {_comment(t.name)!r} has dtype "
            f"{_comment(t.dtype)}; the micro runner handles {sorted(_DTYPES)}. "
            "Convert with quantization='int8' (or 'float32')."
        )
    if not isinstance(t.shape, list) or not 1 <= len(t.shape) <= MAX_RANK:
        raise BundleError(
            f"{owner} tensor {_comment(t.name)!r} has shape "
            f"{_comment(t.shape)}; the micro runner needs static shapes of rank "
            f"1 to {MAX_RANK}."
        )
    for i, d in enumerate(t.shape):
        _c_int(d, f"{field}.shape[{i}]", 1, _INT32_MAX)
    if _bytes(t) > _INT32_MAX:
        raise BundleError(
            f"{owner} tensor {_comment(t.name)!r} of shape "
            f"{t.shape} is too large for a microcontroller."
        )


def _tensor(
    segment: SegmentInfo, t: TensorInfo, value_range: tuple[int, int] | None = None
) -> str:
    field = f"segments[{segment.index}] tensor {_comment(t.name)!r}"
    return _tensor_config(f"Segment {segment.index + 1}", t, field, value_range)


def _gate_tensor(segment: SegmentInfo, name: str) -> str:
    """The logits or confidence output, which the runner's gate reads."""
    t = segment.output(name)
    if t.dtype not in _GATE_DTYPES:
        raise BundleError(
            f"Segment {segment.index + 1} output {name!r} is {_comment(t.dtype)}; "
            f"the micro runner reads {name} as {' or '.join(_GATE_DTYPES)}. "
            "Convert the model again."
        )
    return _tensor(segment, t)


def _tensor_config(
    owner: str, t: TensorInfo, field: str, value_range: tuple[int, int] | None = None
) -> str:
    """An `earlyexit::TensorConfig` initializer of `t`, every value checked.
    int32 tensors also get their `value_range` (default: all of int32)."""
    _check_tensor(owner, t, field)
    dims = ", ".join(str(d) for d in t.shape)
    if t.dtype == "int8":
        scale = _c_float(t.scale, f"{field}.scale", 0, math.inf, low_open=True)
        zero_point = _c_int(t.zero_point, f"{field}.zero_point", -128, 127)
    else:
        scale, zero_point = "0.0f", "0"
    values = ""
    if t.dtype == "int32":
        low, high = value_range or (_INT32_MIN, _INT32_MAX)
        values = f", {_c_int32(low)}, {_c_int32(high)}"
    return (
        f"{{{_c_string(t.name, f'{field}.name')}, "
        f"{_c_int(t.position, f'{field}.position', 0, _INT32_MAX)}, "
        f"{_DTYPES[t.dtype][0]}, {len(t.shape)}, {{{dims}}}, {_bytes(t)}u, "
        f"{scale}, {zero_point}{values}}}"
    )


def _c_int32(value: int) -> str:
    # -2147483648 is not an int literal in C++ (2147483648 negated).
    return "INT32_MIN" if value == _INT32_MIN else str(value)


def _patience(criterion, patience, num_exits: int) -> str:
    """kPatience: the manifest's patience for criterion "patience" (an
    integer in [1, num_exits]), 0 for the other criteria."""
    if criterion == PATIENCE:
        return _c_int(patience, "patience", 1, num_exits)
    if patience is not None:
        raise BundleError(
            f"manifest field patience must be null for criterion "
            f"{_comment(criterion)!r}; found {_comment(patience)}. Convert the "
            "model again."
        )
    return "0"


def _input_ranges(
    owner: str, inputs: list[TensorInfo], data: bytes
) -> list[tuple[int, int] | None]:
    """Per model input, the values the runner lets through: for int32 inputs
    the manifest's `value_range`, narrowed to the rows of every embedding
    table (GATHER) the input reaches in the graph, whose indices TFLite
    Micro does not check; None (all values) for other inputs."""
    bounds = _gather_rows(data)
    ranges = []
    for i, t in enumerate(inputs):
        if t.dtype != "int32":
            ranges.append(None)
            continue
        field = f"{owner} input {_comment(t.name)!r} value_range"
        low, high = _INT32_MIN, _INT32_MAX
        if t.value_range is not None:
            if not isinstance(t.value_range, (list, tuple)) or len(t.value_range) != 2:
                raise BundleError(f"manifest field {field} must be [low, high].")
            low = int(_c_int(t.value_range[0], f"{field}[0]", _INT32_MIN, _INT32_MAX))
            high = int(_c_int(t.value_range[1], f"{field}[1]", low, _INT32_MAX))
        rows = bounds.get(t.position)
        if rows is not None:
            low, high = max(low, 0), min(high, rows - 1)
            if low > high:
                raise BundleError(
                    f"{owner} input {_comment(t.name)!r} indexes a table of "
                    f"{rows} rows, but its manifest value_range is "
                    f"{_comment(t.value_range)}: no id would be valid. Convert "
                    "the model again."
                )
        ranges.append((low, high))
    return ranges


# Ops whose indices input (by position) selects rows of a table input.
_GATHERS = {"GATHER": (1, 0), "EMBEDDING_LOOKUP": (0, 1), "GATHER_ND": (1, 0)}


def _gather_rows(data: bytes) -> dict[int, int]:
    """Input position of the main subgraph -> the fewest rows of the tables
    that GATHER, GATHER_ND or EMBEDDING_LOOKUP index with values computed
    from it (through any ops, into IF and WHILE subgraphs). Inputs that
    reach no such op are absent."""
    from ai_edge_litert import schema_py_generated as schema

    names = {
        v: k for k, v in vars(schema.BuiltinOperator).items() if isinstance(v, int)
    }
    model = schema.Model.GetRootAs(data, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        codes.append(names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode())))
    main = model.Subgraphs(0)
    rows = {}
    for position in range(main.InputsLength()):
        reached = {(0, int(main.Inputs(position)))}
        work = list(reached)
        fewest = None

        def reach(subgraph: int, tensor: int) -> None:
            if tensor >= 0 and (subgraph, tensor) not in reached:
                reached.add((subgraph, tensor))
                work.append((subgraph, tensor))

        while work:
            g, tensor = work.pop()
            graph = model.Subgraphs(g)
            for o in range(graph.OperatorsLength()):
                op = graph.Operators(o)
                inputs = (
                    [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
                )
                if tensor not in inputs:
                    continue
                name = codes[op.OpcodeIndex()]
                if name in _GATHERS:
                    index, table = _GATHERS[name]
                    if index < len(inputs) and inputs[index] == tensor:
                        shape = graph.Tensors(inputs[table]).ShapeAsNumpy()
                        n = int(shape[_gather_axis(op, schema, len(shape))])
                        if name == "GATHER_ND":
                            n = int(min(shape))
                        fewest = n if fewest is None else min(fewest, n)
                for out in op.OutputsAsNumpy() if op.OutputsLength() else []:
                    reach(g, int(out))
                for sub, offset in _called_subgraphs(op, name, schema):
                    callee = model.Subgraphs(sub)
                    for j, i in enumerate(inputs[offset:]):
                        if i == tensor and j < callee.InputsLength():
                            reach(sub, int(callee.Inputs(j)))
        if fewest is not None:
            rows[position] = fewest
    return rows


def _gather_axis(op, schema, rank: int) -> int:
    if op.BuiltinOptionsType() != schema.BuiltinOptions.GatherOptions:
        return 0
    options = schema.GatherOptions()
    table = op.BuiltinOptions()
    options.Init(table.Bytes, table.Pos)
    return options.Axis() % max(rank, 1)


def _called_subgraphs(op, name: str, schema) -> list[tuple[int, int]]:
    """(subgraph, first operand passed to its inputs) of IF and WHILE."""
    table = op.BuiltinOptions()
    if name == "IF" and table is not None:
        options = schema.IfOptions()
        options.Init(table.Bytes, table.Pos)
        return [(options.ThenSubgraphIndex(), 1), (options.ElseSubgraphIndex(), 1)]
    if name == "WHILE" and table is not None:
        options = schema.WhileOptions()
        options.Init(table.Bytes, table.Pos)
        return [(options.CondSubgraphIndex(), 0), (options.BodySubgraphIndex(), 0)]
    return []


def _banner(source: str, sha256: str | None = None) -> str:
    line = f"// Generated by keras_earlyexit.export.to_c_arrays from {_comment(source)}"
    if sha256 is not None:
        line += f"\n// (sha256 {_comment(sha256)})"
    return line + ".\n// Do not edit: export again.\n"


def _array_header(stem: str, source: str, sha256: str, data: bytes) -> str:
    guard = f"EARLYEXIT_{stem.upper()}_H_"
    return (
        f"{_banner(source, sha256)}\n#ifndef {guard}\n#define {guard}\n\n"
        f"extern const unsigned char g_{stem}[];\n"
        f"constexpr unsigned int g_{stem}_len = {len(data)};\n\n"
        f"#endif  // {guard}\n"
    )


def _array_source(stem: str, source: str, sha256: str, data: bytes) -> str:
    rows = [
        "    " + ", ".join(f"0x{b:02x}" for b in data[i : i + 12]) + ","
        for i in range(0, len(data), 12)
    ]
    # Including the header gives the const array external linkage.
    return (
        f'{_banner(source, sha256)}\n#include "{stem}.h"\n\n'
        f"alignas({ALIGNMENT}) const unsigned char g_{stem}[] = {{\n"
        + "\n".join(rows)
        + "\n};\n"
    )


def _generate(
    manifest: Manifest,
    models: list[bytes],
    bundle_name: str,
    ops: list[str],
    arena_size: int,
    namespace: str,
) -> dict[str, str]:
    """File name -> contents of every generated source."""
    sources = {}
    for k, (segment, data) in enumerate(zip(manifest.segments, models)):
        field = f"segments[{k}]"
        _c_int(segment.index, f"{field}.index", k, k)
        if segment.size_bytes != len(data) or type(segment.size_bytes) is not int:
            raise BundleError(
                f"manifest field {field}.size_bytes is {segment.size_bytes!r}; the "
                f"segment file has {len(data)} bytes. Copy the bundle again or "
                "convert again."
            )
        stem = _stem(k)
        # Relative to the bundle's parent: no local paths in sources.
        source = os.path.join(bundle_name, str(segment.file))
        sha256 = segment.sha256
        sources[f"{stem}.h"] = _array_header(stem, source, sha256, data)
        sources[f"{stem}.cc"] = _array_source(stem, source, sha256, data)
    ranges = _input_ranges("Segment 1", manifest.segments[0].inputs, models[0])
    sources[CONFIG_NAME] = _config_header(
        manifest, bundle_name, ops, arena_size, namespace, ranges
    )
    return sources


def _config_header(
    manifest: Manifest,
    bundle_name: str,
    ops: list[str],
    arena_size: int,
    namespace: str,
    ranges: list[tuple[int, int] | None],
) -> str:
    """`ranges`: segment 1's inputs' value ranges (`_input_ranges`)."""
    segments = manifest.segments
    if manifest.quantization not in QUANTIZATION_MODES:
        raise BundleError(
            f"manifest field quantization must be one of {list(QUANTIZATION_MODES)}; "
            f"found {manifest.quantization!r}. Convert the model again."
        )
    lines = [
        _banner(os.path.join(bundle_name, "manifest.json")),
        f"// Model {_comment(manifest.model_name)}, quantization "
        f"{manifest.quantization}, criterion {_comment(manifest.criterion)}.",
        *textwrap.wrap(
            f"Carries: {_comment(manifest.boundary)}.",
            76,
            initial_indent="// ",
            subsequent_indent="// ",
        ),
        "",
        "#ifndef EARLYEXIT_CONFIG_H_",
        "#define EARLYEXIT_CONFIG_H_",
        "",
        "#include <cstddef>",
        "",
        '#include "earlyexit_runner.h"',
    ]
    lines += [f'#include "{_stem(k)}.h"' for k in range(len(segments))]
    lines += [
        "",
        "// The ops of all segments, for a MicroMutableOpResolver<kNumOps>:",
        "//   #define ADD_OP(name) resolver.Add##name();",
        "//   EARLYEXIT_OPS(ADD_OP)",
        "#define EARLYEXIT_OPS(OP) " + " ".join(f"OP({op})" for op in ops),
        "",
        f"namespace {namespace} {{",
        "",
        f"inline constexpr int kNumSegments = {len(segments)};",
        "inline constexpr int kNumClasses = "
        f"{_c_int(manifest.num_classes, 'num_classes', 1, _INT32_MAX)};",
        f"inline constexpr int kNumOps = {len(ops)};",
        "// One arena shared by all segments' MicroInterpreters; the runner",
        "// refuses a smaller one.",
        "inline constexpr size_t kArenaSize = "
        f"{_c_int(arena_size, 'arena_size', 1, _INT32_MAX)};",
    ]
    carry_size = 0
    for k, s in enumerate(segments[:-1]):
        targets = segments[k + 1].inputs
        carry_size = max(carry_size, sum(_align(_bytes(t)) for t in targets))
    lines += [
        "// Bytes the runner needs to park the carry between two segments (at",
        "// least one slot, so that a buffer of this size is never zero-length).",
        f"inline constexpr size_t kCarryBufferSize = {max(carry_size, ALIGNMENT)};",
        "inline constexpr const char* kQuantization = "
        f"{_c_string(manifest.quantization, 'quantization')};",
        "",
    ]
    patience = _patience(manifest.criterion, manifest.patience, len(segments))
    lines += [
        "// Gate criterion; kPatience: exits in a row that must agree on the",
        '// class before a sample leaves (criterion "patience"), else 0.',
        "inline constexpr const char* kCriterion = "
        f"{_c_string(manifest.criterion, 'criterion')};",
        f"inline constexpr int kPatience = {patience};",
        "",
    ]
    for k, s in enumerate(segments):
        n = k + 1
        inputs = ",\n    ".join(
            _tensor(s, t, ranges[i] if k == 0 else None) for i, t in enumerate(s.inputs)
        )
        lines += [
            f"// Segment {n}: exit {_comment(s.exit_name)}, {_comment(s.file)}.",
            f"inline constexpr earlyexit::TensorConfig kSegment{n}Inputs[] = {{",
            f"    {inputs}}};",
        ]
        if k + 1 < len(segments):
            carries = []
            for target in segments[k + 1].inputs:
                source = s.output(target.name)
                requantize = (source.scale, source.zero_point) != (
                    target.scale,
                    target.zero_point,
                )
                carries.append(
                    f"{{{_tensor(s, source)},\n     {_tensor(s, target)},\n     "
                    f"{'true' if requantize else 'false'}}}"
                )
            lines += [
                f"inline constexpr earlyexit::CarryConfig kSegment{n}Carry[] = {{",
                "    " + ",\n    ".join(carries) + "};",
            ]
        lines.append("")
    entries = []
    for k, s in enumerate(segments):
        n = k + 1
        field = f"segments[{k}]"
        last = k + 1 == len(segments)
        # Float bundles compare floats; the runner ignores this field then.
        quantized = s.gate.threshold_quantized
        quantized = _c_int(
            0 if quantized is None else quantized,
            f"{field}.gate.threshold_quantized",
            -128,
            128,
        )
        entries.append(
            "    {"
            + ",\n     ".join(
                [
                    f"{_c_string(s.exit_name, f'{field}.exit_name')}, "
                    f"g_{_stem(k)}, g_{_stem(k)}_len",
                    f"kSegment{n}Inputs, {len(s.inputs)}",
                    f"/*logits=*/{_gate_tensor(s, 'logits')}",
                    f"/*confidence=*/{_gate_tensor(s, 'confidence')}",
                    "nullptr, 0"
                    if last
                    else f"kSegment{n}Carry, {len(segments[k + 1].inputs)}",
                    "/*threshold=*/"
                    f"{_c_float(s.gate.threshold, f'{field}.gate.threshold', 0, 1)}, "
                    f"/*threshold_quantized=*/{quantized}",
                    f"/*macs=*/{_c_int(s.macs, f'{field}.macs', 0, 2**63 - 1)}",
                ]
            )
            + "}"
        )
    lines += [
        "inline constexpr earlyexit::SegmentConfig kSegments[] = {",
        ",\n".join(entries) + "};",
        "",
        "inline constexpr earlyexit::ModelConfig kModel = {",
        "    kSegments, kNumSegments, kNumClasses, kArenaSize, kCarryBufferSize,",
        "    kPatience};",
        "",
        f"}}  // namespace {namespace}",
        "",
        "#endif  // EARLYEXIT_CONFIG_H_",
        "",
    ]
    return "\n".join(lines)


def _fused_config_header(
    manifest,
    file_name: str,
    ops: list[str],
    arena_size: int,
    namespace: str,
    ranges: list[tuple[int, int] | None],
) -> str:
    """`earlyexit_fused_config.h`: an `earlyexit::FusedConfig` (see
    tflite/micro/fused_runner.h) and the exits' names, thresholds and MACs,
    every value checked or escaped. `ranges`: the inputs' value ranges."""
    from keras_earlyexit.runtime.fused import OUTPUT_NAMES

    if manifest.quantization not in QUANTIZATION_MODES:
        raise BundleError(
            f"manifest field quantization must be one of {list(QUANTIZATION_MODES)}; "
            f"found {manifest.quantization!r}. Export the model again."
        )
    exits = manifest.exits
    if not exits or [e.index for e in exits] != list(range(len(exits))):
        raise BundleError(
            f"manifest field exits of {_comment(file_name)} must list exits 0, "
            "1, ... in order. Export the model again."
        )
    positions = {
        name: _c_int(
            manifest.output_position(name),
            f"outputs[{name}]",
            0,
            _INT32_MAX,
        )
        for name in OUTPUT_NAMES[:3]
    }
    logits = "-1"
    if OUTPUT_NAMES[3] in manifest.outputs:
        logits = _c_int(
            manifest.output_position(OUTPUT_NAMES[3]), "outputs[logits]", 0, _INT32_MAX
        )
    inputs = ",\n    ".join(
        _tensor_config(
            "The fused model",
            t,
            f"inputs[{i}] tensor {_comment(t.name)!r}",
            ranges[i],
        )
        for i, t in enumerate(manifest.inputs)
    )
    patience = _patience(manifest.criterion, manifest.patience, len(exits))
    if not manifest.inputs:
        raise BundleError(f"The manifest of {_comment(file_name)} lists no inputs.")
    names, thresholds, quantized, macs, cumulative = [], [], [], [], []
    for e in exits:
        field = f"exits[{e.index}]"
        names.append(_c_string(e.exit_name, f"{field}.exit_name"))
        thresholds.append(_c_float(e.gate.threshold, f"{field}.gate.threshold", 0, 1))
        q = e.gate.threshold_quantized
        quantized.append(
            _c_int(
                0 if q is None else q, f"{field}.gate.threshold_quantized", -128, 128
            )
        )
        macs.append(_c_int(e.macs, f"{field}.macs", 0, 2**63 - 1))
        cumulative.append(
            _c_int(e.cumulative_macs, f"{field}.cumulative_macs", 0, 2**63 - 1)
        )
    n = len(exits)

    def array(ctype: str, name: str, values: list[str]) -> str:
        return f"inline constexpr {ctype} {name}[{n}] = {{{', '.join(values)}}};"

    lines = [
        _banner(file_name, manifest.content_sha256),
        f"// Model {_comment(manifest.model_name)}, quantization "
        f"{manifest.quantization}, criterion {_comment(manifest.criterion)}, "
        f"{n} exits.",
        "",
        "#ifndef EARLYEXIT_FUSED_CONFIG_H_",
        "#define EARLYEXIT_FUSED_CONFIG_H_",
        "",
        "#include <cstddef>",
        "#include <cstdint>",
        "",
        f'#include "{FUSED_STEM}.h"',
        '#include "fused_runner.h"',
        "",
        "// The model's ops (IF runs the branches), for a",
        "// MicroMutableOpResolver<kNumOps>:",
        "//   #define ADD_OP(name) resolver.Add##name();",
        "//   EARLYEXIT_FUSED_OPS(ADD_OP)",
        "#define EARLYEXIT_FUSED_OPS(OP) " + " ".join(f"OP({op})" for op in ops),
        "",
        f"namespace {namespace} {{",
        "",
        f"inline constexpr int kNumExits = {n};",
        "inline constexpr int kNumClasses = "
        f"{_c_int(manifest.num_classes, 'num_classes', 1, _INT32_MAX)};",
        f"inline constexpr int kNumOps = {len(ops)};",
        f"inline constexpr int kNumInputs = {len(manifest.inputs)};",
        "// Measured at export in TFLite Micro, plus a margin; FusedRunner",
        "// refuses a smaller arena.",
        "inline constexpr size_t kArenaSize = "
        f"{_c_int(arena_size, 'arena_size', 1, _INT32_MAX)};",
        "inline constexpr const char* kQuantization = "
        f"{_c_string(manifest.quantization, 'quantization')};",
        "// Gate criterion; kPatience: exits in a row that must agree on the",
        '// class (criterion "patience", computed in the graph), else 0.',
        "inline constexpr const char* kCriterion = "
        f"{_c_string(manifest.criterion, 'criterion')};",
        f"inline constexpr int kPatience = {patience};",
        "",
        "// Positions in the main subgraph's outputs (-1: no logits output).",
        f"inline constexpr int kClassOutput = {positions['class']};",
        f"inline constexpr int kExitIndexOutput = {positions['exit_index']};",
        f"inline constexpr int kConfidenceOutput = {positions['confidence']};",
        f"inline constexpr int kLogitsOutput = {logits};",
        "",
        "// Per exit, as in the embedded manifest. The thresholds are constants",
        "// of the graph (change them with kee.export.set_thresholds and export",
        "// the arrays again); the final exit's entries are unused.",
        array("const char*", "kExitNames", names),
        array("float", "kThresholds", thresholds),
        array("int32_t", "kThresholdsQuantized", quantized),
        array("int64_t", "kMacs", macs),
        array("int64_t", "kCumulativeMacs", cumulative),
        "",
        "inline constexpr earlyexit::TensorConfig kInputs[] = {",
        f"    {inputs}}};",
        "",
        "inline constexpr earlyexit::FusedConfig kFusedModel = {",
        f"    g_{FUSED_STEM}, g_{FUSED_STEM}_len, kInputs, kNumInputs,",
        "    kClassOutput, kExitIndexOutput, kConfidenceOutput, kNumExits,",
        "    kNumClasses, kArenaSize};",
        "",
        f"}}  // namespace {namespace}",
        "",
        "#endif  // EARLYEXIT_FUSED_CONFIG_H_",
        "",
    ]
    return "\n".join(lines)


def _bytes(t: TensorInfo) -> int:
    return _DTYPES[t.dtype][1] * math.prod(t.shape)
