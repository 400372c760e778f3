"""The fused gated model: one `.tflite` file whose own graph gates itself.

`to_tflite(model, "model.tflite", fused=True)` converts the segments as for
a bundle (int8 boundaries matched byte for byte, ops checked for TFLite
Micro) and assembles their flatbuffers into one model with TFLite IF ops:

```
subgraph S1: segment 1 -> gate -> IF(cond, logits1, confidence1, carry1)
                                     then T1: exit 1's outputs
                                     else S2: segment 2 -> gate -> IF(...)
                                                ...
                                                else SN: segment N, outputs
```

An IF hands the same inputs to both branches, so each then-branch (`Tk`)
receives the carry too and ignores it. Every branch returns the same
tensors: the exit's logits (int8 as computed, or float32 with
`logits=True`), its index (an int32 constant) and its confidence (float32:
DEQUANTIZE of the int8 confidence). The main subgraph then outputs `class`
(int32, one ARG_MAX of the returned logits), `exit_index`, `confidence` and,
with `logits=True`, `logits`. Inside, int8 models stay integer: the gate
casts the int8 confidence to int32 and compares it with an int32 constant,
the quantized threshold (128: never), which `set_thresholds` rewrites
without reconverting. Float models compare the float32 confidence with
float32(threshold), or with 2.0 for 1.0.

With criterion `"patience"`, each gate also computes its exit's class
(ARG_MAX) and streak (EQUAL with the previous class, CAST to float32, MUL,
ADD), compares the streak with p (GREATER_EQUAL) and joins both compares
(LOGICAL_AND); class and streak go to the next segment as IF inputs,
between the confidence and the carry.

The converter cannot make this graph itself: its int8 quantization leaves
the branches of a `tf.cond` in float. Every op used (IF, CAST,
GREATER_EQUAL, ARG_MAX, DEQUANTIZE; for patience EQUAL, MUL, ADD and
LOGICAL_AND, in float32 and int32) has a TFLite Micro kernel, and an
offline memory plan (`add_arena_plan`) lets TFLite Micro run the nested
branches in no more activation memory than the largest segment needs.
Internal tensors carry no names (flash); the inputs and outputs carry
their signature names.

The manifest is embedded as TFLite metadata (`runtime.fused`), with the
arena measured in TFLite Micro for the whole file (int8, or `micro=True`).
"""

import hashlib
import os
import stat
import tempfile
import warnings

import numpy as np

from keras_earlyexit.export import flatbuffer
from keras_earlyexit.export import micro as micro_lib
from keras_earlyexit.runtime.fused import (
    HASH_PLACEHOLDER,
    METADATA_NAME,
    OUTPUT_NAMES,
    FusedExit,
    FusedManifest,
    FusedModelError,
    buffer_span,
    content_sha256,
    gate_constant,
    hash_span,
    is_fused_model,
)
from keras_earlyexit.runtime.manifest import (
    GateInfo,
    Manifest,
    TensorInfo,
    read_manifest,
    read_segment,
)

# Op versions as the TFLite converter writes them for these types.
_INT8_VERSIONS = {"CAST": 3, "ARG_MAX": 2, "DEQUANTIZE": 2}


