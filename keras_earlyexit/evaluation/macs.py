"""`count_macs`: multiply-accumulates per exit segment, from layer shapes.

Counting rules (per sample, batch axis excluded):

- `Dense`: one MAC per kernel entry and per position (a `Dense` on a
  sequence runs once per step). Biases and activations are not counted.
- `EinsumDense`: output elements times the sizes of the contracted axes.
- `Conv1D/2D/3D`: output positions times kernel entries (`groups` taken
  into account through the kernel shape); `Conv*Transpose`: input
  positions times kernel entries.
- `DepthwiseConv1D/2D`: output elements times the kernel window.
- `SeparableConv1D/2D`: the depthwise and the pointwise part.
- `MultiHeadAttention`: the query, key, value and output projections plus
  `heads * Tq * Tk * (key_dim + value_dim)` for the scores (QK^T) and the
  weighted sum (AV) (default attention over all non-batch, non-feature
  axes). Masks and the softmax are not counted.
- `BatchNormalization`: 0 where the TFLite converter folds it into the
  weights of the layer before it, otherwise 1 MAC per element (the scale
  and shift that remain at inference). It folds, as checked by converting
  each case (TF 2.21, float32 and int8), when it normalizes the channel
  (last) axis of the output of a `Dense`, `EinsumDense`, `Conv1D/2D`,
  `Conv1D/2DTranspose`, `DepthwiseConv1D/2D` or `SeparableConv1D/2D` with
  no activation, where nothing else reads that output (only `Dropout` or
  another folded `BatchNormalization` in between). It stays when the layer
  has an activation or an activation layer comes between, when the output
  has another reader (a skip connection, an exit, a segment boundary), for
  `Conv3D`/`Conv3DTranspose`, and for any other axis.
  `LayerNormalization` / `GroupNormalization`: 1 MAC per element (scale and
  shift; mean and variance are not counted), or 0 without a scale.
- Embedding lookups (`Embedding` and layers named `*Embedding`, e.g.
  keras-hub's `PositionEmbedding` and `TokenAndPositionEmbedding`): 0.
  A `ReversibleEmbedding` called with `reverse=True` (logits from the
  embedding matrix) counts as the `Dense` it is.
- Layers that nest other layers without a functional graph (e.g. keras-hub's
  `TransformerEncoder`): the sum of their sublayers, each `Dense` and
  normalization applied once per position of the layer's input and each
  `MultiHeadAttention` as self-attention over those positions (a row per
  sublayer, named `outer/inner`). A nested layer with weights of a type
  that has no rule is counted as 0 as a whole and named in the warning.
- Pooling (max, average, global) and the `ExitBranch` pooling: 0 MACs. They
  multiply nothing; their adds/comparisons are not counted (a rule of thumb
  shared with most MAC counters), and each one still gets a row in the
  per-layer breakdown saying so.
- `ExitBranch`: its hidden `Dense` layers and classifier.
- `ExitGate` (softmax + confidence), activations, reshapes, merges, dropout
  and other layers without weights: 0. `keras.ops.matmul` in a functional
  graph: output elements times the contracted size.
- Quantization-aware models (`kee.quantize_aware`): the fake-quantized
  layers (`QuantizedConv2D`, `QuantizedSeparableConv2D`, `QuantizedDense`,
  `QuantizedExitBranch`, ...) subclass their float layers and count as
  they do; `ActivationQuantizer` (a tracked int8 range, a requantization
  in the int8 model) counts 0. A model and its `quantize_aware` copy count
  the same (the copy folds `BatchNormalization` where this count does).
- Layers nested in a sub-model are counted through the sub-model's graph.
- Other layers with weights (e.g. recurrent layers): counted as 0 and named
  in one warning.

Sequence models often leave the sequence length unknown (`keras.Input((None,
))`, keras-hub backbones): `count_macs(model, sequence_length=T)` counts
them at `T` tokens (every unknown axis 1 is taken as `T`).
"""

import warnings
from dataclasses import dataclass, field

import keras
import numpy as np

from keras_earlyexit import graph as graph_lib
from keras_earlyexit.gate import ExitGate
from keras_earlyexit.layers import ExitBranch
from keras_earlyexit.quantization.layers import ActivationQuantizer

