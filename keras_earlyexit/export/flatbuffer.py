"""Read and patch `.tflite` flatbuffers (no TensorFlow needed).

Uses the schema module that ships with `ai_edge_litert`. Patches are made in
place on a copy of the bytes, so sizes, alignment, buffers and signatures
stay exactly as the converter wrote them.
"""

from dataclasses import dataclass, field

import numpy as np


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _names(enum_class) -> dict:
    return {
        value: name
        for name, value in vars(enum_class).items()
        if not name.startswith("_") and isinstance(value, int)
    }


@dataclass
class OpInfo:
    """One operator of a TFLite model.

    Attributes:
        name: builtin operator name (e.g. `"CONV_2D"`), or `"CUSTOM:<code>"`.
        input_types: tensor types of its inputs (e.g. `"INT8"`).
        output_types: tensor types of its outputs.
        input_names: tensor names of its inputs.
        output_names: tensor names of its outputs.
    """

    name: str
    input_types: list[str]
    output_types: list[str]
    # Tensor names carry the Keras layer path ("segment_2_1/conv_2_1/..."),
    # which lets errors name the layer an op came from.
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    @property
    def is_builtin(self) -> bool:
        return not self.name.startswith("CUSTOM")


def list_ops(data: bytes) -> list[OpInfo]:
    """Operators of every subgraph of a `.tflite` model, in execution order.

    Args:
        data: the model's bytes.

    Returns:
        A list of `OpInfo`.

    Example:

    ```python
    ops = list_ops(open("segment_1.tflite", "rb").read())
    float_ops = [op.name for op in ops if "FLOAT32" in op.input_types]
    ```
    """
    schema = _schema()
    model = schema.Model.GetRootAs(data, 0)
    op_names = _names(schema.BuiltinOperator)
    type_names = _names(schema.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live in BuiltinCode; older ones in the deprecated
        # byte field. The larger of the two is the real one.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            codes.append(f"CUSTOM:{custom.decode() if custom else ''}")
        else:
            codes.append(op_names.get(builtin, str(builtin)))
    ops = []
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)

        def types(indices):
            return [
                type_names[subgraph.Tensors(int(i)).Type()] for i in indices if i >= 0
            ]

        def names(indices):
            return [
                (subgraph.Tensors(int(i)).Name() or b"").decode()
                for i in indices
                if i >= 0
            ]

        for o in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(o)
            ops.append(
                OpInfo(
                    codes[op.OpcodeIndex()],
                    types(op.InputsAsNumpy()),
                    types(op.OutputsAsNumpy()),
                    names(op.InputsAsNumpy()),
                    names(op.OutputsAsNumpy()),
                )
            )
    return ops


def set_input_quantization(
    data: bytes, tensor_index: int, scale: float, zero_point: int
) -> bytes:
    """Returns `data` with the scale and zero-point of one tensor of the
    first subgraph replaced.

    The converter stores per-tensor parameters as one-element vectors; they
    are overwritten in place (float32 scale, int64 zero-point), so every
    other byte is unchanged. Kernels read these parameters when the
    interpreter prepares the graph, so the model computes with them.

    Args:
        data: the model's bytes.
        tensor_index: index of the tensor in subgraph 0.
        scale: new scale.
        zero_point: new zero-point.

    Returns:
        The patched bytes.
    """
    schema = _schema()
    buffer = bytearray(data)
    model = schema.Model.GetRootAs(buffer, 0)
    tensor = model.Subgraphs(0).Tensors(tensor_index)
    quantization = tensor.Quantization()
    if quantization is None or quantization.ScaleLength() != 1:
        raise ValueError(
            f"Tensor {tensor_index} ({tensor.Name().decode()}) is not quantized "
            "per tensor; its parameters cannot be replaced."
        )
    # On a bytearray these are writable views into the model's bytes.
    quantization.ScaleAsNumpy()[0] = np.float32(scale)
    quantization.ZeroPointAsNumpy()[0] = np.int64(zero_point)
    return bytes(buffer)


# TFLite aligns weight buffers to 16 bytes (`force_align: 16` in the
# schema); the generated Python packer does not, so buffers are packed here.
BUFFER_ALIGNMENT = 16


