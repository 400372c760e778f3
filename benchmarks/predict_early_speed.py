"""Wall time of gated inference (`predict_early`) against full `predict`.

Settings (each backend in its own process, `KERAS_BACKEND`):

- `mobilenet_b128`: `keras.applications.MobileNetV2(alpha=0.35,
  input_shape=(96, 96, 3), weights=None)` (10.7 M MACs) with exits attached
  after `block_3_project_BN` and `block_10_project_BN`; 512 samples, batch
  128; `predict(x, batch_size=128)` against `predict_early(x, batch_size=128)`.
- `mobilenet_stream`: the same model, one sample per call (an app or a
  server), 48 samples; `predict_on_batch(x[i:i + 1])` (the fastest full
  call per sample: `predict` adds several ms of data-pipeline set-up to
  each call) against `predict_early(x[i:i + 1])`.
- `signals_b256` / `signals_b32`: the 4-exit signal CNN of
  `exit_savings.py`, 2048 samples, batch 256 and 32.
- `signals_no_exit_b256`: the signal CNN with every threshold at 1.0 (no
  sample leaves early): the cost of running segment by segment.

Weights are random (seeded) and the inputs are random images / generated
signals, so nothing needs training first; thresholds are set at confidence
quantiles of the timed samples to give a realistic exit mix: 50% / 25% /
25% for MobileNetV2, and for the signal CNN the shares its calibrated
thresholds give on the test split in `exit_savings.py` (56.7% / 11.9% /
12.6% / 18.8%).

Each figure is the best of several repeats after a warm-up (compilation),
`predict` and `predict_early` alternating. MAC reduction: full-model MACs
over the mean MACs of the exits taken (`count_macs`); ratio: wall-time
speed-up over MAC reduction. Segment bound: the speed-up that gating can
reach when each segment costs what it costs here per sample (time of each
segment on a full batch, compiled as `predict_early` compiles it, weighted
by the share of samples reaching it):
segments of MobileNetV2 cost very different times per MAC on a CPU.

The load column is the machine's 1-minute load average when the row was
measured: on a shared machine the figures of a row move with it (PyTorch's
two threads most: its times vary several-fold run to run under load).

Run: `python benchmarks/predict_early_speed.py` (all backends, about 10
minutes on 2 cores; writes `benchmarks/results/predict_early_speed.{md,json}`),
or a part of it, printed only: `--backends jax,torch --settings
signals_b32,mobilenet_b128`; add `--merge` to put a part's rows in place of
the same (setting, backend) rows of the results files (the table notes
which rows were measured when, and under what load).
"""

import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
BACKENDS = ("tensorflow", "jax", "torch")
SEED = 0
MOBILENET_SHARES = (0.5, 0.25, 0.25)
SIGNAL_SHARES = (0.567, 0.119, 0.126, 0.188)


def exit_thresholds(confidences, shares) -> list[float]:
    """Thresholds that let about `shares[k]` of all samples leave at exit k
    (quantiles of each exit's confidence among the samples still in)."""
    import numpy as np

    thresholds = []
    remaining = np.ones(len(confidences), bool)
    for k, share in enumerate(shares[:-1]):
        quantile = 1.0 - share * len(confidences) / remaining.sum()
        t = float(np.quantile(confidences[remaining, k], min(max(quantile, 0), 1)))
        thresholds.append(t)
        remaining &= confidences[:, k] < np.float32(t)
    return thresholds


def all_confidences(model, x, batch_size: int):
    import keras
    import numpy as np

    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return np.stack(
        [keras.ops.convert_to_numpy(g(z)) for g, z in zip(model.gates, logits)], 1
    )


def mobilenet(samples: int):
    import keras
    import numpy as np

    import keras_earlyexit as kee

    keras.utils.set_random_seed(SEED)
    backbone = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10
    )
    model = kee.attach_exits(
        backbone, ["block_3_project_BN", "block_10_project_BN"], num_classes=10
    )
    x = np.random.default_rng(SEED).uniform(-1, 1, (samples, 96, 96, 3))
    x = x.astype("float32")
    # Random weights give near-uniform, tied confidences: batch-norm
    # statistics taken from the data and per-exit temperatures spread them
    # like a trained model's (the classes and the MACs do not change).
    norms = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in norms:
        layer.momentum = 0.0
    model([x[:256]], training=True)
    for layer in norms:
        layer.momentum = 0.99
    logits = model.predict(x, batch_size=128, verbose=0)
    model.set_temperatures([float(np.std(z)) / 2 for z in logits])
    return model, x