def to_fused_tflite(
    model,
    path: str,
    representative_data=None,
    quantization: str = "int8",
    calibration_samples: int = 500,
    verbose: int = 1,
    micro: bool | None = None,
    logits: bool = False,
) -> str:
    """Converts an `EarlyExitModel` into one fused gated `.tflite` file.

    Called by `kee.export.to_tflite(model, path, ..., fused=True)`; the
    arguments are those of `to_tflite`, plus `logits`. The file is written
    next to `path` and renamed into place: a failed export leaves no partial
    file and keeps a previous one.

    Args:
        model: an `EarlyExitModel` (trained on any backend).
        path: the `.tflite` file to create, or to replace if it is a fused
            model written before (any other existing file is kept).
        representative_data: model inputs to calibrate int8 activations.
        quantization: `"int8"`, `"float16"`, `"dynamic"` or `"float32"`.
        calibration_samples: use at most this many representative samples.
        verbose: 1 shows a progress bar, 0 is silent.
        micro: check the ops for TFLite Micro and measure the file's arena
            into its manifest. Default: True for `"int8"`.
        logits: also output the taken exit's `logits` (float32).

    Returns:
        The file's absolute path.

    Example:

    ```python
    path = kee.export.to_tflite(
        model, "digits.tflite", representative_data=x_val, fused=True
    )
    runner = kee.runtime.fused.FusedInterpreter(path, backend="micro")
    result = runner.predict(x_test)
    ```
    """
    from keras_earlyexit.export.tflite import to_tflite

    path = os.path.abspath(os.fspath(path))
    check_target(path)
    if not isinstance(logits, bool):
        raise ValueError(f"logits must be True or False. Received: {logits!r}")
    if micro is None:
        micro = quantization == "int8"
    with tempfile.TemporaryDirectory(prefix="kee-fused-") as tmp:
        bundle = to_tflite(
            model,
            os.path.join(tmp, "bundle"),
            representative_data=representative_data,
            quantization=quantization,
            calibration_samples=calibration_samples,
            verbose=verbose,
            micro=micro,
        )
        manifest = read_manifest(bundle)
        segments = [read_segment(bundle, s) for s in manifest.segments]
    data = fuse(manifest, segments, model_sha256(model), logits=logits, micro=micro)
    write_atomic(path, data)
    return path


def check_target(path: str) -> None:
    """Refuses a path that does not end in `.tflite`, is a directory, or is
    an existing file other than a fused model (so no user file is lost)."""
    if not path.endswith(".tflite"):
        raise ValueError(
            f"A fused model is one file: give a path ending in '.tflite'; "
            f"received {path!r}. Without fused=True, to_tflite writes a bundle "
            "directory."
        )
    if os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory; choose a file path.")
    if os.path.exists(path) and not is_fused_model(path):
        raise FileExistsError(
            f"{path} exists and is not a fused model written by keras-earlyexit; "
            "to_tflite replaces only those. Choose a new path or remove the file."
        )


