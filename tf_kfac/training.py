"""The K-FAC training step: forward, gradients, curvature statistics.

One function, `curvature_step`, serves `model.fit` (through
`fit_train_step`) and custom training loops (through `KFAC.step`). It runs
the forward pass while the registered layers record their inputs and
pre-activations, computes the objective's gradients, backpropagates the
Fisher estimator's output gradients to the pre-activations, and hands the
gradients and this batch's factors to the optimizer's update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from tf_kfac import _keras_internals as internals
from tf_kfac import capture, distribute
from tf_kfac.adaptive import OutputContext
from tf_kfac.blocks import KroneckerBlock

if TYPE_CHECKING:  # pragma: no cover
    from tf_kfac.optimizer import KFAC


def _single_output(y_pred: Any) -> Any:
    if isinstance(y_pred, dict) and len(y_pred) == 1:
        return next(iter(y_pred.values()))
    if isinstance(y_pred, (list, tuple)) and len(y_pred) == 1:
        return y_pred[0]
    return y_pred


def _example_weights(sample_weight, batch_size) -> tf.Tensor:
    if sample_weight is None:
        return tf.ones([batch_size], tf.float32)
    weights = tf.cast(_single_output(sample_weight), tf.float32)
    if weights.shape.rank is not None and weights.shape.rank > 1:
        weights = tf.reduce_mean(tf.reshape(weights, [batch_size, -1]), axis=1)
    return tf.broadcast_to(tf.reshape(weights, [-1]), [batch_size])


def _network_output(spec, y_pred, recording: capture.Recording) -> tf.Tensor:
    """z: the tensor whose distribution the loss describes (logits for CE).

    When the output is a probability produced by a registered layer's softmax
    or sigmoid, its pre-activation is the logits; other probability outputs go
    through `LossSpec.logits_from_output`.
    """
    wanted = spec.output_activation
    if wanted is None:
        return tf.cast(y_pred, tf.float32)
    produced = recording.layer_producing(y_pred)
    if produced is not None:
        _, call = produced
        if call.activation_name == wanted:
            return tf.cast(call.preactivation, tf.float32)
    return spec.logits_from_output(y_pred)


def curvature_step(
    optimizer: KFAC,
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any,
    forward: Callable[[Any], Any],
    objective: Callable[[Any], tf.Tensor],
) -> tuple[Any, tf.Tensor, dict[str, tf.Tensor]]:
    """One K-FAC step. Returns (y_pred, loss, K-FAC scalars for the logs)."""
    spec = optimizer._loss_spec
    fisher = optimizer.fisher
    layers = optimizer._candidate_layers
    first_input = next(t for t in tf.nest.flatten(x) if t is not None)
    batch_size = tf.shape(first_input)[0]
    # The scales below are those of the global batch: each replica's statistics
    # are means over its share, averaged across replicas (distribute.py).
    global_batch = batch_size * distribute.num_replicas()
    weights = _example_weights(sample_weight, batch_size)

    with tf.GradientTape(persistent=fisher != "empirical") as tape:
        with capture.recording(layers) as recording:
            y_pred = forward(x)
        loss = objective(y_pred)
        z = sampled = None
        if fisher != "empirical":
            z = _network_output(spec, _single_output(y_pred), recording)
            if fisher == "sampled":
                sampled = spec.sampled_nll(z, optimizer._sampling_seed(), weights)

    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    var_list = optimizer._trainable_variables
    if [id(v) for v in model.trainable_variables] != [id(v) for v in var_list]:
        raise ValueError(
            "The model's trainable variables changed after KFAC was built for it (a layer "
            "was frozen, unfrozen or added). Create a new KFAC optimizer and compile the "
            "model again."
        )
    kron_blocks = [b for b in optimizer._blocks if isinstance(b, KroneckerBlock)]
    calls = {id(b): recording.of(b.layer) for b in kron_blocks}
    missing = [b.name for b in kron_blocks if not calls[id(b)]]
    if missing:
        raise ValueError(
            f"K-FAC registered the layers {missing}, but the training forward pass did "
            "not call them, so their curvature cannot be measured. Remove the unused "
            "layers from the model, or freeze them (layer.trainable = False) before "
            "compiling."
        )
    preacts = [c.preactivation for b in kron_blocks for c in calls[id(b)]]

    if fisher == "empirical":
        all_grads = tape.gradient(loss, list(var_list) + preacts)
        grads, loss_preact_grads = all_grads[: len(var_list)], all_grads[len(var_list) :]
    else:
        grads = tape.gradient(loss, var_list)

    # c, the loss's scale; 1 for a loss tf_kfac does not know (fisher="empirical").
    loss_scale = (spec.scale(_single_output(y_pred) if z is None else z, global_batch)
                  if spec is not None else tf.constant(1.0))

    def preactivation_gradient_sets():
        """Per-example output-gradient rows of the estimator, and G's scale."""
        if fisher == "empirical":
            # Row i is ∂h/∂sᵢ = wᵢ·c·∂(−log p)ᵢ/∂sᵢ / B for both reductions (with
            # the "sum" reduction c carries B), so G = c·(1/B) Σ wᵢ gᵢgᵢᵀ needs the
            # rows divided by √wᵢ (rows of weight 0 stay 0) and the scale B²/c.
            rows = loss_preact_grads
            if sample_weight is not None:
                rows = [_per_example(g, tf.sqrt(weights)) for g in rows]
            batch = tf.cast(global_batch, tf.float32)
            return [rows], batch * batch / loss_scale
        if fisher == "sampled":
            return [tape.gradient(sampled, preacts)], loss_scale
        columns = spec.hessian_sqrt_columns(z, weights)
        return [tape.gradient(z, preacts, output_gradients=u) for u in columns], loss_scale

    def batch_statistics():
        grad_sets, g_scale = preactivation_gradient_sets()
        flat = []
        for block in kron_blocks:
            block_calls = calls[id(block)]
            flat.append(block.input_factor(
                block_calls, batch_size, None if sample_weight is None else weights))
            flat.append(tf.add_n([
                block.output_factor(_grads_of(block_calls, preacts, grads_), batch_size, g_scale)
                for grads_ in grad_sets
            ]))
        return flat

    def no_statistics():
        return [tf.zeros(v.shape, tf.float32) for b in kron_blocks for v in b.state[:2]]

    # The statistics (and the estimator's extra backward pass) run only on the
    # steps that update the factors.
    flat = tf.cond(optimizer._factor_update_due(), batch_statistics, no_statistics)
    batch_factors = {id(b): (flat[2 * i], flat[2 * i + 1]) for i, b in enumerate(kron_blocks)}

    context = None
    if optimizer.adaptive:
        context = _step_context(optimizer, x, weights, global_batch, forward, objective)
    logs = optimizer._apply_kfac_update(grads, loss, batch_factors, context, loss_scale)
    return y_pred, loss, logs


