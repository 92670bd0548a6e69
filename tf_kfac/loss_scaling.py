"""Float16 computation: K-FAC's step inside Keras's `LossScaleOptimizer`.

Under the `mixed_float16` policy `model.compile` wraps the optimizer in a
`keras.optimizers.LossScaleOptimizer`, whose `apply` K-FAC never reaches (its
own step computes the gradients). K-FAC's step therefore does the wrapper's
work itself, in the wrapper's variables:

- the objective, and the Fisher estimator's backward passes (the sampled
  targets' NLL, the exact estimator's output gradients), are multiplied by
  the wrapper's current scale S before they are differentiated, so the
  float16 gradients inside the network do not underflow;
- the weight gradients and the estimator's pre-activation gradients are cast
  to float32 and divided by S (exact for the powers of two the dynamic scale
  takes), so the factors, inverses and preconditioning never see S;
- the step overflowed when a gradient or a batch statistic is not finite;
  it then writes nothing of K-FAC's (weights, momentum, factors, inverses,
  `iterations`, the factor and inverse counters, `skipped_steps`), like the
  wrapper, which does not call its inner optimizer on such a step;
- the scale then changes exactly as Keras changes it: halved (and the counter
  reset) after an overflow, doubled (and the counter reset) after
  `dynamic_growth_steps` steps without one.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tf_kfac import _keras_internals as internals
from tf_kfac import distribute, sparse
from tf_kfac.linalg import all_finite


def wrapper_of(model: keras.Model, optimizer: Any) -> keras.optimizers.LossScaleOptimizer | None:
    """The `LossScaleOptimizer` the model is compiled with, when it wraps `optimizer`."""
    wrapper = getattr(model, "optimizer", None)
    if (isinstance(wrapper, keras.optimizers.LossScaleOptimizer)
            and internals.unwrap_optimizer(wrapper) is optimizer):
        return wrapper
    return None


class LossScaling:
    """One K-FAC step's view of the model's `LossScaleOptimizer`.

    Args:
        wrapper: the `keras.optimizers.LossScaleOptimizer` around the KFAC
            optimizer that runs the step.

    Raises:
        ValueError: under a distribution strategy with more than one replica.
    """

    def __init__(self, wrapper: keras.optimizers.LossScaleOptimizer):
        if distribute.num_replicas() > 1:
            raise ValueError(
                "KFAC with loss scaling (a keras.optimizers.LossScaleOptimizer, which "
                "compile adds under the 'mixed_float16' policy) runs on one replica only "
                "for now. Train on one device, or use the 'mixed_bfloat16' policy, which "
                "needs no loss scaling, under the distribution strategy.")
        self.wrapper = wrapper
        self.initial_scale, self.growth_steps = internals.loss_scale_settings(wrapper)

    @classmethod
    def for_step(cls, model: keras.Model, optimizer: Any) -> LossScaling | None:
        """The loss scaling of `optimizer`'s step on `model`, None without a wrapper."""
        wrapper = wrapper_of(model, optimizer)
        return None if wrapper is None else cls(wrapper)

    @property
    def scale(self) -> tf.Tensor:
        """S, the float32 factor the objective is multiplied by on this step."""
        if not self.wrapper.built:  # the value the variable starts from
            return tf.constant(self.initial_scale, tf.float32)
        return tf.convert_to_tensor(internals.loss_scale_variables(self.wrapper)[1])

    def build(self, var_list) -> None:
        """Creates the wrapper's variables (its inner K-FAC optimizer is built)."""
        if not self.wrapper.built:
            self.wrapper.build(var_list)
            self.wrapper.built = True

    @staticmethod
    def overflowed(grads, statistics) -> tf.Tensor:
        """True when a (unscaled) gradient or batch statistic is not finite."""
        values = [sparse.values(g) for g in grads if g is not None]
        return tf.logical_not(all_finite(values + tf.nest.flatten(statistics)))

    def update(self, overflow: tf.Tensor) -> dict[str, tf.Tensor]:
        """Moves the dynamic scale as Keras does; returns `{"dynamic_scale": S'}`."""
        counter, scale = internals.loss_scale_variables(self.wrapper)
        count = tf.convert_to_tensor(counter)
        old = tf.convert_to_tensor(scale)
        grow = tf.logical_and(tf.logical_not(overflow),
                              tf.equal(count, tf.cast(self.growth_steps - 1, count.dtype)))
        reset = tf.logical_or(overflow, grow)
        new_scale = tf.where(overflow, old * 0.5, tf.where(grow, old * 2.0, old))
        counter.assign(tf.where(reset, tf.zeros_like(count), count + 1))
        scale.assign(new_scale)
        return {"dynamic_scale": new_scale}


def unscale(gradient, scale: tf.Tensor | None):
    """A gradient of the scaled objective, in float32 and divided by S (None: as is)."""
    if gradient is None or scale is None:
        return gradient
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(unscale(gradient.values, scale), gradient.indices,
                                gradient.dense_shape)
    if gradient.dtype == tf.float16:
        gradient = tf.cast(gradient, tf.float32)
    return gradient / tf.cast(scale, gradient.dtype)
