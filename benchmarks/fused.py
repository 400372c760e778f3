"""The fused gated `.tflite` (one file, one invoke per sample) against one
monolithic `.tflite` of the same network, and against its segment bundle.

Models: the digits CNN at widths 16 and 64 (scikit-learn digits, no
download) and a keyword-spotting-sized DS-CNN (Zhang et al. 2017, "Hello
Edge": a 10x4 stride-2 conv and four depthwise-separable blocks, 64
channels) on generated 49x10 MFCC-like features: each of 12 classes is a
pattern of spectro-temporal blobs, shifted in time and buried in noise of a
random strength, so that some samples are easy and some hard. Each model is
trained with `EarlyExitLoss`, its thresholds calibrated to lose at most one
point of accuracy on the validation split, and exported three ways per
quantization mode: `to_tflite(..., fused=True)`, the segment bundle, and one
monolithic model computing every exit (`tflite_bundle.monolithic_tflite`).

Measured side by side in one run, the two models taking turns on chunks of
the same samples (fastest of the repeats per chunk: the machine is shared),
one thread, one sample per invoke:

- LiteRT Python latency, fused vs monolithic (int8, float32), against the
  target fused <= 1.1 x (average-MACs ratio) x monolithic + 2 us;
- TFLite Micro time (pip `tflite_micro`, reference kernels, host CPU), int8:
  ratio against 1.1 x the MACs ratio; also the ratio a zero-overhead gated
  loop would reach with these kernels, from each segment's own time;
- TFLite Micro arena (smallest that allocates and invokes, 16-byte steps,
  `export.micro.measure_arena`) and flash (file bytes), int8, against
  1.05 x the monolithic model's;
- agreement with the segment bundle (`GatedInterpreter`) in classes, exits
  and confidences, on LiteRT and on TFLite Micro.

Run:
    KERAS_BACKEND=tensorflow python benchmarks/fused.py
Writes benchmarks/results/fused.md and .json.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a script, this folder is on sys.path, where benchmarks/tflite_micro.py
# would be imported in place of the `tflite_micro` package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_earlyexit as kee  # noqa: E402
from keras_earlyexit import demo  # noqa: E402
from keras_earlyexit.export.micro import (  # noqa: E402
    RUNTIME_ARENA_MARGIN,
    ArenaUsage,
    measure_arena,
    shared_arena_bytes,
)
from keras_earlyexit.runtime.fused import (  # noqa: E402
    FusedInterpreter,
    read_fused_manifest,
)
from keras_earlyexit.runtime.gated import MicroRunner  # noqa: E402
from keras_earlyexit.runtime.manifest import read_manifest, read_segment  # noqa: E402


def _load(name: str):
    """A sibling benchmark script as a module (its helpers are reused)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", os.path.join(_HERE, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tflite_bundle = _load("tflite_bundle")
tflite_micro = _load("tflite_micro")

KWS_SHAPE = (49, 10, 1)
KWS_CLASSES = 12


