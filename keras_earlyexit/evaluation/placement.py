"""`suggest_exits`: where exits pay for their own cost, from probe heads
trained on a frozen backbone."""

import math
from dataclasses import dataclass, field, replace

import keras
import numpy as np
from keras import ops

from keras_earlyexit import graph as graph_lib
from keras_earlyexit.criteria import confidence
from keras_earlyexit.evaluation import _data
from keras_earlyexit.evaluation.calibrate import (
    calibrate_outputs,
    check_guarantee,
    macs_text,
    percentages,
    promise,
)
from keras_earlyexit.evaluation.macs import count_macs
from keras_earlyexit.evaluation.profile import _md_table, _text_table
from keras_earlyexit.inference import check_inputs
from keras_earlyexit.labels import check_labels
from keras_earlyexit.layers import ExitBranch

# Layers that only pad or crop: their output is never a candidate.
_PADDING = ("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D")
_MIN_PART = 20  # samples in each part of the split
# An exit joins (or stays in) the proposal only if it saves at least this
# share of the full model's MACs: smaller gains are within the noise of
# the held-out part.
_MIN_GAIN = 0.01
_MIN_ACCURACY_GAIN = 0.002  # the same with macs_budget, in accuracy


@dataclass
class CandidateExit:
    """One candidate exit layer and what its probe head measured.

    Attributes:
        layer: name of the backbone layer the exit follows.
        output_shape: that layer's output shape.
        accuracy: the probe's accuracy on the held-out part.
        backbone_macs: backbone MACs up to and including the layer.
        head_macs: MACs of the exit head.
        share: `(backbone_macs + head_macs)` over the full model's MACs.
        chosen: whether the proposal places an exit here.
    """

    layer: str
    output_shape: tuple
    accuracy: float
    backbone_macs: int
    head_macs: int
    share: float
    chosen: bool = False


