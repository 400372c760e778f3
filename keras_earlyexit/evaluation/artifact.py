"""Calibrating the exported artifact: every exit's outputs as the deployed
interpreter computes them, searched with `calibrate`'s own guarded search.

`kee.calibrate(interpreter_or_path, x_val, y_val, ...)` comes here for a
`kee.runtime.GatedInterpreter`, a `FusedInterpreter`, or the path of a bundle
directory or fused `.tflite` file. The confidences are the ones the int8
(or float16 / dynamic / float32) model produces on its runtime, so the
thresholds are chosen on the values the device compares, not on Keras's
float confidences.

How every exit's outputs are read: the interpreter runs once per exit k
with thresholds that force every sample out at exit k (1.0 before it, 0.0
at it; all 1.0 for the final exit). That is the only way into a fused file,
whose segments live inside one graph, and it reads exactly what deployment
computes (the int8 comparison, the argmax, the carries) through the public
`set_thresholds` and `predict`. It costs `E (E + 1) / 2` segment invokes
per sample for `E` exits, against `E` for reading each segment of a bundle
in one pass: 6 against 3 on a 3-exit model, under a second for hundreds of
digits. The interpreter's thresholds and `stats` are restored afterwards.

A patience artifact (criterion `"patience"`) is read the same way with
patience 1, which makes its gates plain confidence floors; each exit's
streak then comes from the classes read (`runtime.patience.streaks`), and
samples are held back below the patience as `calibrate` does for a Keras
patience model. Its floors are calibrated for the artifact's own patience,
or for each of the `patience` values given (the best one kept, as
`calibrate` chooses for a Keras model); `apply` writes the patience too.

Int8 confidences take the values `(q - zero_point) * scale` only, so any
threshold between two of them decides as the upper one: the thresholds found
are moved onto that grid (same decisions on every sample, same bounds), and
`quantized_thresholds` gives the integers the device compares with.
"""

import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from keras_earlyexit.evaluation import _data
from keras_earlyexit.evaluation.calibrate import (
    _MIN_SAMPLES,
    CalibrationResult,
    _calibrate_patience,
    _calibrate_patience_only,
    _patience_values,
    calibrate_outputs,
)
from keras_earlyexit.inference import select_exits
from keras_earlyexit.labels import check_labels
from keras_earlyexit.runtime.fused import FusedInterpreter
from keras_earlyexit.runtime.gated import GatedInterpreter, prepare_inputs
from keras_earlyexit.runtime.manifest import (
    NEVER_QUANTIZED,
    BundleError,
    gate_passes,
    quantize_threshold,
)
from keras_earlyexit.runtime.patience import streaks

INTERPRETERS = (GatedInterpreter, FusedInterpreter)


