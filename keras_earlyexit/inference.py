"""Gated inference in Keras: segments run one after another and only the
samples that have not exited go deeper.

The segments are called directly, compiled the backend's own way (not
through `predict_on_batch`, which re-enters Keras' predict machinery and
converts every output to NumPy once per segment):

- TensorFlow: the whole gated batch is one graph (`tf.function` traced once
  for any batch size: segments, gates, compaction and the results), so a
  batch costs one call whatever the number of exits; several batches of a
  large model run in the pooled loop below instead (`_GraphRunner`);
- JAX: each run of segments' stateless call compiled per shape
  (`jax.jit`), so a batch is padded to the next *bucket* (`bucket_size`:
  exact up to 4, then 4 sizes per octave, at most 25% padding): a run of
  any length compiles a bounded set of shapes; a batch of one sample runs
  as one compiled program (`_JaxRunner`);
- PyTorch: each run of segments exported once (`torch.export`) with a
  dynamic batch dimension, so one program serves every batch size and
  nothing is padded; the program replays the segments' tensor operations
  without Keras' per-layer Python work, runs under `torch.inference_mode`,
  and the carries stay tensors on their device.

In the loops (JAX, PyTorch, TensorFlow for large models) the samples that
stay after an exit are pooled across a group of batches and go deeper in
chunks of up to `batch_size`, so the deeper segments run on batches about
as large as the first; and segments whose exits are closed (threshold 1.0)
run with the next one as one call.

A patience gate (PABEE) also needs each sample's class at the previous exit
and its streak: the loops keep them per sample still in play and compact
them with the carries (NumPy on JAX and PyTorch, in the graph on
TensorFlow), by the rule of `keras_earlyexit.runtime.patience`.
"""

import warnings
import weakref

import keras
import numpy as np

from keras_earlyexit import graph
from keras_earlyexit.runtime.manifest import gate_passes
from keras_earlyexit.runtime.patience import next_streak, patience_passes
from keras_earlyexit.runtime.prediction import EarlyExitPrediction


def select_exits(
    confidences: np.ndarray,
    thresholds,
    streaks: np.ndarray | None = None,
    patience: int | None = None,
) -> np.ndarray:
    """Exit each sample takes given all exits' confidences `(n, exits)`:
    the first whose confidence reaches its threshold, else the last. With
    `patience`, the first whose streak (`(n, exits)`, see
    `runtime.patience.streaks`) also reaches it."""
    n, num_exits = confidences.shape
    passes = np.ones((n, num_exits), bool)  # the final exit takes the rest
    for k, threshold in enumerate(thresholds):
        if patience is None:
            passes[:, k] = gate_passes(confidences[:, k], threshold)
        else:
            passes[:, k] = patience_passes(
                streaks[:, k], patience, confidences[:, k], threshold
            )
    return np.argmax(passes, axis=1)


def predict_early(
    model, x, thresholds, batch_size: int = 256, patience: int | None = None
) -> EarlyExitPrediction:
    """Runs `model`'s segments with per-sample exits; see
    `EarlyExitModel.predict_early`. `thresholds`: checked ones, or None for
    the model's own; `patience`: None, or the patience of a `"patience"`
    model (checked by the caller)."""
    runner = gated_runner(model)
    x = check_inputs(model, x)
    n = len(x[0])
    result = EarlyExitPrediction(
        np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float32)
    )
    gates = runner.gates(model, thresholds)
    slices = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    batches = [[v[rows] for v in x] for rows in slices]
    for rows, (classes, exits, confidences) in zip(
        slices, runner(batches, gates, patience)
    ):
        result.classes[rows] = classes
        result.exit_indices[rows] = exits
        result.confidences[rows] = confidences
    return result


def _gate_values(thresholds) -> np.ndarray:
    """Float32 thresholds for `confidence >= t`, one per non-final exit; a
    gate that lets no sample leave (threshold 1.0, see `gate_passes`)
    becomes +inf, which no confidence reaches."""
    return np.array(
        [np.float32(t) if t < 1.0 else np.inf for t in thresholds], np.float32
    )


def bucket_size(n: int) -> int:
    """The padded batch size for `n` samples on backends that compile per
    shape: `n` up to 4, then the next multiple of a quarter of the octave
    (5, 6, 7, 8, 10, 12, 14, 16, 20, ...), so at most 25% of a call is
    padding and batches up to 2**k use at most 4k shapes."""
    if n <= 4:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def gated_runner(model):
    """The compiled gated inference of `model`, built once per set of
    segments (the runner holds the segments, never the model)."""
    segments = model.segments()
    runner = _RUNNERS.get(model)
    if runner is None or runner.segments is not segments:
        backend = keras.backend.backend()
        kinds = {"tensorflow": _GraphRunner, "jax": _JaxRunner, "torch": _TorchRunner}
        if backend not in kinds:
            raise ValueError(
                f"predict_early runs on the {sorted(kinds)} backends; the "
                f"Keras backend is '{backend}'. Set KERAS_BACKEND to one of them."
            )
        runner = kinds[backend](segments)
        if backend == "tensorflow":
            runner.first_macs = _first_segment_macs(model)
        _RUNNERS[model] = runner
    return runner