def signals(samples: int):
    import keras

    sys.path.insert(0, HERE)
    import exit_savings

    keras.utils.set_random_seed(SEED)
    model = exit_savings.early_exit_model("signals", (256, 1))
    x, _, _ = exit_savings.make_signals(samples, seed=SEED)
    return model, x


def alternate(fns: dict, repeats: int) -> dict:
    """Best wall time of each function, run in turns after one warm-up."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def compiled_call(model, k: int):
    """Segment k of `model` on a dict of inputs, compiled as
    `predict_early` compiles it (graph; jit per bucket size; exported
    program)."""
    import keras

    from keras_earlyexit.inference import gated_runner

    segment = model.segments()[k]
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: segment(x, training=False))
    runner = gated_runner(model)
    values = [[v.value for v in variables] for variables in runner.variables]

    def call(x):
        n = len(next(iter(x.values())))
        if backend == "jax":
            import jax

            return jax.block_until_ready(runner._call(k, k, values, x, n))
        import torch

        with torch.inference_mode():
            return runner._call(k, k, values, x, n)

    return call


def segment_bound(model, x, exits, batch_size: int, repeats: int) -> float:
    """Gating's speed-up if each segment costs, per sample, what it costs on
    a full batch here (see the module docstring)."""
    import keras
    import numpy as np

    segments = model.segments()
    carry = {segments[0].inputs[0].name: keras.ops.convert_to_tensor(x[:batch_size])}
    times = []
    for k in range(len(segments)):
        call = compiled_call(model, k)
        times.append(alternate({k: lambda c=carry: call(c)}, repeats)[k])
        if k + 1 < len(segments):
            out = call(carry)
            carry = {t.name: out[t.name] for t in segments[k + 1].inputs}
    reached = [np.mean(exits >= k) for k in range(len(segments))]
    return sum(times) / float(np.dot(times, reached))


def row(name, model, x, exits, full_s, early_s, **extra) -> dict:
    import numpy as np

    import keras_earlyexit as kee

    macs = kee.count_macs(model, warn=False)
    average = float(np.asarray(macs.cumulative_macs)[exits].mean())
    mac_reduction = macs.total_macs / average
    speedup = full_s / early_s
    return {
        "setting": name,
        "samples": len(x),
        "predict_s": round(full_s, 4),
        "predict_early_s": round(early_s, 4),
        "speedup": round(speedup, 3),
        "mac_reduction": round(mac_reduction, 3),
        "ratio": round(speedup / mac_reduction, 3),
        "load": round(os.getloadavg()[0], 1),
        "exit_shares": [
            round(float(s), 3)
            for s in np.bincount(exits, minlength=model.num_exits) / len(x)
        ],
        **extra,
    }


def batched(name, model, x, shares, batch_size: int, repeats: int) -> dict:
    import numpy as np

    if shares is None:
        model.set_thresholds([1.0] * (model.num_exits - 1))
    else:
        model.set_thresholds(
            exit_thresholds(all_confidences(model, x, batch_size), shares)
        )
    best = alternate(
        {
            "predict": lambda: model.predict(x, batch_size=batch_size, verbose=0),
            "early": lambda: model.predict_early(x, batch_size=batch_size),
        },
        repeats,
    )
    exits = model.predict_early(x, batch_size=batch_size).exit_indices
    bound = segment_bound(model, x, exits, batch_size, repeats)
    return row(
        name,
        model,
        x,
        np.asarray(exits),
        best["predict"],
        best["early"],
        batch_size=batch_size,
        segment_bound=round(bound, 3),
    )


def streaming(name, model, x, repeats: int) -> dict:
    """One sample per call; thresholds already set."""

    def full():
        for i in range(len(x)):
            model.predict_on_batch(x[i : i + 1])

    def early():
        for i in range(len(x)):
            model.predict_early(x[i : i + 1], batch_size=1)

    best = alternate({"predict": full, "early": early}, repeats)
    exits = model.predict_early(x, batch_size=1).exit_indices
    bound = segment_bound(model, x, exits, 1, repeats)
    return row(
        name,
        model,
        x,
        exits,
        best["predict"],
        best["early"],
        batch_size=1,
        baseline="predict_on_batch",
        segment_bound=round(bound, 3),
    )


SETTINGS = (
    "mobilenet_b128",
    "mobilenet_stream",
    "signals_b256",
    "signals_b32",
    "signals_no_exit_b256",
)


def one_backend(settings) -> list[dict]:
    import keras

    rows = []
    if {"mobilenet_b128", "mobilenet_stream"} & set(settings):
        model, x = mobilenet(512)
        # Thresholds of the 512 samples, also for streaming 48 of them.
        model.set_thresholds(
            exit_thresholds(all_confidences(model, x, 128), MOBILENET_SHARES)
        )
        if "mobilenet_b128" in settings:
            rows.append(batched("mobilenet_b128", model, x, MOBILENET_SHARES, 128, 5))
        if "mobilenet_stream" in settings:
            rows.append(streaming("mobilenet_stream", model, x[:48], 3))
    model, x = signals(2048)
    if "signals_b256" in settings:
        rows.append(batched("signals_b256", model, x, SIGNAL_SHARES, 256, 5))
    if "signals_b32" in settings:
        rows.append(batched("signals_b32", model, x, SIGNAL_SHARES, 32, 5))
    if "signals_no_exit_b256" in settings:
        rows.append(batched("signals_no_exit_b256", model, x, None, 256, 5))
    for r in rows:
        r["backend"] = keras.backend.backend()
    return rows


def option(name: str, default: tuple) -> tuple:
    """`--name a,b` from the command line, else `default`."""
    if f"--{name}" in sys.argv:
        return tuple(sys.argv[sys.argv.index(f"--{name}") + 1].split(","))
    return default


TARGETS = {"mobilenet_b128": 0.9, "mobilenet_stream": 0.8, "signals_b256": 0.6}


def merged(rows: list[dict], how: str) -> tuple[list[dict], str, list[str]]:
    """`rows` in place of the same (setting, backend) rows of the results
    files; the previous header stays and a note says which rows are new."""
    with open(os.path.join(RESULTS, "predict_early_speed.json")) as f:
        previous = json.load(f)
    with open(os.path.join(RESULTS, "predict_early_speed.md")) as f:
        text = f.read()
    header, rest = text.split("\n\n", 1)
    notes = [line for line in rest.splitlines() if line.startswith("Re-measured")]
    new = {(r["setting"], r["backend"]) for r in rows}
    kept = [r for r in previous if (r["setting"], r["backend"]) not in new]
    names = ", ".join(f"{s} on {b}" for s, b in sorted(new))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    notes = [*notes, f"Re-measured {stamp}: {names} ({how}).", ""]
    return kept + rows, header, notes


def main() -> None:
    settings = option("settings", SETTINGS)
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"Unknown settings {sorted(unknown)}; known: {SETTINGS}.")
    if "--one" in sys.argv:
        print(json.dumps(one_backend(settings)))
        return
    rows = []
    start = time.time()
    load_start = os.getloadavg()[0]
    for backend in option("backends", BACKENDS):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", *sys.argv[1:]],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows += json.loads(out.strip().splitlines()[-1])
        print(f"{backend}: {time.time() - start:.0f} s", flush=True)
    partial = settings != SETTINGS or "--backends" in sys.argv
    if partial and "--merge" not in sys.argv:
        print(json.dumps(rows, indent=1))  # a partial run writes no results
        return
    load = (
        f"1-minute load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    run = f"best of 3-5 alternating runs after a warm-up; {time.time() - start:.0f} s"
    header = (
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}"
        f", shared with other jobs; {load}), {run} in all. Random weights; "
        "thresholds at "
        "confidence quantiles (see the script's docstring). Target: ratio >= "
        + ", ".join(f"{v} ({k})" for k, v in TARGETS.items())
        + "."
    )
    notes = []
    if partial:
        rows, header, notes = merged(rows, f"{load}; {run}")
    with open(os.path.join(RESULTS, "predict_early_speed.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = [
        header,
        "",
        *notes,
        "| setting | backend | batch | predict (s) | predict_early (s) | speed-up "
        "| MAC reduction | ratio | segment bound | exit shares | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["setting"], r["backend"])):
        lines.append(
            f"| {r['setting']} | {r['backend']} | {r['batch_size']} | "
            f"{r['predict_s']:.3f} | {r['predict_early_s']:.3f} | "
            f"{r['speedup']:.2f}x | {r['mac_reduction']:.2f}x | {r['ratio']:.2f} | "
            f"{r['segment_bound']:.2f}x | {r['exit_shares']} | {r['load']} |"
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "predict_early_speed.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