@dataclass
class ArtifactCalibrationResult(CalibrationResult):
    """`CalibrationResult` of an exported artifact (bundle or fused file).

    Attributes (beyond `CalibrationResult`'s):
        artifact: the bundle directory or fused file calibrated.
        quantization: the artifact's mode (`"int8"`, `"float16"`, ...).
        quantized_thresholds: for int8 artifacts, the integer each gate
            compares its int8 confidence with (128: no sample leaves);
            None for float artifacts.
        exit_agreement: with `reference_model`, the share of validation
            samples that leave at the same exit in the artifact (gated by
            `thresholds`) and in the float model (gated by
            `reference_thresholds`); else None.
        class_agreement: the same for the predicted class.
        reference_accuracy: the float model's gated accuracy with
            `reference_thresholds` on the validation data.
        exit_class_agreement: per exit, the share of samples whose class
            the artifact's exit predicts as the float model's does.
        reference_thresholds: the float model's thresholds in these
            comparisons: `thresholds` (the same gates on both), or with
            `match_reference` the float model's own.
    """

    artifact: str = ""
    quantization: str = ""
    quantized_thresholds: list[int] | None = None
    exit_agreement: float | None = None
    class_agreement: float | None = None
    reference_accuracy: float | None = None
    exit_class_agreement: list[float] | None = None
    reference_thresholds: list[float] | None = None

    def apply(self, target):
        """Writes the thresholds (and, for a patience artifact, the
        patience) into a bundle or fused file (a path, through
        `kee.export.set_thresholds`, atomically) or sets them on a
        `GatedInterpreter` / `FusedInterpreter`. Returns `target`."""
        if isinstance(target, INTERPRETERS):
            if self.patience is not None:
                target.set_patience(self.patience)
            target.set_thresholds(self.thresholds)
        elif isinstance(target, (str, os.PathLike)):
            from keras_earlyexit.export.thresholds import set_thresholds

            set_thresholds(target, self.thresholds, patience=self.patience)
        else:
            raise TypeError(
                "apply takes the path of a bundle or fused .tflite file, or a "
                "kee.runtime.GatedInterpreter / FusedInterpreter; received "
                f"{type(target).__name__}. These thresholds were found on the "
                "artifact's confidences: set them on a Keras model with "
                "model.set_thresholds(result.thresholds) only knowingly."
            )
        return target

    def __str__(self) -> str:
        lines = [
            super().__str__(),
            f"  artifact:          {self.artifact} ({self.quantization})",
        ]
        if self.quantized_thresholds is not None:
            lines.append(
                f"  int8 thresholds:   {self.quantized_thresholds} "
                "(compared with the int8 confidence; 128: never)"
            )
        if self.exit_agreement is not None:
            per_exit = ", ".join(f"{a:.1%}" for a in self.exit_class_agreement)
            gated = (
                "at the same thresholds"
                if self.reference_thresholds == self.thresholds
                else "at its thresholds "
                + "["
                + ", ".join(f"{t:.4f}" for t in self.reference_thresholds)
                + "]"
            )
            lines += [
                f"  vs float model {gated}:",
                f"                     same exit {self.exit_agreement:.1%}, same "
                f"class {self.class_agreement:.1%}, float gated accuracy "
                f"{self.reference_accuracy:.4f}",
                f"  class agreement per exit: {per_exit}",
            ]
        return "\n".join(lines)


def is_artifact(model) -> bool:
    """Whether `calibrate` should treat `model` as an exported artifact."""
    return isinstance(model, (str, os.PathLike, *INTERPRETERS))


def open_artifact(source):
    """The interpreter of `source`: itself, or a LiteRT one for a path."""
    if isinstance(source, INTERPRETERS):
        return source
    path = os.fspath(source)
    if path.endswith((".keras", ".h5")):
        raise ValueError(
            f"{path!r} is a Keras model file; calibrate takes the model itself "
            "(keras.saving.load_model(path)) or an exported bundle directory / "
            "fused .tflite file."
        )
    if not os.path.exists(path):
        raise BundleError(
            f"{path!r} does not exist. Give a bundle directory or a fused "
            ".tflite file written by kee.export.to_tflite, or a "
            "kee.runtime.GatedInterpreter."
        )
    return GatedInterpreter(path)  # a FusedInterpreter for a file


@dataclass
class OpenedArtifact:
    """An artifact whose inputs were checked against data; nothing ran yet.

    Attributes:
        interpreter: its `GatedInterpreter` / `FusedInterpreter`.
        path: the bundle directory or fused file.
        exits: per exit, its MACs and int8 confidence parameters.
        num_samples: samples in the data checked.
    """

    interpreter: GatedInterpreter | FusedInterpreter
    path: str
    exits: list["_ExitSpec"]
    num_samples: int

    @property
    def manifest(self):
        return self.interpreter.manifest


def open_on(source, x, x_name: str) -> OpenedArtifact:
    """Opens `source` (see `open_artifact`) and checks `x` against its
    inputs (shape, dtype, finite values), before anything runs.

    Raises:
        ValueError: `x` does not fit, naming `x_name`, the artifact and the
            input's expected shape or dtype.
    """
    interpreter = open_artifact(source)
    path, input_specs, exits = _describe(interpreter)
    try:
        arrays = prepare_inputs(x, input_specs)
    except ValueError as e:
        raise ValueError(f"{x_name} does not fit the artifact {path}: {e}") from None
    return OpenedArtifact(interpreter, path, exits, len(arrays[0]))


@dataclass
class _ExitSpec:
    """What calibration needs to know of one exit of an artifact."""

    macs: int  # of its segment
    cumulative_macs: int
    scale: float | None  # the int8 confidence's, None for float artifacts
    zero_point: int | None