def _first_segment_macs(model) -> int | None:
    """MACs per sample up to the first exit, or None where they cannot be
    counted (a sequence model of variable length)."""
    from keras_earlyexit.evaluation.macs import count_macs

    try:
        return int(count_macs(model, warn=False).cumulative_macs[0])
    except ValueError:
        return None


class _LoopRunner:
    """Segments called one after another from Python as compiled stateless
    calls (variable values as arguments, so weights changed later are
    used) on batches padded to their `_bucket` (JAX; PyTorch pads
    nothing); after each exit the samples that stay are gathered on the
    backend's device. Outputs keep their padded rows (sliced off when
    read); a carry that loses no sample goes on unchanged.

    Segments whose exits no sample can leave (threshold 1.0, no patience)
    run with the next one as one compiled call that returns only its
    outputs: no host round trip in between, and the compiler drops the
    closed exits' heads (with every threshold at 1.0, the whole model is
    one call computing the final exit only).

    The cache holds one compiled function per run of segments (first, last)
    and bucket reached: at most E (E + 1) / 2 runs for E exits (any first
    <= last, as the thresholds open and close exits), times the buckets
    (JAX: at most 4 per octave of the largest batch, `bucket_size`;
    PyTorch: 2, batches of one sample and every other size). It grows with
    neither the number of batches nor the number of distinct batch sizes.

    Batches run in groups of up to `group_samples` samples: the first
    segment runs batch by batch, and the samples that stay are pooled
    across the group and go deeper in chunks of up to the batch size
    (full chunks first). Gating leaves each batch a few samples for the
    deep segments, and a segment costs more per sample on a few samples
    than on a full batch (fixed costs per call and per operation, fewer
    threads busy): on 2 CPU cores, pooling made batches of 32 of the
    signal CNN 1.3x (JAX) to 1.7x (PyTorch) faster. `groups_in_turn`
    groups advance in turns, one call each: on a backend that dispatches
    asynchronously (JAX), one group's segments compute while the host
    reads and gathers another's. Pooling changes which samples share a
    call, not the results (but for the last bits of a confidence, which
    a call's batch size can move, as in `predict`).

    Subclasses define `_compile(function, values, inputs)` (`function`
    compiled for inputs of this bucket), `_bucket`, `_pad`, `_to_numpy`
    and `_gather`.
    """

    group_samples = 1024
    groups_in_turn = 2

    def __init__(self, segments: list):
        self.segments = segments
        self.input_names = [[t.name for t in s.inputs] for s in segments]
        # Walking the layers for their variables costs more than a small
        # segment's call: the lists are taken once.
        self.variables = [list(s.variables) for s in segments]
        self.compiled = {}  # (first, last segment, bucket) -> call

    @staticmethod
    def gates(model, thresholds) -> np.ndarray:
        """The gates' values (`_gate_values`) of `thresholds`, or of the
        model's own (None)."""
        return _gate_values(model.thresholds if thresholds is None else thresholds)

    def __call__(
        self, batches: list, gates: np.ndarray, patience: int | None = None
    ) -> list:
        """(classes, exits, confidences) of each batch of input arrays."""
        batch_size = len(batches[0][0])
        per_group = max(1, self.group_samples // batch_size)
        # Read once per call: reading them per segment costs more than a
        # small segment's arithmetic.
        values = [[v.value for v in variables] for variables in self.variables]
        groups = [
            self._group(batches[i : i + per_group], batch_size, values, gates, patience)
            for i in range(0, len(batches), per_group)
        ]
        results = []
        for start in range(0, len(groups), self.groups_in_turn):
            turn = groups[start : start + self.groups_in_turn]
            done = [None] * len(turn)
            while any(d is None for d in done):
                for i, group in enumerate(turn):
                    if done[i] is None:
                        try:
                            next(group)
                        except StopIteration as stop:
                            done[i] = stop.value
            for d in done:
                results += d
        return results

    def _group(self, group: list, batch_size: int, values: list, gates, patience):
        """The gated loop on a group of batches (`values`: each segment's
        variable values): the first segment runs batch by batch, and the
        samples that stay are pooled across the group and run deeper in
        chunks of up to `batch_size`. Returns each batch's (classes,
        exits, confidences)."""
        sizes = [len(x[0]) for x in group]
        n = sum(sizes)
        classes = np.zeros(n, np.int64)
        exits = np.zeros(n, np.int64)
        confidences = np.zeros(n, np.float32)
        rows = np.arange(n)  # the group's samples in play, in order
        # Patience: class at the previous exit and streak, per row in play.
        previous = np.full(n, -1, np.int64)
        streak = np.zeros(n, np.int64)
        chunks = [dict(zip(self.segments[0].input_order, x)) for x in group]
        chunk_sizes = sizes
        last = len(self.segments) - 1
        for first, k in _stages(gates, patience is not None):
            # All chunks dispatched before any is read (JAX computes one
            # while the host reads another).
            outs = [
                self._call(first, k, values, carry, m)
                for carry, m in zip(chunks, chunk_sizes)
            ]
            yield
            confidence = np.concatenate(
                [self._to_numpy(o["confidence"], m) for o, m in zip(outs, chunk_sizes)]
            ).astype(np.float32)
            predicted = np.concatenate(
                [
                    np.argmax(self._to_numpy(o["logits"], m), axis=-1)
                    for o, m in zip(outs, chunk_sizes)
                ]
            )
            if k == last:
                leave = np.ones(len(rows), bool)
            elif patience is None:
                leave = confidence >= gates[k]
            else:
                streak = next_streak(previous, streak, predicted)
                leave = patience_passes(streak, patience, confidence, gates[k])
            done = rows[leave]
            classes[done] = predicted[leave]
            exits[done] = k
            confidences[done] = confidence[leave]
            stay = np.flatnonzero(~leave)
            if stay.size == 0:  # always at the last exit
                bounds = np.cumsum(sizes)[:-1]
                return list(
                    zip(
                        np.split(classes, bounds),
                        np.split(exits, bounds),
                        np.split(confidences, bounds),
                    )
                )
            previous, streak, rows = predicted[stay], streak[stay], rows[stay]
            chunks, chunk_sizes = self._regroup(
                [{name: o[name] for name in self.input_names[k + 1]} for o in outs],
                chunk_sizes,
                stay,
                batch_size,
            )

    def _regroup(self, carries: list, sizes: list, stay: np.ndarray, batch_size: int):
        """The rows `stay` (of the chunks' carries, `sizes` rows each, taken
        in order) as chunks of at most `batch_size` rows: full chunks
        first, so deeper segments run on batches as large as the first's.
        A single carry that loses no sample goes on unchanged."""
        if len(carries) == 1 and stay.size == sizes[0]:
            return carries, sizes
        bounds = np.cumsum([0] + list(sizes))
        parts = [
            stay[(stay >= a) & (stay < b)] - a for a, b in zip(bounds[:-1], bounds[1:])
        ]
        pooled = {
            name: self._gather([(c[name], p) for c, p in zip(carries, parts) if p.size])
            for name in carries[0]
        }
        starts = range(0, stay.size, batch_size)
        chunks = [
            {name: v[a : a + batch_size] for name, v in pooled.items()} for a in starts
        ]
        return chunks, [min(batch_size, stay.size - a) for a in starts]

    def _call(self, first: int, last: int, values: list, carry: dict, n: int):
        """Segments `first`..`last` on a carry of `n` samples: the outputs
        of segment `last`."""
        size = self._bucket(n)
        inputs = [self._pad(carry[name], size) for name in self.input_names[first]]
        values = [v for k in range(first, last + 1) for v in values[k]]
        function = self.compiled.get((first, last, size))
        if function is None:
            function = self._compile(self._stateless(first, last), values, inputs)
            self.compiled[first, last, size] = function
        return function(values, *inputs)

    def _stateless(self, first: int, last: int):
        """Segments `first`..`last` as a function of their variables'
        values and segment `first`'s inputs."""
        variables = [v for k in range(first, last + 1) for v in self.variables[k]]

        def call(values, *inputs):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return self._run(first, last, inputs)

        return call

    def _run(self, first: int, last: int, inputs) -> dict:
        """Segments `first`..`last` on segment `first`'s inputs: the outputs
        of segment `last`."""
        carry = dict(zip(self.input_names[first], inputs))
        for k in range(first, last + 1):
            out = self.segments[k](carry, training=False)
            if k < last:
                carry = {name: out[name] for name in self.input_names[k + 1]}
        return out

    def compiled_count(self) -> int:
        """Compiled functions held (bounded whatever the batch sizes)."""
        return len(self.compiled)


class _TorchRunner(_LoopRunner):
    """PyTorch: each run of segments exported (`torch.export`, non-strict)
    once with a dynamic batch dimension, run under `torch.inference_mode`,
    carries kept as tensors on their device. The exported program replays
    the segments' tensor operations without Keras' per-layer Python work,
    which costs more than the arithmetic of a small segment, for any batch
    size: nothing is padded and a run of segments is exported at most
    twice (a batch of one sample gets its own program: export specializes
    size 1). `torch.compile` spends about a minute per segment on Keras
    layers (graph breaks and recompilations) and 15 s per exported program
    on 2 CPU cores, more than it saves here. Segments that cannot be
    exported run eagerly. An export replays one path through the layers: a
    layer that branches in Python on tensor values (not on shapes) would
    need eager execution; Keras' built-in layers and this package's do not.
    """

    def __call__(
        self, batches: list, gates: np.ndarray, patience: int | None = None
    ) -> list:
        import torch

        with torch.inference_mode():
            return super().__call__(batches, gates, patience)

    def _bucket(self, n: int) -> int | None:
        return 1 if n == 1 else None  # None: every batch size from 2

    def _compile(self, function, values: list, inputs: list):
        import torch

        class Segments(torch.nn.Module):
            def forward(self, values, *inputs):
                return function(values, *inputs)

        dynamic = None
        if len(inputs[0]) > 1:
            batch = torch.export.Dim("batch", min=2)
            dynamic = ([None] * len(values), tuple({0: batch} for _ in inputs))
        try:
            # Exported outside inference mode, on ordinary copies of the
            # carries (inference mode made them); the program runs in it.
            with torch.inference_mode(False):
                program = torch.export.export(
                    Segments(),
                    (values, *(v.clone() for v in inputs)),
                    dynamic_shapes=dynamic,
                    strict=False,
                )
        except Exception as error:  # any layer the exporter cannot follow
            warnings.warn(
                "predict_early runs some segments eagerly on PyTorch, which is "
                "slower: torch.export could not follow them "
                f"({type(error).__name__}: {str(error)[:200]}). "
                "Results are the same. A layer that branches in Python on "
                "tensor values, or calls outside torch, is the usual cause.",
                stacklevel=2,
            )
            return function
        return _FlatProgram(_without_no_ops(program.module()))

    def _pad(self, value, size: int | None):
        return keras.ops.convert_to_tensor(value)  # never padded

    def _to_numpy(self, value, n: int) -> np.ndarray:
        import torch

        if value.dtype == torch.bfloat16:  # no NumPy dtype
            value = value.float()
        return value.cpu().numpy()

    def _gather(self, parts: list):
        import torch

        taken = [_take_rows(v, torch.as_tensor(r, device=v.device)) for v, r in parts]
        return taken[0] if len(taken) == 1 else _cat_rows(taken)


def _take_rows(value, rows):
    """`value`'s `rows` (a tensor of indices), in `value`'s memory layout.

    Keras' convolutions on PyTorch compute channels-first and hand on a
    channels-last view, so a carry's memory is not in its logical order.
    `index_select` would write a logically ordered copy, a strided
    transpose (several times slower than the segment's own gather), that
    the next segment copies back before it convolves; gathering the
    memory's leading dimension copies whole contiguous samples and keeps
    the layout the next segment wants."""
    order = sorted(range(value.dim()), key=lambda d: (-value.stride(d), d))
    in_memory = value.permute(order)
    if order[0] != 0 or not in_memory.is_contiguous():
        return value.index_select(0, rows)
    back = sorted(range(value.dim()), key=order.__getitem__)
    return in_memory.index_select(0, rows).permute(back)


def _cat_rows(values: list):
    """`values` (same shape but the rows, same memory layout, as
    `_take_rows` returns them) stacked along the rows in that layout (a
    plain `torch.cat` would write logical order: a strided transpose)."""
    import torch

    value = values[0]
    order = sorted(range(value.dim()), key=lambda d: (-value.stride(d), d))
    if order[0] != 0:
        return torch.cat(values)
    back = sorted(range(value.dim()), key=order.__getitem__)
    return torch.cat([v.permute(order) for v in values]).permute(back)


class _FlatProgram:
    """An exported program's graph called on flat arguments: `(values,
    *inputs)` in, the segment's dict of outputs out. The module's own call
    matches the arguments against the exported tree structure (nested
    lists, key paths) on every call, about 0.1 ms of Python per segment
    call, as much as a small segment's arithmetic; here the structure is
    fixed by construction. The graph's guards (input shapes) still run.
    A PyTorch whose exported modules keep no output structure
    (`_out_spec`) gets the module's own call."""

    def __init__(self, module):
        import torch

        self.module = module
        self.positions = None
        out_spec = getattr(module, "_out_spec", None)
        if out_spec is None:
            return
        module.graph.set_codegen(torch.fx.graph.CodeGen())  # flat in, flat out
        module.recompile()
        # Output name -> position in the flat outputs.
        self.positions = torch.utils._pytree.tree_unflatten(
            list(range(out_spec.num_leaves)), out_spec
        )

    def __call__(self, values: list, *inputs) -> dict:
        if self.positions is None:
            return self.module(values, *inputs)
        flat = self.module.forward(*values, *inputs)
        return {name: flat[i] for name, i in self.positions.items()}


def _without_no_ops(module):
    """`module` (an exported program's graph) without the nodes that do
    nothing at run time: Keras' dtype checks and casts to the dtype a
    tensor already has, two thirds of a segment's nodes, each costing a
    Python call per run."""
    import torch

    aten = torch.ops.aten
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif node.target in (aten.to.dtype, aten.to.dtype_layout) and _same_tensor(
            node
        ):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    module.recompile()
    return module


def _same_tensor(node) -> bool:
    """Whether a `Tensor.to` node returns its input itself (same dtype,
    device and layout; no copy, no memory format asked for)."""
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    return (
        before is not None
        and after is not None
        and (before.dtype, before.device, before.layout)
        == (after.dtype, after.device, after.layout)
        and not node.kwargs.get("copy", False)
        and node.kwargs.get("memory_format") is None
        and len(node.args) <= 2
    )


class _JaxRunner(_LoopRunner):
    """JAX: `jax.jit` of each run of segments' stateless call, one
    executable per bucket size reached (`bucket_size`). JAX dispatches
    asynchronously: two groups of up to 1024 samples are in flight
    (their carries held at once); between two segment calls a group waits
    for its confidences, reads them and gathers its carries on the host
    while the other group's calls compute (on 2 CPU cores, 1.2x faster
    than one group at a time on the signal CNN at batch 256). Gathering
    on the device instead (a jitted take) ran no faster: one more call
    per segment. Nor did one compiled program per batch (all segments,
    the rows in play under `lax.cond` in power-of-two pieces, like
    TensorFlow's one graph): 10% slower on the signal CNN at batch 256,
    the pieces costing more per sample than the host round trips they
    save.

    Batches of one sample (streaming) are the exception: each runs as one
    compiled program, the segments after an exit under a `lax.cond` on its
    gate, so a sample costs one call and no host round trip (one program
    per set of closed exits, patience or not): one sample at a time, the
    signal CNN ran 1.1x faster than segment by segment (MobileNetV2, whose
    segments take milliseconds, the same)."""

    def __init__(self, segments: list):
        super().__init__(segments)
        self.one_sample = {}  # (stages, patience or not) -> program

    def __call__(
        self, batches: list, gates: np.ndarray, patience: int | None = None
    ) -> list:
        if len(batches[0][0]) > 1:
            return super().__call__(batches, gates, patience)
        track = patience is not None
        stages = _stages(gates, track)
        program = self.one_sample.get((stages, track))
        if program is None:
            program = self._one_sample_program(stages, track)
            self.one_sample[stages, track] = program
        values = [[v.value for v in variables] for variables in self.variables]
        settings = (gates, np.int32(patience if track else 0))
        results = []
        for start in range(0, len(batches), self.group_samples):
            # Dispatched together, read together (JAX runs them in turn).
            outs = [
                program(values, x, *settings)
                for x in batches[start : start + self.group_samples]
            ]
            results += [
                tuple(np.asarray([v]).astype(t) for v, t in zip(out, _RESULT_DTYPES))
                for out in outs
            ]
        return results

    def _one_sample_program(self, stages: tuple, track: bool):
        """The gated loop on one sample, as one jitted program: `(values,
        inputs, gates, patience)` -> (class, exit, confidence)."""
        import jax
        import jax.numpy as jnp

        last = len(self.segments) - 1
        calls = [self._stateless(first, stage_last) for first, stage_last in stages]

        def program(values, inputs, gates, patience):
            def from_stage(i, carry, previous, streak):
                first, stage_last = stages[i]
                flat = [v for k in range(first, stage_last + 1) for v in values[k]]
                out = calls[i](flat, *[carry[name] for name in self.input_names[first]])
                confidence = out["confidence"][0].astype(jnp.float32)
                predicted = jnp.argmax(out["logits"][0], axis=-1).astype(jnp.int32)
                result = (predicted, jnp.int32(stage_last), confidence)
                if stage_last == last:
                    return result
                if track:
                    # runtime.patience.next_streak and patience_passes.
                    streak = jnp.where(predicted == previous, streak + 1, 1)
                    leave = (streak >= patience) & (confidence >= gates[stage_last])
                else:
                    leave = confidence >= gates[stage_last]
                carry = {name: out[name] for name in self.input_names[stage_last + 1]}
                return jax.lax.cond(
                    leave,
                    lambda: result,
                    lambda: from_stage(i + 1, carry, predicted, streak),
                )

            carry = dict(zip(self.segments[0].input_order, inputs))
            return from_stage(0, carry, jnp.int32(-1), jnp.int32(0))

        return jax.jit(program)

    def compiled_count(self) -> int:
        return len(self.compiled) + len(self.one_sample)

    def _bucket(self, n: int) -> int:
        return bucket_size(n)

    def _compile(self, function, values: list, inputs: list):
        import jax

        return jax.jit(function)

    def _pad(self, value, size: int):
        return _pad_rows(value, size)

    def _to_numpy(self, value, n: int) -> np.ndarray:
        return np.asarray(value)[:n]

    def _gather(self, parts: list) -> np.ndarray:
        return np.concatenate([np.asarray(v)[r] for v, r in parts])


def _stages(gates: np.ndarray, track: bool) -> tuple:
    """(first, last) segments of each call: a segment whose exit no sample
    can leave (gate +inf, no patience) runs with the next."""
    stages, first = [], 0
    for k in range(len(gates) + 1):
        if k == len(gates) or track or gates[k] != np.inf:
            stages.append((first, k))
            first = k + 1
    return tuple(stages)


_RESULT_DTYPES = (np.int64, np.int64, np.float32)


def _pad_rows(value, size: int):
    """`value` with `size` rows: padding repeats the last row (finite
    values; padded rows are never read)."""
    if len(value) == size:
        return value
    value = np.asarray(value)
    return np.concatenate([value, np.repeat(value[-1:], size - len(value), axis=0)])


class _GraphRunner:
    """TensorFlow: one graph per model runs a whole gated batch. Traced
    once, on the first call, with a dynamic batch dimension (graph kernels
    take any batch size, so nothing is padded); the thresholds (and the
    patience) are arguments, so changing them does not retrace. A segment
    runs only if some sample is still in play (`tf.cond`). A patience
    model's graph also carries each sample's previous class and streak.

    Several batches of a large model (a first segment of at least
    `pool_from_macs` MACs per batch) run pooled instead (`_TfLoopRunner`):
    its calls are long enough that the host round trips between segments
    cost little, while the deep segments gain from full batches. On 2 CPU
    cores: MobileNetV2 at batch 128 (520 M MACs per batch to the first
    exit) 1.69x faster than `predict` pooled against 1.43x as one graph
    per batch; the signal CNN at batch 256 (24 M), 2.47x pooled against
    2.92x."""

    pool_from_macs = 100_000_000
    first_macs = None  # per sample, up to the first exit (`gated_runner`)

    def __init__(self, segments: list):
        self.pooled = _TfLoopRunner(segments)
        self.segments = segments
        self.input_names = [[t.name for t in s.inputs] for s in segments]
        # (tracks the patience streak, reads the model's own thresholds)
        # -> tf.function.
        self.functions = {}
        # The same, as their one concrete function each: called directly, a
        # call skips the tf.function's signature lookup (binding and hashing
        # the arguments' types), about 0.8 ms per call, a seventh of a
        # one-sample call of a MobileNetV2-size model on 2 CPU cores.
        self.concrete = {}

    @staticmethod
    def gates(model, thresholds):
        """The gates' values (`_gate_values`) of `thresholds`; for the
        model's own (None), their variables, read in the graph: reading
        them here costs about 0.1 ms each per call."""
        if thresholds is None:
            return tuple(gate.threshold_variable for gate in model.gates[:-1])
        return _gate_values(thresholds)

    def __call__(self, batches: list, gates, patience: int | None = None) -> list:
        """(classes, exits, confidences) of each batch of input arrays;
        `gates`: see `gates`."""
        import tensorflow as tf

        track = patience is not None
        own = not isinstance(gates, np.ndarray)
        if (
            len(batches) > 1
            and self.first_macs is not None
            and self.first_macs * len(batches[0][0]) >= self.pool_from_macs
        ):
            if own:
                gates = _gate_values(
                    [float(keras.ops.convert_to_numpy(v)) for v in gates]
                )
            return self.pooled(batches, gates, patience)
        if (track, own) not in self.functions:
            signature = [
                [tf.TensorSpec((None,) + v.shape[1:], v.dtype) for v in batches[0]],
                tf.TensorSpec((), tf.int64),
            ]
            if own:

                def gated(x, patience):
                    return self._gated_batch(x, _read_gates(gates), patience, track)

            else:
                signature.insert(1, tf.TensorSpec(gates.shape, tf.float32))

                def gated(x, gates, patience):
                    return self._gated_batch(x, gates, patience, track)

            function = tf.function(gated, input_signature=signature)
            self.functions[track, own] = function
            self.concrete[track, own] = function.get_concrete_function()
        function = self.concrete[track, own]
        # Tensors, not arrays: the call's own conversion of NumPy arguments
        # costs about 0.1 ms more.
        settings = [tf.constant(np.int64(patience if track else 0))]
        if not own:
            settings.insert(0, tf.constant(gates))
        return [
            tuple(v.numpy() for v in function([tf.constant(v) for v in x], *settings))
            for x in batches
        ]

    def _gated_batch(self, x, gates, patience, track: bool):
        import tensorflow as tf

        n = tf.shape(x[0])[0]
        result = (
            tf.zeros([n], tf.int64),
            tf.zeros([n], tf.int64),
            tf.zeros([n], tf.float32),
        )
        carry = dict(zip(self.segments[0].input_order, x))
        # Class at the previous exit and streak (read only with `track`).
        agreement = (tf.fill([n], tf.constant(-1, tf.int64)), tf.zeros([n], tf.int64))
        return self._from(
            0, carry, tf.range(n), gates, result, agreement, patience, track
        )

    def _from(
        self, k: int, carry: dict, rows, gates, result, agreement, patience, track
    ):
        """Segments k and deeper on the samples `rows` (segment k's carry);
        with `track`, `agreement` holds their previous class and streak."""
        import tensorflow as tf

        out = self.segments[k](carry, training=False)
        confidence = tf.cast(out["confidence"], tf.float32)
        predicted = tf.argmax(out["logits"], axis=-1)
        previous, streak = agreement
        if k == len(self.segments) - 1:
            leave = tf.ones_like(confidence, tf.bool)
        elif track:
            # runtime.patience.next_streak and patience_passes, in the graph.
            streak = tf.where(predicted == previous, streak + 1, tf.ones_like(streak))
            leave = (streak >= patience) & (confidence >= gates[k])
        else:
            leave = confidence >= gates[k]
        done = tf.where(leave)[:, 0]
        at = tf.gather(rows, done)[:, None]
        classes, exits, confidences = result
        result = (
            tf.tensor_scatter_nd_update(classes, at, tf.gather(predicted, done)),
            tf.tensor_scatter_nd_update(
                exits, at, tf.fill(tf.shape(done), tf.constant(k, tf.int64))
            ),
            tf.tensor_scatter_nd_update(confidences, at, tf.gather(confidence, done)),
        )
        if k == len(self.segments) - 1:
            return result
        stay = tf.where(~leave)[:, 0]

        def deeper():
            carry = {
                name: tf.gather(out[name], stay) for name in self.input_names[k + 1]
            }
            kept = (tf.gather(predicted, stay), tf.gather(streak, stay))
            return self._from(
                k + 1,
                carry,
                tf.gather(rows, stay),
                gates,
                result,
                kept,
                patience,
                track,
            )

        return tf.cond(tf.size(stay) > 0, deeper, lambda: result)

    def compiled_count(self) -> int:
        """Traces made (one per kind of call whatever the batch sizes), and
        the pooled loop's (one per run of segments)."""
        traces = sum(
            f.experimental_get_tracing_count() for f in self.functions.values()
        )
        return traces + len(self.pooled.compiled)


class _TfLoopRunner(_LoopRunner):
    """TensorFlow, several batches of a large model: the pooled loop of
    `_LoopRunner` (see `_GraphRunner`), each run of segments one
    `tf.function` traced once with a dynamic batch dimension (variables
    read in the graph), nothing padded."""

    def __init__(self, segments: list):
        super().__init__(segments)
        self.variables = [[] for _ in segments]  # read by the graphs

    def _call(self, first: int, last: int, values: list, carry: dict, n: int):
        import tensorflow as tf

        function = self.compiled.get((first, last, None))
        if function is None:
            # The segment's declared shapes: a variable length stays variable.
            signature = [
                tf.TensorSpec((None,) + tuple(t.shape[1:]), carry[t.name].dtype)
                for t in self.segments[first].inputs
            ]
            function = tf.function(
                lambda *inputs: self._run(first, last, inputs),
                input_signature=signature,
            )
            function = function.get_concrete_function()
            self.compiled[first, last, None] = function
        inputs = [tf.convert_to_tensor(carry[name]) for name in self.input_names[first]]
        return function(*inputs)

    def _to_numpy(self, value, n: int) -> np.ndarray:
        return value.numpy()

    def _gather(self, parts: list):
        import tensorflow as tf

        taken = [tf.gather(v, r) for v, r in parts]
        return taken[0] if len(taken) == 1 else tf.concat(taken, 0)


def _read_gates(variables):
    """`_gate_values` of threshold variables, in a TensorFlow graph."""
    import tensorflow as tf

    values = tf.cast(tf.stack([v.value for v in variables]), tf.float32)
    return tf.where(values < 1.0, values, tf.constant(np.inf, tf.float32))


def check_inputs(model, x) -> list[np.ndarray]:
    """The model's input arrays from `x`, checked: count, sample shape,
    non-empty, equal lengths, dtype and finite values (see `_cast_input`);
    cast to the inputs' dtypes."""
    expected = keras.tree.flatten(model.inputs)
    if isinstance(x, dict):
        missing = [t.name for t in expected if t.name not in x]
        if missing:
            raise ValueError(
                f"Inputs {missing} are missing from the dict of inputs, which "
                f"has keys {sorted(x)}. Key each array by its model input's "
                f"name: {[t.name for t in expected]}."
            )
        x = [x[t.name] for t in expected]
    arrays = [np.asarray(v) for v in keras.tree.flatten(x)]
    if len(arrays) != len(expected):
        raise ValueError(
            f"The model takes {len(expected)} input(s); received {len(arrays)}."
        )
    for a, t in zip(arrays, expected):
        if a.ndim == 0 or len(a) == 0:
            raise ValueError(
                "Received no samples (empty x). Pass at least one sample, and "
                "for profiling or calibration a few hundred."
            )
        if a.ndim != len(t.shape) or any(
            d is not None and d != s for d, s in zip(t.shape[1:], a.shape[1:])
        ):
            raise ValueError(
                f"Input '{t.name}' expects samples of shape {tuple(t.shape[1:])}; "
                f"received an array of shape {a.shape}."
            )
    sizes = {len(a) for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"All inputs must have the same number of samples: {sizes}.")
    graph.check_sequence_lengths(model, arrays)
    return [_cast_input(a, t) for a, t in zip(arrays, expected)]


def _cast_input(array: np.ndarray, tensor) -> np.ndarray:
    """`array` in the dtype of model input `tensor`, or a ValueError.

    One rule for every entry point: float inputs take float arrays only (an
    integer image on the 0..255 scale, fed to a model trained on [0, 1],
    would run and be silently wrong); integer inputs (token ids) take
    integer arrays whose values fit the input's dtype; no value may be NaN
    or infinite, in the array or after the cast (a NaN logit gives
    confidence 1.0 and an early exit with a meaningless class).
    """
    name = tensor.name
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    kind = array.dtype.kind
    if "float" in dtype:
        if kind != "f":
            raise ValueError(
                f"Input '{name}' is {dtype} but received an array of dtype "
                f"{array.dtype}. Scale and convert it as in training, e.g. "
                "x.astype('float32') / 255 for 8-bit images; integer arrays "
                "are accepted only for integer inputs (token ids)."
            )
        # bfloat16 has no NumPy dtype; the backend casts float32 itself.
        with np.errstate(over="ignore"):  # overflow is refused just below
            cast = array.astype("float32" if dtype == "bfloat16" else dtype, copy=False)
        # Checked after the cast: a float64 value beyond the input dtype's
        # range becomes infinite.
        bad = ~np.isfinite(cast.reshape(len(cast), -1)).all(axis=1)
        if bad.any():
            raise ValueError(
                f"Input '{name}' has {int(bad.sum())} of {len(array)} samples "
                f"with NaN or infinite values, or values beyond {dtype}'s "
                f"range (first at index {int(np.argmax(bad))}). Remove or "
                "repair them; no exit can classify them."
            )
        return cast
    if "int" in dtype:
        if kind not in "iu":
            raise ValueError(
                f"Input '{name}' is {dtype} (e.g. token ids) but received an "
                f"array of dtype {array.dtype}. Pass integer ids, e.g. "
                f"x.astype('{dtype}')."
            )
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(
                f"Input '{name}' is {dtype}; received values in "
                f"[{array.min()}, {array.max()}], outside [{info.min}, "
                f"{info.max}]."
            )
        return array.astype(dtype, copy=False)
    if dtype == "bool" and kind != "b":
        raise ValueError(
            f"Input '{name}' is bool; received an array of dtype {array.dtype}."
        )
    return array.astype(dtype, copy=False)
