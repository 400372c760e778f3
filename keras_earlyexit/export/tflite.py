"""`to_tflite`: one quantized `.tflite` per exit segment, plus a manifest.

Each segment model holds its part of the backbone, its exit head and its
gate; its outputs are the carry tensors for the next segment, `"logits"` and
`"confidence"`, named through the TFLite signature (the converter reorders
outputs, so positions are never trusted).

Int8 boundaries. Segment k+1 is calibrated on the float carry that segment k
computes on the representative data, so both sides observe the same range;
the converter then derives the same scale and zero-point up to float
rounding (the carry is computed by Keras on one side and by the calibrator
on the other). The exporter writes segment k's output parameters into
segment k+1's input tensor, and into the tensors tied to it (ops such as
CONCATENATION or MAX_POOL_2D keep one scale on their int8 inputs and
output), so the int8 carry is handed on byte for byte: no
requantization, no extra rounding, nothing to compute between segments on a
microcontroller. Where the two sides differ by more than rounding (an op in
segment k that fixes its output scale, such as a softmax or sigmoid carry),
the parameters are left as calibrated, the manifest says so in `boundary`,
and runtimes requantize that carry (`runtime.requantize`).

TFLite Micro. Int8 bundles are meant for microcontrollers unless told
otherwise (`micro=False`): every op of every segment is checked against the
ops TFLite Micro provides (an unsupported op fails the export, naming the
op, the segment and the Keras layer), and each segment's arena is measured
in the TFLite Micro interpreter and written to the manifest. Float bundles
are neither checked nor measured unless `micro=True`.

TensorFlow is imported here only, lazily: conversion needs the TensorFlow
backend. Under JAX or PyTorch, `to_tflite` saves the model to a temporary
`.keras` file and converts it in a `KERAS_BACKEND=tensorflow` subprocess.
"""

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import keras
import numpy as np

from keras_earlyexit.export import flatbuffer
from keras_earlyexit.export import micro as micro_lib
from keras_earlyexit.export.manifest import (
    INTEGER_DTYPES,
    PATIENCE,
    QUANTIZATION_MODES,
    GateInfo,
    Manifest,
    SegmentInfo,
    TensorInfo,
    check_replaceable,
    clean_leftovers,
    make_temp_dir,
    not_a_bundle,
    quantize_threshold,
    replace_directory,
    resolve_target,
    sha256_of,
    write_manifest,
)
from keras_earlyexit.runtime.gated import gather_inputs

# Relative scale difference below which two int8 boundary parameters are
# the same calibration up to float rounding.
_SAME_SCALE_RTOL = 1e-3