def _describe(interpreter) -> tuple[str, list, list[_ExitSpec]]:
    """`(path, input tensors, exits)` of a bundle or fused interpreter."""
    manifest = interpreter.manifest
    if isinstance(interpreter, FusedInterpreter):
        exits = [
            _ExitSpec(
                e.macs, e.cumulative_macs, e.confidence_scale, e.confidence_zero_point
            )
            for e in manifest.exits
        ]
        return interpreter.path, manifest.inputs, exits
    exits = []
    for s in manifest.segments:
        c = s.output("confidence")
        exits.append(_ExitSpec(s.macs, s.cumulative_macs, c.scale, c.zero_point))
    return interpreter.directory, manifest.segments[0].inputs, exits


def on_grid(threshold: float, spec: _ExitSpec) -> float:
    """The int8 confidence value a threshold decides as (float artifacts:
    itself). 1.0 where no int8 confidence reaches it."""
    if spec.scale is None:
        return threshold
    q = quantize_threshold(threshold, spec.scale, spec.zero_point)
    if q == NEVER_QUANTIZED:
        return 1.0
    value = float(np.float32(q - spec.zero_point) * np.float32(spec.scale))
    return value if value < 1.0 else threshold  # 1.0 would mean "never"


def artifact_outputs(
    interpreter, x, labels, exits, verbose=0
) -> tuple[_data.ExitOutputs, np.ndarray]:
    """Every exit's class and confidence on `x`, from the interpreter
    itself (see the module docstring); thresholds and stats restored.

    Returns:
        `(ExitOutputs, classes)`: `classes` is `(n, exits)`, each exit's
        predicted class (`ExitOutputs` keeps only their correctness). For a
        patience artifact, the outputs hold the streaks and are gated by
        the interpreter's patience (`ExitOutputs.with_patience`).
    """
    num_exits = len(exits)
    saved_thresholds, saved_stats = interpreter.thresholds, interpreter.stats
    patience = interpreter.patience
    classes, confidences = [], []
    try:
        interpreter.reset_stats()
        if patience is not None:
            interpreter.set_patience(1)  # the gates are plain floors
        for k in range(num_exits):
            forced = [1.0] * (num_exits - 1)
            if k < num_exits - 1:
                forced[k] = 0.0
            interpreter.set_thresholds(forced)
            result = interpreter.predict(x, verbose=verbose)
            stray = int(np.sum(result.exit_indices != k))
            if stray:
                raise ValueError(
                    f"{stray} sample(s) did not leave exit {k} at threshold 0: "
                    "their confidence is below 0 or NaN, which a gate cannot "
                    "produce. The artifact is damaged: export it again."
                )
            classes.append(result.classes)
            confidences.append(result.confidences.astype(np.float32))
    finally:
        if patience is not None:
            interpreter.set_patience(patience)
        interpreter.set_thresholds(saved_thresholds)
        interpreter.stats = saved_stats
    predictions = np.stack(classes, axis=1)  # (n, E)
    outputs = _data.ExitOutputs(
        # The runtimes return classes, not logits: no temperature refit.
        logits=np.zeros((num_exits, len(labels), 0), np.float32),
        confidences=np.stack(confidences, axis=1),  # (n, E)
        correct=predictions == labels[:, None],
        agrees=predictions == predictions[:, -1:],
        labels=labels,
        cumulative_macs=np.array([e.cumulative_macs for e in exits], np.float64),
    )
    if patience is not None:
        outputs.streaks = streaks(predictions)
        outputs = outputs.with_patience(patience)
    return outputs, predictions