@dataclass
class ExitPlacement:
    """Exit layers proposed by `suggest_exits`, with every candidate's figures.

    Attributes:
        exit_layers: the proposed layers, shallow to deep (pass them to
            `kee.attach_exits`, or use `build_model()`).
        thresholds: the calibrated thresholds of the proposal on the
            held-out part (probe heads, max-prob gates).
        expected_accuracy: gated accuracy of the proposal there.
        expected_macs: its average MACs per sample (exit heads included).
        expected_share: `expected_macs` over `full_macs`.
        exit_shares: fraction of held-out samples leaving at each exit.
        final_accuracy: accuracy of the final exit on the held-out part.
        full_macs: MACs of the model without early exits (backbone, plus
            the final head when the backbone has no classifier).
        candidates: `CandidateExit` rows, shallow to deep.
        target: `"max_accuracy_drop"` or `"macs_budget"`.
        target_value: the value asked for.
        num_samples: held-out samples the figures come from.
        num_classes: classes of the exit heads.
        exit_kwargs: keyword arguments of every exit head.
        delta: failure probability of the guard or guarantee.
        guard: whether `calibrate`'s guard was on.
        guarantee: `calibrate`'s guarantee the thresholds were chosen
            with (None: the guard).
    """

    exit_layers: list[str]
    thresholds: list[float]
    expected_accuracy: float
    expected_macs: float
    expected_share: float
    exit_shares: list[float]
    final_accuracy: float
    full_macs: int
    candidates: list[CandidateExit]
    target: str
    target_value: float
    num_samples: int
    num_classes: int = 0
    exit_kwargs: dict = field(default_factory=dict)
    delta: float = 0.1
    guard: bool = True
    guarantee: str | None = None
    _backbone: object = field(default=None, repr=False)
    _final: str = field(default="auto", repr=False)
    _weights: dict = field(default_factory=dict, repr=False)

    def build_model(self):
        """The backbone with the proposed exits attached (`attach_exits`),
        their heads set to the trained probes and the thresholds applied;
        fine-tune or calibrate it as any `EarlyExitModel`. To calibrate it
        again, use data the probes were not trained on: on the part of `x`
        they were fitted to, their confidences are too high.

        Returns:
            An `EarlyExitModel` sharing the backbone's layers.
        """
        from keras_earlyexit.attach import attach_exits

        model = attach_exits(
            self._backbone,
            self.exit_layers,
            self.num_classes,
            final=self._final,
            exit_kwargs=self.exit_kwargs,
        )
        for k, name in enumerate(self.exit_layers):
            model.get_layer(f"exit_{k + 1}").set_weights(self._weights[name])
        if self._final == "new":
            model.get_layer("final").set_weights(self._weights[None])
        model.set_thresholds(self.thresholds)
        return model

    def _rows(self) -> list:
        exits = {name: k for k, name in enumerate(self.exit_layers)}
        return [
            (
                c.layer,
                str(tuple(c.output_shape[1:])),
                f"{c.accuracy:.4f}",
                f"{c.backbone_macs:,}",
                f"{c.head_macs:,}",
                f"{c.share:.1%}",
                f"exit_{exits[c.layer] + 1}" if c.chosen else "",
            )
            for c in self.candidates
        ]

    _HEADER = (
        "layer",
        "output",
        "probe accuracy",
        "backbone MACs",
        "head MACs",
        "share",
        "proposed",
    )

    def _summary(self) -> list[str]:
        thresholds = ", ".join(f"{t:.4f}" for t in self.thresholds)
        return [
            f"Proposed exits: {self.exit_layers} (thresholds [{thresholds}])",
            f"Expected on {self.num_samples} held-out samples: accuracy "
            f"{self.expected_accuracy:.4f} (final exit {self.final_accuracy:.4f}), "
            + macs_text(self.expected_macs, self.expected_share, self.full_macs)
            + f"; exit shares {percentages(self.exit_shares)}",
            "Promise of the thresholds: "
            + promise(
                self.target,
                self.target_value,
                self.delta,
                self.guarantee,
                self.guard,
                data="held-out samples",
            )
            + ". It is for these exits: they were chosen on the same samples, "
            "so calibrate build_model() on new data for a promise that holds "
            "after the choice.",
        ]

    def __str__(self) -> str:
        title = (
            f"Exit placement for {self.target}={self.target_value} "
            f"({len(self.candidates)} candidates, probe heads on a frozen backbone)"
        )
        return "\n".join(
            [title, _text_table(self._HEADER, self._rows()), "", *self._summary()]
        )

    def to_markdown(self) -> str:
        """The same table in GitHub markdown."""
        summary = self._summary()
        return "\n".join([_md_table(self._HEADER, self._rows()), "", *summary])