def to_tflite(
    model,
    directory: str,
    representative_data=None,
    quantization: str = "int8",
    calibration_samples: int = 500,
    verbose: int = 1,
    micro: bool | None = None,
    fused: bool = False,
    logits: bool = False,
) -> str:
    """Converts an `EarlyExitModel` into a bundle of per-exit TFLite segments.

    Writes one `segment_<k>.tflite` per exit (backbone part, exit head and
    gate; outputs: carry tensors, `"logits"`, `"confidence"`) and
    `manifest.json` (see `keras_earlyexit.export.manifest`). The bundle is
    written to a temporary directory next to `directory` and renamed into
    place at the end: a failed or interrupted conversion leaves no partial
    bundle and keeps a previous bundle at `directory` intact.

    Args:
        model: an `EarlyExitModel` (trained on any backend). Its gates'
            criterion, temperature and thresholds are exported.
        directory: bundle directory to create or replace. An existing
            directory is replaced only if it is empty or holds a bundle
            written by `to_tflite` (its `manifest.json` and segment files,
            nothing else); a symlink is kept and the bundle it points to
            replaced. Leftovers of a killed export are removed.
        representative_data: model inputs (array, list or dict of arrays)
            to calibrate int8 activations; required for `"int8"`. A few
            hundred samples suffice. Float inputs take floats; integer
            inputs (token ids, padding masks) integers, which stay integers
            in every mode (only float tensors are quantized; int64 inputs
            become int32). In every mode, a dimension the Keras model
            leaves open (a sequence length of None) is fixed at this data's
            shape; such a model needs it.
        quantization: `"int8"` (full integer: int8 inputs, outputs and
            kernels, for microcontrollers), `"float16"` (float16 weights),
            `"dynamic"` (int8 weights, float activations) or `"float32"`.
        calibration_samples: use at most this many representative samples.
        verbose: 1 prints what is converted and a progress bar over the
            segments; 0 prints nothing. The converter's own logs (MLIR,
            absl) are never shown, unless the conversion fails.
        micro: prepare the bundle for TFLite Micro: fail on an op it lacks
            (`micro.UnsupportedOpError`, naming the op, segment and Keras
            layer) and measure each segment's arena into the manifest
            (`arena_bytes`; skipped with a warning if `tflite_micro` is not
            installed). Default: True for `"int8"`, False otherwise; pass
            False for int8 bundles meant for LiteRT (Android) only.
        fused: write one `.tflite` file (`directory` is then its path,
            ending in `.tflite`) whose graph gates itself, instead of a
            bundle; see `keras_earlyexit.export.fused`.
        logits: with `fused=True`, also output the taken exit's logits
            (float32, named `"logits"`).

    Returns:
        The bundle directory (the file, with `fused=True`).

    Example:

    ```python
    bundle = kee.export.to_tflite(
        model, "digits_int8", representative_data=x_val, quantization="int8"
    )
    result = kee.runtime.GatedInterpreter(bundle).predict(x_test)
    ```
    """
    # A quantization-aware model says what to convert for this mode.
    if hasattr(model, "for_export"):
        model = model.for_export(quantization)
    if fused:
        from keras_earlyexit.export.fused import to_fused_tflite

        return to_fused_tflite(
            model,
            directory,
            representative_data=representative_data,
            quantization=quantization,
            calibration_samples=calibration_samples,
            verbose=verbose,
            micro=micro,
            logits=logits,
        )
    if logits:
        raise ValueError(
            "logits=True applies to fused files (fused=True); a bundle's "
            "segments always output their logits."
        )
    if str(directory).endswith(".tflite"):
        raise ValueError(
            f"{directory!r} names a .tflite file, but to_tflite writes a bundle "
            "directory. Pass fused=True for one fused file, or choose a "
            "directory name."
        )
    if not hasattr(model, "segments"):
        raise ValueError(
            f"to_tflite converts an EarlyExitModel; received a "
            f"{type(model).__name__}. Build one with kee.EarlyExitModel or "
            "kee.attach_exits."
        )
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(
            f"Unknown quantization {quantization!r}. Use one of "
            f"{', '.join(map(repr, QUANTIZATION_MODES))}."
        )
    if micro is None:
        micro = quantization == "int8"
    if not isinstance(calibration_samples, int) or calibration_samples < 1:
        raise ValueError(
            f"calibration_samples must be an int >= 1. Received: "
            f"{calibration_samples!r}"
        )
    if representative_data is not None:
        representative_data = input_dict(model, representative_data)
        representative_data = {
            k: v[:calibration_samples] for k, v in representative_data.items()
        }
    elif quantization == "int8":
        raise ValueError(
            "quantization='int8' needs representative_data (a few hundred "
            "input samples, e.g. from the validation set) to calibrate "
            "activation ranges."
        )
    example_input(model, representative_data)  # fixed shapes, or a clear error
    target = resolve_target(directory)
    check_replaceable(
        target,
        not_a_bundle,
        "to_tflite replaces only a bundle it wrote (manifest.json and "
        "segment_<k>.tflite files): choose a new or empty directory.",
    )
    if keras.backend.backend() != "tensorflow":
        _convert_in_subprocess(
            model, target, representative_data, quantization, verbose, micro
        )
    else:
        _convert(model, target, representative_data, quantization, verbose, micro)
    return os.path.abspath(directory)


def input_dict(model, x) -> dict[str, np.ndarray]:
    """Model inputs as `{name: array}`, named like segment 1's inputs.

    Float inputs become float32 (finite values only); integer inputs
    (token ids, padding masks) stay integers, at the dtype of the exported
    graph (`graph_dtype`: int64 becomes int32).

    Args:
        model: an `EarlyExitModel`.
        x: an array (single-input models), a list of arrays in input order,
            or a dict by input name.

    Returns:
        Dict of arrays with the same number of samples.
    """
    specs = model_inputs(model)
    names = [t.name for t in specs]
    arrays = gather_inputs(x, names)
    out = {}
    for name, array, spec in zip(names, arrays, specs):
        array = np.asarray(array)
        if array.ndim != len(spec.shape) or any(
            d is not None and d != n for d, n in zip(spec.shape[1:], array.shape[1:])
        ):
            raise ValueError(
                f"Input {name!r} expects samples of shape {tuple(spec.shape[1:])}; "
                f"received an array of shape {array.shape}."
            )
        out[name] = _checked_input(array, spec)
    if len({len(a) for a in out.values()}) > 1 or len(arrays[0]) == 0:
        raise ValueError("Input arrays must hold the same, non-zero number of samples.")
    return out