def calibrate_artifact(
    source,
    x_val,
    y_val,
    target: str,
    value: float,
    reference_model=None,
    match_reference: bool = False,
    temperature_scaling: bool = False,
    apply: bool = False,
    verbose: int = 0,
    patience=None,
    confidence_floor: bool = True,
    **search,
) -> ArtifactCalibrationResult:
    """`kee.calibrate` on a bundle or fused file (the target already checked).

    Args:
        source: a `GatedInterpreter` / `FusedInterpreter`, or a path.
        x_val, y_val: validation data, checked before anything runs.
        target, value: the checked target of `calibrate`.
        reference_model: optional float `EarlyExitModel` the artifact was
            exported from, for the exit agreement.
        match_reference: prefer the thresholds whose exits agree most with
            `reference_model` at its own thresholds (see `calibrate`).
        temperature_scaling: must be False: the temperatures are part of
            the exported gates.
        apply: write the thresholds into `source` (see
            `ArtifactCalibrationResult.apply`).
        verbose: 1 shows progress.
        patience: for a patience artifact, the patience values to try (an
            int or a list of ints in [1, exits]); None (default) keeps the
            artifact's own.
        confidence_floor: for a patience artifact, also calibrate the
            floors (default); False keeps them at 0.0 and chooses only the
            patience among `patience` (or every p in [1, exits] if None).
        **search: `delta`, `guard`, `risk_bound`, `search_fraction`,
            `num_candidates` and `seed` of `calibrate`.

    Returns:
        `ArtifactCalibrationResult`.
    """
    if temperature_scaling:
        raise ValueError(
            "temperature_scaling=True cannot apply to an exported artifact: "
            "its gates' temperatures are compiled into the .tflite models. "
            "Calibrate temperatures on the Keras model "
            "(kee.calibrate(model, ..., temperature_scaling=True, apply=True)), "
            "export again, then calibrate the artifact's thresholds."
        )
    _check_match_reference(match_reference, reference_model, target, search)
    opened = open_on(source, x_val, "x_val")
    interpreter, path, exits, n = (
        opened.interpreter,
        opened.path,
        opened.exits,
        opened.num_samples,
    )
    if n < _MIN_SAMPLES:
        raise ValueError(
            f"calibrate received {n} validation samples; thresholds fitted on "
            f"fewer than {_MIN_SAMPLES} mean nothing. Use a few hundred or more."
        )
    labels = check_labels(y_val, n, interpreter.manifest.num_classes, "y_val")
    candidates = _patience_candidates(interpreter, patience, confidence_floor)
    if match_reference and interpreter.patience is not None:
        raise ValueError(
            "match_reference=True is not supported for a patience artifact: "
            "its exits depend on the patience chosen with the floors. Drop "
            "match_reference, or calibrate with patience= only."
        )
    if reference_model is not None:
        check_reference(reference_model, x_val, len(exits), interpreter.manifest)
    data, predictions = artifact_outputs(interpreter, x_val, labels, exits, verbose)
    reference = reference_exits = own_thresholds = None
    if reference_model is not None:
        reference = reference_outputs(
            reference_model, x_val, y_val, data.cumulative_macs
        )
    if match_reference:
        own_thresholds = [float(t) for t in reference_model.thresholds]
        reference_exits = select_exits(reference.confidences, own_thresholds)
    if candidates is None:
        base = calibrate_outputs(
            data,
            target,
            value,
            verbose=verbose,
            reference_exits=reference_exits,
            reference_thresholds=own_thresholds,
            **search,
        )
    elif confidence_floor:
        base = _calibrate_patience(
            data, candidates, target, value, None, verbose, **search
        )
    else:
        base = _calibrate_patience_only(data, candidates, target, value, **search)
    result = ArtifactCalibrationResult(
        **{
            **vars(base),
            "thresholds": [on_grid(t, e) for t, e in zip(base.thresholds, exits)],
        },
        artifact=path,
        quantization=interpreter.manifest.quantization,
    )
    if exits[0].scale is not None:
        result.quantized_thresholds = [
            quantize_threshold(t, e.scale, e.zero_point)
            for t, e in zip(result.thresholds, exits)
        ]
    if reference_model is not None:
        result.reference_thresholds = own_thresholds or list(result.thresholds)
        _agreement(result, data, predictions, reference)
    if apply:
        result.apply(source)
    return result


def _check_match_reference(match_reference, reference_model, target, search) -> None:
    if not match_reference:
        return
    if reference_model is None:
        raise ValueError(
            "match_reference=True needs reference_model=: the float "
            "EarlyExitModel the artifact was exported from, with the "
            "thresholds whose exits the artifact should reproduce."
        )
    if target == "risk" or search.get("guarantee") is not None:
        raise ValueError(
            "match_reference=True works with the guarded search of "
            "max_accuracy_drop or macs_budget; a guarantee or risk certifies "
            "settings along a path fixed in advance, which agreement cannot "
            "reorder. Drop match_reference or the guarantee."
        )


