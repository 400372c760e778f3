"""Per-exit TFLite bundles against one monolithic `.tflite` of the same
network: size, accuracy and single-thread latency, per quantization mode.

Trains the digits CNN (scikit-learn digits, no download), calibrates its
thresholds to lose at most one point of accuracy on the validation split,
converts it with `kee.export.to_tflite` and, for comparison, as a single
model that computes every exit. Latency is measured in one run, alternating
the gated loop (`kee.runtime.GatedInterpreter`, one thread) and the
monolithic model (one thread, the same per-sample Python loop) over the
test split, and reported as a ratio next to the average MACs ratio.
Target: gated / monolithic latency <= 1.1 x (average MACs ratio).

Run:
    KERAS_BACKEND=tensorflow python benchmarks/tflite_bundle.py
Writes benchmarks/results/tflite_bundle.md and .json.
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

import keras_earlyexit as kee  # noqa: E402
from keras_earlyexit import demo  # noqa: E402
from keras_earlyexit.export.tflite import convert_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def train(width: int, epochs: int, splits) -> kee.EarlyExitModel:
    keras.utils.set_random_seed(0)
    model = demo.digits_cnn(width=width)
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
    model.fit(splits.x_train, splits.y_train, epochs=epochs, batch_size=32, verbose=0)
    calibration = kee.calibrate(
        model, splits.x_val, splits.y_val, max_accuracy_drop=0.01
    )
    model.set_thresholds(calibration.thresholds)
    return model


def monolithic_tflite(model, x_val: np.ndarray, mode: str) -> bytes:
    """The whole network as one `.tflite` computing every exit (outputs
    named after the exits), converted like the segments; int8 calibrates on
    up to 500 samples of `x_val`, as `to_tflite` does by default."""
    whole = keras.Model(
        model.inputs, dict(zip(model.exit_names, model.outputs)), name="monolithic"
    )
    representative = {whole.inputs[0].name: x_val[:500]}
    return convert_model(whole, mode, representative if mode == "int8" else None)


class Monolithic:
    """The whole network as one `.tflite` (every exit computed), run one
    sample at a time like the gated loop."""

    def __init__(self, data: bytes):
        self.interpreter = Interpreter(model_content=data, num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        runner = self.interpreter.get_signature_runner()
        self.final = runner.get_output_details()["final"]["index"]

    def predict(self, x: np.ndarray) -> np.ndarray:
        scale, zero_point = self.input["quantization"]
        if self.input["dtype"] == np.int8:
            x = kee.runtime.quantize(x, scale, zero_point)
        classes = np.zeros(len(x), np.int64)
        for i in range(len(x)):
            self.interpreter.set_tensor(self.input["index"], x[i : i + 1])
            self.interpreter.invoke()
            classes[i] = np.argmax(self.interpreter.get_tensor(self.final))
        return classes


def bench_mode(model, splits, mode: str, root: str, repeats: int) -> dict:
    bundle = kee.export.to_tflite(
        model,
        os.path.join(root, mode),
        representative_data=splits.x_val,
        quantization=mode,
        verbose=0,
    )
    mono_bytes = monolithic_tflite(model, splits.x_val, mode)
    gated = kee.runtime.GatedInterpreter(bundle, num_threads=1)
    mono = Monolithic(mono_bytes)
    x, y = splits.x_test, splits.y_test
    gated.predict(x[:32])  # warm-up (first invokes pack weights)
    mono.predict(x[:32])
    gated_times, mono_times = [], []
    for _ in range(repeats):  # alternate, so both see the same machine load
        t0 = time.perf_counter()
        result = gated.predict(x)
        gated_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mono_classes = mono.predict(x)
        mono_times.append(time.perf_counter() - t0)
    manifest = gated.manifest
    cumulative = np.array([s.cumulative_macs for s in manifest.segments])
    fractions = np.bincount(result.exit_indices, minlength=len(cumulative)) / len(x)
    macs_ratio = float(fractions @ cumulative / cumulative[-1])
    gated_s = float(np.median(gated_times)) / len(x)
    mono_s = float(np.median(mono_times)) / len(x)
    latency_ratio = gated_s / mono_s
    return {
        "mode": mode,
        "bundle_bytes": sum(s.size_bytes for s in manifest.segments),
        "monolithic_bytes": len(mono_bytes),
        "gated_accuracy": float(np.mean(result.classes == y)),
        "monolithic_accuracy": float(np.mean(mono_classes == y)),
        "exit_mix": [float(f) for f in fractions],
        "macs_ratio": macs_ratio,
        "gated_us": gated_s * 1e6,
        "monolithic_us": mono_s * 1e6,
        "latency_ratio": latency_ratio,
        "target_met": bool(latency_ratio <= 1.1 * macs_ratio),
        "boundary": manifest.boundary.split(":")[0],
    }


def to_markdown(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        lines += [
            f"### digits CNN, width {run['width']} "
            f"({run['total_macs']:,} MACs, thresholds "
            f"{', '.join(f'{t:.3f}' for t in run['thresholds'])}; Keras gated "
            f"accuracy {run['keras_accuracy']:.2%})",
            "",
            "| mode | bundle bytes | monolithic bytes | gated acc | monolithic acc "
            "| exit mix | MACs ratio | gated us | monolithic us | latency ratio "
            "| target (<= 1.1 x MACs) |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        for r in run["modes"]:
            mix = " / ".join(f"{f:.0%}" for f in r["exit_mix"])
            lines.append(
                f"| {r['mode']} | {r['bundle_bytes']:,} | {r['monolithic_bytes']:,} "
                f"| {r['gated_accuracy']:.2%} | {r['monolithic_accuracy']:.2%} "
                f"| {mix} | {r['macs_ratio']:.3f} | {r['gated_us']:.1f} "
                f"| {r['monolithic_us']:.1f} | {r['latency_ratio']:.3f} "
                f"| {'met' if r['target_met'] else 'missed'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--modes", nargs="+", default=list(kee.export.QUANTIZATION_MODES)
    )
    args = parser.parse_args()
    splits = demo.load_digits(seed=0)
    runs = []
    with tempfile.TemporaryDirectory(prefix="kee-bench-") as root:
        for width in args.widths:
            model = train(width, args.epochs, splits)
            keras_result = model.predict_early(splits.x_test)
            run = {
                "width": width,
                "total_macs": kee.count_macs(model, warn=False).total_macs,
                "thresholds": model.thresholds,
                "keras_accuracy": float(np.mean(keras_result.classes == splits.y_test)),
                "modes": [],
            }
            for mode in args.modes:
                r = bench_mode(
                    model, splits, mode, os.path.join(root, str(width)), args.repeats
                )
                print(json.dumps({"width": width, **r}))
                run["modes"].append(r)
            runs.append(run)
    write_results("tflite_bundle", runs, to_markdown(runs))


def write_results(name: str, runs: list, markdown: str) -> None:
    """Prints the table and writes results/NAME.md and results/NAME.json."""
    os.makedirs(RESULTS, exist_ok=True)
    print(markdown)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