def model_inputs(model) -> list:
    """Segment 1's input tensors in the model's own input order (that of a
    list of arrays); Keras lists those of a segment, built from a dict of
    named inputs, by name."""
    first = model.segments()[0]
    by_name = {t.name: t for t in first.inputs}
    return [by_name[name] for name in first.input_order]


def graph_dtype(dtype: str) -> str:
    """The dtype a Keras tensor of `dtype` has in an exported graph: int64
    becomes int32 (TFLite Micro's GATHER and most integer kernels take
    int32; token ids and masks fit), every other dtype stays."""
    return "int32" if dtype == "int64" else dtype


def _checked_input(array: np.ndarray, spec) -> np.ndarray:
    """One representative input, checked by the rule of `predict_early`
    (floats for float inputs, finite; integers in range for integer ones),
    at the dtype the exported graph takes."""
    from keras_earlyexit.inference import _cast_input

    array = _cast_input(array, spec)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    target = graph_dtype(array.dtype.name)
    if target != array.dtype.name and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(
                f"Input {spec.name!r} holds values in [{array.min()}, "
                f"{array.max()}], outside the range of {target} that the "
                "exported model takes."
            )
    return array.astype(target)


def value_ranges(keras_model) -> dict[str, list[int]]:
    """`{input name: [low, high]}`: the valid values of integer inputs that
    feed embedding lookups (`keras.layers.Embedding` and its subclasses, or
    a layer with an integer `vocabulary_size`, such as keras-hub's
    `TokenAndPositionEmbedding`): `[0, rows - 1]` of the smallest table."""
    ranges = {}
    for tensor in keras_model.inputs:
        if keras.backend.standardize_dtype(tensor.dtype) not in INTEGER_DTYPES:
            continue
        rows = []
        for layer in keras_model.layers:
            if isinstance(layer, keras.layers.Embedding):
                size = layer.input_dim
            else:
                size = getattr(layer, "vocabulary_size", None)
            if type(size) is not int or size < 1:
                continue
            for node in layer._inbound_nodes:
                if any(t is tensor for t in node.input_tensors):
                    rows.append(size)
        if rows:
            ranges[tensor.name] = [0, min(rows) - 1]
    return ranges


def _convert_in_subprocess(
    model, directory, representative_data, quantization, verbose, micro
):
    """Saves `model` and converts it with the TensorFlow backend in a child
    process (JAX and PyTorch have no TFLite converter)."""
    with tempfile.TemporaryDirectory(prefix="kee-export-") as tmp:
        model_path = os.path.join(tmp, "model.keras")
        model.save(model_path)
        command = [
            sys.executable,
            "-m",
            "keras_earlyexit.export",
            model_path,
            directory,
            "--quantization",
            quantization,
            "--verbose",
            str(verbose),
            "--micro" if micro else "--no-micro",
        ]
        if representative_data is not None:
            data_path = os.path.join(tmp, "representative.npz")
            np.savez(data_path, **representative_data)
            command += ["--representative-data", data_path]
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        proc = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        # The child's clear errors (unsupported op, bad data) are re-raised
        # as such; anything else is reported with the child's output.
        for line in reversed(proc.stderr.strip().splitlines()):
            for error in (micro_lib.UnsupportedOpError,):
                prefix = f"{error.__module__}.{error.__name__}: "
                if line.startswith(prefix):
                    raise error(line[len(prefix) :])
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(
            f"Converting with the TensorFlow backend in a subprocess failed "
            f"(exit status {proc.returncode}); the {keras.backend.backend()} "
            "model was saved to .keras and reloaded there. Check that "
            "tensorflow is installed. Its last output:\n" + tail
        )


