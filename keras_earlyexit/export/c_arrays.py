"""`to_c_arrays`: a bundle as C++ sources for the TFLite Micro runner.

Writes, for a bundle made by `to_tflite`:

- `segment_<k>_model_data.cc/.h`: each segment's `.tflite` bytes as
  `alignas(16) const unsigned char g_segment_<k>_model_data[]` (TFLite Micro
  reads the flatbuffer in place, from flash) and its length as a constant;
- `earlyexit_config.h`: an `earlyexit::ModelConfig` for the runner in
  `tflite/micro/` (per segment: input, logits, confidence and carry tensors
  with their positions, shapes, dtypes and int8 parameters; thresholds in
  float and int8; MACs), the tensor arena size, the carry buffer size, and
  `EARLYEXIT_OPS(OP)`, the `MicroMutableOpResolver` ops the segments use.

The arena size is, in order of preference: `arena_size` given by the
caller; the arena measured at export in TFLite Micro (manifest field
`arena_bytes` of int8 bundles; one `MicroAllocator` shared by all segments:
every segment's persistent part plus the largest activation plan, see
`micro.shared_arena_bytes`); or `estimate_arena_size`, an upper bound from
the flatbuffers that assumes no memory reuse inside a segment (bundles
exported without measurement).
"""

import json
import math
import os
import re
import shutil
import textwrap

import numpy as np