_CONV = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
_CONV_TRANSPOSE = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_POOLING_NAMES = ("Pooling", "pooling")
# Layers whose weights the TFLite converter folds a following
# BatchNormalization into (not Conv3D / Conv3DTranspose: MUL and ADD stay).
_FOLDS_BATCHNORM = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    *_DEPTHWISE,
    *_SEPARABLE,
)
# Layers with weights that cost no MACs by design.
_ZERO_MAC_WEIGHTED = (keras.layers.Embedding, ExitGate)


@dataclass
class LayerMacs:
    """MACs of one layer call.

    Attributes:
        segment: 0-based index of the exit segment the call belongs to.
        name: layer name (`outer/inner` for layers of nested models).
        type: layer class name.
        macs: multiply-accumulates per sample.
        note: how the count was made, when it is not the plain rule.
    """

    segment: int
    name: str
    type: str
    macs: int
    note: str = ""


@dataclass
class MacsReport:
    """MACs per exit segment, cumulative, and per layer.

    Attributes:
        segment_macs: per exit, MACs of its segment (backbone part and head).
        cumulative_macs: per exit, MACs to reach and evaluate that exit
            (segments 1..k).
        layers: `LayerMacs` rows, in graph order.
        exit_names: names of the exits.
        uncounted: names of layer types with weights that were counted as 0.
    """

    segment_macs: list[int]
    cumulative_macs: list[int]
    layers: list[LayerMacs] = field(default_factory=list)
    exit_names: list[str] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        """MACs of the full model (every segment, every exit head)."""
        return self.cumulative_macs[-1]

    def share(self) -> list[float]:
        """Cumulative MACs of each exit as a fraction of the full model."""
        total = max(self.total_macs, 1)
        return [c / total for c in self.cumulative_macs]

    def __str__(self) -> str:
        rows = [f"{'layer':<32} {'type':<22} {'MACs':>12}  note"]
        for k, name in enumerate(self.exit_names):
            rows.append(f"-- segment {k + 1} (exit '{name}')")
            for r in self.layers:
                if r.segment == k:
                    rows.append(f"{r.name:<32} {r.type:<22} {r.macs:>12,}  {r.note}")
        rows.append("")
        rows.append(
            f"{'exit':<12} {'segment MACs':>14} {'cumulative':>14} {'share':>8}"
        )
        for name, seg, cum, share in zip(
            self.exit_names, self.segment_macs, self.cumulative_macs, self.share()
        ):
            rows.append(f"{name:<12} {seg:>14,} {cum:>14,} {share:>8.1%}")
        return "\n".join(rows)


def count_macs(
    model: keras.Model, warn: bool = True, sequence_length: int | None = None
) -> MacsReport:
    """Counts multiply-accumulates per exit segment from layer shapes.

    See the module docstring for the rule of each layer type (BatchNorm
    counts 0 where the TFLite converter folds it into the layer before it;
    pooling counts 0).

    Args:
        model: an `EarlyExitModel` (counted per exit segment) or any built
            functional / Sequential `keras.Model` (counted as one segment).
        warn: emit one warning naming layer types with weights that have no
            counting rule (they are counted as 0).
        sequence_length: the length at which to count a model whose
            sequence axis (axis 1) is unknown (`None`); required for such
            models, ignored where the length is fixed.

    Returns:
        `MacsReport` with lists `.segment_macs` and `.cumulative_macs` (one
        int per exit), the per-layer breakdown `.layers`, and a table from
        `str()`.

    Example:

    ```python
    macs = kee.count_macs(model)
    print(macs)  # per-layer table and per-exit summary
    macs.cumulative_macs[-1]  # full model, per sample
    kee.count_macs(text_model, sequence_length=128)  # keras-hub backbones
    ```
    """
    if sequence_length is not None and (
        isinstance(sequence_length, bool)
        or not isinstance(sequence_length, int)
        or sequence_length < 1
    ):
        raise ValueError(
            f"sequence_length must be an int >= 1. Received: {sequence_length!r}"
        )
    if hasattr(model, "segments"):
        graphs = model.segments()
        exit_names = list(model.exit_names)
    else:
        graph = getattr(model, "_functional", None) or model
        if not getattr(graph, "outputs", None):
            raise ValueError(
                f"count_macs needs a built functional or Sequential model; "
                f"'{model.name}' has no symbolic outputs. Build it first "
                "(call it on a keras.Input or pass input_shape)."
            )
        graphs = [graph]
        exit_names = [model.name]
    rows: list[LayerMacs] = []
    uncounted: set = set()
    for k, graph in enumerate(graphs):
        _count_graph(graph, k, "", rows, uncounted, sequence_length)
    segment_macs = [
        sum(r.macs for r in rows if r.segment == k) for k in range(len(graphs))
    ]
    cumulative = [int(c) for c in np.cumsum(segment_macs)]
    if uncounted and warn:
        warnings.warn(
            "count_macs has no rule for layer type(s) "
            f"{', '.join(sorted(uncounted))}; they were counted as 0 MACs.",
            stacklevel=2,
        )
    return MacsReport(segment_macs, cumulative, rows, exit_names, sorted(uncounted))


