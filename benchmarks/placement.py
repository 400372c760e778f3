"""Where exits pay: `kee.suggest_exits` on the signal CNN and MobileNetV2.

- `signals`: the 6-conv signal CNN of `exit_savings.py` with its final head
  and no exits, trained as a plain classifier (same data and epochs).
  Probe heads like the benchmark's exit heads (global max pooling, one
  hidden layer of 32). Compared with the hand placement of
  `exit_savings.py` (exits after conv 2, 3 and 4: the same MACs as the
  candidates `pool_2`, `pool_3`, `pool_4`, which follow them at no cost),
  given to `suggest_exits` as the only candidates.
- `mobilenet`: `keras.applications.MobileNetV2(weights=None, alpha=0.35,
  input_shape=(96, 96, 3))` trained on scikit-learn digits upscaled to
  96x96 (gray to 3 channels); linear probes on 2x2-pooled features.

For each, the backbone is trained on part of the data, `suggest_exits`
runs on data the backbone did not see, and the proposal is then checked
on the test split: `build_model()` (probe heads as exits, with the
thresholds calibrated on the held-out part of the placement data), gated
accuracy and average MACs from `kee.profile` on the test split.

Run: `KERAS_BACKEND=jax python benchmarks/placement.py` (about 20 minutes on
2 cores; trained backbones are kept in `results/placement_*.keras`).
Writes `benchmarks/results/placement.{md,json}`.
"""

import os
import sys
import time

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit import demo
from keras_earlyexit.evaluation.placement import suggest_exits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _results  # noqa: E402  (results files)
import exit_savings  # noqa: E402  (the signal CNN and its data)

RESULTS = exit_savings.RESULTS
MAX_DROP = 0.01
SEED = 0


def signal_backbone() -> keras.Model:
    inputs = keras.Input((256, 1))
    x, _ = exit_savings.signal_backbone(inputs, exits=False)
    logits = exit_savings.signal_head(hidden=64, name="final")(x)
    return keras.Model(inputs, logits, name="signal_cnn")


def mobilenet_digits():
    """Digits upscaled to 96x96x3: train (900 samples) for the backbone,
    the rest of train and the validation split for placement, test."""
    d = demo.load_digits(seed=SEED)

    def up(x):
        return np.repeat(np.repeat(x, 12, axis=1), 12, axis=2).repeat(3, axis=3)

    x_place = np.concatenate([d.x_train[900:], d.x_val])
    y_place = np.concatenate([d.y_train[900:], d.y_val])
    return (
        (up(d.x_train[:900]), d.y_train[:900]),
        (up(x_place), y_place),
        (up(d.x_test), d.y_test),
    )


def data(name: str):
    if name == "mobilenet":
        return mobilenet_digits()
    d = exit_savings.load("signals")
    return (d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)


def trained_backbone(name: str, train) -> keras.Model:
    path = os.path.join(RESULTS, f"placement_{name}.keras")
    if os.path.exists(path):
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(SEED)
    if name == "mobilenet":
        model = keras.applications.MobileNetV2(
            weights=None,
            alpha=0.35,
            input_shape=(96, 96, 3),
            classes=10,
            classifier_activation=None,
        )
        # Its batch norms average at momentum 0.999: too slow for the few
        # hundred steps of this small set, whose inference would then use
        # statistics still near their initial values.
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        epochs, rate = 15, 2e-3
    else:
        model = signal_backbone()
        epochs, rate = exit_savings.EPOCHS["signals"], 3e-3
    model.compile(
        keras.optimizers.Adam(rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*train, epochs=epochs, batch_size=64, verbose=0)
    model.save(path)
    return model


def check_on_test(placement, test) -> dict:
    # The thresholds come from the held-out part of the placement data;
    # the rest trained the probes, whose confidences are too high there.
    model = placement.build_model()
    report = kee.profile(model, *test)
    return {
        "exit_layers": placement.exit_layers,
        "expected_share_placement_data": round(placement.expected_share, 4),
        "test_accuracy": report.current.accuracy,
        "final_accuracy_test": report.accuracy[-1],
        "test_drop_points": round(
            100 * (report.accuracy[-1] - report.current.accuracy), 2
        ),
        "test_share": round(report.current.share, 4),
        "test_speedup": round(1 / report.current.share, 2),
        "exit_shares": [round(s, 4) for s in report.current.exit_shares],
    }


SETTINGS = {
    "signals": {"exit_kwargs": {"hidden_units": 32, "pooling": "max"}, "epochs": 20},
    "mobilenet": {"exit_kwargs": {"pooled_size": 2}, "epochs": 30},
}
HAND = {"signals": ["pool_2", "pool_3", "pool_4"]}


def run(name: str) -> dict:
    start = time.time()
    train, place, test = data(name)
    backbone = trained_backbone(name, train)
    final = float(
        np.mean(np.argmax(backbone.predict(test[0], verbose=0), 1) == test[1])
    )
    suggest_start = time.time()
    placement = suggest_exits(
        backbone, *place, max_accuracy_drop=MAX_DROP, **SETTINGS[name]
    )
    suggest_seconds = time.time() - suggest_start
    result = {
        "name": name,
        "backbone_test_accuracy": final,
        "full_macs": placement.full_macs,
        "samples": {
            "train": len(train[1]),
            "placement": len(place[1]),
            "test": len(test[1]),
        },
        "table": placement.to_markdown(),
        "suggested": check_on_test(placement, test),
        "suggest_seconds": round(suggest_seconds, 1),
    }
    if name in HAND:
        hand = suggest_exits(
            backbone,
            *place,
            candidates=HAND[name],
            max_accuracy_drop=MAX_DROP,
            **SETTINGS[name],
        )
        result["hand_candidates"] = HAND[name]
        result["hand"] = check_on_test(hand, test)
    result["seconds"] = round(time.time() - start, 1)
    print(placement)
    return result


def markdown(results: list[dict]) -> str:
    lines = [
        f"Backend `{keras.backend.backend()}`. `suggest_exits(max_accuracy_drop="
        f"{MAX_DROP})` on data the backbone did not see; the proposal's probe "
        "heads as exits and thresholds from its held-out part (`build_model()`), "
        "figures from `profile` on the test split.",
        "",
    ]
    for r in results:
        lines += [
            f"### {r['name']}",
            "",
            f"Backbone test accuracy {r['backbone_test_accuracy']:.4f}, "
            f"{r['full_macs']:,} MACs; samples {r['samples']}; suggest_exits "
            f"took {r['suggest_seconds']} s.",
            "",
            r["table"],
            "",
            "| placement | exits | test drop (pt) | test MACs share | speed-up | "
            "exit shares |",
            "|---|---|---|---|---|---|",
        ]
        for key in ("suggested", "hand"):
            if key not in r:
                continue
            e = r[key]
            label = key if key == "suggested" else f"hand ({r['hand_candidates']})"
            lines.append(
                f"| {label} | {e['exit_layers']} | {e['test_drop_points']:+.2f} | "
                f"{e['test_share']:.1%} | {e['test_speedup']:.2f}x | "
                f"{e['exit_shares']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(names=("signals", "mobilenet")) -> None:
    _results.write_merged(
        "placement", run, markdown, RESULTS, names, ("signals", "mobilenet"), "name"
    )


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("signals", "mobilenet"))
