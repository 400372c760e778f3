"""Cut a functional multi-exit graph into per-exit segments.

Segment k holds the layer calls that exit k needs and no earlier exit
needed. Its inputs are the carry of segment k-1 (for segment 1, the model
inputs); its outputs are its own carry, the exit's logits and the gate's
confidence. A carry holds every tensor computed so far that a later segment
reads, so a skip connection that crosses an exit point is handed on.

Keras masks (e.g. from `Embedding(mask_zero=True)`) ride on tensors, not
on graph edges, so a segment rebuilt on fresh `keras.Input`s would lose
them: a carried tensor that has a mask is handed on with it, as one more
carry named `<carry>_mask` (int32 0/1 for boolean masks, so that segment
inputs and outputs stay numeric), and re-attached to the tensor at the
next segment's input. An explicit padding-mask input (as keras-hub
backbones take) is an ordinary tensor and is carried like any other.

Keras has no public API for walking a functional graph; this module is the
one place that reads `_keras_history` and `_inbound_nodes`.
"""

import re
from dataclasses import dataclass, field

import keras
from keras import ops


@dataclass
class SegmentPlan:
    """Which layer calls and tensors make up one segment."""

    nodes: list = field(default_factory=list)  # keras Nodes, topological
    inputs: list = field(default_factory=list)  # KerasTensors
    carry: list = field(default_factory=list)  # KerasTensors handed on
    logits: object = None  # KerasTensor
    names: dict = field(default_factory=dict)  # id(KerasTensor) -> name
    # id(KerasTensor) -> name of the carry holding that tensor's Keras mask
    mask_names: dict = field(default_factory=dict)


def node_of(tensor):
    """The layer call that produced `tensor`."""
    operation, node_index, _ = tensor._keras_history
    return operation._inbound_nodes[node_index]


def _ancestors(tensor, stop_ids: set, seen: set, order: list):
    """Post-order DFS over the nodes that compute `tensor`."""
    stack = [(tensor, False)]
    while stack:
        t, expanded = stack.pop()
        if id(t) in stop_ids:
            continue
        node = node_of(t)
        if expanded:
            if id(node) not in seen:
                seen.add(id(node))
                order.append(node)
            continue
        if id(node) in seen:
            continue
        stack.append((t, True))
        for parent in reversed(node.input_tensors):
            stack.append((parent, False))


def nodes_between(inputs: list, outputs: list) -> list:
    """The layer calls that compute `outputs` from `inputs`, in topological
    order (input layers left out)."""
    input_ids = {id(t) for t in inputs}
    seen: set = set()
    order: list = []
    for tensor in outputs:
        _ancestors(tensor, input_ids, seen, order)
    return [node for node in order if not node.is_input]


def plan_segments(inputs: list, outputs: list) -> list[SegmentPlan]:
    """Split the graph from `inputs` to exit logits `outputs` into segments."""
    input_ids = {id(t) for t in inputs}
    seen: set = set()
    plans = []
    for logits in outputs:
        order: list = []
        _ancestors(logits, input_ids, seen, order)
        plans.append(
            SegmentPlan(nodes=[n for n in order if not n.is_input], logits=logits)
        )

    produced_before = list(inputs)  # tensors available entering segment k
    for k, plan in enumerate(plans):
        plan.inputs = list(produced_before)
        for node in plan.nodes:
            produced_before.extend(node.outputs)
        later_reads = {
            id(t)
            for later in plans[k + 1 :]
            for node in later.nodes
            for t in node.input_tensors
        }
        later_reads |= {id(p.logits) for p in plans[k + 1 :]}
        carry = [t for t in produced_before if id(t) in later_reads]
        # A mask that later layers read comes with the tensor it rides on.
        riding = [keras_mask(t) for t in carry if keras_mask(t) is not None]
        plan.carry = [t for t in carry if all(t is not m for m in riding)]
        produced_before = list(plan.carry) + [
            keras_mask(t) for t in plan.carry if keras_mask(t) is not None
        ]
    # Segment inputs are exactly what the previous segment carried.
    for k in range(1, len(plans)):
        plans[k].inputs = plans[k - 1].carry
    names = _unique_names([t for plan in plans for t in plan.inputs + plan.carry])
    carried = [t for plan in plans for t in plan.carry]
    mask_names = _mask_names(carried, names)
    if mask_names:
        _check_runtime_masks(
            [node for plan in plans for node in plan.nodes],
            [t for t in carried if id(t) in mask_names],
        )
    for plan in plans:
        plan.names = names
        plan.mask_names = mask_names
    return plans


