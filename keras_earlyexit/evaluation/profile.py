"""`profile`: accuracy against compute, per exit and over thresholds."""

import itertools
from dataclasses import dataclass, field

import numpy as np

from keras_earlyexit.evaluation import _data, artifact
from keras_earlyexit.evaluation.macs import count_macs, sequence_length_of
from keras_earlyexit.labels import check_labels

# Per-exit threshold combinations evaluated for the Pareto front.
_MAX_COMBINATIONS = 4096


@dataclass
class SweepPoint:
    """Simulated gated inference at one setting of thresholds.

    Attributes:
        thresholds: one per non-final exit.
        accuracy: fraction of samples classified right.
        average_macs: MACs per sample, averaged over the samples.
        share: `average_macs` as a fraction of the full model's MACs.
        exit_shares: fraction of samples leaving at each exit.
        patience: for a patience model, the patience of this setting (the
            thresholds are its confidence floors); else None. Apply with
            `model.set_patience(point.patience)`.
    """

    thresholds: tuple[float, ...]
    accuracy: float
    average_macs: float
    share: float
    exit_shares: tuple[float, ...]
    patience: int | None = None

    def setting(self) -> str:
        """The thresholds (and patience) as short text."""
        floors = _fmt_list(self.thresholds, "{:.3f}")
        return floors if self.patience is None else f"p={self.patience} {floors}"


