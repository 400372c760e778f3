"""Early-exit text generation against full decoding, side by side on CPU.

Trains a 6-block `EarlyExitCausalLM` (exits after blocks 1, 2 and 4, shared
LM head, `exit_dropout=0.3`) on the generated grammar corpus, calibrates `"early_exit"`
thresholds on calibration prompts for 95% agreement with full greedy
decoding, then decodes held-out prompts with `"full"`, `"early_exit"` and
`"self_speculative"` (drafting with exit 1 and exit 2). Reports tokens per
second (best of 3 timed runs after a warm-up that compiles), average blocks
per generated token, and token agreement with full greedy decoding.

Run: `KERAS_BACKEND=jax python benchmarks/generation.py` (any backend)
trains the model and saves it to `benchmarks/results/generation_model.keras`;
`--model PATH` decodes a saved model instead (the same weights on every
backend: `KERAS_BACKEND=torch python benchmarks/generation.py --model
benchmarks/results/generation_model.keras`).
Writes `benchmarks/results/generation_{backend}.{md,json}`. `--follow F
--keep K` draw a less predictable corpus (see `grammar_corpus`) and
`--exit-dropout D` trains with another `exit_dropout`; the files then end in
`_follow{F}_keep{K}` and `_exit_dropout{D}`.
"""

import argparse
import inspect
import json
import os
import time

import keras
import numpy as np

import keras_earlyexit as kee
from keras_earlyexit.generation import (
    EarlyExitCausalLM,
    calibrate,
    generate,
    next_token_data,
)
from keras_earlyexit.generation.calibration import token_agreement
from keras_earlyexit.generation.corpus import VOCABULARY, grammar_corpus

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONTEXT, PROMPT, NEW_TOKENS = 64, 12, 48
CALIBRATION_PROMPTS, TEST_PROMPTS = 200, 100
EXIT_DROPOUT = 0.3
CORPUS_DEFAULTS = {
    name: inspect.signature(grammar_corpus).parameters[name].default
    for name in ("follow", "keep")
}
REPEATS = 3


def train(corpus: dict, exit_dropout: float) -> EarlyExitCausalLM:
    keras.utils.set_random_seed(0)
    documents = grammar_corpus(800, CONTEXT + 1, seed=0, **corpus)
    x, y, mask = next_token_data(documents, length=CONTEXT)
    model = EarlyExitCausalLM(
        len(VOCABULARY),
        CONTEXT,
        6,
        (1, 2, 4),
        d_model=64,
        num_heads=4,
        exit_dropout=exit_dropout,
        seed=0,
    )
    model.compile(keras.optimizers.Adam(3e-3), kee.EarlyExitLoss())
    model.fit(x, y, sample_weight=mask, epochs=12, batch_size=32, verbose=0)
    return model


def timed(model, prompts, **kwargs) -> tuple[float, list]:
    runs = [generate(model, p, NEW_TOKENS, **kwargs) for p in prompts]  # warm-up
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        runs = [generate(model, p, NEW_TOKENS, **kwargs) for p in prompts]
        best = min(best, time.perf_counter() - start)
    return len(prompts) * NEW_TOKENS / best, runs


def first_divergences(model, prompts, runs, full_runs) -> dict:
    """Where early-exit sequences first leave full decoding: how many start
    at a token from a non-final exit (that exit's mistake) or from the
    final exit (propagated states flipped the full model's choice), and
    the full model's top-1 minus top-2 probability at those tokens."""
    from_exit, from_final, margins = 0, 0, []
    for prompt, run, full in zip(prompts, runs, full_runs):
        differ = np.flatnonzero(run.tokens != full.tokens)
        if not differ.size:
            continue
        i = int(differ[0])
        if run.exit_indices[i] == model.num_exits - 1:
            from_final += 1
        else:
            from_exit += 1
        sequence = np.concatenate([prompt, full.tokens[:i]])[None].astype("int32")
        logits = keras.ops.convert_to_numpy(model(sequence)[-1][0, -1])
        p = np.sort(np.exp(logits - logits.max()))
        margins.append(float((p[-1] - p[-2]) / p.sum()))
    return {
        "from_non_final_exit": from_exit,
        "from_final_exit": from_final,
        "full_model_margin_median": round(float(np.median(margins)), 3)
        if margins
        else None,
    }