def write_atomic(path: str, data: bytes) -> None:
    """Writes `data` to a temporary file next to `path` and renames it into
    place: readers see the old file or the new one, never a partial one."""
    parent, base = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp creates files 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _file_mode(path: str) -> int:
    """The mode of the file being replaced, or that of a file `open()`
    would create (the umask applies)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def model_sha256(model) -> str:
    """sha256 of a Keras model's weights (paths, dtypes, shapes, values):
    which trained model a fused file was made from."""
    from keras import ops

    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def fuse(
    manifest: Manifest,
    segments: list[bytes],
    source_sha256: str,
    logits: bool = False,
    micro: bool = False,
) -> bytes:
    """Assembles a bundle's segment models into one fused model.

    Args:
        manifest: the bundle's manifest.
        segments: the segment files' bytes, in order.
        source_sha256: hash of the source model, stored in the manifest.
        logits: also output the taken exit's logits.
        micro: measure the TFLite Micro arena into the manifest.

    Returns:
        The fused `.tflite` bytes, manifest embedded.
    """
    if manifest.boundary.startswith("requantize"):
        raise ValueError(
            "The segments' int8 carries have different scales on the two sides "
            f"of a boundary ({manifest.boundary}); a fused model hands them on "
            "unchanged. Export a bundle (fused=False) for this model."
        )
    graph = _Graph(with_logits=logits)
    exits = graph.build(manifest, segments)
    add_arena_plan(graph.model)
    fused = FusedManifest(
        quantization=manifest.quantization,
        model_name=manifest.model_name,
        num_classes=manifest.num_classes,
        criterion=manifest.criterion,
        exit_names=list(manifest.exit_names),
        boundary=manifest.boundary.split(":")[0],
        # The main graph takes the inputs in the manifest's list order (the
        # model's), which need not be segment 1's positions.
        inputs=[
            TensorInfo(**{**vars(t), "position": i})
            for i, t in enumerate(manifest.segments[0].inputs)
        ],
        outputs=list(OUTPUT_NAMES if logits else OUTPUT_NAMES[:3]),
        exits=exits,
        source_sha256=source_sha256,
        patience=manifest.patience,
    )
    data = finish(graph.model, fused)
    if micro:
        try:
            (usage,) = micro_lib.measure_arena([data])
        except ImportError as e:
            warnings.warn(f"{e} The manifest gets no arena size.", stacklevel=3)
        else:
            fused.arena_bytes = usage.arena_bytes
            fused.arena_head_bytes = usage.head_bytes
            data = finish(graph.model, fused)
    return data


def finish(model, manifest: FusedManifest) -> bytes:
    """Packs `model` (object API) with `manifest` embedded as its metadata,
    hash included (`runtime.fused.content_sha256`)."""
    manifest.content_sha256 = HASH_PLACEHOLDER
    _set_metadata(model, METADATA_NAME, manifest.to_json().encode())
    entry = next(m for m in model.metadata if _text(m.name) == METADATA_NAME)
    data = bytearray(flatbuffer.pack_model(model))
    start, length = hash_span(data, buffer_span(data, entry.buffer))
    manifest.content_sha256 = content_sha256(data, (start, length))
    data[start : start + length] = manifest.content_sha256.encode()
    return bytes(data)


# TFLite Micro's offline memory plan (micro/docs/memory_management.md):
# int32 [version, subgraphs, n, offset of tensor 0, ..., offset of n-1],
# tensors of all subgraphs in order, -1 for those it plans itself.
OFFLINE_PLAN_NAME = "OfflineMemoryAllocation"
# TFLite Micro's arena buffer alignment (MicroArenaBufferAlignment).
_ARENA_ALIGNMENT = 16
_ITEM_BYTES = {
    "FLOAT32": 4, "FLOAT16": 2, "BFLOAT16": 2, "INT32": 4, "UINT32": 4,
    "INT16": 2, "UINT16": 2, "INT8": 1, "UINT8": 1, "BOOL": 1, "INT64": 8,
    "UINT64": 8, "FLOAT64": 8, "COMPLEX64": 8,
}  # fmt: skip


def add_arena_plan(model) -> int:
    """Adds a TFLite Micro offline memory plan to `model` (object API).

    TFLite Micro's own planner gives every subgraph's tensors their own
    place and keeps an IF's inputs alive until the IF returns. A fused model
    would then hold each carry twice (the IF's input and the branch's copy)
    and keep every earlier segment's carry while the later segments run:
    more than the monolithic model. This plan puts an IF's inputs and the
    branches' inputs at the same offset (TFLite Micro then skips the copy:
    `CopyOpInputsToSubgraphInputs` compares the pointers) and frees them
    after their last use inside the branch, so that activation memory is
    that of the segments run one after another. LiteRT ignores the plan.

    Lifetimes follow TFLite Micro's `AllocationInfoBuilder`: one step per
    op, depth-first into an IF's then- and else-branch, whose steps thus
    never overlap. Buffers are placed largest first at the lowest offset
    free over their lifetime, as `GreedyMemoryPlanner` places them.

    Returns:
        The planned activation bytes (the arena's head).
    """
    schema = flatbuffer._schema()
    type_names = {v: k for k, v in vars(schema.TensorType).items() if k.isupper()}
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    subgraphs = model.subgraphs
    first: dict[tuple, int] = {}
    last: dict[tuple, int] = {}
    alias: dict[tuple, tuple] = {}
    time = 0

    def root(key: tuple) -> tuple:
        while alias.get(key, key) != key:
            key = alias[key]
        return key

    def visit(s: int) -> None:
        nonlocal time
        graph = subgraphs[s]
        for i in graph.inputs:
            first.setdefault((s, int(i)), time)
            last[(s, int(i))] = time
        for op in graph.operators:
            time += 1
            start = time
            for o in op.outputs:
                first.setdefault((s, int(o)), time)
            is_if = codes[op.opcodeIndex] == schema.BuiltinOperator.IF
            if is_if:
                options = op.builtinOptions
                for branch in (options.thenSubgraphIndex, options.elseSubgraphIndex):
                    for i, j in zip(op.inputs[1:], subgraphs[branch].inputs):
                        alias[root((branch, int(j)))] = root((s, int(i)))
                    time += 1
                    visit(branch)
            for n, i in enumerate(op.inputs):
                if i >= 0:
                    # An IF reads the inputs it shares with its branches on
                    # entry; the branches' uses extend the shared buffer.
                    last[(s, int(i))] = start if is_if and n > 0 else time
            for o in op.outputs:
                last[(s, int(o))] = time
        for o in graph.outputs:
            first.setdefault((s, int(o)), time)
            last[(s, int(o))] = time

    visit(0)
    groups: dict[tuple, list] = {}  # root -> [size, first, last, members]
    for s, graph in enumerate(subgraphs):
        for t, tensor in enumerate(graph.tensors):
            data = model.buffers[tensor.buffer].data
            constant = data is not None and len(data) > 0
            if constant or tensor.isVariable or (s, t) not in first:
                continue
            shape = [] if tensor.shape is None else tensor.shape
            size = int(np.prod(shape)) * _ITEM_BYTES[type_names[tensor.type]]
            size = -(-size // _ARENA_ALIGNMENT) * _ARENA_ALIGNMENT
            if size == 0:
                continue
            group = groups.setdefault(root((s, t)), [0, first[s, t], last[s, t], []])
            group[0] = max(group[0], size)
            group[1] = min(group[1], first[s, t])
            group[2] = max(group[2], last[s, t])
            group[3].append((s, t))
    placed: list[tuple[int, int, int, int]] = []  # offset, size, first, last
    offsets = {}
    for size, begin, end, members in sorted(groups.values(), key=lambda g: -g[0]):
        offset = 0
        for other in sorted(p for p in placed if p[2] <= end and begin <= p[3]):
            if offset + size <= other[0]:
                break
            offset = max(offset, other[0] + other[1])
        placed.append((offset, size, begin, end))
        offsets.update(dict.fromkeys(members, offset))
    plan = [
        offsets.get((s, t), -1)
        for s, graph in enumerate(subgraphs)
        for t in range(len(graph.tensors))
    ]
    header = [1, len(subgraphs), len(plan)]
    _set_metadata(model, OFFLINE_PLAN_NAME, np.array(header + plan, "<i4").tobytes())
    return max((p[0] + p[1] for p in placed), default=0)


def _set_metadata(model, name: str, data: bytes) -> None:
    """Sets (adds or replaces) the metadata entry `name` of `model`."""
    schema = flatbuffer._schema()
    entry = next((m for m in model.metadata or [] if _text(m.name) == name), None)
    if entry is None:
        model.buffers.append(schema.BufferT())
        entry = schema.MetadataT()
        entry.name, entry.buffer = name, len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
    model.buffers[entry.buffer].data = np.frombuffer(data, np.uint8)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class _Graph:
    """The fused model under construction (flatbuffer object API).

    Subgraph 2k holds segment k+1 (its ops, then its gate and IF), 2k+1
    exit k+1's then-branch; the last segment's subgraph has no IF.
    """

    def __init__(self, with_logits: bool):
        schema = flatbuffer._schema()
        self.schema = schema
        self.types = schema.TensorType
        self.with_logits = with_logits
        self.model = schema.ModelT()
        self.model.version = 3
        self.model.description = "keras-earlyexit fused gated model"
        self.model.operatorCodes = []
        self.model.buffers = [schema.BufferT()]  # buffer 0: empty, by convention
        self.model.subgraphs = []
        self._opcodes: dict[tuple, int] = {}

    # Model-level tables.

    def opcode(self, builtin: int, version: int = 1, custom=None) -> int:
        key = (builtin, version, _text(custom))
        if key not in self._opcodes:
            code = self.schema.OperatorCodeT()
            code.builtinCode = builtin
            # Codes above 127 keep 127 (PLACEHOLDER_FOR_GREATER_OP_CODES) here.
            code.deprecatedBuiltinCode = min(builtin, 127)
            code.version = version
            code.customCode = custom
            self.model.operatorCodes.append(code)
            self._opcodes[key] = len(self.model.operatorCodes) - 1
        return self._opcodes[key]

    def buffer(self, data: bytes) -> int:
        buffer = self.schema.BufferT()
        buffer.data = np.frombuffer(data, np.uint8)
        self.model.buffers.append(buffer)
        return len(self.model.buffers) - 1

    # Tensors and ops of one subgraph.

    def tensor(self, subgraph, shape, dtype, buffer=0, quantization=None) -> int:
        tensor = self.schema.TensorT()
        tensor.shape = np.array(shape, np.int32)
        tensor.type = dtype
        tensor.buffer = buffer
        tensor.quantization = quantization
        subgraph.tensors.append(tensor)
        return len(subgraph.tensors) - 1

    def like(self, subgraph, source, quantized: bool = True) -> int:
        """A new tensor with `source`'s shape and type (and quantization,
        unless the tensor is only handed through)."""
        quantization = source.quantization if quantized else None
        return self.tensor(subgraph, source.shape, source.type, 0, quantization)

    def constant(self, subgraph, value: np.ndarray, buffer=None) -> int:
        if buffer is None:
            buffer = self.buffer(value.tobytes())
        dtype = {
            np.dtype(np.int32): self.types.INT32,
            np.dtype(np.float32): self.types.FLOAT32,
        }
        return self.tensor(subgraph, value.shape, dtype[value.dtype], buffer)

    def op(self, subgraph, name: str, inputs, outputs, options=None, version=1):
        op = self.schema.OperatorT()
        op.opcodeIndex = self.opcode(
            getattr(self.schema.BuiltinOperator, name), version
        )
        op.inputs = np.array(inputs, np.int32)
        op.outputs = np.array(outputs, np.int32)
        if options is not None:
            # CastOptionsT -> BuiltinOptions.CastOptions
            op.builtinOptionsType = getattr(
                self.schema.BuiltinOptions, type(options).__name__[:-1]
            )
            op.builtinOptions = options
        subgraph.operators.append(op)

    def is_int8(self, subgraph, tensor: int) -> bool:
        return subgraph.tensors[tensor].type == self.types.INT8

    # Assembly.

    def import_segment(self, data: bytes, file: str):
        """Segment `data`'s subgraph with buffers and op codes moved into
        the fused model; returns it and its signature's tensor indices."""
        segment = self.schema.ModelT.InitFromPackedBuf(data, 0)
        if len(segment.subgraphs) != 1 or not segment.signatureDefs:
            raise FusedModelError(
                f"{file} is not a single-subgraph segment model with a "
                "signature; convert the bundle again."
            )
        subgraph = segment.subgraphs[0]
        moved: dict[int, int] = {}
        for tensor in subgraph.tensors:
            # Names cost flash and no runtime reads them; the model's inputs
            # and outputs get their signature names (`_signature`).
            tensor.name = None
            source = segment.buffers[tensor.buffer]
            if source.offset or source.size:
                raise FusedModelError(f"{file} stores weights outside the model.")
            if source.data is None or len(source.data) == 0:
                tensor.buffer = 0  # computed tensors share the empty buffer
                continue
            if tensor.buffer not in moved:
                moved[tensor.buffer] = self.buffer(bytes(source.data))
            tensor.buffer = moved[tensor.buffer]
        for op in subgraph.operators:
            code = segment.operatorCodes[op.opcodeIndex]
            op.opcodeIndex = self.opcode(
                max(code.builtinCode, code.deprecatedBuiltinCode),
                code.version,
                code.customCode,
            )
        signature = segment.signatureDefs[0]
        inputs = {_text(t.name): t.tensorIndex for t in signature.inputs}
        outputs = {_text(t.name): t.tensorIndex for t in signature.outputs}
        return subgraph, inputs, outputs

    def exit_results(self, subgraph, logits: int, confidence: int, k: int):
        """Exit k's results as every branch returns them: its logits (int8
        as computed, or float32 if the model outputs them), its index and
        its float32 confidence. Returns the tensor indices."""
        exit_index = self.constant(subgraph, np.array([k], np.int32))
        results = [logits, exit_index, confidence]
        # The confidence, and the logits if they are an output, in float32.
        for j in [2, 0] if self.with_logits else [2]:
            if self.is_int8(subgraph, results[j]):
                shape = subgraph.tensors[results[j]].shape
                out = self.tensor(subgraph, shape, self.types.FLOAT32)
                version = _INT8_VERSIONS["DEQUANTIZE"]
                self.op(subgraph, "DEQUANTIZE", [results[j]], [out], version=version)
                results[j] = out
        return results

    def gate(self, subgraph, confidence: int, exit: FusedExit, k: int) -> int:
        """The gate's compare: a bool tensor, true when the sample leaves.
        Sets `exit.threshold_buffer` to the threshold constant's buffer."""
        value = gate_constant(exit, exit.gate.threshold)
        if self.is_int8(subgraph, confidence):
            # int8 cannot hold 128 ("never"): compare in int32.
            wide = self.tensor(subgraph, [1], self.types.INT32)
            options = self.schema.CastOptionsT()
            options.inDataType, options.outDataType = self.types.INT8, self.types.INT32
            version = _INT8_VERSIONS["CAST"]
            self.op(subgraph, "CAST", [confidence], [wide], options, version)
            confidence, constant = wide, np.array([value], np.int32)
        else:
            constant = np.array([value], np.float32)
        exit.threshold_buffer = self.buffer(constant.tobytes())
        threshold = self.constant(subgraph, constant, exit.threshold_buffer)
        leaves = self.tensor(subgraph, [1], self.types.BOOL)
        self.op(subgraph, "GREATER_EQUAL", [confidence, threshold], [leaves])
        return leaves

    def patience_gate(self, subgraph, logits, leaves, previous, exit, patience):
        """The patience rule (`runtime.patience`) after the floor's compare
        `leaves`: this exit's class (ARG_MAX of its logits, int32) and
        streak (float32: 1 at exit 0, else `same * previous streak + 1`),
        from `previous` = [] at exit 0, [class] at exit 1, [class, streak]
        later. Sets `exit.patience_buffer` to the buffer of p (float32).

        Returns:
            The bool tensor "floor passed and streak >= p", and the state
            handed on: [class] after exit 0, [class, streak] later.
        """
        types = self.types
        label = self.tensor(subgraph, [1], types.INT32)
        axis = self.constant(subgraph, np.array([1], np.int32))
        options = self.schema.ArgMaxOptionsT()
        options.outputType = types.INT32
        version = _INT8_VERSIONS["ARG_MAX"] if self.is_int8(subgraph, logits) else 1
        self.op(subgraph, "ARG_MAX", [logits, axis], [label], options, version)
        one = self.constant(subgraph, np.array([1.0], np.float32))
        if not previous:
            streak = one
        else:
            same = self.tensor(subgraph, [1], types.BOOL)
            self.op(subgraph, "EQUAL", [label, previous[0]], [same])
            counted = self.tensor(subgraph, [1], types.FLOAT32)
            options = self.schema.CastOptionsT()
            options.inDataType, options.outDataType = types.BOOL, types.FLOAT32
            self.op(subgraph, "CAST", [same], [counted], options)
            if len(previous) == 2:
                grown = self.tensor(subgraph, [1], types.FLOAT32)
                self.op(
                    subgraph,
                    "MUL",
                    [counted, previous[1]],
                    [grown],
                    self.schema.MulOptionsT(),
                )
                counted = grown
            streak = self.tensor(subgraph, [1], types.FLOAT32)
            self.op(
                subgraph, "ADD", [counted, one], [streak], self.schema.AddOptionsT()
            )
        exit.patience_buffer = self.buffer(np.array([patience], np.float32).tobytes())
        required = self.tensor(subgraph, [1], types.FLOAT32, exit.patience_buffer)
        enough = self.tensor(subgraph, [1], types.BOOL)
        self.op(subgraph, "GREATER_EQUAL", [streak, required], [enough])
        both = self.tensor(subgraph, [1], types.BOOL)
        self.op(subgraph, "LOGICAL_AND", [leaves, enough], [both])
        return both, [label] if not previous else [label, streak]

    def build(self, manifest: Manifest, segments: list[bytes]) -> list[FusedExit]:
        """Fills the model; returns the manifest's exits."""
        n = len(segments)
        self.model.subgraphs = [None] * (2 * n - 1)
        exits = []
        handed: list[int] = []  # the previous IF's inputs, in its subgraph
        kept: list[int] = []  # the patience state among them, in this one
        parent = None
        for k, (info, data) in enumerate(zip(manifest.segments, segments)):
            subgraph, inputs, outputs = self.import_segment(data, info.file)
            subgraph.name = f"segment_{k + 1}"
            if k == 0:
                entry = [inputs[t.name] for t in info.inputs]
            else:
                # Both branches take the IF's inputs: the previous exit's
                # logits and confidence, which this branch ignores, the
                # patience state (class and streak), then the carry.
                ignored = [
                    self.like(subgraph, parent.tensors[i], quantized=False)
                    for i in handed[:2]
                ]
                carry = manifest.segments[k - 1].carry_out
                state = handed[2 : len(handed) - len(carry)]
                kept = [self.like(subgraph, parent.tensors[i]) for i in state]
                entry = ignored + kept + [inputs[name] for name in carry]
            subgraph.inputs = np.array(entry, np.int32)
            confidence_info = info.output("confidence")
            exit = FusedExit(
                index=k,
                exit_name=info.exit_name,
                macs=info.macs,
                cumulative_macs=info.cumulative_macs,
                gate=GateInfo(**vars(info.gate)),
                confidence_scale=confidence_info.scale,
                confidence_zero_point=confidence_info.zero_point,
            )
            if exit.quantized:
                exit.gate.threshold_quantized = gate_constant(exit, exit.gate.threshold)
            logits, confidence = outputs["logits"], outputs["confidence"]
            if k == n - 1:
                results = self.exit_results(subgraph, logits, confidence, k)
            else:
                leaves = self.gate(subgraph, confidence, exit, k)
                state = []
                if manifest.patience is not None:
                    leaves, state = self.patience_gate(
                        subgraph, logits, leaves, kept, exit, manifest.patience
                    )
                handed = [logits, confidence] + state
                handed += [outputs[c] for c in info.carry_out]
                then = self._then_branch(subgraph, handed, k)
                self.model.subgraphs[2 * k + 1] = then
                results = [self.like(subgraph, then.tensors[i]) for i in then.outputs]
                options = self.schema.IfOptionsT()
                options.thenSubgraphIndex = 2 * k + 1
                options.elseSubgraphIndex = 2 * k + 2
                self.op(subgraph, "IF", [leaves] + handed, results, options)
            if k == 0:
                results = self._model_outputs(subgraph, results)
            subgraph.outputs = np.array(results, np.int32)
            self.model.subgraphs[2 * k] = subgraph
            parent = subgraph
            exits.append(exit)
        self._signature(manifest)
        return exits

    def _then_branch(self, parent, handed: list[int], k: int):
        """Exit k's then-branch: takes the IF's inputs (the carry too,
        unused) and returns exit k's results."""
        subgraph = self.schema.SubGraphT()
        subgraph.name = f"exit_{k + 1}"
        subgraph.tensors, subgraph.operators = [], []
        inputs = [
            self.like(subgraph, parent.tensors[i], quantized=j < 2)
            for j, i in enumerate(handed)
        ]
        subgraph.inputs = np.array(inputs, np.int32)
        subgraph.outputs = np.array(
            self.exit_results(subgraph, inputs[0], inputs[1], k), np.int32
        )
        return subgraph

    def _model_outputs(self, subgraph, results: list[int]) -> list[int]:
        """The model's outputs from the taken exit's results: `class` is
        the ARG_MAX of its logits, once here rather than in every branch
        (argmax needs no quantization parameters)."""
        logits, exit_index, confidence = results
        axis = self.constant(subgraph, np.array([1], np.int32))
        label = self.tensor(subgraph, [1], self.types.INT32)
        options = self.schema.ArgMaxOptionsT()
        options.outputType = self.types.INT32
        version = _INT8_VERSIONS["ARG_MAX"] if self.is_int8(subgraph, logits) else 1
        self.op(subgraph, "ARG_MAX", [logits, axis], [label], options, version)
        return [label, exit_index, confidence] + ([logits] if self.with_logits else [])

    def _signature(self, manifest: Manifest) -> None:
        main = self.model.subgraphs[0]
        signature = self.schema.SignatureDefT()
        signature.signatureKey = "serving_default"
        signature.subgraphIndex = 0
        signature.inputs, signature.outputs = [], []
        names = OUTPUT_NAMES if self.with_logits else OUTPUT_NAMES[:3]
        for entries, pairs in (
            (
                signature.inputs,
                zip([t.name for t in manifest.segments[0].inputs], main.inputs),
            ),
            (signature.outputs, zip(names, main.outputs)),
        ):
            for name, index in pairs:
                entry = self.schema.TensorMapT()
                entry.name, entry.tensorIndex = name, int(index)
                entries.append(entry)
                main.tensors[index].name = name
        self.model.signatureDefs = [signature]