def sequence_length_of(model: keras.Model, x) -> int | None:
    """The length of the sequences in `x` for the inputs of `model` whose
    length is open (axis 1 `None`), to pass as `count_macs(model,
    sequence_length=...)`; None when no input has an open length.

    Args:
        model: the model.
        x: its input array(s), as for `model.predict` (a dict is matched
            to the inputs by name).

    Returns:
        The longest such length in `x`, or None.
    """
    tensors = keras.tree.flatten(model.inputs)
    if isinstance(x, dict):
        arrays = [x.get(t.name) for t in tensors]
    else:
        arrays = keras.tree.flatten(x)
    lengths = [
        np.shape(a)[1]
        for a, t in zip(arrays, tensors)
        if len(t.shape) > 1 and t.shape[1] is None and np.ndim(a) > 1
    ]
    return max(lengths, default=None)


def _graph_nodes(graph) -> list:
    """Nodes of a functional graph in topological order, walked back from
    the graph's own outputs, so a layer shared by several graphs (the model
    and its segments) is seen through this graph's call."""
    return graph_lib.nodes_between(
        keras.tree.flatten(graph.inputs), keras.tree.flatten(graph.outputs)
    )


def _count_graph(
    graph,
    segment: int,
    prefix: str,
    rows: list,
    uncounted: set,
    sequence_length: int | None,
):
    nodes = _graph_nodes(graph)
    folds = _BatchNormFolding(graph, nodes)
    for node in nodes:
        op = node.operation
        inner = getattr(op, "_functional", None) or op
        if isinstance(op, keras.Model) and getattr(inner, "outputs", None):
            _count_graph(
                inner,
                segment,
                f"{prefix}{op.name}/",
                rows,
                uncounted,
                sequence_length,
            )
            continue
        target = folds.target(node)
        if target is not None:
            rows.append(
                LayerMacs(
                    segment,
                    prefix + op.name,
                    type(op).__name__,
                    0,
                    f"folded into '{target.name}'",
                )
            )
            continue
        macs, note = _node_macs(node, sequence_length)
        if macs is None:
            nested = _nested_rows(node, sequence_length)
            if nested is not None:
                rows.extend(
                    LayerMacs(segment, f"{prefix}{op.name}/{name}", kind, m, n)
                    for name, kind, m, n in nested
                )
                continue
            uncounted.add(type(op).__name__)
            macs, note = 0, "no rule: counted as 0"
        rows.append(LayerMacs(segment, prefix + op.name, type(op).__name__, macs, note))


def _size(shape) -> int:
    """Elements per sample of a `(batch, ...)` shape."""
    dims = list(shape[1:])
    if any(d is None for d in dims):
        unknown_steps = len(shape) in (2, 3) and shape[1] is None
        raise ValueError(
            f"count_macs needs static shapes; found a tensor of shape {shape}. "
            + (
                "Its sequence length is unknown: pass the length to count at, "
                "e.g. count_macs(model, sequence_length=128)."
                if unknown_steps
                else "Build the model with fixed input sizes (e.g. "
                "keras.Input((32, 32, 3))) to count it."
            )
        )
    return int(np.prod(dims, dtype=np.int64))


def _static(shape, sequence_length: int | None) -> tuple:
    """`shape` with an unknown axis 1 (the sequence axis) set to
    `sequence_length`, when given."""
    shape = tuple(shape)
    if sequence_length is None or len(shape) < 2 or shape[1] is not None:
        return shape
    return (shape[0], sequence_length, *shape[2:])


def _prod(shape) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64))