def main(
    model_path: str | None, follow: float, keep: float, exit_dropout: float
) -> None:
    corpus = {"follow": follow, "keep": keep}
    suffix = "" if corpus == CORPUS_DEFAULTS else f"_follow{follow}_keep{keep}"
    if exit_dropout != EXIT_DROPOUT:
        suffix += f"_exit_dropout{exit_dropout}"
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)  # one token at a time: threads only synchronise
    if model_path:
        model, train_seconds = keras.saving.load_model(model_path), None
    else:
        start = time.perf_counter()
        model = train(corpus, exit_dropout)
        train_seconds = round(time.perf_counter() - start, 1)
        os.makedirs(RESULTS, exist_ok=True)
        model.save(os.path.join(RESULTS, f"generation_model{suffix}.keras"))
    calibration = [
        d[:PROMPT]
        for d in grammar_corpus(CALIBRATION_PROMPTS, PROMPT, seed=1, **corpus)
    ]
    test = [d[:PROMPT] for d in grammar_corpus(TEST_PROMPTS, PROMPT, seed=2, **corpus)]
    cal = calibrate(model, calibration, NEW_TOKENS, min_agreement=0.95)
    settings = {
        "full": {},
        "early_exit": {"strategy": "early_exit", "thresholds": cal.thresholds},
        "self_speculative (draft exit 1)": {
            "strategy": "self_speculative",
            "draft_exit": 0,
        },
        "self_speculative (draft exit 2)": {
            "strategy": "self_speculative",
            "draft_exit": 1,
        },
    }
    rows, full_runs, full_speed = [], None, None
    for name, kwargs in settings.items():
        speed, runs = timed(model, test, **kwargs)
        if full_runs is None:
            full_runs, full_speed = runs, speed
        agreement = np.mean(
            [token_agreement(r.tokens, f.tokens) for r, f in zip(runs, full_runs)]
        )
        rows.append(
            {
                "strategy": name,
                "tokens_per_second": round(speed, 1),
                "speedup": round(speed / full_speed, 2),
                "layers_per_token": round(
                    float(np.mean([r.layers_per_token for r in runs])), 2
                ),
                "agreement": round(float(agreement), 4),
                "identical_sequences": int(
                    sum((r.tokens == f.tokens).all() for r, f in zip(runs, full_runs))
                ),
                "first_divergences": first_divergences(model, test, runs, full_runs)
                if kwargs.get("strategy") == "early_exit"
                else None,
                "exit_counts": np.bincount(
                    np.concatenate([r.exit_indices for r in runs]), minlength=4
                ).tolist(),
            }
        )
    result = {
        "backend": backend,
        "model": "6 blocks, d_model 64, 4 heads, exits after blocks 1, 2, 4, "
        f"exit_dropout {model.exit_dropout}",
        "corpus": corpus,
        "trained_on": model_path or backend,
        "train_seconds": train_seconds,
        "prompts": len(test),
        "new_tokens": NEW_TOKENS,
        "thresholds": [round(t, 4) for t in cal.thresholds],
        "calibration_agreement": round(cal.expected_agreement, 4),
        "calibration_agreement_bound": round(cal.agreement_bound, 4),
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"generation_{backend}{suffix}")
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"# Generation on CPU, {backend} backend",
        "",
        f"{result['model']}; corpus {corpus}; {len(test)} held-out prompts of "
        f"{PROMPT} tokens, "
        f"{NEW_TOKENS} new tokens each, greedy. early_exit thresholds "
        f"{result['thresholds']} (calibrated for 95% agreement on "
        f"{CALIBRATION_PROMPTS} other prompts: {cal.expected_agreement:.1%}, lower "
        f"bound {cal.agreement_bound:.1%} at delta {cal.delta}). Model trained on "
        f"{result['trained_on']}.",
        "",
        "| strategy | tokens/s | speed-up | blocks/token | agreement with full "
        "| identical sequences | tokens per exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['tokens_per_second']} | {r['speedup']}x "
            f"| {r['layers_per_token']} | {r['agreement']:.1%} "
            f"| {r['identical_sequences']}/{len(test)} | {r['exit_counts']} |"
        )
    early = next(r for r in rows if r["first_divergences"] is not None)
    d = early["first_divergences"]
    lines += [
        "",
        f"early_exit: of {len(test) - early['identical_sequences']} sequences "
        f"that differ from full decoding, {d['from_non_final_exit']} first differ "
        f"at a token from a non-final exit and {d['from_final_exit']} at a token "
        "from the final exit (state propagation changed the full model's choice); "
        "median top-1 minus top-2 probability of the full model there: "
        f"{d['full_model_margin_median']}.",
    ]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="decode this saved model (no training)")
    for name, default in CORPUS_DEFAULTS.items():
        parser.add_argument(
            f"--{name}",
            type=float,
            default=default,
            help=f"grammar_corpus {name} (default {default})",
        )
    parser.add_argument(
        "--exit-dropout",
        type=float,
        default=EXIT_DROPOUT,
        help=f"EarlyExitCausalLM exit_dropout when training (default {EXIT_DROPOUT})",
    )
    args = parser.parse_args()
    main(args.model, args.follow, args.keep, args.exit_dropout)
