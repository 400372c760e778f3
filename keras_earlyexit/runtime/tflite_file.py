"""What a segment's `.tflite` file itself says about its inputs and outputs.

The manifest may come from elsewhere: before a segment runs, the runtime
reads the signature tensors (name, position, dtype, shape, scale and
zero-point) from the flatbuffer and refuses a manifest that disagrees, so
that quantization parameters always come from the model that computes with
them. Reads the flatbuffer with the schema module of `ai_edge_litert` or of
`tflite_micro`, whichever is installed; no interpreter is created.
"""

import numpy as np

from keras_earlyexit.runtime.manifest import BundleError, SegmentInfo, TensorInfo


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        try:
            from tflite_micro.tensorflow.lite.micro.python import (
                schema_py_generated as schema,
            )
        except ImportError:
            raise ImportError(
                "Reading a .tflite file needs ai-edge-litert or tflite-micro: "
                "pip install 'keras-earlyexit[runtime]' (or '[micro]')."
            ) from None
    return schema


def signature_tensors(data: bytes) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The signature inputs and outputs of a `.tflite` model.

    Args:
        data: the model's bytes (one signature, on subgraph 0, as
            `to_tflite` writes).

    Returns:
        `(inputs, outputs)`, lists of `TensorInfo` sorted by position (the
        tensor's place in the subgraph's input or output list); `scale` and
        `zero_point` are set for int8 tensors quantized per tensor.

    Raises:
        BundleError: not a TFLite model, no signature, or a tensor that is
            not what a segment can have (per-channel input or output).
    """
    schema = _schema()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise BundleError("it is not a TFLite model (no TFL3 identifier)")
    types = {
        value: name.lower()
        for name, value in vars(schema.TensorType).items()
        if not name.startswith("_")
    }
    try:
        model = schema.Model.GetRootAs(data, 0)
        if model.SignatureDefsLength() != 1:
            raise BundleError(
                f"it has {model.SignatureDefsLength()} signatures; a segment has one"
            )
        signature = model.SignatureDefs(0)
        subgraph = model.Subgraphs(signature.SubgraphIndex())

        def read(count, entry, order):
            order = [int(i) for i in order]
            tensors = []
            for i in range(count):
                name = entry(i).Name().decode()
                index = entry(i).TensorIndex()
                tensors.append(_tensor_info(name, index, order, subgraph, types))
            return sorted(tensors, key=lambda t: t.position)

        return (
            read(signature.InputsLength(), signature.Inputs, subgraph.InputsAsNumpy()),
            read(
                signature.OutputsLength(), signature.Outputs, subgraph.OutputsAsNumpy()
            ),
        )
    except BundleError:
        raise
    except Exception as e:  # a malformed flatbuffer fails in many ways
        raise BundleError(
            f"it is not a readable TFLite model ({type(e).__name__})"
        ) from None


def _tensor_info(name, index, order, subgraph, types) -> TensorInfo:
    if index not in order:
        raise BundleError(f"signature tensor {name!r} is not a subgraph input/output")
    tensor = subgraph.Tensors(index)
    dtype = types.get(tensor.Type(), str(tensor.Type()))
    quantization = tensor.Quantization()
    scales = quantization.ScaleLength() if quantization is not None else 0
    if scales > 1:
        raise BundleError(f"tensor {name!r} is quantized per channel")
    scale = float(quantization.Scale(0)) if scales else 0.0
    quantized = dtype == "int8" and scale > 0
    return TensorInfo(
        name=name,
        position=order.index(index),
        shape=[int(tensor.Shape(i)) for i in range(tensor.ShapeLength())],
        dtype=dtype,
        scale=scale if quantized else None,
        zero_point=int(quantization.ZeroPoint(0)) if quantized else None,
    )


def check_segment_tensors(segment: SegmentInfo, data: bytes) -> None:
    """Refuses a manifest entry whose tensors differ from the file's.

    Args:
        segment: the manifest's entry.
        data: the segment file's bytes.

    Raises:
        BundleError: naming the segment, the tensor, the field and both
            values.
    """
    where = f"Segment {segment.index + 1} ({segment.file})"
    try:
        inputs, outputs = signature_tensors(data)
    except BundleError as e:
        raise BundleError(f"{where} cannot be used: {e}. Convert again.") from None
    for kind, listed, actual in (
        ("input", segment.inputs, inputs),
        ("output", segment.outputs, outputs),
    ):
        found = {t.name: t for t in actual}
        if sorted(found) != sorted(t.name for t in listed):
            raise BundleError(
                f"{where}: the manifest lists {kind}s "
                f"{sorted(t.name for t in listed)}, the .tflite file has "
                f"{sorted(found)}. The manifest does not describe this model: "
                "convert again."
            )
        for t in listed:
            f = found[t.name]
            for field, mine, theirs in (
                ("position", t.position, f.position),
                ("dtype", t.dtype, f.dtype),
                ("shape", t.shape, f.shape),
                ("zero_point", t.zero_point, f.zero_point),
                ("scale", _f32(t.scale), _f32(f.scale)),
            ):
                if mine != theirs:
                    raise BundleError(
                        f"{where} {kind} {t.name!r}: the manifest gives {field} "
                        f"{_show(mine)}, the .tflite file {_show(theirs)}. The "
                        "manifest does not describe this model: convert again."
                    )


def _f32(scale):
    return None if scale is None else np.float32(scale)


def _show(value):
    return repr(float(value)) if isinstance(value, np.floating) else repr(value)