def suggest_exits(
    backbone: keras.Model,
    x,
    y,
    candidates: list[str] | None = None,
    max_accuracy_drop: float | None = None,
    macs_budget: float | None = None,
    num_classes: int | None = None,
    exit_kwargs: dict | None = None,
    final: str = "auto",
    max_candidates: int = 8,
    epochs: int = 10,
    learning_rate: float = 1e-2,
    batch_size: int = 64,
    validation_split: float = 0.3,
    delta: float = 0.1,
    guard: bool = True,
    guarantee: str | None = None,
    seed: int = 0,
    verbose: int = 0,
) -> ExitPlacement:
    """Proposes exit layers that minimize average MACs at a target.

    1. Candidates: with `candidates=None`, every layer whose output alone
       separates the backbone's inputs from its outputs (a block boundary:
       no skip connection crosses it), of rank 2, 3 or 4 with known sizes,
       other than padding layers and the backbone's inputs and outputs.
       Of a run of such layers with no MACs between them (convolution,
       batch norm, activation) the deepest is kept. If more than
       `max_candidates` remain, those closest to evenly spaced shares of
       the backbone's MACs are kept.
    2. Probes: the backbone stays frozen; its features at every candidate
       (pooled as the exit head pools them) are computed once, and one
       `ExitBranch(num_classes, **exit_kwargs)` per candidate is trained on
       them for `epochs` (on standardized features, folded back into the
       head's weights afterwards), on `1 - validation_split` of the data.
    3. Placement: on the held-out part, the probes' max-prob confidences
       simulate gated inference; for a set of exits, `calibrate`'s search
       and guard (or its `guarantee`) give the least average MACs within
       the target, counting every exit head a sample passes. Exits are
       added greedily (the one that lowers MACs most, while it saves at
       least 1% of the full model's MACs) and then removed while that
       costs less than 1%.
       With `macs_budget`, the same search maximizes accuracy instead.

    Args:
        backbone: a built functional or Sequential model, ideally trained.
        x: input array(s), ideally not the data the backbone was fitted on
            (e.g. a validation split): on its training data a backbone's
            final exit looks better than it is, and every exit looks
            worse against it.
        y: labels, int `(n,)` or one-hot.
        candidates: names of layers to consider (default: the rule above).
        max_accuracy_drop: target (absolute, 0.01 = 1 point) below the final
            exit's accuracy; default 0.01 when no target is given.
        macs_budget: instead, the best accuracy within this fraction of the
            full model's average MACs.
        num_classes: classes (default: the backbone's classifier output,
            else the largest label + 1).
        exit_kwargs: keyword arguments of every probe `ExitBranch` (e.g.
            `{"pooled_size": 2}`, `{"hidden_units": 32}`), also used by
            `build_model()`. Default: a linear probe on global average pooling.
        final: as in `attach_exits`: `"auto"` uses the backbone's own
            classifier when its output is `(batch, num_classes)`, else a
            probe head on its output (`"new"`, always).
        max_candidates: candidates kept by the default rule.
        epochs: probe training epochs.
        learning_rate: Adam learning rate of the probes.
        batch_size: batch size of feature extraction and probe training.
        validation_split: held-out fraction, in (0, 1).
        delta: failure probability of `calibrate`'s guard or guarantee.
        guard: use `calibrate`'s upper confidence bound for the target.
        guarantee: as in `calibrate`, for `max_accuracy_drop`: None
            (default: the approximate guard), `"high_probability"` (with
            probability >= 1 - `delta` over the draw of the held-out part,
            the accuracy drop on new data is <= the target) or
            `"expectation"` (it is on average over draws). Each candidate
            set's thresholds are then one shared threshold certified on
            the held-out part; a finite-sample promise of 1 point needs a
            few hundred held-out samples even when no answer is lost. The
            promise is for the thresholds of a given exit set: the set is
            chosen on the same held-out samples, so for a promise that
            holds after that choice, calibrate `build_model()` again on
            new data (`kee.calibrate(..., guarantee=...)`).
        seed: seed of the split and probe initialization.
        verbose: 1 prints progress.

    Returns:
        `ExitPlacement` with `.exit_layers`, `.expected_macs`, the table of
        candidates (`str()`, `.to_markdown()`) and `.build_model()`.

    Example:

    ```python
    backbone = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10)
    backbone.fit(x_train, y_train, epochs=5)
    placement = kee.suggest_exits(backbone, x_train, y_train)
    print(placement)
    model = placement.build_model()  # or attach_exits(..., placement.exit_layers)
    ```
    """
    target, value = _check_target(max_accuracy_drop, macs_budget)
    check_guarantee(guarantee, target)
    if final not in ("auto", "new"):
        raise ValueError(f"final must be 'auto' or 'new'. Received: {final!r}")
    if not 0.0 < validation_split < 1.0:
        raise ValueError(
            f"validation_split must be in (0, 1). Received: {validation_split}"
        )
    for name, v in (("epochs", epochs), ("max_candidates", max_candidates)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1. Received: {v!r}")
    exit_kwargs = dict(exit_kwargs or {})
    graph = _graph(backbone)
    head = graph.outputs[0] if len(graph.outputs) == 1 else None
    num_classes = _num_classes(num_classes, head, y)
    use_backbone_head = (
        final == "auto" and head is not None and tuple(head.shape[1:]) == (num_classes,)
    )
    inputs = check_inputs(backbone, x)
    labels = check_labels(y, len(inputs[0]), num_classes)
    n = len(labels)
    rows = np.random.default_rng(seed).permutation(n)
    cut = int(round((1.0 - validation_split) * n))
    if min(cut, n - cut) < _MIN_PART:
        raise ValueError(
            f"suggest_exits received {n} samples; with validation_split="
            f"{validation_split} a part has fewer than {_MIN_PART}. Use a few "
            "hundred samples or more."
        )
    train_rows, held_rows = rows[:cut], rows[cut:]

    layers = _candidates(backbone, graph, candidates, max_candidates)
    keras.utils.set_random_seed(seed)  # the probes' initial weights
    heads = [
        ExitBranch(num_classes, **exit_kwargs, name=f"probe_{layer.name}")
        for layer, _, _ in layers
    ]
    if not use_backbone_head:
        heads.append(ExitBranch(num_classes, **exit_kwargs, name="probe_final"))
    features, final_logits = _features(
        graph, layers, inputs, heads, use_backbone_head, batch_size, verbose
    )
    fit = dict(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size)
    weights, logits = _train_probes(
        features, heads, labels, (train_rows, held_rows), verbose, **fit
    )
    if use_backbone_head:
        final_held = final_logits[held_rows]
        full = count_macs(backbone, warn=False).total_macs
    else:
        final_held = logits.pop()
        full = count_macs(backbone, warn=False).total_macs + _head_macs(heads[-1])
    held_labels = labels[held_rows]
    rows_table = [
        CandidateExit(
            layer=layer.name,
            output_shape=tuple(tensor.shape),
            accuracy=float(np.mean(np.argmax(z, 1) == held_labels)),
            backbone_macs=macs,
            head_macs=_head_macs(h),
            share=(macs + _head_macs(h)) / full,
        )
        for (layer, tensor, macs), h, z in zip(layers, heads, logits)
    ]
    search = _Placement(
        rows_table, logits, final_held, held_labels, full, delta, guard, guarantee
    )
    chosen = search.greedy(target, value)
    if chosen is None:
        raise ValueError(search.unreachable(target, value))
    result = search.evaluate(chosen, target, value)
    for k in chosen:
        rows_table[k].chosen = True
    names = [rows_table[k].layer for k in chosen]
    placement = ExitPlacement(
        exit_layers=names,
        thresholds=list(result.thresholds),
        expected_accuracy=result.expected_accuracy,
        expected_macs=result.expected_macs,
        expected_share=result.expected_share,
        exit_shares=list(result.exit_shares),
        final_accuracy=result.final_accuracy,
        full_macs=int(full),
        candidates=rows_table,
        target=target,
        target_value=value,
        num_samples=len(held_rows),
        num_classes=num_classes,
        exit_kwargs=exit_kwargs,
        delta=delta,
        guard=guard,
        guarantee=guarantee,
        _backbone=backbone,
        _final="backbone" if use_backbone_head else "new",
        _weights={
            **{rows_table[k].layer: weights[k] for k in chosen},
            **({} if use_backbone_head else {None: weights[-1]}),
        },
    )
    return placement


def _check_target(max_accuracy_drop, macs_budget) -> tuple[str, float]:
    if max_accuracy_drop is not None and macs_budget is not None:
        raise ValueError("Give one target: max_accuracy_drop or macs_budget, not both.")
    if macs_budget is not None:
        if not 0.0 < float(macs_budget) <= 1.0:
            raise ValueError(f"macs_budget must be in (0, 1]. Received: {macs_budget}")
        return "macs_budget", float(macs_budget)
    value = 0.01 if max_accuracy_drop is None else float(max_accuracy_drop)
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"max_accuracy_drop must be in [0, 1) (0.01 = one point). "
            f"Received: {max_accuracy_drop}"
        )
    return "max_accuracy_drop", value