def _patience_candidates(interpreter, patience, confidence_floor) -> list | None:
    """The patience values to calibrate a patience artifact for (None for
    another criterion, which takes neither argument)."""
    if patience is None and confidence_floor and interpreter.patience is not None:
        return [interpreter.patience]
    exported = SimpleNamespace(
        criterion=interpreter.manifest.criterion, num_exits=interpreter.num_exits
    )
    return _patience_values(exported, patience, confidence_floor)


def check_reference(model, x, num_exits: int, manifest) -> None:
    """The float model must match the artifact's exits, classes, criterion
    and inputs."""
    _data.check_model(model)
    if model.num_exits != num_exits or model.num_classes != manifest.num_classes:
        raise ValueError(
            f"reference_model has {model.num_exits} exits and "
            f"{model.num_classes} classes; the artifact has {num_exits} exits "
            f"and {manifest.num_classes} classes. Pass the model it was "
            "exported from."
        )
    if model.criterion != manifest.criterion:
        raise ValueError(
            f"reference_model has criterion {model.criterion!r}; the artifact "
            f"was exported with {manifest.criterion!r}. Pass the model it was "
            "exported from."
        )
    _data.num_samples(model, x)  # checks x against the model's inputs


@dataclass
class Agreement:
    """An artifact against the float model it was exported from, on the
    same samples, each gated by its thresholds (the same ones unless
    `match_reference` kept the float model's own) and the same patience.

    Attributes:
        exit_agreement: share of samples that leave at the same exit.
        class_agreement: share of samples given the same class.
        reference_accuracy: the float model's gated accuracy.
        exit_class_agreement: per exit, the share of samples whose class
            the artifact's exit predicts as the float model's does.
        gate_agreement: per non-final exit, the share of samples whose gate
            decides alike (leave or go on), each on its own confidence (and
            streak).
        reference_exit_accuracy: per exit, the float model's accuracy.
    """

    exit_agreement: float
    class_agreement: float
    reference_accuracy: float
    exit_class_agreement: list[float]
    gate_agreement: list[float]
    reference_exit_accuracy: list[float]


def reference_outputs(model, x, y, cumulative_macs, batch_size: int = 256):
    """Every exit's outputs of the float model (`_data.ExitOutputs`)."""
    return _data.exit_outputs(model, x, y, batch_size, cumulative_macs=cumulative_macs)


def agreement(
    data, predictions, reference, thresholds, patience, reference_thresholds=None
) -> Agreement:
    """Exit decisions and classes of the artifact (`data`, `predictions`
    from `artifact_outputs`) gated by `thresholds` against the float model's
    `reference` outputs gated by `reference_thresholds` (default: the same
    `thresholds`) and, for patience models, both by `patience`."""
    if patience is not None:
        data = data.with_patience(patience)
        reference = reference.with_patience(patience)
    if reference_thresholds is None:
        reference_thresholds = thresholds
    rows = np.arange(len(data.labels))
    exits = select_exits(data.confidences, thresholds)
    float_exits = select_exits(reference.confidences, reference_thresholds)
    float_predictions = np.argmax(reference.logits, axis=-1).T  # (n, E)
    gates = [
        float(
            np.mean(
                gate_passes(data.confidences[:, k], t)
                == gate_passes(reference.confidences[:, k], r)
            )
        )
        for k, (t, r) in enumerate(zip(thresholds, reference_thresholds))
    ]
    return Agreement(
        exit_agreement=float(np.mean(exits == float_exits)),
        class_agreement=float(
            np.mean(predictions[rows, exits] == float_predictions[rows, float_exits])
        ),
        reference_accuracy=float(reference.correct[rows, float_exits].mean()),
        exit_class_agreement=[
            float(a) for a in (predictions == float_predictions).mean(axis=0)
        ],
        gate_agreement=gates,
        reference_exit_accuracy=[float(a) for a in reference.correct.mean(axis=0)],
    )


def _agreement(result, data, predictions, reference) -> None:
    """`result`'s agreement fields, at its thresholds (the float model's at
    `result.reference_thresholds`) and patience."""
    found = agreement(
        data,
        predictions,
        reference,
        result.thresholds,
        result.patience,
        result.reference_thresholds,
    )
    result.exit_agreement = found.exit_agreement
    result.class_agreement = found.class_agreement
    result.reference_accuracy = found.reference_accuracy
    result.exit_class_agreement = found.exit_class_agreement
