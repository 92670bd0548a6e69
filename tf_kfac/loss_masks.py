"""The loss side of Keras masks: how a masked loss weighs the model's outputs.

When the model's output carries a Keras mask (a per-position output after
`Embedding(mask_zero=True)` or `keras.layers.Masking`, for instance), Keras's
loss merges it into the sample weights: a padded output weighs 0, and with the
mean reductions (`"sum_over_batch_size"`, `"mean"`) the loss is divided by the
number of real outputs of the batch instead of all of them. The estimators then
draw, and take output-Hessian columns, with these weights, and the loss's scale
c is raised by the same ratio (docs/design.md §3, "Masks"). Without an output
mask nothing changes: the weights are the per-example sample weights.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tf_kfac import _keras_internals as internals


@dataclasses.dataclass(frozen=True)
class OutputWeights:
    """How the loss weighs the terms of one batch.

    Attributes:
        weights: without an output mask, one weight per example (the sample
            weights, or ones). With one, one weight per term of the loss (the
            output's shape without its last axis): the sample weight times the
            mask, as Keras multiplies them.
        ratio: with an output mask and a mean reduction, the number of terms
            over the number of real ones (Keras's rescaling of the masked
            weights), by which c grows; otherwise None.
    """

    weights: tf.Tensor
    ratio: tf.Tensor | None = None


def output_weights(spec, y_pred, sample_weight, example_weights: tf.Tensor) -> OutputWeights:
    """The weights of the loss's terms for the output `y_pred`.

    Args:
        spec: the loss's `LossSpec`, or None for a loss tf_kfac does not know
            (its own handling of masks is then left to it).
        y_pred: the model's (single) output, as the loss receives it.
        sample_weight: the sample weights of that output, or None.
        example_weights: the per-example weights (B,) used without a mask.

    Raises:
        ValueError: when the output's mask does not have the loss's shape, or
            when sample weights of shape (batch,) meet a mask over positions,
            which Keras multiplies along the wrong axis.
    """
    mask = internals.keras_mask(y_pred) if spec is not None and tf.is_tensor(y_pred) else None
    if mask is None:
        return OutputWeights(example_weights)
    _check_mask(mask, y_pred)
    real = tf.cast(mask, tf.float32)
    weights = real if sample_weight is None else _weighted(tf.cast(sample_weight, tf.float32),
                                                           real)
    if spec.sum_reduction:
        return OutputWeights(weights)
    # Keras gives each real term the weight total / valid (0 when no term is real:
    # the loss is then 0, and so is every G; c keeps its unmasked value).
    valid = tf.reduce_sum(real)
    total = tf.cast(tf.size(real), tf.float32)
    return OutputWeights(weights, tf.where(valid > 0.0, total / tf.maximum(valid, 1.0), 1.0))


def _check_mask(mask: tf.Tensor, y_pred: tf.Tensor) -> None:
    rank, output_rank = mask.shape.rank, y_pred.shape.rank
    if rank is None or output_rank is None or rank != output_rank - 1 or not (
            mask.shape.is_compatible_with(y_pred.shape[:-1])):
        raise ValueError(
            f"The model's output of shape {y_pred.shape} carries a Keras mask of shape "
            f"{mask.shape}. Keras's loss has one term per output position, and K-FAC "
            "weighs these terms by a mask of the output's shape without its last axis "
            "(e.g. (batch, timesteps) for an output (batch, timesteps, classes)). Give "
            "the output a mask of that shape, or end the model with a layer that drops "
            "the mask (its compute_mask returning None).")


def _weighted(sample_weight: tf.Tensor, real: tf.Tensor) -> tf.Tensor:
    """The sample weights times the mask, with the shapes Keras multiplies them in."""
    rank, mask_rank = sample_weight.shape.rank, real.shape.rank
    if rank == mask_rank + 1 and sample_weight.shape[-1] == 1:
        sample_weight = sample_weight[..., 0]  # Keras drops a last axis of size 1
        rank = mask_rank
    if rank not in (0, mask_rank):
        raise ValueError(
            f"The model's output carries a Keras mask of shape {real.shape}, and the "
            f"sample weights have shape {sample_weight.shape}. Keras's loss multiplies "
            "them along the last axis, which fails (or, when the batch size equals the "
            "number of positions, gives example i's weight to position i). Pass sample "
            "weights of shape (batch, 1) for one weight per example, or of the mask's "
            "shape for one weight per position.")
    return tf.broadcast_to(sample_weight * real, tf.shape(real))
