"""Gated int8 bundle against one monolithic int8 `.tflite` in TFLite Micro:
time per sample, average MACs, tensor arena and flash.

Trains the digits CNN (scikit-learn digits, no download), calibrates its
thresholds to lose at most one point of accuracy on the validation split,
converts it with `kee.export.to_tflite(quantization="int8")` (ops checked
for TFLite Micro, arenas measured) and, for comparison, as one model that
computes every exit (`tflite_bundle.monolithic_tflite`). Both run in the
TFLite Micro interpreter of the `tflite_micro` pip package (reference
kernels, on this host's CPU): the gated loop is
`GatedInterpreter(backend="micro")`, the monolithic model the same
per-sample Python loop. Time is measured in one run, alternating the two
over the test split, median of the repeats, and reported as a ratio next to
the average-MACs ratio.

Arena: the gated figures are per segment (measured at export), the largest
segment, the sum of separate arenas (one `MicroAllocator` per segment, as
`GatedInterpreter(backend="micro")` does) and the shared arena the C++
runner `TflmEarlyExit` needs (one `MicroAllocator`: persistent parts summed,
activation area shared; `micro.shared_arena_bytes`); the monolithic arena is
measured the same way. Flash: the models' bytes.

Run:
    KERAS_BACKEND=tensorflow python benchmarks/tflite_micro.py
Writes benchmarks/results/tflite_micro.md and .json.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named like the `tflite_micro` package: with its folder on
# sys.path (as when run as a script), `import tflite_micro` would find it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402

import keras_earlyexit as kee  # noqa: E402
from keras_earlyexit import demo  # noqa: E402
from keras_earlyexit.export.micro import (  # noqa: E402
    RUNTIME_ARENA_MARGIN,
    ArenaUsage,
    measure_arena,
    shared_arena_bytes,
)
from keras_earlyexit.export.tflite import tensor_infos  # noqa: E402
from keras_earlyexit.runtime.gated import MicroRunner  # noqa: E402


def _load_tflite_bundle():
    """benchmarks/tflite_bundle.py, for its training and monolithic model."""
    path = os.path.join(_HERE, "tflite_bundle.py")
    spec = importlib.util.spec_from_file_location("tflite_bundle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tflite_bundle = _load_tflite_bundle()


class MonolithicMicro:
    """The whole network in one TFLite Micro interpreter, one sample at a
    time; the final exit's output is found by signature name."""

    def __init__(self, data: bytes, arena_size: int):
        inputs, outputs = tensor_infos(data)
        self.input = inputs[0]
        self.final = next(t for t in outputs if t.name == "final")
        self.runner = MicroRunner(data, arena_size)

    def predict(self, x: np.ndarray) -> np.ndarray:
        q = kee.runtime.quantize(x, self.input.scale, self.input.zero_point)
        classes = np.zeros(len(x), np.int64)
        runner = self.runner
        for i in range(len(x)):
            runner.set_input(self.input, q[i : i + 1])
            runner.invoke()
            classes[i] = np.argmax(runner.get_output(self.final))
        return classes


