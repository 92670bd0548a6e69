"""The fixed update rule: learning rate, KL-clip, clipping, momentum, weight decay.

It sees gradients and update directions only, never a factor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from tf_kfac import sparse
from tf_kfac.adaptive import inner_product


def kl_clip_scale(directions, grads, lr: tf.Tensor, bound: tf.Tensor) -> tf.Tensor:
    """ν = min(1, √(bound / (lr² Σ⟨V, ∇⟩))) (Ba, Grosse & Martens 2017)."""
    inner = inner_product(directions, grads)
    return tf.minimum(1.0, tf.sqrt(bound / tf.maximum(lr * lr * inner, 1e-30)))


def fixed_step(
    variables: Sequence[keras.Variable],
    buffers: Sequence[keras.Variable],
    grads: Sequence[tf.Tensor | None],
    directions: Sequence[tf.Tensor | None],
    *,
    lr: tf.Tensor,
    momentum: tf.Tensor,
    kl_bound: tf.Tensor | None,
    clip: Callable[[list[tf.Tensor]], list[tf.Tensor]],
    weight_decay: Callable[[keras.Variable], tf.Tensor | None],
) -> tuple[list, list, dict[str, tf.Tensor]]:
    """One step m ← momentum·m + ν·V, w ← w − lr·m (− lr·decay·w).

    Args:
        variables: the trainable variables.
        buffers: their momentum buffers.
        grads: the objective's gradients (None: no update).
        directions: the preconditioned directions V.
        lr: the learning rate.
        momentum: the heavy-ball coefficient.
        kl_bound: the KL-clip bound in the loss's units (κ·c), or None.
        clip: Keras's clipping of the directions (clipnorm and friends).
        weight_decay: the decoupled weight-decay coefficient of a variable, or None.

    Returns:
        The updates δ (added to the weights), the new momentum values, and logs.
    """
    logs = {}
    directions = list(directions)
    if kl_bound is not None:
        scale = kl_clip_scale(directions, grads, lr, kl_bound)
        directions = [None if d is None else sparse.scale(d, scale) for d in directions]
        logs["kl_scale"] = scale
    present = [i for i, d in enumerate(directions) if d is not None]
    clipped = clip([directions[i] for i in present])
    updates: list[tf.Tensor | None] = [None] * len(variables)
    new_buffers: list[tf.Tensor | None] = [None] * len(variables)
    rows_only = tf.get_static_value(momentum) == 0  # a constant 0: see tf_kfac/sparse.py
    for i, direction in zip(present, clipped, strict=True):
        variable, buffer = variables[i], buffers[i]
        if sparse.is_sparse(direction) and rows_only:
            new_buffers[i] = direction
            updates[i] = sparse.scale(direction, -lr)
            continue
        if sparse.is_sparse(direction):
            new_buffers[i] = sparse.add_rows(tf.cast(momentum, buffer.dtype) * buffer, direction)
        else:
            new_buffers[i] = tf.cast(momentum, buffer.dtype) * buffer + direction
        delta = tf.cast(lr, variable.dtype) * new_buffers[i]
        decay = weight_decay(variable)
        if decay is not None:
            delta += tf.cast(lr * decay, variable.dtype) * variable
        updates[i] = -delta
    return updates, new_buffers, logs