def _graph(backbone):
    try:
        graph = getattr(backbone, "_functional", None) or backbone
        inputs, outputs = list(graph.inputs), list(graph.outputs)
    except (AttributeError, ValueError, TypeError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            f"Backbone '{getattr(backbone, 'name', backbone)}' has no graph to "
            "place exits in. Use a functional model or a Sequential model built "
            "with an Input (keras.Input or input_shape)."
        )
    return graph


def _num_classes(num_classes, head, y) -> int:
    if num_classes is not None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes must be an int >= 2. Received: {num_classes!r}"
            )
        return num_classes
    if head is not None and len(head.shape) == 2 and head.shape[-1]:
        return int(head.shape[-1])
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return int(y.shape[1])
    return max(2, int(np.max(y)) + 1)


def _usable(tensor) -> bool:
    shape = tuple(tensor.shape)
    return 2 <= len(shape) <= 4 and all(d is not None for d in shape[1:])


def _candidates(backbone, graph, names, max_candidates) -> list:
    """`(layer, output tensor, backbone MACs up to it)` per candidate, by depth."""
    nodes = graph_lib.nodes_between(list(graph.inputs), list(graph.outputs))
    outputs = {id(t) for t in graph.outputs}
    node_of_layer = {}
    for node in nodes:
        node_of_layer.setdefault(node.operation.name, []).append(node)
    if names is not None:
        if isinstance(names, str):
            names = [names]
        missing = [n for n in names if n not in node_of_layer]
        if missing:
            raise ValueError(
                f"Layers {missing} are not in backbone '{backbone.name}'. Use names "
                f"from backbone.layers, e.g. {[n.operation.name for n in nodes][:12]}."
            )
        chosen = []
        for name in dict.fromkeys(names):
            calls = node_of_layer[name]
            tensors = [t for node in calls for t in node.outputs]
            if (
                len(tensors) != 1
                or not _usable(tensors[0])
                or id(tensors[0]) in outputs
            ):
                shapes = [tuple(t.shape) for t in tensors]
                why = (
                    "it is the backbone's output (the final exit)"
                    if tensors and id(tensors[0]) in outputs
                    else f"its output shape is {shapes[0] if shapes else None}"
                    if len(shapes) <= 1
                    else f"it has {len(shapes)} outputs {shapes}"
                )
                raise ValueError(
                    f"Layer '{name}' has no usable output for an exit: {why}. An "
                    "exit needs one output tensor of rank 2, 3 or 4 with known "
                    "sizes, e.g. (batch, features), (batch, steps, channels) or "
                    "(batch, height, width, channels). Choose another layer, "
                    "e.g. one of the default candidates (candidates=None)."
                )
            chosen.append((calls[0], tensors[0]))
    else:
        chosen = [
            (node, node.outputs[0])
            for node in _cuts(nodes, graph)
            if _usable(node.outputs[0])
            and id(node.outputs[0]) not in outputs
            and type(node.operation).__name__ not in _PADDING
            and len(node_of_layer[node.operation.name]) == 1
        ]
    depth = {id(node): i for i, node in enumerate(nodes)}
    chosen.sort(key=lambda c: depth[id(c[0])])
    found = [
        (
            node.operation,
            tensor,
            count_macs(keras.Model(graph.inputs, tensor), warn=False).total_macs,
        )
        for node, tensor in chosen
    ]
    if names is not None:
        return found
    found = [c for c in found if c[2] > 0]
    # The deepest of each run with no MACs between.
    found = [
        c for i, c in enumerate(found) if i + 1 == len(found) or found[i + 1][2] > c[2]
    ]
    if not found:
        raise ValueError(
            f"Backbone '{backbone.name}' has no layer where an exit can go (a "
            "block boundary of rank 2-4 with known sizes). Name layers with "
            "candidates=[...]."
        )
    if len(found) > max_candidates:
        full = count_macs(backbone, warn=False).total_macs
        shares = np.array([c[2] / full for c in found])
        keep = set()
        for goal in np.arange(1, max_candidates + 1) / (max_candidates + 1):
            order = np.argsort(np.abs(shares - goal))
            keep.add(int(next(i for i in order if i not in keep)))
        found = [found[i] for i in sorted(keep)]
    return found