def bench(width: int, epochs: int, repeats: int, splits, root: str) -> dict:
    model = tflite_bundle.train(width, epochs, splits)
    bundle = kee.export.to_tflite(
        model,
        os.path.join(root, f"int8_{width}"),
        representative_data=splits.x_val,
        quantization="int8",
        verbose=0,
    )
    mono_bytes = tflite_bundle.monolithic_tflite(model, splits.x_val, "int8")
    (mono_usage,) = measure_arena([mono_bytes])
    gated = kee.runtime.GatedInterpreter(bundle, backend="micro")
    mono = MonolithicMicro(mono_bytes, mono_usage.arena_bytes + RUNTIME_ARENA_MARGIN)
    x, y = splits.x_test, splits.y_test
    gated.predict(x[:16])  # warm-up
    mono.predict(x[:16])
    gated_times, mono_times = [], []
    for _ in range(repeats):  # alternate, so both see the same machine load
        t0 = time.perf_counter()
        result = gated.predict(x)
        gated_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mono_classes = mono.predict(x)
        mono_times.append(time.perf_counter() - t0)
    segments = gated.manifest.segments
    cumulative = np.array([s.cumulative_macs for s in segments])
    fractions = np.bincount(result.exit_indices, minlength=len(cumulative)) / len(x)
    average_macs = float(fractions @ cumulative)
    gated_s = float(np.median(gated_times)) / len(x)
    mono_s = float(np.median(mono_times)) / len(x)
    usages = [ArenaUsage(s.arena_bytes, s.arena_head_bytes) for s in segments]
    return {
        "width": width,
        "thresholds": model.thresholds,
        "total_macs": int(cumulative[-1]),
        "average_macs": average_macs,
        "macs_ratio": average_macs / float(cumulative[-1]),
        "gated_accuracy": float(np.mean(result.classes == y)),
        "monolithic_accuracy": float(np.mean(mono_classes == y)),
        "exit_mix": [float(f) for f in fractions],
        "gated_us": gated_s * 1e6,
        "monolithic_us": mono_s * 1e6,
        "time_ratio": gated_s / mono_s,
        "segment_arena_bytes": [u.arena_bytes for u in usages],
        "segment_arena_head_bytes": [u.head_bytes for u in usages],
        "gated_arena_max_segment": max(u.arena_bytes for u in usages),
        "gated_arena_separate_sum": sum(u.arena_bytes for u in usages),
        "gated_arena_shared": shared_arena_bytes(usages),
        "monolithic_arena": mono_usage.arena_bytes,
        "segment_flash_bytes": [s.size_bytes for s in segments],
        "gated_flash_bytes": sum(s.size_bytes for s in segments),
        "monolithic_flash_bytes": len(mono_bytes),
        "repeats": repeats,
        "samples": len(x),
    }


def to_markdown(runs: list[dict]) -> str:
    lines = [
        "TFLite Micro (pip `tflite_micro`, reference kernels, host CPU), digits "
        "int8, test split, one sample at a time; time: median of alternating "
        "repeats. Arena: gated = one shared `MicroAllocator` (C++ "
        "`TflmEarlyExit`); also the largest segment alone and the sum of "
        'separate arenas (Python `GatedInterpreter(backend="micro")`).',
        "",
        "| width | total MACs | exit mix | avg MACs ratio | gated us | "
        "monolithic us | time ratio | gated acc | monolithic acc |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        mix = " / ".join(f"{f:.0%}" for f in r["exit_mix"])
        lines.append(
            f"| {r['width']} | {r['total_macs']:,} | {mix} | {r['macs_ratio']:.3f} "
            f"| {r['gated_us']:.1f} | {r['monolithic_us']:.1f} "
            f"| {r['time_ratio']:.3f} | {r['gated_accuracy']:.2%} "
            f"| {r['monolithic_accuracy']:.2%} |"
        )
    lines += [
        "",
        "| width | arena gated shared | largest segment | separate sum | "
        "arena monolithic | segment arenas | flash gated | flash monolithic |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        per_segment = " / ".join(f"{b:,}" for b in r["segment_arena_bytes"])
        lines.append(
            f"| {r['width']} | {r['gated_arena_shared']:,} "
            f"| {r['gated_arena_max_segment']:,} "
            f"| {r['gated_arena_separate_sum']:,} | {r['monolithic_arena']:,} "
            f"| {per_segment} | {r['gated_flash_bytes']:,} "
            f"| {r['monolithic_flash_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    splits = demo.load_digits(seed=0)
    runs = []
    with tempfile.TemporaryDirectory(prefix="kee-bench-micro-") as root:
        for width in args.widths:
            run = bench(width, args.epochs, args.repeats, splits, root)
            print(json.dumps(run), flush=True)
            runs.append(run)
    tflite_bundle.write_results("tflite_micro", runs, to_markdown(runs))


if __name__ == "__main__":
    main()