def _convert(
    model, directory, representative_data, quantization, verbose, micro=False
) -> None:
    """The conversion proper (TensorFlow backend), into a temporary
    directory renamed into place at the end."""
    from keras_earlyexit.evaluation import count_macs

    segments = model.segments()
    example = example_input(model, representative_data)
    # The length the model is exported at, for an open sequence axis.
    lengths = [
        example[t.name].shape[1]
        for t in model_inputs(model)
        if len(t.shape) > 1 and t.shape[1] is None
    ]
    macs = count_macs(model, warn=False, sequence_length=max(lengths, default=None))
    clean_leftovers(directory, not_a_bundle)
    tmp = make_temp_dir(directory)
    progbar = None
    if verbose:
        print(
            f"Converting '{model.name}' to {len(segments)} {quantization} "
            f"TFLite segments in {directory}"
        )
        progbar = keras.utils.Progbar(len(segments), unit_name="segment")
    try:
        carry = representative_data if quantization == "int8" else None
        # One sample through the Keras segments gives each segment's fixed
        # input shapes (a sequence length left open in Keras included).
        infos: list[SegmentInfo] = []
        unmatched: list[str] = []
        for k, (segment, gate) in enumerate(zip(segments, model.gates)):
            shapes = {name: value.shape for name, value in example.items()}
            data = convert_model(segment, quantization, carry, shapes)
            ranges = value_ranges(segment) if k == 0 else {}
            # Checked ids need no wrap of negative ids (see the function).
            data = flatbuffer.without_index_wrap(
                data, [name for name, (low, _) in ranges.items() if low >= 0]
            )
            inputs, outputs = tensor_infos(data)
            for t in inputs:
                t.value_range = ranges.get(t.name)
            if k == 0:  # in the model's order: that of a list of arrays
                order = [t.name for t in model_inputs(model)]
                inputs.sort(key=lambda t: order.index(t.name))
            if micro:
                micro_lib.check_micro_ops(
                    data,
                    k,
                    layer_names=[layer.name for layer in segment.layers],
                    exit_name=model.exit_names[k],
                )
            if quantization == "int8":
                _warn_float_ops(data, k)
            if quantization == "int8" and k > 0:
                data, inputs, outputs, names = _match_boundary(
                    data, inputs, infos[-1].outputs
                )
                unmatched += names
            file = f"segment_{k + 1}.tflite"
            with open(os.path.join(tmp, file), "wb") as f:
                f.write(data)
            carry_out = (
                [t.name for t in segments[k + 1].inputs]
                if k + 1 < len(segments)
                else []
            )
            infos.append(
                SegmentInfo(
                    index=k,
                    exit_name=model.exit_names[k],
                    file=file,
                    sha256=sha256_of(data),
                    size_bytes=len(data),
                    inputs=inputs,
                    outputs=outputs,
                    carry_out=carry_out,
                    macs=int(macs.segment_macs[k]),
                    cumulative_macs=int(macs.cumulative_macs[k]),
                    gate=_gate_info(gate, outputs, is_final=k == len(segments) - 1),
                )
            )
            if carry is not None and carry_out:
                carry = _float_carry(segment, carry, carry_out)
            if carry_out:
                example = _float_carry(segment, example, carry_out)
            if progbar is not None:
                progbar.update(k + 1)
        if micro:
            _add_arena_sizes(tmp, infos)
        if quantization != "int8":
            boundary = "float: carries are passed on unchanged"
        elif not unmatched:
            boundary = (
                "identical: each int8 carry has the same scale and zero-point "
                "on both sides and is passed on unchanged"
            )
        else:
            boundary = "requantize: " + ", ".join(unmatched)
        manifest = Manifest(
            quantization=quantization,
            model_name=model.name,
            num_classes=int(model.num_classes),
            criterion=model.criterion,
            exit_names=list(model.exit_names),
            boundary=boundary,
            segments=infos,
            patience=_patience(model),
        )
        write_manifest(manifest, tmp)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_model(
    keras_model,
    quantization: str,
    representative_data: dict | None = None,
    shapes: dict | None = None,
) -> bytes:
    """Converts one functional Keras model with named inputs and a dict of
    named outputs to TFLite (TensorFlow backend, batch size 1).

    Used for each segment, and by the benchmarks for the monolithic model.

    Args:
        keras_model: the model; its input names become signature input names
            and its output dict keys signature output names.
        quantization: one of `QUANTIZATION_MODES`.
        representative_data: `{input name: array}` for `"int8"` (float
            arrays, and integer arrays for integer inputs).
        shapes: `{input name: shape}` with batch size 1, for inputs whose
            Keras shape leaves a dimension open (None); default: the Keras
            shapes.

    Returns:
        The `.tflite` bytes.
    """
    import tensorflow as tf

    dtypes = {
        t.name: keras.backend.standardize_dtype(t.dtype) for t in keras_model.inputs
    }
    shapes = shapes or {}
    specs = {
        t.name: tf.TensorSpec(
            tuple(shapes.get(t.name, (1, *t.shape[1:]))),
            graph_dtype(dtypes[t.name]),
            t.name,
        )
        for t in keras_model.inputs
    }
    with tempfile.TemporaryDirectory(prefix="kee-savedmodel-") as saved_model:
        # The SavedModel route freezes every variable (the gates' temperature
        # included) and names signature outputs after the dict keys;
        # from_concrete_functions left the temperature as a READ_VARIABLE
        # op that fails during int8 calibration.
        archive = keras.export.ExportArchive()
        archive.track(keras_model)
        archive.add_endpoint(
            "serving_default",
            lambda inputs: _fixed_confidence_range(
                _graph_outputs(
                    keras_model(_keras_inputs(inputs, dtypes), training=False)
                ),
                quantization,
            ),
            input_signature=[specs],
        )
        with native_output_captured():
            archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        if quantization != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.representative_dataset = _samples(representative_data)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        try:
            with warnings.catch_warnings(), native_output_captured():
                # The calibrator uses the deprecated tf.lite.Interpreter.
                warnings.filterwarnings("ignore", message=".*is deprecated")
                return converter.convert()
        except Exception as e:
            raise RuntimeError(
                f"TFLite conversion of '{keras_model.name}' "
                f"(quantization={quantization!r}) failed: {e}. With 'int8', "
                "every layer must map to an int8 TFLite builtin; try "
                "'dynamic' or 'float16', or replace the layer named above."
            ) from e