def kws_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated keyword-spotting features `(n, 49, 10, 1)` and labels.

    Class c is 3 Gaussian blobs at fixed (frame, coefficient) places; a
    sample shifts its class pattern by up to 8 frames, scales it, and adds
    white noise whose strength varies per sample (SNR from easy to hard).
    """
    patterns = np.random.default_rng(1234)  # the same classes for every split
    centers = patterns.uniform([8, 0], [40, 9], size=(KWS_CLASSES, 3, 2))
    widths = patterns.uniform([2, 0.7], [6, 2.0], size=(KWS_CLASSES, 3, 2))
    signs = patterns.choice([-1.0, 1.0], size=(KWS_CLASSES, 3))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, KWS_CLASSES, n)
    frames, coefficients = np.meshgrid(np.arange(49), np.arange(10), indexing="ij")
    x = np.zeros((n, 49, 10), np.float32)
    shifts = rng.integers(-8, 9, n)
    for i, (c, shift) in enumerate(zip(labels, shifts)):
        for (t, f), (wt, wf), sign in zip(centers[c], widths[c], signs[c]):
            x[i] += sign * np.exp(
                -(((frames - t - shift) / wt) ** 2) - ((coefficients - f) / wf) ** 2
            )
    noise = rng.uniform(0.2, 1.2, size=(n, 1, 1))
    x = x * rng.uniform(0.7, 1.3, size=(n, 1, 1)) + noise * rng.normal(size=x.shape)
    return x[..., None].astype(np.float32), labels


def ds_cnn(filters: int = 64) -> kee.EarlyExitModel:
    """DS-CNN for 49x10 features with exits after blocks 1 and 2 and the
    final classifier after block 4."""
    layers = keras.layers
    inputs = keras.Input(KWS_SHAPE, name="features")
    x = layers.Conv2D(filters, (10, 4), strides=2, padding="same", name="conv")(inputs)
    x = layers.ReLU(name="relu")(layers.BatchNormalization(name="bn")(x))
    exits = []
    for b in range(1, 5):
        x = layers.DepthwiseConv2D(3, padding="same", name=f"dw_{b}")(x)
        x = layers.ReLU(name=f"dw_relu_{b}")(
            layers.BatchNormalization(name=f"dw_bn_{b}")(x)
        )
        x = layers.Conv2D(filters, 1, name=f"pw_{b}")(x)
        x = layers.ReLU(name=f"pw_relu_{b}")(
            layers.BatchNormalization(name=f"pw_bn_{b}")(x)
        )
        if b < 3:
            exits.append(kee.ExitBranch(KWS_CLASSES, name=f"exit_{b}")(x))
    exits.append(kee.ExitBranch(KWS_CLASSES, name="final")(x))
    return kee.EarlyExitModel(inputs, exits, name="ds_cnn")


def kws_splits(seed: int = 0) -> demo.Splits:
    x, y = kws_data(4000, seed)
    return demo.Splits(
        x[:2800], y[:2800], x[2800:3400], y[2800:3400], x[3400:], y[3400:]
    )


def train_kws(splits: demo.Splits, epochs: int) -> kee.EarlyExitModel:
    keras.utils.set_random_seed(0)
    model = ds_cnn()
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss("linear"))
    model.fit(splits.x_train, splits.y_train, epochs=epochs, batch_size=64, verbose=0)
    calibration = kee.calibrate(
        model, splits.x_val, splits.y_val, max_accuracy_drop=0.01
    )
    model.set_thresholds(calibration.thresholds)
    return model


def _alternate(runs: dict, x: np.ndarray, repeats: int, chunk: int = 30) -> dict:
    """Seconds per sample of each function `fn(x_chunk)`. The functions
    take turns on each chunk of `x`, so that they see the same machine
    load, `repeats` times; each chunk counts with its fastest time (this
    machine is shared: the minimum is the least disturbed measurement)."""
    for fn in runs.values():
        fn(x[:chunk])  # warm-up
    starts = range(0, len(x), chunk)
    best = {name: [np.inf] * len(starts) for name in runs}
    for _ in range(repeats):
        for c, start in enumerate(starts):
            part = x[start : start + chunk]
            for name, fn in runs.items():
                begin = time.perf_counter()
                fn(part)
                best[name][c] = min(best[name][c], time.perf_counter() - begin)
    return {name: float(np.sum(b)) / len(x) for name, b in best.items()}


def _agreement(a, b) -> float:
    same = (
        (a.classes == b.classes)
        & (a.exit_indices == b.exit_indices)
        & (a.confidences == b.confidences)
    )
    return float(np.mean(same))


def _segment_seconds(bundle: str, x: np.ndarray, repeats: int) -> list[float]:
    """Seconds per invoke of each segment alone in TFLite Micro (inputs
    are zeros: the reference kernels' time does not depend on values)."""
    manifest = read_manifest(bundle)
    out = []
    for info in manifest.segments:
        runner = MicroRunner(read_segment(bundle, info), 1 << 22)
        values = [np.zeros(t.shape, t.dtype) for t in info.inputs]

        def invoke(part, runner=runner, info=info, values=values):
            for _ in range(len(part)):
                for t, v in zip(info.inputs, values):
                    runner.set_input(t, v)
                runner.invoke()

        out.append(_alternate({"segment": invoke}, x, repeats)["segment"])
    return out


def bench_mode(model, splits, mode: str, root: str, args) -> dict:
    common = dict(representative_data=splits.x_val, quantization=mode, verbose=0)
    path = kee.export.to_tflite(
        model, os.path.join(root, f"{mode}.tflite"), fused=True, **common
    )
    bundle = kee.export.to_tflite(model, os.path.join(root, mode), **common)
    mono_bytes = tflite_bundle.monolithic_tflite(model, splits.x_val, mode)
    with open(path, "rb") as f:
        fused_bytes = f.read()
    manifest = read_fused_manifest(fused_bytes)
    cumulative = np.array([e.cumulative_macs for e in manifest.exits])
    x, y = splits.x_test, splits.y_test

    fused = FusedInterpreter(path)
    mono = tflite_bundle.Monolithic(mono_bytes)
    result = fused.predict(x)
    fractions = np.bincount(result.exit_indices, minlength=len(cumulative)) / len(x)
    macs_ratio = float(fractions @ cumulative / cumulative[-1])
    # Also each exit's path alone (thresholds that send every sample there).
    num_exits = len(cumulative)
    paths = {
        f"exit_{k + 1}": FusedInterpreter(
            path, thresholds=[1.0] * k + [0.0] * (num_exits - 1 - k)
        ).predict
        for k in range(num_exits)
    }
    seconds = _alternate(
        {"fused": fused.predict, "mono": mono.predict, **paths}, x, args.repeats
    )
    fused_us, mono_us = (seconds[k] * 1e6 for k in ("fused", "mono"))
    target_us = 1.1 * macs_ratio * mono_us + 2.0
    r = {
        "mode": mode,
        "exit_mix": fractions.tolist(),
        "macs_ratio": macs_ratio,
        "fused_accuracy": float(np.mean(result.classes == y)),
        "monolithic_accuracy": float(np.mean(mono.predict(x) == y)),
        "litert_fused_us": fused_us,
        "litert_monolithic_us": mono_us,
        "litert_target_us": target_us,
        "litert_target_met": bool(fused_us <= target_us),
        "litert_path_us": [seconds[name] * 1e6 for name in paths],
        "path_macs_ratio": (cumulative / cumulative[-1]).tolist(),
        "agreement_litert": _agreement(
            result, kee.runtime.GatedInterpreter(bundle).predict(x)
        ),
        "flash_fused": len(fused_bytes),
        "flash_monolithic": len(mono_bytes),
        "flash_bundle": sum(s.size_bytes for s in read_manifest(bundle).segments),
    }
    r["flash_ratio"] = r["flash_fused"] / r["flash_monolithic"]
    r["flash_target_met"] = bool(r["flash_ratio"] <= 1.05)
    if mode != "int8":
        return r

    micro = FusedInterpreter(path, backend="micro")
    r["agreement_micro"] = _agreement(
        micro.predict(x),
        kee.runtime.GatedInterpreter(bundle, backend="micro").predict(x),
    )
    (mono_arena,) = measure_arena([mono_bytes])
    mono_micro = tflite_micro.MonolithicMicro(
        mono_bytes, mono_arena.arena_bytes + RUNTIME_ARENA_MARGIN
    )
    # TFLite Micro is slow on the host: time a subset, with its own exit mix.
    xm = x[: args.micro_samples]
    seconds = _alternate(
        {"fused": micro.predict, "mono": mono_micro.predict}, xm, args.micro_repeats
    )
    mix = np.bincount(micro.predict(xm).exit_indices, minlength=len(cumulative))
    mix = mix / len(xm)
    segment_s = np.array(_segment_seconds(bundle, xm, args.micro_repeats))
    r.update(
        {
            "micro_samples": len(xm),
            "micro_macs_ratio": float(mix @ cumulative / cumulative[-1]),
            "micro_fused_us": seconds["fused"] * 1e6,
            "micro_monolithic_us": seconds["mono"] * 1e6,
            "micro_segment_us": (segment_s * 1e6).tolist(),
            "micro_ideal_ratio": float(mix @ np.cumsum(segment_s)) / seconds["mono"],
        }
    )
    r["micro_time_ratio"] = r["micro_fused_us"] / r["micro_monolithic_us"]
    r["micro_time_target_met"] = bool(
        r["micro_time_ratio"] <= 1.1 * r["micro_macs_ratio"]
    )
    r.update(
        {
            "arena_fused": manifest.arena_bytes,
            "arena_fused_head": manifest.arena_head_bytes,
            "arena_monolithic": mono_arena.arena_bytes,
            "arena_monolithic_head": mono_arena.head_bytes,
            "arena_bundle_shared": shared_arena_bytes(
                [
                    ArenaUsage(s.arena_bytes, s.arena_head_bytes)
                    for s in read_manifest(bundle).segments
                ]
            ),
        }
    )
    r["arena_ratio"] = r["arena_fused"] / r["arena_monolithic"]
    r["arena_target_met"] = bool(r["arena_ratio"] <= 1.05)
    return r


def _yes(met: bool) -> str:
    return "met" if met else "missed"


def to_markdown(runs: list[dict]) -> str:
    lines = [
        "Fused gated `.tflite` (one invoke per sample) vs one monolithic "
        "`.tflite` computing every exit; one thread, one sample per invoke, "
        "alternating on chunks of the test split, fastest of the repeats per "
        "chunk. Targets: LiteRT fused <= 1.1 x MACs "
        "ratio x monolithic + 2 us; TFLite Micro time ratio <= 1.1 x MACs "
        "ratio; arena and flash <= 1.05 x monolithic; 100% agreement with "
        "the segment bundle.",
        "",
        "### LiteRT (Python, `ai_edge_litert`)",
        "",
        "| model | mode | exit mix | MACs ratio | fused us | monolithic us "
        "| target us | latency | flash fused / mono | flash | agreement "
        "| fused acc | mono acc |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for run in runs:
        for r in run["modes"]:
            mix = " / ".join(f"{f:.0%}" for f in r["exit_mix"])
            lines.append(
                f"| {run['model']} | {r['mode']} | {mix} | {r['macs_ratio']:.3f} "
                f"| {r['litert_fused_us']:.1f} | {r['litert_monolithic_us']:.1f} "
                f"| {r['litert_target_us']:.1f} | {_yes(r['litert_target_met'])} "
                f"| {r['flash_fused']:,} / {r['flash_monolithic']:,} "
                f"({r['flash_ratio']:.3f}) | {_yes(r['flash_target_met'])} "
                f"| {r['agreement_litert']:.0%} | {r['fused_accuracy']:.2%} "
                f"| {r['monolithic_accuracy']:.2%} |"
            )
    lines += [
        "",
        "LiteRT time of each exit's path alone (every sample sent there), "
        "against the monolithic model: the path to exit k costs its "
        "segments' ops plus a fixed part (the Python call, the gates' "
        "softmax and compare, the IF and its branch), which the MACs ratio "
        "does not count.",
        "",
        "| model | mode | path us (MACs share) | monolithic us |",
        "|---|---|---|---:|",
    ]
    for run in runs:
        for r in run["modes"]:
            paths = " / ".join(
                f"{us:.1f} ({share:.1%})"
                for us, share in zip(r["litert_path_us"], r["path_macs_ratio"])
            )
            lines.append(
                f"| {run['model']} | {r['mode']} | {paths} "
                f"| {r['litert_monolithic_us']:.1f} |"
            )
    lines += [
        "",
        "### TFLite Micro (pip `tflite_micro`, reference kernels, host CPU), int8",
        "",
        "Ideal ratio: what a gated loop without any overhead would reach with "
        "these kernels (each segment's own time, weighted by the exit mix): "
        "time per MAC differs between layers, so the MACs ratio is not "
        "reachable. Arena on the 64-bit host (pointers and TFLite Micro "
        "structs are smaller on a 32-bit microcontroller); bundle = the "
        "segments on one shared `MicroAllocator` (C++ runner).",
        "",
        "| model | MACs ratio | fused us | monolithic us | time ratio | ideal "
        "ratio | time | arena fused (head) | arena mono (head) | arena bundle "
        "| arena | agreement |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for run in runs:
        for r in run["modes"]:
            if r["mode"] != "int8":
                continue
            lines.append(
                f"| {run['model']} | {r['micro_macs_ratio']:.3f} "
                f"| {r['micro_fused_us']:.1f} | {r['micro_monolithic_us']:.1f} "
                f"| {r['micro_time_ratio']:.3f} | {r['micro_ideal_ratio']:.3f} "
                f"| {_yes(r['micro_time_target_met'])} "
                f"| {r['arena_fused']:,} ({r['arena_fused_head']:,}) "
                f"| {r['arena_monolithic']:,} ({r['arena_monolithic_head']:,}) "
                f"| {r['arena_bundle_shared']:,} | {r['arena_ratio']:.3f} "
                f"{_yes(r['arena_target_met'])} | {r['agreement_micro']:.0%} |"
            )
    load = runs[0]["load_average"] if runs else None
    if load:
        lines.append(
            f"\nLoad average of the 2-core machine during the run: {load[0]:.1f} "
            f"at the start, {runs[-1]['load_average'][1]:.1f} at the end."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--kws-epochs", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--micro-samples", type=int, default=60)
    parser.add_argument("--micro-repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["int8", "float32"])
    parser.add_argument("--no-kws", action="store_true")
    args = parser.parse_args()
    digits = demo.load_digits(seed=0)
    jobs = [
        (
            f"digits CNN w{w}",
            lambda w=w: tflite_bundle.train(w, args.epochs, digits),
            digits,
        )
        for w in args.widths
    ]
    if not args.no_kws:
        kws = kws_splits()
        jobs.append(("KWS DS-CNN 49x10", lambda: train_kws(kws, args.kws_epochs), kws))
    runs = []
    with tempfile.TemporaryDirectory(prefix="kee-bench-fused-") as root:
        for name, train, splits in jobs:
            model = train()
            run = {
                "model": name,
                "load_average": [os.getloadavg()[0]],
                "total_macs": kee.count_macs(model, warn=False).total_macs,
                "thresholds": model.thresholds,
                "modes": [],
            }
            for mode in args.modes:
                directory = os.path.join(root, name.split()[-1])
                os.makedirs(directory, exist_ok=True)
                r = bench_mode(model, splits, mode, directory, args)
                print(json.dumps({"model": name, **r}), flush=True)
                run["modes"].append(r)
            run["load_average"].append(os.getloadavg()[0])
            runs.append(run)
    tflite_bundle.write_results("fused", runs, to_markdown(runs))


if __name__ == "__main__":
    main()
