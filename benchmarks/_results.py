"""Results files of a benchmark run per data set: a run of some data sets
keeps the others' earlier figures."""

import json
import os
from collections.abc import Callable, Sequence

import keras


def write_merged(
    stem: str,
    run: Callable[[str], dict],
    markdown: Callable[[list], str],
    results_dir: str,
    names: Sequence[str],
    order: Sequence[str],
    key: str,
) -> None:
    """Runs `names`, keeps the earlier results of the other entries of
    `order` (matched on `key`), and writes `results_dir/stem.{json,md}`."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{stem}.json")
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = {r[key]: r for r in json.load(f)["results"]}
    for name in names:
        previous[name] = run(name)
        print(json.dumps(previous[name], indent=1))
    results = [previous[n] for n in order if n in previous]
    with open(path, "w") as f:
        json.dump({"backend": keras.backend.backend(), "results": results}, f, indent=2)
    text = markdown(results)
    with open(os.path.join(results_dir, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)