def _cuts(nodes, graph) -> list:
    """Nodes whose single output is the only tensor alive after them: every
    path from the inputs to the outputs goes through it."""
    last_read = {}
    for j, node in enumerate(nodes):
        for t in node.input_tensors:
            last_read[id(t)] = j
    for t in graph.outputs:
        last_read[id(t)] = len(nodes)
    alive = {id(t) for t in graph.inputs}
    cuts = []
    for j, node in enumerate(nodes):
        alive = {t for t in alive if last_read.get(t, -1) > j}
        alive |= {id(t) for t in node.outputs if last_read.get(id(t), -1) > j}
        if len(node.outputs) == 1 and alive == {id(node.outputs[0])}:
            cuts.append(node)
    return cuts


def _features(graph, layers, inputs, heads, use_backbone_head, batch_size, verbose):
    """Every head's features (the candidates', then the backbone output's
    for a final probe) pooled as the head pools them, and the backbone's
    final logits when it has a classifier (else None), in one pass. Each
    head is built for its feature map: on the pooled features (rank 2) the
    same weights are a plain `Dense` stack."""
    from keras_earlyexit.attach import _logits_of

    output = graph.outputs[0]
    tensors = [(layer.name, tensor) for layer, tensor, _ in layers]
    if not use_backbone_head:
        if not _usable(output):
            raise ValueError(
                f"The backbone's output has shape {tuple(output.shape)}; a final "
                "probe head needs rank 2, 3 or 4 with known sizes."
            )
        tensors.append(("the backbone's output", output))
    pooled = []
    for (name, tensor), head in zip(tensors, heads):
        try:
            head.build(tensor.shape)  # checks pooled_size against the sizes
        except ValueError as e:
            raise ValueError(f"Layer '{name}': {e}") from None
        pooled.append(head._pool(tensor))
    if use_backbone_head:
        pooled.append(_logits_of(output))
    extractor = keras.Model(graph.inputs, pooled)
    x = inputs[0] if len(inputs) == 1 else inputs
    outputs = extractor.predict(x, batch_size=batch_size, verbose=verbose)
    outputs = [np.asarray(o, np.float32) for o in keras.tree.flatten(outputs)]
    if use_backbone_head:
        return outputs[:-1], outputs[-1]
    return outputs, None