@dataclass
class ProfileReport:
    """Accuracy against MACs of an early-exit model on labelled data.

    Attributes:
        exit_names: names of the exits, shallow to deep.
        accuracy: per exit, accuracy when every sample leaves there.
        segment_macs: per exit, MACs of its segment.
        cumulative_macs: per exit, MACs to reach and evaluate it.
        macs_share: per exit, cumulative MACs as a fraction of the full model.
        oracle_accuracy: accuracy when each sample leaves at the first exit
            that is right (else at the final exit): an upper bound.
        oracle_macs: average MACs per sample of that oracle: the least
            compute any gate could spend for that accuracy.
        oracle_exit_shares: fraction of samples the oracle sends to each exit.
        current: the model's own thresholds (and patience), simulated.
        sweep: one shared threshold for every exit, from 0 to 1 (for a
            patience model: a shared confidence floor, at every patience
            from 1 to the number of exits).
        pareto_front: the settings (shared and per-exit thresholds, and
            every patience) that no other setting beats in both accuracy
            and average MACs, by increasing MACs.
        num_samples: samples profiled.
        criterion: the gates' confidence criterion.
        patience: the model's patience (criterion `"patience"`), else None.
        patience_sweep: for a patience model, patience alone (floors 0.0)
            at each patience from 1 to the number of exits; else empty.
        artifact: for an exported artifact, its bundle directory or fused
            file; else "".
        quantization: the artifact's mode (`"int8"`, `"float16"`, ...).
        exit_agreement: for an artifact profiled with `reference_model`,
            the share of samples that leave at the same exit in the
            artifact and in the float model, both at the artifact's current
            thresholds (else None, as the fields below).
        class_agreement: the same for the class given.
        reference_accuracy: the float model's gated accuracy at those
            thresholds.
        exit_class_agreement: per exit, the share of samples whose class the
            artifact's exit predicts as the float model's does.
        gate_agreement: per non-final exit, the share of samples whose gate
            decides alike (leave or go on) at the current thresholds.
        reference_exit_accuracy: per exit, the float model's accuracy.
    """

    exit_names: list[str]
    accuracy: list[float]
    segment_macs: list[int]
    cumulative_macs: list[int]
    macs_share: list[float]
    oracle_accuracy: float
    oracle_macs: float
    oracle_exit_shares: list[float]
    current: SweepPoint
    sweep: list[SweepPoint] = field(default_factory=list)
    pareto_front: list[SweepPoint] = field(default_factory=list)
    num_samples: int = 0
    criterion: str = ""
    patience: int | None = None
    patience_sweep: list[SweepPoint] = field(default_factory=list)
    artifact: str = ""
    quantization: str = ""
    exit_agreement: float | None = None
    class_agreement: float | None = None
    reference_accuracy: float | None = None
    exit_class_agreement: list[float] | None = None
    gate_agreement: list[float] | None = None
    reference_exit_accuracy: list[float] | None = None

    @property
    def full_macs(self) -> int:
        return self.cumulative_macs[-1]

    def best_under(self, max_accuracy_drop: float) -> SweepPoint:
        """Cheapest Pareto point within `max_accuracy_drop` of the final exit."""
        target = self.accuracy[-1] - max_accuracy_drop
        return min(
            (p for p in self.pareto_front if p.accuracy >= target - 1e-12),
            key=lambda p: p.average_macs,
        )

    def _front_rows(self, max_rows: int = 12) -> list[SweepPoint]:
        front = self.pareto_front
        if len(front) <= max_rows:
            return front
        keep = np.unique(np.linspace(0, len(front) - 1, max_rows).round().astype(int))
        return [front[i] for i in keep]

    def _exit_header(self) -> tuple[str, ...]:
        header = ("exit", "accuracy", "segment MACs", "cumulative MACs", "share")
        if self.exit_agreement is None:
            return header
        return (*header, "float accuracy", "same class", "same gate decision")

    def _rows(self) -> tuple[list, list, list]:
        exits = [
            (
                name,
                f"{acc:.4f}",
                f"{seg:,}",
                f"{cum:,}",
                f"{share:.1%}",
            )
            for name, acc, seg, cum, share in zip(
                self.exit_names,
                self.accuracy,
                self.segment_macs,
                self.cumulative_macs,
                self.macs_share,
            )
        ]
        if self.exit_agreement is not None:
            gates = [f"{a:.1%}" for a in self.gate_agreement] + ["-"]
            exits = [
                (*row, f"{float_acc:.4f}", f"{same:.1%}", gate)
                for row, float_acc, same, gate in zip(
                    exits,
                    self.reference_exit_accuracy,
                    self.exit_class_agreement,
                    gates,
                )
            ]
        summary = [
            (
                "oracle",
                f"{self.oracle_accuracy:.4f}",
                f"{self.oracle_macs:,.0f}",
                f"{self.oracle_macs / self.full_macs:.1%}",
                _fmt_list(self.oracle_exit_shares, "{:.0%}"),
            ),
            (
                f"thresholds {self.current.setting()}",
                f"{self.current.accuracy:.4f}",
                f"{self.current.average_macs:,.0f}",
                f"{self.current.share:.1%}",
                _fmt_list(self.current.exit_shares, "{:.0%}"),
            ),
        ]
        front = [
            (
                p.setting(),
                f"{p.accuracy:.4f}",
                f"{p.average_macs:,.0f}",
                f"{p.share:.1%}",
                f"{1 / max(p.share, 1e-12):.2f}x",
                _fmt_list(p.exit_shares, "{:.0%}"),
            )
            for p in self._front_rows()
        ]
        return exits, summary, front

    def _patience_text(self) -> str:
        return "" if self.patience is None else f", patience {self.patience}"

    def _subject(self) -> str:
        """What was profiled, for the title."""
        if not self.artifact:
            return ""
        return f" of {self.artifact} ({self.quantization})"

    def _agreement_text(self) -> str:
        """The artifact against the float model, at the current thresholds."""
        if self.exit_agreement is None:
            return ""
        return (
            f"{self.quantization} artifact vs float model at thresholds "
            f"{self.current.setting()}: same exit {self.exit_agreement:.1%}, "
            f"same class {self.class_agreement:.1%}; gated accuracy "
            f"{self.current.accuracy:.4f} ({self.quantization}) vs "
            f"{self.reference_accuracy:.4f} (float)"
        )

    def __str__(self) -> str:
        exits, summary, front = self._rows()
        title = (
            f"Early-exit profile{self._subject()} on {self.num_samples} samples "
            f"(criterion {self.criterion!r}{self._patience_text()}, "
            f"full model {self.full_macs:,} MACs)"
        )
        agreement = self._agreement_text()
        parts = [
            title,
            _text_table(self._exit_header(), exits),
            "",
            _text_table(
                ("gated", "accuracy", "avg MACs", "share", "exit shares"), summary
            ),
            *([agreement] if agreement else []),
            "",
            f"Pareto front ({len(self.pareto_front)} points, accuracy vs avg MACs):",
            _text_table(
                ("thresholds", "accuracy", "avg MACs", "share", "speed-up", "exits"),
                front,
            ),
        ]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        """The same tables in GitHub markdown."""
        exits, summary, front = self._rows()
        agreement = self._agreement_text()
        return "\n".join(
            [
                f"Profile{self._subject()} on {self.num_samples} samples, "
                f"criterion `{self.criterion}`{self._patience_text()}, full "
                f"model {self.full_macs:,} MACs.",
                "",
                _md_table(self._exit_header(), exits),
                "",
                _md_table(
                    ("gated", "accuracy", "avg MACs", "share", "exit shares"), summary
                ),
                *(["", self._agreement_text() + "."] if agreement else []),
                "",
                _md_table(
                    (
                        "thresholds",
                        "accuracy",
                        "avg MACs",
                        "share",
                        "speed-up",
                        "exits",
                    ),
                    front,
                ),
            ]
        )

    def plot(self, path: str, title: str | None = None) -> str:
        """Writes accuracy against average MACs as a PNG.

        Shows the Pareto front, the shared-threshold sweep, each exit (all
        samples leaving there), the final exit, the oracle and the model's
        current thresholds.

        Args:
            path: file to write (`.png`).
            title: figure title.

        Returns:
            `path`.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for patience in dict.fromkeys(p.patience for p in self.sweep):
            points = [p for p in self.sweep if p.patience == patience]
            ax.plot(
                [p.average_macs for p in points],
                [p.accuracy for p in points],
                color="0.6",
                lw=1,
                label="one shared threshold"
                if patience is None
                else f"patience {patience}, one shared floor",
            )
        if self.patience_sweep:
            ax.plot(
                [p.average_macs for p in self.patience_sweep],
                [p.accuracy for p in self.patience_sweep],
                color="C4",
                marker="o",
                lw=1,
                label="patience alone (p = 1, 2, ...)",
            )
        ax.step(
            [p.average_macs for p in self.pareto_front],
            [p.accuracy for p in self.pareto_front],
            where="post",
            color="C0",
            lw=2,
            label="Pareto front (per-exit thresholds)",
        )
        ax.scatter(
            self.cumulative_macs[:-1],
            self.accuracy[:-1],
            color="C1",
            zorder=3,
            label="single exit",
        )
        for name, macs, acc in zip(
            self.exit_names, self.cumulative_macs, self.accuracy
        ):
            ax.annotate(name, (macs, acc), textcoords="offset points", xytext=(4, -10))
        ax.scatter(
            [self.full_macs],
            [self.accuracy[-1]],
            marker="s",
            color="C3",
            zorder=3,
            label="final exit (no early exit)",
        )
        ax.scatter(
            [self.oracle_macs],
            [self.oracle_accuracy],
            marker="*",
            s=150,
            color="C2",
            zorder=3,
            label="oracle",
        )
        ax.scatter(
            [self.current.average_macs],
            [self.current.accuracy],
            marker="x",
            color="k",
            zorder=3,
            label="current thresholds",
        )
        ax.set_xlabel("average MACs per sample")
        ax.set_ylabel("accuracy")
        ax.set_title(title or f"Accuracy vs compute ({self.num_samples} samples)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return str(path)


def profile(
    model,
    x,
    y,
    batch_size: int = 256,
    verbose: int = 0,
    num_thresholds: int = 101,
    reference_model=None,
) -> ProfileReport:
    """Accuracy and compute per exit, the oracle bound and the Pareto front.

    All exits' logits are computed once with `model.predict`; confidences
    come from the model's own gates; thresholds are then simulated in NumPy
    with the same rule as `predict_early` (leave at the first exit whose
    confidence reaches its threshold). For a `criterion="patience"` model
    the sweeps and the Pareto front also range over the patience, from 1 to
    the number of exits, with the confidence floors as thresholds.

    `model` may also be an exported artifact: a `kee.runtime.GatedInterpreter`
    / `FusedInterpreter`, or the path of a bundle directory or fused
    `.tflite` file. Every exit's classes and confidences are then the ones
    its runtime computes (int8 confidences for an int8 artifact, read as
    `kee.calibrate` reads them), the MACs are the manifest's (counted by
    the exporter on the model it converted) and the current thresholds are
    the artifact's. With `reference_model`, the float model it was exported
    from, the report adds how often the artifact and the float model agree.

    Args:
        model: an `EarlyExitModel`, or an exported artifact (see above).
        x: input array(s).
        y: labels, int `(n,)` or one-hot `(n, num_classes)`.
        batch_size: batch size of `model.predict` (and of the reference
            model's).
        verbose: 1 shows the progress bar of `model.predict`.
        num_thresholds: grid size of the shared-threshold sweep (the
            confidences' quantiles are added to it).
        reference_model: for an artifact only, the float `EarlyExitModel`
            it was exported from: the report then gives, per exit, the
            float accuracy, the share of samples given the same class and
            the share whose gate decides alike, and at the artifact's
            thresholds the share leaving at the same exit and given the same
            class.

    Returns:
        `ProfileReport` with per-exit `.accuracy` and `.cumulative_macs`,
        `.oracle_accuracy`, `.oracle_macs`, `.pareto_front`, `.plot(path)`
        and a table from `str()` / `.to_markdown()`; for an artifact with a
        `reference_model`, `.exit_agreement`, `.class_agreement` and the
        per-exit `.exit_class_agreement` and `.gate_agreement`.

    Example:

    ```python
    report = kee.profile(model, x_val, y_val)
    print(report)
    report.plot("profile.png")
    # The int8 bundle as it runs, against the float model:
    print(kee.profile("digits_bundle", x_val, y_val, reference_model=model))
    ```
    """
    if artifact.is_artifact(model):
        return _profile_artifact(
            model, x, y, reference_model, batch_size, verbose, num_thresholds
        )
    if reference_model is not None:
        raise ValueError(
            "reference_model is for profiling an exported artifact (a "
            "GatedInterpreter or a bundle / fused file path); a Keras model "
            "is its own reference."
        )
    macs = count_macs(model, sequence_length=sequence_length_of(model, x))
    data = _data.exit_outputs(
        model, x, y, batch_size, verbose, cumulative_macs=macs.cumulative_macs
    )
    return _report(
        data,
        exit_names=list(model.exit_names),
        segment_macs=list(macs.segment_macs),
        thresholds=model.thresholds,
        criterion=str(model.gates[0].criterion),
        patience=getattr(model, "patience", None),
        num_thresholds=num_thresholds,
    )


def _profile_artifact(
    source, x, y, reference_model, batch_size, verbose, num_thresholds
) -> ProfileReport:
    """`profile` of a bundle or fused file (see `profile`); every input is
    checked before anything runs."""
    opened = artifact.open_on(source, x, "x")
    if opened.num_samples == 0:
        raise ValueError("x is empty: profile needs labelled samples.")
    manifest = opened.manifest
    labels = check_labels(y, opened.num_samples, manifest.num_classes)
    if reference_model is not None:
        artifact.check_reference(reference_model, x, len(opened.exits), manifest)
    interpreter = opened.interpreter
    data, predictions = artifact.artifact_outputs(
        interpreter, x, labels, opened.exits, verbose
    )
    report = _report(
        data,
        exit_names=list(manifest.exit_names),
        segment_macs=[e.macs for e in opened.exits],
        thresholds=interpreter.thresholds,
        criterion=manifest.criterion,
        patience=interpreter.patience,
        num_thresholds=num_thresholds,
    )
    report.artifact = opened.path
    report.quantization = manifest.quantization
    if reference_model is not None:
        reference = artifact.reference_outputs(
            reference_model, x, labels, data.cumulative_macs, batch_size
        )
        found = artifact.agreement(
            data, predictions, reference, interpreter.thresholds, interpreter.patience
        )
        for name, value in vars(found).items():
            setattr(report, name, value)
    return report


def _report(
    data: _data.ExitOutputs,
    exit_names: list,
    segment_macs: list,
    thresholds,
    criterion: str,
    patience: int | None,
    num_thresholds: int,
) -> ProfileReport:
    """The report of every exit's outputs `data` (gated by `patience`, if
    any; MACs to each exit in `data.cumulative_macs`), with the current
    `thresholds` simulated."""
    num_exits = data.num_exits
    cumulative_macs = [int(c) for c in data.cumulative_macs]
    full = float(cumulative_macs[-1])

    def point(thresholds, gated=data) -> SweepPoint:
        acc, avg, _, exits = gated.simulate(thresholds)
        shares = np.bincount(exits, minlength=num_exits) / len(exits)
        return SweepPoint(
            tuple(float(t) for t in thresholds),
            acc,
            avg,
            avg / full,
            tuple(float(s) for s in shares),
            gated.patience,
        )

    # Oracle: first exit that is right, else the final one.
    right = np.concatenate([data.correct[:, :-1], np.ones_like(data.correct[:, :1])], 1)
    oracle_exits = np.argmax(right, axis=1)
    oracle_shares = np.bincount(oracle_exits, minlength=num_exits) / len(oracle_exits)

    # One gating per patience (a single one for other criteria).
    settings = (
        [data]
        if patience is None
        else [data.with_patience(p) for p in range(1, num_exits + 1)]
    )
    combinations = _MAX_COMBINATIONS / len(settings)
    per_exit = max(2, int(combinations ** (1 / max(num_exits - 1, 1))))
    sweep, candidates = [], []
    for gated in settings:
        early = gated.confidences[:, :-1]
        shared = np.unique(
            np.concatenate(
                [
                    np.linspace(0.0, 1.0, num_thresholds),
                    _quantiles(early.ravel(), num_thresholds),
                ]
            ).clip(0.0, 1.0)
        )
        shared_points = [point([t] * (num_exits - 1), gated) for t in shared]
        grids = [
            np.unique(np.append(_quantiles(early[:, k], per_exit), 1.0))
            for k in range(num_exits - 1)
        ]
        sweep += shared_points
        candidates += shared_points
        candidates += [point(c, gated) for c in itertools.product(*grids)]
    patience_sweep = []
    if patience is not None:
        patience_sweep = [point([0.0] * (num_exits - 1), gated) for gated in settings]
    return ProfileReport(
        exit_names=exit_names,
        accuracy=[float(a) for a in data.correct.mean(axis=0)],
        segment_macs=[int(m) for m in segment_macs],
        cumulative_macs=cumulative_macs,
        macs_share=[c / max(full, 1.0) for c in cumulative_macs],
        oracle_accuracy=float(data.correct.any(axis=1).mean()),
        oracle_macs=float(data.cumulative_macs[oracle_exits].mean()),
        oracle_exit_shares=[float(s) for s in oracle_shares],
        current=point(thresholds),
        sweep=sweep,
        pareto_front=pareto_front(candidates),
        num_samples=len(data.labels),
        criterion=criterion,
        patience=patience,
        patience_sweep=patience_sweep,
    )


def _quantiles(confidences: np.ndarray, num: int) -> np.ndarray:
    """`num` quantiles of the confidences a threshold can let through
    (those a patience gate holds back are below every threshold)."""
    values = confidences[confidences >= 0.0]
    if values.size == 0:
        return np.array([1.0])
    return np.quantile(values, np.linspace(0, 1, num))


def pareto_front(points: list[SweepPoint]) -> list[SweepPoint]:
    """Points not beaten in both accuracy and average MACs, by MACs."""
    front: list[SweepPoint] = []
    for p in sorted(points, key=lambda p: (p.average_macs, -p.accuracy)):
        if not front or p.accuracy > front[-1].accuracy + 1e-12:
            front.append(p)
    return front


def _fmt_list(values, fmt: str) -> str:
    return "[" + ", ".join(fmt.format(v) for v in values) + "]"


def _text_table(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