def _keras_inputs(inputs: dict, dtypes: dict) -> dict:
    """The graph's inputs at the Keras model's dtypes (int32 ids back to
    int64 where the model takes int64)."""
    import tensorflow as tf

    return {
        name: value if value.dtype == dtypes[name] else tf.cast(value, dtypes[name])
        for name, value in inputs.items()
    }


def _graph_outputs(outputs: dict) -> dict:
    """int64 outputs (an int64 carry, such as a padding mask) as int32, the
    dtype the next segment's graph takes (`graph_dtype`)."""
    import tensorflow as tf

    return {
        name: tf.cast(value, tf.int32) if value.dtype == tf.int64 else value
        for name, value in outputs.items()
    }


def _fixed_confidence_range(outputs, quantization: str):
    """Gives an int8 `confidence` output the range of the int8 softmax,
    [0, 255/256] (scale 1/256, zero point -128), whatever the calibration
    data shows: a range calibrated on data whose confidences stay below,
    say, 0.6 would make every higher threshold unreachable on the device."""
    if quantization != "int8" or "confidence" not in outputs:
        return outputs
    import tensorflow as tf

    outputs = dict(outputs)
    outputs["confidence"] = tf.quantization.fake_quant_with_min_max_args(
        outputs["confidence"], min=0.0, max=255.0 / 256.0, num_bits=8
    )
    return outputs


@contextlib.contextmanager
def native_output_captured():
    """Keeps what native code writes to file descriptors 1 and 2 (the
    converter's MLIR and absl logs, `fully_quantize: ...`, LiteRT notices)
    off the terminal while the block runs; if the block raises, writes it
    to stderr so that the cause of the failure stays visible.

    Python's own `sys.stdout`/`sys.stderr` are redirected with the file
    descriptors, so nothing is printed from inside the block.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no stdout/stderr to protect (closed descriptors)
        yield
        return
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            _flush_c_stdio()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                sys.stderr.flush()


def _flush_c_stdio() -> None:
    """Flushes C stdio buffers (C++ `printf`/`std::cout` output) into the
    current file descriptors."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass  # no C library handle on this platform: nothing to flush


