"""`attach_exits`: turn an existing classifier into an `EarlyExitModel`."""

from collections.abc import Sequence

import keras

from keras_earlyexit.layers import ExitBranch
from keras_earlyexit.models import EarlyExitModel


def attach_exits(
    backbone: keras.Model,
    exit_layers: Sequence[str],
    num_classes: int,
    final: str = "auto",
    exit_kwargs: dict | None = None,
    **model_kwargs,
) -> EarlyExitModel:
    """Adds exits after named layers of a functional or Sequential model.

    The new model shares the backbone's layers and weights. Exits are
    ordered by depth whatever the order of `exit_layers`. A layer whose
    output also feeds a skip connection is fine: the segments carry it.

    Token sequences: an exit on a `(batch, steps, channels)` output pools
    only the valid tokens. The padding mask is the backbone's `padding_mask`
    input where it has one (keras-hub backbones such as `BertBackbone`;
    their dict inputs become the model's inputs and the segments carry the
    mask with the hidden states), else the Keras mask riding on the output
    (e.g. from `Embedding(mask_zero=True)`). Pooling stays the masked
    average by default: it needs no `[CLS]` token (causal and from-scratch
    encoders have none, or one that has not yet learned to summarize at
    shallow depths); pass `exit_kwargs={"pooling": "first"}` to read the
    `[CLS]` token as DeeBERT and PABEE do with pretrained BERT. A backbone
    with dict outputs (keras-hub: `sequence_output`, `pooled_output`) gets
    a new final exit on its `sequence_output`.

    Args:
        backbone: a built functional or Sequential `keras.Model`.
        exit_layers: names of the layers after which an exit is attached.
        num_classes: classes of every exit.
        final: `"auto"` keeps the backbone's own classifier when its output
            is `(batch, num_classes)` (a trailing softmax is replaced by its
            logits) and otherwise adds a final `ExitBranch`; `"backbone"`
            requires the backbone's classifier; `"new"` always adds a final
            `ExitBranch` on the backbone's output (its `sequence_output`
            for dict outputs that have one).
        exit_kwargs: keyword arguments for every `ExitBranch` (e.g.
            `{"pooled_size": 2, "hidden_units": 64}`).
        **model_kwargs: passed to `EarlyExitModel` (e.g. `criterion`).

    Returns:
        An `EarlyExitModel` with `len(exit_layers) + 1` exits.

    Example:

    ```python
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), weights=None, classes=10)
    model = attach_exits(backbone, ["block_3_project_BN", "block_9_add"], 10)

    encoder = keras_hub.models.BertBackbone(
        vocabulary_size=100, num_layers=4, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16)
    model = attach_exits(
        encoder, ["transformer_layer_1", "transformer_layer_2"], 2)
    model.fit({"token_ids": ..., "segment_ids": ..., "padding_mask": ...}, y)
    ```
    """
    if final not in ("auto", "backbone", "new"):
        raise ValueError(
            f"final must be 'auto', 'backbone' or 'new'. Received: {final!r}"
        )
    if isinstance(exit_layers, str):
        exit_layers = [exit_layers]
    if not exit_layers:
        raise ValueError(
            "exit_layers is empty: name at least one layer of the backbone "
            "after which an exit goes."
        )
    try:
        inputs, outputs = backbone.inputs, backbone.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if inputs and isinstance(_input_structure(backbone), dict):
        inputs = backbone.input  # named inputs, as keras-hub backbones take
    if not inputs or not outputs:
        raise ValueError(
            f"Backbone '{backbone.name}' has no graph to attach exits to. "
            "Use a functional model or a Sequential model built with an "
            "Input (keras.Input or input_shape)."
        )
    depth = {layer.name: i for i, layer in enumerate(backbone.layers)}
    missing = [name for name in exit_layers if name not in depth]
    if missing:
        nearby = [layer.name for layer in backbone.layers][:12]
        raise ValueError(
            f"Layers {missing} are not in backbone '{backbone.name}'. Use names "
            f"from backbone.layers, e.g. {nearby}... (print "
            "[l.name for l in backbone.layers] for all). Layers nested inside "
            "a sub-model cannot be used; flatten the backbone first."
        )
    ordered = sorted(set(exit_layers), key=depth.get)
    exit_kwargs = dict(exit_kwargs or {})
    padding_mask = _padding_mask_input(inputs)

    def branch(name: str, features):
        layer = ExitBranch(num_classes, name=name, **exit_kwargs)
        if padding_mask is not None and len(features.shape) == 3:
            return layer(features, padding_mask=padding_mask)
        return layer(features)

    exits = []
    for k, name in enumerate(ordered):
        features = backbone.get_layer(name).output
        if not isinstance(features, keras.KerasTensor):
            raise ValueError(
                f"Layer '{name}' of backbone '{backbone.name}' has "
                f"{len(keras.tree.flatten(features))} outputs; an exit needs "
                "a layer with one output. Name the layer that follows it."
            )
        exits.append(branch(f"exit_{k + 1}", features))
    head = outputs[0] if len(outputs) == 1 else None
    is_classifier = head is not None and tuple(head.shape[1:]) == (num_classes,)
    if final == "backbone" and not is_classifier:
        raise ValueError(
            f"final='backbone' needs a backbone output of shape (batch, "
            f"{num_classes}); received outputs of shapes "
            f"{[tuple(t.shape) for t in outputs]}. Use final='new'."
        )
    if is_classifier and final != "new":
        exits.append(_logits_of(head))
    else:
        features = outputs[0]
        if isinstance(backbone.output, dict):
            features = backbone.output.get("sequence_output", features)
        exits.append(branch("final", features))
    return EarlyExitModel(inputs, exits, **model_kwargs)


def _input_structure(backbone):
    """`backbone.input` (the inputs' dict, list or tensor), or None where
    Keras keeps none (a Sequential model)."""
    try:
        return backbone.input
    except (AttributeError, ValueError):
        return None


def _padding_mask_input(inputs):
    """The backbone's `padding_mask` input (keras-hub's name), or None."""
    if isinstance(inputs, dict):
        return inputs.get("padding_mask")
    for t in keras.tree.flatten(inputs):
        if t.name == "padding_mask":
            return t
    return None


def _logits_of(head):
    """The logits behind a classifier output that may end in a softmax."""
    layer = head._keras_history[0]
    if isinstance(layer, keras.layers.Softmax) or (
        isinstance(layer, keras.layers.Activation)
        and getattr(layer.activation, "__name__", "") == "softmax"
    ):
        return layer.input
    activation = getattr(layer, "activation", None)
    if (
        isinstance(layer, keras.layers.Dense)
        and getattr(activation, "__name__", "") == "softmax"
    ):
        # No pre-softmax tensor exists: a linear copy of the classifier.
        config = layer.get_config()
        config.update(name=f"{layer.name}_logits", activation=None)
        logits_layer = keras.layers.Dense.from_config(config)
        logits = logits_layer(layer.input)
        logits_layer.set_weights(layer.get_weights())
        return logits
    return head