def _train_probes(
    features, heads, labels, split, verbose, epochs, learning_rate, batch_size
):
    """Trains every probe head at once on standardized features (`split`:
    training and held-out rows); returns each head's weights, the
    standardization folded in, and its held-out logits."""
    train_rows, held_rows = split
    means = [f[train_rows].mean(axis=0) for f in features]
    scales = [np.maximum(f[train_rows].std(axis=0), 1e-6) for f in features]
    scaled = [(f - m) / s for f, m, s in zip(features, means, scales)]
    probe_inputs = [keras.Input((f.shape[1],)) for f in features]
    probes = keras.Model(probe_inputs, [h(i) for h, i in zip(heads, probe_inputs)])
    probes.compile(
        keras.optimizers.Adam(learning_rate),
        [keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * len(heads),
    )
    probes.fit(
        [f[train_rows] for f in scaled],
        [labels[train_rows]] * len(heads),
        epochs=epochs,
        batch_size=batch_size,
        verbose=verbose,
    )
    logits = probes.predict([f[held_rows] for f in scaled], verbose=0)
    logits = [np.asarray(z, np.float32) for z in keras.tree.flatten(logits)]
    weights = []
    for head, mean, scale in zip(heads, means, scales):
        values = head.get_weights()  # first Dense: kernel, bias
        kernel = values[0] / scale[:, None]  # (features, units)
        values[1] = values[1] - mean @ kernel
        values[0] = kernel
        weights.append(values)
    return weights, logits


def _head_macs(head) -> int:
    dense = [*head.hidden_layers, head.classifier]
    return int(sum(math.prod(layer.kernel.shape) for layer in dense))


class _Placement:
    """Gated inference simulated on the held-out part for sets of exits."""

    def __init__(
        self, rows, logits, final_logits, labels, full, delta, guard, guarantee
    ):
        self.rows, self.logits, self.final = rows, logits, final_logits
        self.labels, self.full = labels, full
        self.search = dict(
            delta=delta, guard=guard, num_candidates=64, guarantee=guarantee
        )
        self.cache = {}

    def outputs(self, chosen) -> _data.ExitOutputs:
        logits = np.stack([self.logits[k] for k in chosen] + [self.final])
        probs = [
            ops.convert_to_numpy(confidence(ops.convert_to_tensor(z), "max_prob"))
            for z in logits
        ]
        heads = np.cumsum([self.rows[k].head_macs for k in chosen])
        cumulative = [self.rows[k].backbone_macs + h for k, h in zip(chosen, heads)] + [
            self.full + (heads[-1] if len(chosen) else 0)
        ]
        predictions = np.argmax(logits, axis=-1).T  # (n, exits)
        return _data.ExitOutputs(
            logits=logits,
            confidences=np.stack(probs, axis=1).astype(np.float32),
            correct=predictions == self.labels[:, None],
            agrees=predictions == predictions[:, -1:],
            labels=self.labels,
            cumulative_macs=np.asarray(cumulative, np.float64),
        )

    def evaluate(self, chosen, target, value):
        """`calibrate_outputs` on the chosen exits, with every MACs share
        (the budget and `expected_share`) taken of `full`, the model without
        exits, rather than of the full path with its exit heads."""
        key = (tuple(chosen), target, value)
        if key not in self.cache:
            outputs = self.outputs(chosen)
            with_heads = float(outputs.cumulative_macs[-1])
            if target == "macs_budget":
                value = value * self.full / with_heads
            try:
                found = calibrate_outputs(outputs, target, value, **self.search)
                result = replace(found, expected_share=found.expected_macs / self.full)
            except ValueError:
                result = None
            self.cache[key] = result
        return self.cache[key]

    def cost(self, chosen, target, value) -> float:
        if not chosen:
            return 1.0 if target == "max_accuracy_drop" else math.inf
        result = self.evaluate(chosen, target, value)
        if result is None:
            return math.inf
        if target == "max_accuracy_drop":
            return result.expected_share
        return -result.expected_accuracy + 1e-6 * result.expected_share

    def greedy(self, target, value) -> list[int] | None:
        """Add the exit that lowers the cost most while it gains enough,
        then drop exits whose removal costs less than that; None if no set
        of exits meets the target and saves."""
        # Gains in MACs share (drop target) or in accuracy (budget target).
        gain = _MIN_GAIN if target == "max_accuracy_drop" else _MIN_ACCURACY_GAIN
        chosen: list[int] = []
        best = self.cost(chosen, target, value)
        while True:
            trials = [
                (self.cost(sorted([*chosen, k]), target, value), k)
                for k in range(len(self.rows))
                if k not in chosen
            ]
            if not trials:
                break
            cost, k = min(trials)
            if not cost < best - gain and not (math.isinf(best) and cost < best):
                break
            chosen, best = sorted([*chosen, k]), cost
        reference = best
        for k in sorted(chosen, reverse=True):
            fewer = [c for c in chosen if c != k]
            if fewer:
                cost = self.cost(fewer, target, value)
                if cost < reference + gain:
                    chosen, best = fewer, cost
        saves = best < 1.0 if target == "max_accuracy_drop" else math.isfinite(best)
        return chosen if chosen and saves else None

    def unreachable(self, target, value) -> str:
        if target == "macs_budget":
            cheapest = min(self.rows, key=lambda r: r.share)
            return (
                f"macs_budget={value} cannot be reached with these candidates: "
                f"the cheapest exit, after '{cheapest.layer}', costs "
                f"{cheapest.share:.4f} of the full model's MACs even when every "
                f"sample leaves there. Use macs_budget > {cheapest.share:.4f}, or "
                "name earlier layers in candidates=[...]."
            )
        reach = None
        for larger in (0.02, 0.05, 0.1, 0.2, 0.5):
            if larger <= value:
                continue
            result = None
            for k in range(len(self.rows)):
                r = self.evaluate([k], target, larger)
                if (
                    r is not None
                    and r.expected_share < 1.0
                    and (result is None or r.expected_share < result[1].expected_share)
                ):
                    result = (k, r)
            if result is not None:
                reach = (larger, *result)
                break
        what = (
            f" Reachable: max_accuracy_drop={reach[0]} saves "
            f"{1 - reach[2].expected_share:.0%} of the MACs with one exit after "
            f"'{self.rows[reach[1]].layer}'."
            if reach
            else " No candidate saves MACs even at max_accuracy_drop=0.5."
        )
        guarantee = self.search["guarantee"]
        relax = {
            None: "guard=False",
            "high_probability": "guarantee='expectation' or None",
            "expectation": "guarantee=None",
        }[guarantee]
        return (
            f"max_accuracy_drop={value} cannot be reached with early exits on "
            f"these {len(self.labels)} held-out samples: no set of candidate exits "
            "meets it and saves MACs (exit heads included)." + what + " Use a "
            "larger max_accuracy_drop, more data (the "
            + ("guard's margin" if guarantee is None else "certified bound's margin")
            + f" shrinks), {relax}, or train the backbone longer."
        )