def keras_mask(tensor):
    """The Keras mask riding on `tensor`, or None."""
    return getattr(tensor, "_keras_mask", None)


def _check_runtime_masks(nodes: list, masked_carry: list) -> None:
    """Raises where the full model's masks at run time differ from the
    graph's, so that segments (which carry the graph's masks) could not
    reproduce its logits.

    Keras' `MultiHeadAttention` removes the Keras mask from its input
    tensors when it runs (Keras 3.15); any other layer that reads such a
    tensor afterwards (a residual `Add`, a second attention) runs without
    the mask in the full model, while the graph says it has one.
    """
    readers: dict = {}
    for node in nodes:
        for t in node.input_tensors:
            readers.setdefault(id(t), set()).add(id(node))
    for node in nodes:
        if not isinstance(node.operation, keras.layers.MultiHeadAttention):
            continue
        for t in node.input_tensors:
            if keras_mask(t) is None or readers[id(t)] == {id(node)}:
                continue
            carried = ", ".join(f"'{c._keras_history[0].name}'" for c in masked_carry)
            raise ValueError(
                f"The Keras masks of {carried} would have to cross from one "
                "segment to the next, but the model's masks at run time do "
                f"not follow its graph: MultiHeadAttention "
                f"'{node.operation.name}' removes the mask from its input "
                f"'{t._keras_history[0].name}' when it runs, so the other "
                "layers reading that tensor (e.g. a residual Add) run "
                "unmasked in the full model, and segments would not match "
                "it. Pass the padding mask as an explicit model input "
                "instead: padding_mask = keras.Input((steps,), "
                "dtype='int32'), then MultiHeadAttention(...)(x, x, "
                "attention_mask=padding_mask[:, None, :]) (or keras-hub's "
                "TransformerEncoder(...)(x, padding_mask=padding_mask)) and "
                "ExitBranch(...)(x, padding_mask=padding_mask)."
            )


def _mask_names(carried: list, names: dict) -> dict:
    """Carry names for the Keras masks of carried tensors that have one."""
    used = set(RESERVED_NAMES) | set(names.values())
    mask_names: dict = {}
    for t in carried:
        if id(t) in mask_names or keras_mask(t) is None:
            continue
        mask_names[id(t)] = _fresh_name(f"{names[id(t)]}_mask", used)
    return mask_names


def _fresh_name(base: str, used: set) -> str:
    """`base`, or `base_2`, `base_3`, ... : the first not in `used` (which
    it joins)."""
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


RESERVED_NAMES = ("logits", "confidence")


def _unique_names(tensors: list) -> dict:
    """Names for carry tensors: the producing layer's name (plus the output
    index of multi-output layers), made unique, safe for TFLite signatures."""
    names: dict = {}
    used = set(RESERVED_NAMES)
    for t in tensors:
        if id(t) in names:
            continue
        operation, _, tensor_index = t._keras_history
        base = re.sub(r"[^0-9A-Za-z_]", "_", operation.name)
        if len(node_of(t).outputs) > 1:
            base += f"_{tensor_index}"
        names[id(t)] = _fresh_name(base, used)
    return names


