"""Keras masks in the curvature statistics: which positions of a call are real.

A padded position (`Embedding(mask_zero=True)`, `keras.layers.Masking`, a
mask passed to a layer) is one the model is meant to ignore, so it contributes
to no factor (docs/design.md §3, "Masks"). This module reads the mask of a
recorded call as Keras would hand it to the layer, and turns it into weights
over the rows a block builds its statistics from. True (or 1) is a real
position.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tf_kfac import _keras_internals as internals


def call_mask(layer, inputs, given) -> tf.Tensor | None:
    """The boolean mask of the positions of one call of `layer`, or None.

    `given` is the call's `mask` argument (Keras fills it from the input's mask
    when the layer's `call` takes one); otherwise the mask attached to the input
    tensor. A layer with `mask_zero=True` (Embedding) also masks the positions
    whose id is 0, as its own `compute_mask` does for the layers after it.
    """
    mask = given if given is not None else (
        internals.keras_mask(inputs) if tf.is_tensor(inputs) else None)
    if mask is not None:
        mask = tf.cast(mask, tf.bool)
    if getattr(layer, "mask_zero", False) is True and tf.is_tensor(inputs):
        real = tf.not_equal(inputs, tf.zeros([], inputs.dtype))
        mask = real if mask is None else tf.logical_and(mask, real)
    return mask


def attention_masks(layer, arguments: dict[str, Any]) -> dict[int, tf.Tensor]:
    """The masks of a MultiHeadAttention's projections, by projection id.

    `MultiHeadAttention.call` removes the Keras masks of its inputs before it
    projects them, so the projections cannot read them. The query, gate and
    output projections act on the query's positions (the query's mask, as the
    layer reads it); the key and value projections on the value's positions
    (the value's and the key's masks, both of which the attention applies to
    those positions). `attention_mask` and the causal mask say which pairs
    attend, not which positions are padding, and are not used.
    """
    query_mask = internals.keras_mask(arguments.get("query"))
    source = [m for m in (arguments.get("value_mask"), arguments.get("key_mask"))
              if m is not None]
    source_mask = None
    for m in source:
        m = tf.cast(m, tf.bool)
        source_mask = m if source_mask is None else tf.logical_and(source_mask, m)
    roles = {"query": query_mask, "gate": query_mask, "output": query_mask,
             "key": source_mask, "value": source_mask}
    routed = {}
    for role, projection in internals.attention_projections(layer).items():
        if roles[role] is not None:
            routed[id(projection)] = tf.cast(roles[role], tf.bool)
    return routed


def broadcast_to_input(mask: tf.Tensor, inputs: tf.Tensor, name: str) -> tf.Tensor:
    """The mask as float32 of the input's shape, its axes the input's leading axes.

    Raises:
        ValueError: when the mask has more axes than the input, or its known
            dimensions differ from the input's leading ones.
    """
    rank, input_rank = mask.shape.rank, inputs.shape.rank
    if rank is None or input_rank is None or rank > input_rank or rank < 1 or not (
            mask.shape[:rank].is_compatible_with(inputs.shape[:rank])):
        raise ValueError(
            f"The Keras mask of layer '{name}' has shape {mask.shape}, which does not "
            f"match the leading axes of its input of shape {inputs.shape}. A mask marks "
            "the examples and positions of the input (e.g. (batch, timesteps) for an "
            "input (batch, timesteps, features)); pass a mask of that shape.")
    mask = tf.cast(mask, tf.float32)
    for _ in range(input_rank - rank):
        mask = mask[..., None]
    return tf.broadcast_to(mask, tf.shape(inputs))


def check_positions_only(mask: tf.Tensor, position_axes: int, name: str) -> None:
    """Raises ValueError when the mask reaches a feature axis of the layer.

    A Kronecker block's positions are the input's leading `position_axes` axes
    (the batch included); a mask over a feature axis would mask part of one
    position's input, which no factor can express.
    """
    if mask.shape.rank is not None and mask.shape.rank > position_axes:
        raise ValueError(
            f"The Keras mask of layer '{name}' has {mask.shape.rank} axes, but the "
            f"layer's input has only {position_axes} axes of examples and positions "
            "before its features. A mask marks whole positions: give it the shape of "
            "the input's examples and positions.")


def expand_g_weights(mask: tf.Tensor | None, positions: tf.Tensor) -> tf.Tensor:
    """Weights of the rows gᵢₜ in G = (1/B) Σᵢ Σₜ weightᵢₜ gᵢₜgᵢₜᵀ ("expand").

    mᵢₜ / Tᵢ with Tᵢ = Σₜ mᵢₜ the example's real positions (an example with none
    adds nothing), or the scalar 1 / T without a mask.
    """
    if mask is None:
        return 1.0 / tf.cast(positions, tf.float32)
    real = tf.reduce_sum(mask, axis=1, keepdims=True)
    return tf.math.divide_no_nan(mask, real)


def masked_mean(rows: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
    """The mean of (examples, positions, d) rows over the real positions, keepdims.

    Without a mask, the mean over all positions. An example with no real
    position gets zeros.
    """
    if mask is None:
        return tf.reduce_mean(rows, axis=1, keepdims=True)
    total = tf.reduce_sum(rows * mask[..., None], axis=1, keepdims=True)
    return tf.math.divide_no_nan(total, tf.reduce_sum(mask, axis=1)[:, None, None])