@dataclasses.dataclass
class StepContext:
    """What the adaptive mode needs beyond gradients and factors.

    Attributes:
        output: the quadratic model's view of the network (on a subset of the
            batch).
        objective_at: maps one update per trainable variable (or None) to the
            objective h(θ + δ) on the same batch, without changing any state.
    """

    output: OutputContext
    objective_at: Callable


def _step_context(optimizer, x, weights, global_batch, forward, objective) -> StepContext:
    spec = optimizer._loss_spec
    layers = optimizer._candidate_layers
    fraction = optimizer.quadratic_model_fraction
    local_batch = tf.shape(weights)[0]
    count = tf.cast(tf.math.ceil(fraction * tf.cast(local_batch, tf.float32)), tf.int32)
    count = tf.maximum(count, 1)

    def network_output(inputs):
        with capture.recording(layers) as recording:
            y_pred = forward(inputs)
        return _network_output(spec, _single_output(y_pred), recording)

    def objective_at(updates):
        variables = optimizer._trainable_variables
        mapping = [(v, v + u) for v, u in zip(variables, updates, strict=True) if u is not None]
        with keras.StatelessScope(state_mapping=mapping):
            return objective(forward(x))

    output = OutputContext(
        network_output=network_output,
        inputs=tf.nest.map_structure(lambda t: t[:count], x),
        example_weights=weights[:count],
        spec=spec,
        batch_size=global_batch,
    )
    return StepContext(output=output, objective_at=objective_at)


def _per_example(rows: tf.Tensor, root_weights: tf.Tensor) -> tf.Tensor:
    """A (B, ...) tensor divided by √w per example, 0 where w = 0."""
    shape = [-1] + [1] * (rows.shape.rank - 1)
    return tf.math.divide_no_nan(rows, tf.cast(tf.reshape(root_weights, shape), rows.dtype))


def _grads_of(block_calls, preacts, grad_set):
    """The gradients in `grad_set` that belong to `block_calls` (by identity)."""
    by_id = {id(p): g for p, g in zip(preacts, grad_set, strict=True)}
    return [by_id[id(call.preactivation)] for call in block_calls]


def fit_train_step(optimizer: KFAC, model: keras.Model, data: Any) -> dict[str, Any]:
    """`Model.train_step` for models compiled with K-FAC (used by `model.fit`)."""
    optimizer.attach(model)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    training_arg = internals.call_has_training_arg(model)

    def forward(inputs):
        return model(inputs, training=True) if training_arg else model(inputs)

    def objective(y_pred):
        return internals.compute_loss(model, x, y, y_pred, sample_weight)

    y_pred, loss, kfac_logs = curvature_step(
        optimizer, model, x, y, sample_weight, forward, objective
    )
    first_input = next(t for t in tf.nest.flatten(x) if t is not None)
    # Keras scales each replica's loss by 1/replicas; its tracker takes the
    # replica's own mean, as in Keras's train_step.
    replica_loss = loss * tf.cast(distribute.num_replicas(), loss.dtype)
    internals.update_loss_tracker(model, replica_loss, tf.shape(first_input)[0])
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    logs = dict(logs)
    logs.update(kfac_logs)
    return logs