from keras_earlyexit.export.flatbuffer import list_ops
from keras_earlyexit.export.manifest import (
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

# Kept for callers of the former private name.
_resolver_method = resolver_method

CONFIG_NAME = "earlyexit_config.h"
# TFLite Micro's tensor arena and flatbuffer alignment.
ALIGNMENT = 16
MAX_RANK = 6
_DTYPES = {
    "int8": ("earlyexit::DType::kInt8", 1),
    "float32": ("earlyexit::DType::kFloat32", 4),
}


def to_c_arrays(
    directory: str,
    out_dir: str,
    arena_size: int | None = None,
    namespace: str = "earlyexit_config",
) -> str:
    """Writes a bundle's segments as C arrays plus the runner's config header.

    Each segment file is checked against the manifest's sha256 first. The
    sources are written to a temporary directory next to `out_dir` and
    renamed into place: a failure leaves no partial output, and a previous
    output at `out_dir` stays intact until the new one is complete. Only
    files that `to_c_arrays` generated (recognised by name and first line)
    are ever replaced or removed.

    Args:
        directory: a bundle written by `kee.export.to_tflite` (int8 for
            integer-only microcontrollers; float bundles also work).
        out_dir: directory to create or replace; not the bundle nor a
            directory holding it. An existing directory is replaced when it
            is empty or holds only a previous output. One that holds a
            previous output (`earlyexit_config.h`) beside your own files
            (e.g. `main.cc`) gets its generated files replaced, stale ones
            removed and yours kept. Any other non-empty directory is
            refused. A symlink is kept and its target written.
        arena_size: TFLite Micro tensor arena bytes for all segments
            together (they share one arena). Default: `bundle_arena_size`,
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
    ```
    """
    if arena_size is not None and (not isinstance(arena_size, int) or arena_size <= 0):
        raise ValueError(
            f"arena_size must be a positive int (bytes). Received: {arena_size!r}"
        )
    if not re.fullmatch(r"[A-Za-z_]\w*", namespace):
        raise ValueError(f"namespace must be a C++ identifier. Received: {namespace!r}")
    directory = os.path.abspath(directory)
    manifest = read_manifest(directory, verify=False)
    if not manifest.segments:
        raise BundleError(f"The manifest in {directory} lists no segments.")
    models = [read_segment(directory, s) for s in manifest.segments]
    for segment in manifest.segments:
        for t in segment.inputs + segment.outputs:
            _check_tensor(segment, t)
    ops = resolver_ops(models)
    if arena_size is None:
        arena_size = bundle_arena_size(manifest) or estimate_arena_size(models)

    target = resolve_target(out_dir)
    merge = _check_out_dir(directory, target)
    clean_leftovers(target, _not_generated)
    tmp = make_temp_dir(target)
    try:
        for segment, data in zip(manifest.segments, models):
            stem = _stem(segment)
            # Relative to the bundle's parent: no local paths in sources.
            source = os.path.join(os.path.basename(directory), segment.file)
            _write(tmp, f"{stem}.h", _array_header(stem, source, segment))
            _write(tmp, f"{stem}.cc", _array_source(stem, source, segment, data))
        config = _config_header(
            manifest, os.path.basename(directory), ops, arena_size, namespace
        )
        _write(tmp, CONFIG_NAME, config)
        if merge:
            _merge_generated(tmp, target)
        else:
            replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(out_dir)


# What `to_c_arrays` writes: these names, each file opening with the banner.
_GENERATED_NAME = re.compile(
    r"segment_\d+_model_data\.(cc|h)|" + re.escape(CONFIG_NAME)
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
    rather than replace it whole."""
    bundle = os.path.realpath(bundle)
    out = os.path.realpath(out_dir)
    if out == bundle or bundle.startswith(out + os.sep):
        raise ValueError(
            f"out_dir {out_dir} is or contains the bundle {bundle} that "
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
    if not _is_generated(os.path.join(out_dir, CONFIG_NAME)):
        raise FileExistsError(
            f"Refusing to replace {out_dir}: {_not_generated(out_dir)}, and "
            f"no previous output ({CONFIG_NAME}). {fix}"
        )
    return True


def _merge_generated(tmp: str, out_dir: str) -> None:
    """Moves the files generated in `tmp` into `out_dir`, which also holds
    the user's files: generated files are replaced one by one (the config
    header last), stale generated ones removed, the others kept."""
    os.remove(os.path.join(tmp, TEMP_MARKER))
    new = sorted(os.listdir(tmp), key=lambda name: name == CONFIG_NAME)
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


def _check_tensor(segment: SegmentInfo, t: TensorInfo) -> None:
    if t.dtype not in _DTYPES:
        raise BundleError(
            f"Segment {segment.index + 1} tensor {t.name!r} has dtype {t.dtype}; "
            f"the micro runner handles {sorted(_DTYPES)}. Convert with "
            "quantization='int8' (or 'float32')."
        )
    if len(t.shape) > MAX_RANK or min(t.shape, default=1) < 1:
        raise BundleError(
            f"Segment {segment.index + 1} tensor {t.name!r} has shape {t.shape}; "
            f"the micro runner needs static shapes of rank <= {MAX_RANK}."
        )


def _write(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def _stem(segment: SegmentInfo) -> str:
    return f"segment_{segment.index + 1}_model_data"


def _banner(source: str, segment: SegmentInfo | None = None) -> str:
    line = f"// Generated by keras_earlyexit.export.to_c_arrays from {source}"
    if segment is not None:
        line += f"\n// (sha256 {segment.sha256})"
    return line + ".\n// Do not edit: export again.\n"


def _array_header(stem: str, source: str, segment: SegmentInfo) -> str:
    guard = f"EARLYEXIT_{stem.upper()}_H_"
    return (
        f"{_banner(source, segment)}\n#ifndef {guard}\n#define {guard}\n\n"
        f"extern const unsigned char g_{stem}[];\n"
        f"constexpr unsigned int g_{stem}_len = {segment.size_bytes};\n\n"
        f"#endif  // {guard}\n"
    )


def _array_source(stem: str, source: str, segment: SegmentInfo, data: bytes) -> str:
    rows = [
        "    " + ", ".join(f"0x{b:02x}" for b in data[i : i + 12]) + ","
        for i in range(0, len(data), 12)
    ]
    # Including the header gives the const array external linkage.
    return (
        f'{_banner(source, segment)}\n#include "{stem}.h"\n\n'
        f"alignas({ALIGNMENT}) const unsigned char g_{stem}[] = {{\n"
        + "\n".join(rows)
        + "\n};\n"
    )


def _float(value: float | None) -> str:
    """A C float literal that reads back as the same float32."""
    text = f"{np.float32(value or 0.0):.9g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text + "f"


def _tensor(t: TensorInfo) -> str:
    dims = ", ".join(str(d) for d in t.shape)
    # json.dumps quotes and escapes the name as a valid C string literal.
    return (
        f"{{{json.dumps(t.name)}, {t.position}, {_DTYPES[t.dtype][0]}, "
        f"{len(t.shape)}, {{{dims}}}, {_bytes(t)}u, {_float(t.scale)}, "
        f"{t.zero_point or 0}}}"
    )


def _config_header(
    manifest: Manifest,
    bundle_name: str,
    ops: list[str],
    arena_size: int,
    namespace: str,
) -> str:
    segments = manifest.segments
    lines = [
        _banner(os.path.join(bundle_name, "manifest.json")),
        f"// Model {manifest.model_name!r}, quantization {manifest.quantization!r},",
        f"// criterion {manifest.criterion!r}.",
        *textwrap.wrap(
            f"Carries: {manifest.boundary}.",
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
    lines += [f'#include "{_stem(s)}.h"' for s in segments]
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
        f"inline constexpr int kNumClasses = {manifest.num_classes};",
        f"inline constexpr int kNumOps = {len(ops)};",
        "// One arena shared by all segments' MicroInterpreters.",
        f"inline constexpr size_t kArenaSize = {arena_size};",
    ]
    carry_size = 0
    for k, s in enumerate(segments[:-1]):
        targets = segments[k + 1].inputs
        carry_size = max(carry_size, sum(_align(_bytes(t)) for t in targets))
    lines += [
        "// Bytes the runner needs to park the carry between two segments.",
        f"inline constexpr size_t kCarryBufferSize = {carry_size};",
        f'inline constexpr const char* kQuantization = "{manifest.quantization}";',
        "",
    ]
    for k, s in enumerate(segments):
        n = k + 1
        inputs = ",\n    ".join(_tensor(t) for t in s.inputs)
        lines += [
            f"// Segment {n}: exit {s.exit_name!r}, {s.file}.",
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
                    f"{{{_tensor(source)},\n     {_tensor(target)},\n     "
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
        last = k + 1 == len(segments)
        # Float bundles compare floats; the runner ignores this field then.
        quantized = s.gate.threshold_quantized or 0
        entries.append(
            "    {"
            + ",\n     ".join(
                [
                    f'"{s.exit_name}", g_{_stem(s)}, g_{_stem(s)}_len',
                    f"kSegment{n}Inputs, {len(s.inputs)}",
                    f"/*logits=*/{_tensor(s.output('logits'))}",
                    f"/*confidence=*/{_tensor(s.output('confidence'))}",
                    "nullptr, 0"
                    if last
                    else f"kSegment{n}Carry, {len(segments[k + 1].inputs)}",
                    f"/*threshold=*/{_float(s.gate.threshold)}, "
                    f"/*threshold_quantized=*/{quantized}",
                    f"/*macs=*/{s.macs}",
                ]
            )
            + "}"
        )
    lines += [
        "inline constexpr earlyexit::SegmentConfig kSegments[] = {",
        ",\n".join(entries) + "};",
        "",
        "inline constexpr earlyexit::ModelConfig kModel = {",
        "    kSegments, kNumSegments, kNumClasses, kArenaSize, kCarryBufferSize};",
        "",
        f"}}  // namespace {namespace}",
        "",
        "#endif  // EARLYEXIT_CONFIG_H_",
        "",
    ]
    return "\n".join(lines)


def _bytes(t: TensorInfo) -> int:
    return _DTYPES[t.dtype][1] * math.prod(t.shape)
