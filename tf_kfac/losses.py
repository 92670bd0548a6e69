"""The predictive distributions behind Keras's losses: sampling, output Hessians, scale.

K-FAC's curvature is the Fisher (equivalently, the generalised Gauss-Newton
matrix) of the training objective. For the losses below, Keras's per-example
loss is ℓ = c · (−log p(y | z)) for a distribution p over targets given the
network's output z (logits for the cross-entropies, the prediction for MSE):

| Keras loss                          | p(y | z)                 | c                         |
|-------------------------------------|--------------------------|---------------------------|
| sparse / categorical cross-entropy  | categorical(softmax(z))  | 1 / positions             |
| binary cross-entropy                | Bernoulli(sigmoid(z))    | 1 / elements              |
| mean squared error                  | Normal(z, σ² = ½)        | 1 / elements              |

"positions" is the number of softmax vectors per example (1 for a classifier,
H·W for a per-pixel one) and "elements" the number of output entries per
example, because Keras averages over them. A loss weight from `compile` and
the `"sum"` reduction (which skips the division by the batch size) scale c
further, and so does a Keras mask on the output with the mean reductions
(`tf_kfac/loss_masks.py`), which weighs the loss's terms one by one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

SUPPORTED_LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error (mse)",
)

_CATEGORICAL = "categorical"
_BERNOULLI = "bernoulli"
_GAUSSIAN = "gaussian"

_BY_NAME = {
    "sparse_categorical_crossentropy": (_CATEGORICAL, True),
    "categorical_crossentropy": (_CATEGORICAL, False),
    "binary_crossentropy": (_BERNOULLI, False),
    "mean_squared_error": (_GAUSSIAN, False),
    "mse": (_GAUSSIAN, False),
}

_BY_CLASS = {
    keras.losses.SparseCategoricalCrossentropy: "sparse_categorical_crossentropy",
    keras.losses.CategoricalCrossentropy: "categorical_crossentropy",
    keras.losses.BinaryCrossentropy: "binary_crossentropy",
    keras.losses.MeanSquaredError: "mean_squared_error",
}

_BY_FUNCTION = {
    keras.losses.sparse_categorical_crossentropy: "sparse_categorical_crossentropy",
    keras.losses.categorical_crossentropy: "categorical_crossentropy",
    keras.losses.binary_crossentropy: "binary_crossentropy",
    keras.losses.mean_squared_error: "mean_squared_error",
}

# Probabilities are clipped as Keras's own cross-entropies clip them.
_EPSILON = 1e-7


class UnsupportedLossError(ValueError):
    """The compiled loss has no predictive distribution that tf_kfac knows."""


def unsupported_loss_message(loss: Any) -> str:
    return (
        f"K-FAC's fisher='sampled' and fisher='exact' need to know the predictive "
        f"distribution behind the loss, and tf_kfac does not know it for {loss!r}. "
        f"Supported losses: {', '.join(SUPPORTED_LOSSES)} (as strings, functions or "
        "keras.losses objects), on a model with a single output. Either compile with "
        "one of them, or use KFAC(fisher='empirical'), which builds the curvature "
        "from the gradients of your own loss and works with any loss."
    )


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What K-FAC needs to know about the compiled loss.

    Attributes:
        name: canonical Keras name of the loss.
        kind: `"categorical"`, `"bernoulli"` or `"gaussian"`.
        from_logits: whether the model's output is already logits.
        weight: factor on the per-example loss beyond c (loss weight, and the
            batch size for the `"sum"` reduction is applied by the caller).
        sum_reduction: True for `reduction="sum"`.
    """

    name: str
    kind: str
    from_logits: bool
    weight: float = 1.0
    sum_reduction: bool = False

    @property
    def output_activation(self) -> str | None:
        """The output activation this loss expects when not `from_logits`."""
        if self.from_logits or self.kind == _GAUSSIAN:
            return None
        return "softmax" if self.kind == _CATEGORICAL else "sigmoid"

    # ---------------------------------------------------------------- scale
    def elements_per_example(self, z: tf.Tensor) -> tf.Tensor:
        """How many terms Keras averages over in one example's loss."""
        shape = tf.shape(z)
        if self.kind == _CATEGORICAL:
            count = tf.reduce_prod(shape[1:-1])
        else:
            count = tf.reduce_prod(shape[1:])
        return tf.cast(count, tf.float32)

    def scale(self, z: tf.Tensor, batch_size=None) -> tf.Tensor:
        """c: per-example loss = c · (−log p), with loss weight and reduction.

        With the `"sum"` reduction Keras sums the loss over the batch and the
        output positions instead of averaging, so c carries the batch size B
        (that of `z` unless given) and the number of positions. A Keras mask on
        the output raises c further (`loss_masks.OutputWeights.ratio`).
        """
        c = self.weight / self.elements_per_example(z)
        if self.sum_reduction:
            # Keras sums the per-position losses (one per softmax vector, or per
            # entry averaged over the last axis) over the batch and positions.
            batch = tf.shape(z)[0] if batch_size is None else batch_size
            positions = tf.cast(tf.reduce_prod(tf.shape(z)[1:-1]), tf.float32)
            c = c * tf.cast(batch, tf.float32) * positions
        return c

    # ------------------------------------------------------------- logits
    def logits_from_output(self, y_pred: tf.Tensor) -> tf.Tensor:
        """Logits whose distribution equals the one of a probability output.

        Used when the model's output is probabilities produced by something
        other than a Dense/Conv2D activation. log p (softmax) and log(p/(1−p))
        (sigmoid) give the same Fisher as the true logits, because the softmax
        Hessian annihilates the constant that separates them.
        """
        if self.from_logits or self.kind == _GAUSSIAN:
            return y_pred
        p = tf.clip_by_value(tf.cast(y_pred, tf.float32), _EPSILON, 1.0 - _EPSILON)
        if self.kind == _CATEGORICAL:
            return tf.math.log(p)
        return tf.math.log(p) - tf.math.log1p(-p)

    # ---------------------------------------------------------- sampling
    def sampled_nll(self, z: tf.Tensor, seed: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """Σ √w · (−log p(ỹ | z)) with ỹ drawn from the model's distribution.

        `weights` has one weight per example (B,) or one per term of the loss
        (z's shape without its last axis, for a masked output). The gradient with
        respect to a layer's pre-activations has, in row i, √w times the gradient
        for a sampled target, so that the outer products of the rows carry the
        weights once; a term of weight 0 draws nothing.
        """
        z = tf.cast(z, tf.float32)
        if self.kind == _CATEGORICAL:
            classes = tf.shape(z)[-1]
            flat = tf.reshape(z, [-1, classes])
            # A non-finite logit would draw an out-of-range class and crash the
            # loss op; sample from finite logits instead and let the step's
            # finiteness check (the loss itself is not finite) skip the step.
            flat = tf.where(tf.math.is_finite(flat), flat, tf.zeros_like(flat))
            # XLA has a kernel only for an int32 seed; the draws are the same.
            draws = tf.random.stateless_categorical(flat, 1, seed=tf.cast(seed, tf.int32),
                                                    dtype=tf.int32)
            draws = tf.stop_gradient(tf.reshape(draws, tf.shape(z)[:-1]))
            nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=draws, logits=z)
        elif self.kind == _BERNOULLI:
            uniform = tf.random.stateless_uniform(tf.shape(z), seed=seed)
            draws = tf.stop_gradient(tf.cast(uniform < tf.sigmoid(z), tf.float32))
            nll = tf.nn.sigmoid_cross_entropy_with_logits(labels=draws, logits=z)
        else:
            noise = tf.random.stateless_normal(tf.shape(z), seed=seed)
            draws = tf.stop_gradient(z + noise * math.sqrt(0.5))
            nll = tf.square(draws - z)  # (y − z)² / (2σ²) with σ² = ½
        return tf.reduce_sum(tf.sqrt(broadcastable(weights, nll.shape.rank)) * nll)

    # ------------------------------------------------------ exact Fisher
    def hessian_sqrt_columns(self, z: tf.Tensor, weights: tf.Tensor) -> Iterator[tf.Tensor]:
        """Columns u of L (H = L Lᵀ, H the Hessian of −log p w.r.t. z), per element.

        Yields one tensor shaped like z per output element (per class and
        position for the categorical case), times √w of its example (`weights`
        of shape (B,)) or of its term (z's shape without its last axis);
        backpropagating all of them and summing outer products gives the exact
        GGN. Needs a static output shape.
        """
        z = tf.cast(z, tf.float32)
        root_w = tf.sqrt(broadcastable(weights, z.shape.rank))
        shape = z.shape[1:]
        if not shape.is_fully_defined():
            raise ValueError(
                "fisher='exact' needs a model output with a static shape; got "
                f"{z.shape}. Use fisher='sampled' for this model."
            )
        if self.kind == _CATEGORICAL:
            p = tf.nn.softmax(z)
            classes = int(shape[-1])
            positions = int(math.prod(shape[:-1]))
            flat_p = tf.reshape(p, [-1, positions, classes])
            for position in range(positions):
                mask = tf.reshape(tf.one_hot(position, positions), [1, positions, 1])
                for k in range(classes):
                    p_k = flat_p[:, position : position + 1, k : k + 1]
                    column = tf.sqrt(p_k) * (tf.one_hot(k, classes) - flat_p) * mask
                    yield tf.reshape(column, tf.shape(z)) * root_w
        else:
            if self.kind == _BERNOULLI:
                p = tf.sigmoid(z)
                diag = tf.sqrt(p * (1.0 - p))
            else:
                diag = tf.fill(tf.shape(z), math.sqrt(2.0))
            elements = int(math.prod(shape))
            flat_diag = tf.reshape(diag, [-1, elements])
            for element in range(elements):
                column = flat_diag * tf.one_hot(element, elements)
                yield tf.reshape(column, tf.shape(z)) * root_w

    def output_hessian_product(self, z: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """H v per example, H the Hessian of −log p(y | z) with respect to z."""
        z = tf.cast(z, tf.float32)
        if self.kind == _CATEGORICAL:
            p = tf.nn.softmax(z)
            return p * v - p * tf.reduce_sum(p * v, axis=-1, keepdims=True)
        if self.kind == _BERNOULLI:
            p = tf.sigmoid(z)
            return p * (1.0 - p) * v
        return 2.0 * v


def broadcastable(weights: tf.Tensor, rank: int) -> tf.Tensor:
    """Weights per example or per term of the loss, with unit axes up to `rank`."""
    weights = tf.cast(weights, tf.float32)
    extra = rank - weights.shape.rank
    return tf.reshape(weights, tf.concat([tf.shape(weights), tf.ones([extra], tf.int32)], 0))


def _canonical(loss: Any) -> tuple[str, bool, str] | None:
    """(canonical name, from_logits, reduction) for a supported loss, else None."""
    if isinstance(loss, str):
        name = loss.lower()
        return (name, False, "sum_over_batch_size") if name in _BY_NAME else None
    for cls, name in _BY_CLASS.items():
        if type(loss) is cls:
            config = loss.get_config()
            return name, bool(config.get("from_logits", False)), config.get("reduction")
    name = _BY_FUNCTION.get(loss)
    if name is not None:
        return name, False, "sum_over_batch_size"
    return None


def _single_weight(loss_weights: Any, output_names: Any, loss: Any) -> float:
    """The loss weight of a single-output model from any form Keras accepts.

    `loss_weights` may be a number, a one-element list or tuple, or a dict
    with one entry (keyed by the output's name, as Keras matches it).
    """
    if loss_weights is None:
        return 1.0
    if isinstance(loss_weights, (list, tuple)) and len(loss_weights) == 1:
        loss_weights = loss_weights[0]
    elif isinstance(loss_weights, dict):
        names = list(output_names or ())
        matching = [key for key in loss_weights if key in names]
        if len(matching) == 1:
            loss_weights = loss_weights[matching[0]]
        elif len(loss_weights) == 1:
            (loss_weights,) = loss_weights.values()
    if isinstance(loss_weights, bool) or not isinstance(loss_weights, (int, float)):
        raise UnsupportedLossError(
            f"tf_kfac reads one loss weight for a single-output model; received "
            f"loss_weights={loss_weights!r} for the loss {loss!r}. Pass a number, a "
            "one-element list or a one-entry dict."
        )
    return float(loss_weights)


def resolve_loss(loss: Any, loss_weights: Any = None, output_names: Any = None) -> LossSpec:
    """Reads a LossSpec from the loss and loss weights given to `compile`.

    Args:
        loss: the loss as given to `compile` (a name, function, `Loss`
            object, or a one-element list or dict of one).
        loss_weights: as given to `compile`: a number, a one-element list, or
            a one-entry dict keyed by the output's name.
        output_names: the model's output names, to match a dict.

    Raises:
        UnsupportedLossError: when the loss is not one that K-FAC knows the
            predictive distribution of.
    """
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, dict) and len(loss) == 1:
        (key, loss), = loss.items()
        if isinstance(loss_weights, dict) and key in loss_weights:
            loss_weights = loss_weights[key]
    weight = _single_weight(loss_weights, output_names, loss)
    canonical = _canonical(loss)
    if canonical is None:
        raise UnsupportedLossError(unsupported_loss_message(loss))
    name, from_logits, reduction = canonical
    ignored = loss.get_config().get("ignore_class") if isinstance(loss, keras.losses.Loss) else None
    if ignored is not None:
        raise UnsupportedLossError(
            f"The loss {loss!r} leaves out the terms whose target is {ignored} "
            "(ignore_class), a mask that depends on the targets, which K-FAC's "
            "fisher='sampled' and fisher='exact' never see. Use KFAC(fisher='empirical'), "
            "or mark the positions to leave out with a Keras mask on the model's output "
            "(Keras's loss applies it, and so does K-FAC).")
    if reduction not in ("sum_over_batch_size", "mean", "sum"):
        raise UnsupportedLossError(
            f"K-FAC supports the reductions 'sum_over_batch_size' (Keras's default) and "
            f"'sum'; the loss {loss!r} uses reduction={reduction!r}. Use one of those, "
            "or KFAC(fisher='empirical')."
        )
    kind, _ = _BY_NAME[name]
    return LossSpec(
        name=name,
        kind=kind,
        from_logits=from_logits,
        weight=weight,
        sum_reduction=reduction == "sum",
    )
