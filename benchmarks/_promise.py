"""What `guarantees.py` and `exit_policies.py` share: the figures of one
setting of thresholds, the oracle, the summary of repeated calibrations
(a kept promise) and its table cells."""

from collections.abc import Sequence

import numpy as np

from keras_earlyexit.evaluation import _data


def figures(outputs, thresholds, exits=None, accuracy=None) -> dict:
    """Drop against the final exit, MACs and exit shares of `thresholds`
    on `outputs`: simulated, or of the `exits` and `accuracy` a real run
    gave."""
    if exits is None:
        accuracy, _, _, exits = outputs.simulate(thresholds)
    macs = float(outputs.cumulative_macs[exits].mean())
    final = float(outputs.correct[:, -1].mean())
    return {
        "thresholds": [round(float(t), 4) for t in thresholds],
        "accuracy": accuracy,
        "drop_points": round(100 * (final - accuracy), 2),
        "average_macs": macs,
        "speedup": round(float(outputs.cumulative_macs[-1]) / macs, 2),
        "exit_shares": [
            round(float(s), 4)
            for s in np.bincount(exits, minlength=outputs.num_exits) / len(exits)
        ],
    }


def oracle(outputs) -> dict:
    """Each sample leaves at its first correct exit (or the final one)."""
    correct = outputs.correct
    right = np.concatenate([correct[:, :-1], np.ones_like(correct[:, :1])], 1)
    macs = float(outputs.cumulative_macs[np.argmax(right, axis=1)].mean())
    return {
        "average_macs": macs,
        "speedup": round(float(outputs.cumulative_macs[-1]) / macs, 2),
    }


def concat(a, b) -> _data.ExitOutputs:
    """Two data sets' exit outputs as one population."""
    return _data.ExitOutputs(
        logits=np.concatenate([a.logits, b.logits], axis=1),
        confidences=np.concatenate([a.confidences, b.confidences]),
        correct=np.concatenate([a.correct, b.correct]),
        agrees=np.concatenate([a.agrees, b.agrees]),
        labels=np.concatenate([a.labels, b.labels]),
        cumulative_macs=a.cumulative_macs,
    )


def summary(
    drops: Sequence[float], speedups: Sequence[float], draw: int, max_drop: float
) -> dict:
    """A promise kept or not over repeated calibrations: `drops` (fractions,
    one per calibration, measured on new data) above `max_drop` fail."""
    drops = np.asarray(drops, np.float64)
    failed = drops > max_drop + 1e-12
    return {
        "draws": len(drops),
        "draw_size": draw,
        "failures": int(np.sum(failed)),
        "failure_rate": float(np.mean(failed)),
        "mean_drop_points": round(100 * float(drops.mean()), 3),
        "max_drop_points": round(100 * float(drops.max()), 3),
        "mean_speedup": round(float(np.mean(speedups)), 2),
    }


def cells(p: dict | None) -> str:
    """The promise's table cells: failures, mean drop, mean speed-up."""
    if p is None:
        return "- | - | -"
    return (
        f"{p['failures']}/{p['draws']} (n={p['draw_size']}) | "
        f"{p['mean_drop_points']:.2f} | {p['mean_speedup']:.2f}x"
    )