def _node_macs(node, sequence_length: int | None) -> tuple[int | None, str]:
    """MACs of one layer call, or `(None, "")` when no rule applies."""
    op = node.operation
    in_shape = (
        _static(node.input_tensors[0].shape, sequence_length)
        if node.input_tensors
        else None
    )
    out_shape = _static(keras.tree.flatten(node.outputs)[0].shape, sequence_length)
    if isinstance(op, ExitBranch):
        dense = [*op.hidden_layers, op.classifier]
        macs = sum(_prod(layer.kernel.shape) for layer in dense)
        pooled = len(in_shape) > 2
        return macs, "pooling 0 + dense layers" if pooled else ""
    if isinstance(op, keras.layers.Dense):
        return _size(in_shape) * op.units, ""
    if isinstance(op, keras.layers.EinsumDense):
        return _einsum_macs(op, in_shape), ""
    if isinstance(op, _SEPARABLE):
        positions = _size(out_shape) // op.filters
        depthwise = positions * _prod(op.depthwise_kernel.shape)
        pointwise = positions * _prod(op.pointwise_kernel.shape)
        return depthwise + pointwise, "depthwise + pointwise"
    if isinstance(op, _DEPTHWISE):
        return _size(out_shape) * _prod(op.kernel_size), ""
    if isinstance(op, _CONV_TRANSPOSE):
        return _size(in_shape) // in_shape[_channel_axis(op)] * _prod(
            op.kernel.shape
        ), ""
    if isinstance(op, _CONV):
        return _size(out_shape) // op.filters * _prod(op.kernel.shape), ""
    if isinstance(op, keras.layers.MultiHeadAttention):
        return _attention_macs(op, node, sequence_length), _ATTENTION_NOTE
    if isinstance(op, keras.layers.BatchNormalization):
        return _size(out_shape), "scale and shift (not folded by the converter)"
    if isinstance(op, _NORMALIZATION):
        return _normalization_macs(op, _size(out_shape)), _NORMALIZATION_NOTE
    if _is_embedding(op):
        if node.arguments.kwargs.get("reverse"):
            return _size(in_shape) * op.input_dim, "reverse: logits from embeddings"
        return 0, "embedding lookup"
    if any(s in type(op).__name__ for s in _POOLING_NAMES):
        return 0, "pooling: no multiplies (adds/comparisons not counted)"
    if type(op).__name__ == "Matmul":
        a = node.input_tensors[0].shape
        return _size(out_shape) * int(a[-1]), ""
    if isinstance(op, ActivationQuantizer):
        return 0, "fake quantization (int8 range)"
    if isinstance(op, _ZERO_MAC_WEIGHTED) or not getattr(op, "weights", None):
        return 0, ""
    return None, ""


class _BatchNormFolding:
    """Which `BatchNormalization` calls of one graph the TFLite converter
    folds into the weights of the layer before them (module docstring)."""

    def __init__(self, graph, nodes: list):
        self.nodes = {id(node) for node in nodes}
        self.reads: dict[int, int] = {}  # id(tensor) -> readers in this graph
        for node in nodes:
            for t in node.input_tensors:
                self.reads[id(t)] = self.reads.get(id(t), 0) + 1
        for t in keras.tree.flatten(graph.outputs):
            self.reads[id(t)] = self.reads.get(id(t), 0) + 1
        self.targets: dict[int, keras.layers.Layer] = {}  # id(node) -> layer

    def target(self, node):
        """The layer `node` folds into, or None (also for non-BN nodes)."""
        op = node.operation
        if not isinstance(op, keras.layers.BatchNormalization):
            return None
        rank = len(node.input_tensors[0].shape)
        if op.axis % rank != rank - 1:
            return None
        tensor = node.input_tensors[0]
        while True:
            if self.reads.get(id(tensor)) != 1:
                return None  # the unnormalized output is needed elsewhere
            producer = graph_lib.node_of(tensor)
            if id(producer) not in self.nodes:
                return None  # an input of this graph (or segment)
            if id(producer) in self.targets:
                target = self.targets[id(producer)]  # BN after a folded BN
                break
            if isinstance(producer.operation, keras.layers.Dropout):
                tensor = producer.input_tensors[0]
                continue
            target = producer.operation
            if not (
                isinstance(target, _FOLDS_BATCHNORM)
                and _is_linear(target)
                and _channel_axis(target) == -1
            ):
                return None
            break
        self.targets[id(node)] = target
        return target


