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
