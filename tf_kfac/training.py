"""The measurements of a K-FAC step: forward pass, gradients, curvature statistics.

`forward_pass` runs the model while the registered layers record their inputs
and pre-activations; `gradients_and_statistics` computes the objective's
gradients, backpropagates the Fisher estimator's output gradients to the
pre-activations and has the estimator turn them into this batch's statistics;
`step_context` is what the adaptive rule needs besides. Nothing here reads or
writes optimizer state: the optimizer (`KFAC._run_step`) calls these and
commits the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tf_kfac import capture, distribute, loss_masks
from tf_kfac.adaptive import OutputContext
from tf_kfac.estimator import CurvatureEstimator
from tf_kfac.loss_scaling import unscale
from tf_kfac.losses import LossSpec


def single_output(y_pred: Any) -> Any:
    if isinstance(y_pred, dict) and len(y_pred) == 1:
        return next(iter(y_pred.values()))
    if isinstance(y_pred, (list, tuple)) and len(y_pred) == 1:
        return y_pred[0]
    return y_pred


def _example_weights(sample_weight, batch_size) -> tf.Tensor:
    if sample_weight is None:
        return tf.ones([batch_size], tf.float32)
    weights = tf.cast(single_output(sample_weight), tf.float32)
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


@dataclasses.dataclass
class ForwardPass:
    """One forward pass under capture, with the tape that watched it."""

    tape: tf.GradientTape
    recording: capture.Recording
    y_pred: Any
    loss: tf.Tensor
    z: tf.Tensor | None  # the network output (estimators other than "empirical")
    sampled: tf.Tensor | None  # the sampled targets' NLL ("sampled")
    weights: tf.Tensor  # per-example weights (ones without sample weights)
    output: loss_masks.OutputWeights  # the weights of the loss's terms (masks)
    c: tf.Tensor  # the loss's scale on this replica's batch (1 for an unknown loss)
    batch_size: tf.Tensor  # this replica's B
    global_batch: tf.Tensor  # B across replicas
    scale: tf.Tensor | None = None  # S, the dynamic loss scale (float16 computation)
    scaled_loss: tf.Tensor | None = None  # S·h, differentiated instead of h under S


def forward_pass(layers, spec: LossSpec | None, fisher: str, seed: Callable[[], tf.Tensor],
                 x, sample_weight, forward, objective, scale=None) -> ForwardPass:
    """Runs the model under capture and a tape.

    With a loss scale S (`tf_kfac/loss_scaling.py`) the tape also records S·h
    and S times the sampled targets' NLL, whose gradients are the ones taken.
    A Keras mask on the output weighs the loss's terms and raises c
    (`tf_kfac/loss_masks.py`); it is read before the loss, so that a mask that
    K-FAC cannot follow raises its error first.
    """
    first_input = next(t for t in tf.nest.flatten(x) if t is not None)
    batch_size = tf.shape(first_input)[0]
    # The scales below are those of the global batch: each replica's statistics
    # are means over its share, averaged across replicas (distribute.py).
    global_batch = batch_size * distribute.num_replicas()
    weights = _example_weights(sample_weight, batch_size)
    with tf.GradientTape(persistent=fisher != "empirical") as tape:
        with capture.recording(layers) as recording:
            y_pred = forward(x)
        output = loss_masks.output_weights(
            spec, single_output(y_pred),
            None if sample_weight is None else single_output(sample_weight), weights)
        loss = objective(y_pred)
        z = sampled = None
        if fisher != "empirical":
            z = _network_output(spec, single_output(y_pred), recording)
            if fisher == "sampled":
                sampled = spec.sampled_nll(z, seed(), output.weights)
                if scale is not None:
                    sampled = sampled * scale
        scaled_loss = None if scale is None else loss * tf.cast(scale, loss.dtype)
    # c, the loss's scale; 1 for a loss tf_kfac does not know (fisher="empirical").
    c = (spec.scale(single_output(y_pred) if z is None else z, global_batch)
         if spec is not None else tf.constant(1.0))
    if output.ratio is not None:
        c = c * output.ratio
    return ForwardPass(tape, recording, y_pred, loss, z, sampled, weights, output, c,
                       batch_size, global_batch, scale, scaled_loss)


def gradients_and_statistics(
    step: ForwardPass, estimator: CurvatureEstimator, var_list, spec: LossSpec | None,
    fisher: str, sample_weight, statistics_due: tf.Tensor,
) -> tuple[list, list, tf.Tensor]:
    """(the objective's gradients, this batch's statistics, the loss's scale c).

    The statistics (and the estimator's extra backward pass) are computed only
    when `statistics_due`; otherwise they are zeros. Under a loss scale S, the
    gradients and the estimator's pre-activation gradients are of S·h and are
    returned divided by S, in float32. G carries this replica's c; the c
    returned (for damping, the KL bound and the fallback) is its mean over the
    replicas, which differ only when an output mask counts their real terms.
    """
    tape = step.tape
    target = step.loss if step.scale is None else step.scaled_loss
    calls = estimator.calls(step.recording)
    preacts = [[call.targets for call in block_calls] for block_calls in calls]
    flat_preacts = tf.nest.flatten(preacts)
    if fisher == "empirical":
        all_grads = tape.gradient(target, list(var_list) + flat_preacts)
        grads, loss_preact_grads = all_grads[: len(var_list)], all_grads[len(var_list):]
    else:
        grads = tape.gradient(target, var_list)
    grads = [unscale(g, step.scale) for g in grads]

    loss_scale = step.c

    def gradient_sets():
        """The estimator's per-example pre-activation gradients, and G's scale."""
        if fisher == "empirical":
            # Row i is ∂h/∂sᵢ = wᵢ·c·∂(−log p)ᵢ/∂sᵢ / B for both reductions (with
            # the "sum" reduction c carries B), so G = c·(1/B) Σ wᵢ gᵢgᵢᵀ needs the
            # rows divided by √wᵢ (rows of weight 0 stay 0) and the scale B²/c.
            rows = [unscale(g, step.scale) for g in loss_preact_grads]
            if sample_weight is not None:
                rows = [_per_example(g, tf.sqrt(step.weights)) for g in rows]
            batch = tf.cast(step.global_batch, tf.float32)
            return [rows], batch * batch / loss_scale
        if fisher == "sampled":
            rows = tape.gradient(step.sampled, flat_preacts)
            return [[unscale(g, step.scale) for g in rows]], loss_scale
        columns = spec.hessian_sqrt_columns(step.z, step.output.weights)
        if step.scale is not None:
            columns = [u * tf.cast(step.scale, u.dtype) for u in columns]
        return ([[unscale(g, step.scale)
                  for g in tape.gradient(step.z, flat_preacts, output_gradients=u)]
                 for u in columns], loss_scale)

    def batch_statistics():
        sets, g_scale = gradient_sets()
        sets = [tf.nest.pack_sequence_as(preacts, list(s)) for s in sets]
        return estimator.batch_statistics(
            calls, sets, step.batch_size, g_scale,
            None if sample_weight is None else step.weights)

    if estimator.curvature_blocks:
        statistics = tf.cond(statistics_due, batch_statistics, estimator.zero_statistics)
    else:
        statistics = []
    if step.output.ratio is not None:
        (loss_scale,) = distribute.all_reduce("mean", [loss_scale])
    return list(grads), statistics, loss_scale


@dataclasses.dataclass
class StepContext:
    """What the adaptive mode needs beyond gradients and statistics.

    Attributes:
        output: the quadratic model's view of the network (on a subset of the
            batch).
        objective_at: maps one update per trainable variable (or None) to the
            objective h(θ + δ) on the same batch, without changing any state.
    """

    output: OutputContext
    objective_at: Callable


def step_context(spec: LossSpec, layers, fraction: float, variables, x, weights, global_batch,
                 forward, objective, scale=None) -> StepContext:
    """The quadratic model's view of this batch.

    `weights` are the loss's weights per example or per term
    (`ForwardPass.output.weights`) and `scale` this replica's c (by default the
    spec's c of the network output).
    """
    local_batch = tf.shape(weights)[0]
    count = tf.cast(tf.math.ceil(fraction * tf.cast(local_batch, tf.float32)), tf.int32)
    count = tf.maximum(count, 1)

    def network_output(inputs):
        with capture.recording(layers, unrolled=True) as recording:
            y_pred = forward(inputs)
        return _network_output(spec, single_output(y_pred), recording)

    def objective_at(updates):
        mapping = [(v, v + u) for v, u in zip(variables, updates, strict=True) if u is not None]
        with keras.StatelessScope(state_mapping=mapping):
            return objective(forward(x))

    output = OutputContext(
        network_output=network_output,
        inputs=tf.nest.map_structure(lambda t: t[:count], x),
        example_weights=weights[:count],
        spec=spec,
        batch_size=global_batch,
        scale=scale,
    )
    return StepContext(output=output, objective_at=objective_at)


def _per_example(rows: tf.Tensor, root_weights: tf.Tensor) -> tf.Tensor:
    """A (B, ...) tensor divided by √w per example, 0 where w = 0."""
    shape = [-1] + [1] * (rows.shape.rank - 1)
    return tf.math.divide_no_nan(rows, tf.cast(tf.reshape(root_weights, shape), rows.dtype))
