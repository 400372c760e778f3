"""Cut a functional multi-exit graph into per-exit segments.

Segment k holds the layer calls that exit k needs and no earlier exit
needed. Its inputs are the carry of segment k-1 (for segment 1, the model
inputs); its outputs are its own carry, the exit's logits and the gate's
confidence. A carry holds every tensor computed so far that a later segment
reads, so a skip connection that crosses an exit point is handed on.

Keras has no public API for walking a functional graph; this module is the
one place that reads `_keras_history` and `_inbound_nodes`.
"""

import re
from dataclasses import dataclass, field

import keras


@dataclass
class SegmentPlan:
    """Which layer calls and tensors make up one segment."""

    nodes: list = field(default_factory=list)  # keras Nodes, topological
    inputs: list = field(default_factory=list)  # KerasTensors
    carry: list = field(default_factory=list)  # KerasTensors handed on
    logits: object = None  # KerasTensor
    names: dict = field(default_factory=dict)  # id(KerasTensor) -> name


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
        plan.carry = [t for t in produced_before if id(t) in later_reads]
        produced_before = list(plan.carry)
    # Segment inputs are exactly what the previous segment carried.
    for k in range(1, len(plans)):
        plans[k].inputs = plans[k - 1].carry
    names = _unique_names([t for plan in plans for t in plan.inputs + plan.carry])
    for plan in plans:
        plan.names = names
    return plans


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
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        names[id(t)] = name
    return names


def build_segment(plan: SegmentPlan, gate, name: str) -> keras.Model:
    """A functional model for one segment, sharing the original layers.

    Inputs are named after the carry tensors they receive; outputs are a
    dict `{carry names..., "logits": ..., "confidence": ...}`.
    """
    new_inputs = {}
    tensors = {}
    for t in plan.inputs:
        input_name = plan.names[id(t)]
        new = keras.Input(shape=t.shape[1:], dtype=t.dtype, name=input_name)
        new_inputs[input_name] = new
        tensors[id(t)] = new
    for node in plan.nodes:
        args, kwargs = node.arguments.fill_in(tensors)
        results = node.operation(*args, **kwargs)
        results = keras.tree.flatten(results)
        for old, new in zip(node.outputs, results):
            tensors[id(old)] = new
    outputs = {plan.names[id(t)]: tensors[id(t)] for t in plan.carry}
    logits = tensors[id(plan.logits)]
    outputs["logits"] = logits
    outputs["confidence"] = gate(logits)
    return keras.Model(new_inputs, outputs, name=name)