class _AlignedBuffer:
    """Packs one `BufferT` with its data aligned to `BUFFER_ALIGNMENT`."""

    def __init__(self, buffer):
        self.buffer = buffer

    def Pack(self, builder):  # noqa: N802 (the object API's method name)
        schema = _schema()
        data = self.buffer.data
        vector = None
        if data is not None:
            payload = np.asarray(data, np.uint8).tobytes()
            builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            vector = builder.EndVector(len(payload))
        schema.BufferStart(builder)
        if vector is not None:
            schema.BufferAddData(builder, vector)
        return schema.BufferEnd(builder)


def pack_model(model) -> bytes:
    """Serializes a `schema_py_generated.ModelT` to `.tflite` bytes.

    Buffers are 16-byte aligned, as the TFLite converter writes them
    (microcontroller kernels read weights and biases in place), and the
    file carries the `"TFL3"` identifier.

    Args:
        model: the model in the flatbuffer object API (e.g. from
            `ModelT.InitFromPackedBuf(data)`); its buffers must hold their
            data inline (no external offset).

    Returns:
        The model's bytes.
    """
    import flatbuffers

    for i, buffer in enumerate(model.buffers or []):
        if buffer.offset or buffer.size:
            raise ValueError(
                f"Buffer {i} is stored outside the flatbuffer (models over "
                "2 GB); such models cannot be repacked."
            )
    builder = flatbuffers.Builder(1 << 16)
    buffers = model.buffers
    model.buffers = [_AlignedBuffer(b) for b in buffers or []]
    try:
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    finally:
        model.buffers = buffers
    return bytes(builder.Output())


def without_index_wrap(data: bytes, input_names: list[str]) -> bytes:
    """`data` without the wrap of negative ids in front of an embedding
    lookup of the named (signature) inputs, which then feed the lookup
    directly.

    Keras's `Embedding` (through `ops.take`) maps an id `i < 0` to
    `i + rows` with `SELECT(LESS(ids, 0), ADD(ids, rows), ids)`. TFLite
    Micro's SELECT_V2 has no int32 kernel, so the segment could not run
    there. The wrap changes nothing for ids in `[0, rows - 1]`: drop it
    only for inputs whose values the runtimes check against the manifest's
    `value_range` before a segment runs.

    Args:
        data: the model's bytes (one signature, on subgraph 0).
        input_names: signature names of the inputs holding checked ids.

    Returns:
        The model's bytes, repacked (`pack_model`) if anything changed.
    """
    schema = _schema()
    codes = schema.BuiltinOperator
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    signature = model.signatureDefs[0]
    graph = model.subgraphs[signature.subgraphIndex]
    ids = {
        int(t.tensorIndex)
        for t in signature.inputs
        if (t.name.decode() if isinstance(t.name, bytes) else t.name) in input_names
    }

    def code(op) -> int:
        c = model.operatorCodes[op.opcodeIndex]
        return max(c.builtinCode, c.deprecatedBuiltinCode)

    def constant(i: int):
        buffer = model.buffers[graph.tensors[i].buffer].data
        return None if buffer is None or not len(buffer) else np.asarray(buffer)

    producer = {int(o): op for op in graph.operators for o in op.outputs}
    replaced: dict[int, int] = {}
    removable = []  # the wrap's ops: SELECT, LESS, ADD
    for op in graph.operators:
        if code(op) not in (codes.SELECT, codes.SELECT_V2) or len(op.inputs) != 3:
            continue
        condition, wrapped, plain = (int(i) for i in op.inputs)
        less, add = producer.get(condition), producer.get(wrapped)
        zero = None if less is None else constant(int(less.inputs[1]))
        if (
            plain in ids
            and less is not None
            and code(less) == codes.LESS
            and int(less.inputs[0]) == plain
            and zero is not None
            and not zero.any()
            and add is not None
            and code(add) == codes.ADD
            and int(add.inputs[0]) == plain
        ):
            replaced[int(op.outputs[0])] = plain
            removable += [op, less, add]
    if not replaced:
        return data
    for op in graph.operators:
        op.inputs = np.array(
            [replaced.get(int(i), int(i)) for i in op.inputs], np.int32
        )
    graph.outputs = np.array(
        [replaced.get(int(i), int(i)) for i in graph.outputs], np.int32
    )
    # The SELECT first, then the LESS and ADD if nothing else reads them.
    for op in removable:
        read = {int(i) for other in graph.operators for i in other.inputs}
        read.update(int(i) for i in graph.outputs)
        if op in graph.operators and not any(int(o) in read for o in op.outputs):
            graph.operators.remove(op)
    return pack_model(model)