def _is_linear(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def _channel_axis(layer) -> int:
    return (
        -1 if getattr(layer, "data_format", "channels_last") == "channels_last" else 1
    )


def _einsum_macs(layer, in_shape) -> int:
    """One MAC per combination of the equation's indices (batch excluded)."""
    lhs, kernel = layer.equation.split("->")[0].split(",")
    sizes = dict(zip(kernel, layer.kernel.shape))
    if lhs.startswith("..."):
        letters = lhs[3:]
        broadcast = in_shape[1 : len(in_shape) - len(letters)]
        extra = _size((None, *broadcast))
    else:
        letters, extra = lhs[1:], 1  # lhs[0] indexes the batch
    sizes.update(zip(letters, in_shape[len(in_shape) - len(letters) :]))
    return extra * _size((None, *sizes.values()))


def _attention_macs(layer, node, sequence_length: int | None) -> int:
    args = list(node.arguments.args)
    kwargs = node.arguments.kwargs
    query = kwargs.get("query", args[0] if args else None)
    value = kwargs.get("value", args[1] if len(args) > 1 else None)
    key = kwargs.get("key", args[2] if len(args) > 2 else None)
    key = value if key is None else key
    query, key, value = (_static(t.shape, sequence_length) for t in (query, key, value))
    return _mha_macs(
        layer,
        _size(query) // query[-1],
        _size(key) // key[-1],
        _size(value) // value[-1],
    )


def _mha_macs(layer, tq: int, tk: int, tv: int) -> int:
    """Projections (from the built kernels) at `tq` queries, `tk` keys and
    `tv` values, plus QK^T and AV."""
    heads, key_dim = layer.num_heads, layer.key_dim
    value_dim = layer.value_dim or key_dim
    projections = (
        tq * _prod(layer.query_dense.kernel.shape)  # (d_q, heads, key_dim)
        + tk * _prod(layer.key_dense.kernel.shape)  # (d_k, heads, key_dim)
        + tv * _prod(layer.value_dense.kernel.shape)  # (d_v, heads, value_dim)
        + tq * _prod(layer.output_dense.kernel.shape)  # (heads, value_dim, d)
    )
    return int(projections + heads * tq * tk * (key_dim + value_dim))


_ATTENTION_NOTE = "projections + scores + weighted sum"
_NORMALIZATION = (keras.layers.LayerNormalization, keras.layers.GroupNormalization)
_NORMALIZATION_NOTE = "scale and shift; statistics not counted"


def _normalization_macs(layer, elements: int) -> int:
    # The scale is the one multiply per element that remains.
    return elements if getattr(layer, "scale", True) else 0


def _is_embedding(layer) -> bool:
    return isinstance(layer, keras.layers.Embedding) or (
        type(layer).__name__.endswith("Embedding")
        and all(_is_embedding(sub) for sub in _sublayers(layer))
    )


def _sublayers(layer) -> list:
    """Direct sublayers of a layer (Keras keeps no public list of them)."""
    if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
        return []
    return layer._flatten_layers(include_self=False, recursive=False)


def _nested_rows(node, sequence_length: int | None) -> list | None:
    """`(name, type, macs, note)` per weighted sublayer of a layer that
    nests layers without a functional graph (module docstring), or None
    when one of them has no rule."""
    shape = _static(node.input_tensors[0].shape, sequence_length)
    if not _sublayers(node.operation) or len(shape) < 2:
        return None
    positions = _size(shape) // shape[-1]
    rows: list = []
    if not _sublayer_rows(node.operation, positions, "", rows):
        return None
    return rows


def _sublayer_rows(layer, positions: int, prefix: str, rows: list) -> bool:
    for sub in _sublayers(layer):
        name, kind = prefix + sub.name, type(sub).__name__
        if isinstance(sub, keras.layers.MultiHeadAttention):
            macs = _mha_macs(sub, positions, positions, positions)
            rows.append((name, kind, macs, _ATTENTION_NOTE + " (self-attention)"))
        elif isinstance(sub, keras.layers.Dense):
            rows.append((name, kind, positions * _prod(sub.kernel.shape), ""))
        elif isinstance(sub, _NORMALIZATION):
            # One scale per feature: the feature size is the scale's size.
            weights = [w for w in sub.weights if len(w.shape) == 1]
            features = _prod(weights[0].shape) if weights else 0
            macs = _normalization_macs(sub, positions * features)
            rows.append((name, kind, macs, _NORMALIZATION_NOTE))
        elif _is_embedding(sub) or isinstance(sub, _ZERO_MAC_WEIGHTED):
            rows.append((name, kind, 0, "embedding lookup"))
        elif isinstance(sub, ActivationQuantizer):
            rows.append((name, kind, 0, "fake quantization (int8 range)"))
        elif _sublayers(sub):
            if not _sublayer_rows(sub, positions, f"{name}/", rows):
                return False
        elif sub.weights:
            return False
    return True
