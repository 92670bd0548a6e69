"""The forward pass and objective of K-FAC's step, for `model.fit` and custom loops.

`fit_train_step` is `Model.train_step` for models compiled with K-FAC (installed by
`import tf_kfac`); `custom_loop_step` is what `KFAC.step` runs.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tf_kfac import _keras_internals as internals
from tf_kfac import distribute


def fit_train_step(optimizer: Any, model: keras.Model, data: Any) -> dict[str, Any]:
    """K-FAC's step with the loss, loss tracker and metrics exactly as Keras computes them."""
    optimizer.attach(model)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    forward = _training_forward(model)

    def objective(y_pred):
        return internals.compute_loss(model, x, y, y_pred, sample_weight)

    y_pred, loss, kfac_logs = optimizer._run_step(model, x, sample_weight, forward, objective)
    first_input = next(t for t in tf.nest.flatten(x) if t is not None)
    # Keras scales each replica's loss by 1/replicas; its tracker takes the
    # replica's own mean, as in Keras's train_step.
    replica_loss = loss * tf.cast(distribute.num_replicas(), loss.dtype)
    internals.update_loss_tracker(model, replica_loss, tf.shape(first_input)[0])
    logs = dict(model.compute_metrics(x, y, y_pred, sample_weight=sample_weight))
    logs.update(kfac_logs)
    return logs


def custom_loop_step(model: keras.Model, loss_fn: Any, y: Any, sample_weight: Any):
    """(forward, objective) of `KFAC.step`: `loss(y, model(x), sample_weight)` plus the
    model's regularisation losses, each replica carrying 1/replicas of them as in Keras."""
    def objective(y_pred):
        value = loss_fn(y, y_pred, sample_weight=sample_weight)
        if model.losses:
            extra = tf.add_n([tf.cast(v, value.dtype) for v in model.losses])
            value = value + extra / tf.cast(distribute.num_replicas(), value.dtype)
        return value

    return _training_forward(model), objective


def _training_forward(model: keras.Model):
    """The model's forward pass in training mode (`training=True` when `call` takes it)."""
    training_arg = internals.call_has_training_arg(model)

    def forward(inputs):
        return model(inputs, training=True) if training_arg else model(inputs)

    return forward
