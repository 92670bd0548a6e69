"""Row-sparse gradients: an Embedding's `tf.IndexedSlices`, kept sparse through the step.

An Embedding's gradient is nonzero only in the rows of the ids the batch looked
up. K-FAC keeps it as `tf.IndexedSlices` with unique, summed rows from the
gradient to the update, so its block preconditions the rows seen only (never a
vocab × d × d product) and, where the update rule allows it, the weights and
the momentum buffer are written at those rows only:

- momentum 0 (a constant): m and w change only at the rows seen;
- any other momentum: heavy-ball momentum moves every row (m ← μ·m + V decays
  the rows not seen), so m and w are written whole; V stays sparse.

Everything else densifies the gradient first, because it makes the gradient or
the update dense: `l2_reg` (its ηθ term), decoupled weight decay, a variable
constraint, clipping, the adaptive mode (its quadratic model) and more than one
replica (the all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf


def is_sparse(gradient) -> bool:
    return isinstance(gradient, tf.IndexedSlices)


def dense(gradient):
    """The gradient as a dense tensor (None stays None)."""
    return tf.convert_to_tensor(gradient) if is_sparse(gradient) else gradient


def unique_rows(gradient: tf.IndexedSlices) -> tf.IndexedSlices:
    """The same gradient with each row index once (duplicate rows summed)."""
    indices, position = tf.unique(tf.cast(gradient.indices, tf.int64))
    values = tf.math.unsorted_segment_sum(gradient.values, position, tf.size(indices))
    return tf.IndexedSlices(values, indices, gradient.dense_shape)


def prepare(gradients: Sequence, keep_sparse: Sequence[bool]) -> list:
    """Each row-sparse gradient with unique rows where `keep_sparse`, else dense."""
    return [unique_rows(g) if is_sparse(g) and keep else dense(g)
            for g, keep in zip(gradients, keep_sparse, strict=True)]


def values(gradient):
    """The stored entries: a sparse gradient's rows, or the dense tensor itself."""
    return gradient.values if is_sparse(gradient) else gradient


def with_values(gradient: tf.IndexedSlices, rows: tf.Tensor) -> tf.IndexedSlices:
    """New rows at the same indices."""
    return tf.IndexedSlices(rows, gradient.indices, gradient.dense_shape)


def map_values(gradient, fn: Callable[[tf.Tensor], tf.Tensor]):
    """`fn` applied to the stored entries (elementwise `fn` only), sparse or dense."""
    return with_values(gradient, fn(gradient.values)) if is_sparse(gradient) else fn(gradient)


def scale(gradient, factor):
    """gradient · factor, sparse or dense."""
    return map_values(gradient, lambda v: v * tf.cast(factor, v.dtype))


def inner(x, y) -> tf.Tensor:
    """⟨x, y⟩ in float32. Two sparse operands must share their (unique) indices,
    as a gradient and its preconditioned direction do."""
    if is_sparse(x) and is_sparse(y):
        a, b = x.values, y.values
    elif is_sparse(x):
        a, b = x.values, tf.gather(y, x.indices)
    elif is_sparse(y):
        a, b = tf.gather(x, y.indices), y.values
    else:
        a, b = x, y
    return tf.reduce_sum(tf.cast(a, tf.float32) * tf.cast(b, tf.float32))


def add_rows(tensor: tf.Tensor, rows: tf.IndexedSlices) -> tf.Tensor:
    """tensor + rows, dense."""
    return tf.tensor_scatter_nd_add(tensor, rows.indices[:, None],
                                    tf.cast(rows.values, tensor.dtype))


def write_rows(variable, rows: tf.IndexedSlices, flag: tf.Tensor, *, add: bool) -> None:
    """Adds (`add`) or assigns `rows` to those rows of `variable`, where `flag` holds."""
    target = getattr(variable, "value", variable)  # a Keras variable's tf.Variable
    values = tf.cast(rows.values, target.dtype)
    if add:
        values = tf.where(flag, values, tf.zeros_like(values))
        target.scatter_add(tf.IndexedSlices(values, rows.indices))
    else:
        values = tf.where(flag, values, tf.gather(target, rows.indices))
        target.scatter_update(tf.IndexedSlices(values, rows.indices))