def _samples(data: dict):
    n = len(next(iter(data.values())))

    def generate():
        for i in range(n):
            yield {name: v[i : i + 1] for name, v in data.items()}

    return generate


def tensor_infos(data: bytes) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Signature inputs and outputs of a converted model, by name, with the
    position of each in the subgraph's input/output list."""
    from ai_edge_litert.interpreter import Interpreter

    with native_output_captured():
        interpreter = Interpreter(model_content=data)
    runner = interpreter.get_signature_runner()
    input_order = [d["index"] for d in interpreter.get_input_details()]
    output_order = [d["index"] for d in interpreter.get_output_details()]

    def info(name, d, order):
        scale, zero_point = d["quantization"]
        quantized = np.dtype(d["dtype"]) == np.int8 and scale > 0
        return TensorInfo(
            name=name,
            position=order.index(d["index"]),
            shape=[int(s) for s in d["shape"]],
            dtype=np.dtype(d["dtype"]).name,
            scale=float(scale) if quantized else None,
            zero_point=int(zero_point) if quantized else None,
        )

    inputs = [info(n, d, input_order) for n, d in runner.get_input_details().items()]
    outputs = [info(n, d, output_order) for n, d in runner.get_output_details().items()]
    return (
        sorted(inputs, key=lambda t: t.position),
        sorted(outputs, key=lambda t: t.position),
    )


def _match_boundary(data: bytes, inputs: list, previous_outputs: list):
    """Gives segment k+1's int8 inputs the exact parameters of segment k's
    carry outputs when calibration found the same range.

    An input is patched together with every tensor tied to it: ops such as
    CONCATENATION, MAX_POOL_2D, RESHAPE or PAD need (and get from the
    converter) the same scale and zero-point on their int8 inputs and
    outputs, and their kernels refuse or misread a tensor patched alone.
    An input whose tied group holds a constant, another segment input or
    the fixed-range output of an op (e.g. softmax) keeps its calibrated
    parameters, to be requantized.

    Returns:
        The patched bytes, the segment's input and output infos read from
        them, and the names of the inputs left to requantize.
    """
    from ai_edge_litert.interpreter import Interpreter

    produced = {t.name: t for t in previous_outputs}
    with native_output_captured():
        interpreter = Interpreter(model_content=data)
    tensor_index = {
        name: d["index"]
        for name, d in interpreter.get_signature_runner().get_input_details().items()
    }
    unmatched = []
    for t in inputs:
        source = produced[t.name]
        if (source.scale, source.zero_point) == (t.scale, t.zero_point):
            continue
        same = (
            source.zero_point == t.zero_point
            and abs(source.scale - t.scale) <= _SAME_SCALE_RTOL * source.scale
        )
        others = {tensor_index[n] for n in tensor_index if n != t.name}
        group = _tied_tensors(data, tensor_index[t.name]) if same else None
        if group is None or group & others:
            unmatched.append(t.name)
            continue
        for index in sorted(group):
            data = flatbuffer.set_input_quantization(
                data, index, source.scale, source.zero_point
            )
    inputs, outputs = tensor_infos(data)
    return data, inputs, outputs, unmatched


# Int8 ops whose output parameters the kernels fix, whatever the input.
_FIXED_OUTPUT_OPS = frozenset({"SOFTMAX", "LOG_SOFTMAX", "LOGISTIC", "TANH"})