def build_segment(plan: SegmentPlan, gate, name: str) -> keras.Model:
    """A functional model for one segment, sharing the original layers.

    Inputs are named after the carry tensors they receive; outputs are a
    dict `{carry names..., "logits": ..., "confidence": ...}`. A carried
    tensor with a Keras mask comes with its mask under
    `plan.mask_names` (module docstring).
    """
    new_inputs = {}
    tensors = {}
    for t in plan.inputs:
        input_name = plan.names[id(t)]
        new = keras.Input(shape=t.shape[1:], dtype=t.dtype, name=input_name)
        new_inputs[input_name] = new
        mask_name = plan.mask_names.get(id(t))
        if mask_name is not None:
            mask = keras_mask(t)
            carried = keras.Input(
                shape=mask.shape[1:], dtype=_carried_dtype(mask), name=mask_name
            )
            new_inputs[mask_name] = carried
            new = AttachMask(mask.dtype, name=f"{input_name}_attach_mask")(
                new, mask=carried
            )
            tensors[id(mask)] = keras_mask(new)
        tensors[id(t)] = new
    for node in plan.nodes:
        args, kwargs = node.arguments.fill_in(tensors)
        results = node.operation(*args, **kwargs)
        results = keras.tree.flatten(results)
        for old, new in zip(node.outputs, results):
            tensors[id(old)] = new
    outputs = {}
    for t in plan.carry:
        outputs[plan.names[id(t)]] = tensors[id(t)]
        mask_name = plan.mask_names.get(id(t))
        if mask_name is not None:
            # A copy without the mask: the next segment takes the mask from
            # its own input, and Keras warns when a tensor with a mask enters
            # a model.
            outputs[plan.names[id(t)]] = ops.copy(tensors[id(t)])
            mask = keras_mask(tensors[id(t)])
            if mask is None:
                raise ValueError(
                    f"Segment '{name}' lost the Keras mask of carry "
                    f"'{plan.names[id(t)]}' when rebuilt. Pass the padding "
                    "mask as an explicit model input instead (e.g. "
                    "ExitBranch(...)(x, padding_mask=mask), as keras-hub "
                    "backbones do)."
                )
            outputs[mask_name] = ops.cast(mask, _carried_dtype(mask))
    logits = tensors[id(plan.logits)]
    outputs["logits"] = logits
    outputs["confidence"] = gate(logits)
    segment = keras.Model(new_inputs, outputs, name=name)
    # Keras lists the inputs of a dict-built model by name; callers feeding
    # the model's input arrays in order need the original order.
    segment.input_order = tuple(new_inputs)
    return segment


def _carried_dtype(mask) -> str:
    dtype = keras.backend.standardize_dtype(mask.dtype)
    return "int32" if dtype == "bool" else dtype


class AttachMask(keras.layers.Layer):
    """Hands `inputs` on with `mask` (cast to `mask_dtype`) as its Keras
    mask: re-attaches a carried mask at a segment's input.

    The output is a copy (an identity in a graph), so that the mask given
    here, not one left on the incoming tensor, is the one downstream layers
    read.
    """

    def __init__(self, mask_dtype: str = "bool", **kwargs):
        super().__init__(**kwargs)
        self.mask_dtype = keras.backend.standardize_dtype(mask_dtype)

    def call(self, inputs, mask=None):
        return ops.copy(inputs)

    def compute_mask(self, inputs, mask=None):
        return None if mask is None else ops.cast(mask, self.mask_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mask_dtype": self.mask_dtype}


def max_sequence_length(model: keras.Model) -> int | None:
    """The most tokens `model` takes: the smallest `sequence_length` of its
    position embeddings (keras-hub's `PositionEmbedding`,
    `TokenAndPositionEmbedding`), or None when it has none."""
    limits = [
        layer.sequence_length
        for layer in model._flatten_layers(include_self=False)
        if type(layer).__name__.endswith("PositionEmbedding")
        and isinstance(getattr(layer, "sequence_length", None), int)
    ]
    return min(limits) if limits else None


def check_sequence_lengths(model: keras.Model, arrays: list) -> None:
    """Raises a ValueError naming the input, the length received and the
    most the model takes, when a sequence input of `model` (rank 2 or 3:
    token ids, masks, `(batch, steps, features)`) receives sequences longer
    than its fixed length or than its position embeddings cover.

    Args:
        model: the model.
        arrays: one array per input, in the order of
            `keras.tree.flatten(model.inputs)`.
    """
    for a, t in zip(arrays, keras.tree.flatten(model.inputs)):
        if len(t.shape) not in (2, 3) or getattr(a, "ndim", 0) != len(t.shape):
            continue
        steps = a.shape[1]
        if t.shape[1] is not None:
            if steps > t.shape[1]:
                raise ValueError(
                    f"Input '{t.name}' takes sequences of {t.shape[1]} steps; "
                    f"received sequences of {steps}. Truncate them (x[:, "
                    f":{t.shape[1]}]) or split them into windows of "
                    f"{t.shape[1]}; pad shorter ones up to that length "
                    "(padding_mask 0 where padded)."
                )
            continue
        # The layer walk costs about 0.5 ms a call: only variable lengths need it.
        limit = max_sequence_length(model)
        if limit is not None and steps > limit:
            raise ValueError(
                f"Input '{t.name}' received sequences of {steps} tokens; the "
                f"model takes at most {limit} (the length of its position "
                f"embeddings, max_sequence_length). Truncate them (x[:, "
                f":{limit}]) or split them into windows of at most {limit}."
            )