def _tied_tensors(data: bytes, index: int) -> set[int] | None:
    """The tensors of subgraph 0 that share tensor `index`'s int8 scale and
    zero-point through the ops that connect them (tensor `index` included),
    or None if one of them cannot take new parameters."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    ops = flatbuffer.list_ops(data)[: graph.OperatorsLength()]

    def params(i: int):
        q = graph.Tensors(i).Quantization()
        if q is None or q.ScaleLength() != 1 or q.ZeroPointLength() != 1:
            return None
        return float(q.Scale(0)), int(q.ZeroPoint(0))

    key = params(index)
    if key is None:
        return None
    nodes = []
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        ins = [int(i) for i in op.InputsAsNumpy() if i >= 0 and params(int(i)) == key]
        outs = [int(i) for i in op.OutputsAsNumpy() if i >= 0 and params(int(i)) == key]
        nodes.append((ops[o].name, ins, outs))
    group, frontier = {index}, [index]
    while frontier:
        tensor = frontier.pop()
        for name, ins, outs in nodes:
            if tensor not in ins + outs:
                continue
            if name in _FIXED_OUTPUT_OPS and outs:
                return None
            for other in ins + outs:
                if other not in group:
                    group.add(other)
                    frontier.append(other)
    for i in group:
        tensor = graph.Tensors(i)
        if tensor.IsVariable() or model.Buffers(tensor.Buffer()).DataLength():
            return None
    return group


def _warn_float_ops(data: bytes, k: int) -> None:
    float_ops = sorted(
        {
            op.name
            for op in flatbuffer.list_ops(data)
            if "FLOAT32" in op.input_types + op.output_types
        }
    )
    if float_ops:
        warnings.warn(
            f"Segment {k + 1} converted to int8 still computes {float_ops} in "
            "float32 (no int8 kernel for the op as written). It runs in LiteRT, "
            "but is not integer-only for microcontrollers; rewrite the layer "
            "with ops that have int8 kernels.",
            stacklevel=3,
        )


def _add_arena_sizes(directory: str, infos: list[SegmentInfo]) -> None:
    """Measures each segment's TFLite Micro arena into its `SegmentInfo`."""
    models = []
    for info in infos:
        with open(os.path.join(directory, info.file), "rb") as f:
            models.append(f.read())
    try:
        usages = micro_lib.measure_arena(models)
    except ImportError as e:
        warnings.warn(f"{e} The manifest gets no arena sizes.", stacklevel=4)
        return
    for info, usage in zip(infos, usages):
        info.arena_bytes = usage.arena_bytes
        info.arena_head_bytes = usage.head_bytes


def _patience(model) -> int | None:
    """The patience of a model whose gates have criterion `"patience"`
    (one for all exits), else None."""
    if model.criterion != PATIENCE:
        return None
    values = {int(g.patience) for g in model.gates}
    if len(values) != 1:
        raise ValueError(
            f"The gates of '{model.name}' have different patience values "
            f"{sorted(values)}; an exported model has one. Set it with "
            "model.set_patience(p)."
        )
    return values.pop()


def _gate_info(gate, outputs: list, is_final: bool) -> GateInfo:
    threshold = 0.0 if is_final else float(gate.threshold)
    confidence = next(t for t in outputs if t.name == "confidence")
    quantized = None
    if confidence.quantized:
        quantized = quantize_threshold(
            threshold, confidence.scale, confidence.zero_point
        )
    return GateInfo(
        criterion=gate.criterion,
        temperature=float(gate.temperature),
        threshold=threshold,
        threshold_quantized=quantized,
    )


def example_input(model, representative_data: dict | None) -> dict:
    """One sample of the model's inputs at the exported graph's dtypes: the
    first representative sample, or zeros where every shape is fixed.

    Raises:
        ValueError: an input with an open dimension (e.g. a sequence length
            of None) and no representative data to fix it.
    """
    if representative_data is not None:
        return {name: value[:1] for name, value in representative_data.items()}
    example = {}
    for t in model_inputs(model):
        if any(d is None for d in t.shape[1:]):
            raise ValueError(
                f"Input {t.name!r} has shape {tuple(t.shape)}: a dimension other "
                "than the batch is open, and a TFLite model has fixed shapes. "
                "Pass representative_data (a few samples, e.g. token ids of the "
                "sequence length to deploy): the model is exported at its "
                "shape, and runtimes refuse other lengths."
            )
        dtype = graph_dtype(keras.backend.standardize_dtype(t.dtype))
        example[t.name] = np.zeros((1, *t.shape[1:]), dtype)
    return example


def _float_carry(segment, inputs: dict, names: list, batch_size: int = 256) -> dict:
    """The carry a segment computes on the representative data (the
    calibration data of the next segment): float tensors as float32,
    integer ones (a padding mask) at the graph's dtype."""
    from keras import ops

    n = len(next(iter(inputs.values())))
    parts: dict = {name: [] for name in names}
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in inputs.items()}
        out = segment(batch, training=False)
        for name in names:
            value = ops.convert_to_numpy(out[name])
            if value.dtype.kind == "f":
                value = value.astype(np.float32)
            else:
                value = value.astype(graph_dtype(value.dtype.name))
            parts[name].append(value)
    return {name: np.concatenate(p) for name, p in parts.items()}
