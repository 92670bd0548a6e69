"""One K-FAC update, committed in one masked write.

`apply_update` turns one batch's gradients and statistics into new moving
averages, refreshed values, momentum and weights: the estimator supplies the
statistics, refreshes and directions, a rule (`rules.fixed_step` or
`AdaptiveRule`) the update, and a step with any non-finite input or result
changes nothing but the step counters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tf_kfac import distribute, rules, sparse
from tf_kfac.adaptive_rule import AdaptiveRule
from tf_kfac.estimator import CurvatureEstimator
from tf_kfac.linalg import all_finite


@dataclasses.dataclass
class KFACState:
    """The optimizer variables K-FAC keeps besides the blocks' and the weights'."""

    damping: keras.Variable
    skipped_steps: keras.Variable
    factor_updates: keras.Variable
    inverse_updates: keras.Variable
    gamma: keras.Variable  # γ relative to √c
    alpha: keras.Variable
    mu: keras.Variable
    rho: keras.Variable
    model_change: keras.Variable
    seed: keras.Variable  # the sampling seed, so a tf.train.Checkpoint carries it
    momentums: list[keras.Variable]

    @classmethod
    def create(cls, optimizer, var_list, initial_damping: float, l2_reg: float,
               seed: int) -> KFACState:
        """Adds the variables to `optimizer`, in the order saved files expect."""
        def scalar(name, dtype="float32", value=0.0):
            init = keras.initializers.Constant(value)
            return optimizer.add_variable((), initializer=init, dtype=dtype, name=name)

        return cls(
            damping=scalar("kfac_damping", value=initial_damping),
            skipped_steps=scalar("kfac_skipped_steps", "int64", 0),
            factor_updates=scalar("kfac_factor_updates", "int64", 0),
            inverse_updates=scalar("kfac_inverse_updates", "int64", 0),
            # The paper's adaptive quantities (§6–7); constant in the fixed mode.
            gamma=scalar("kfac_gamma", value=(initial_damping + l2_reg) ** 0.5),
            alpha=scalar("kfac_alpha"), mu=scalar("kfac_mu"), rho=scalar("kfac_rho"),
            model_change=scalar("kfac_model_change"),
            seed=scalar("kfac_seed", "int64", seed),
            momentums=[optimizer.add_variable_from_reference(v, "momentum") for v in var_list])

    def factor_update_due(self, iteration: tf.Tensor, interval: int) -> tf.Tensor:
        """Whether this step updates the statistics: every interval, and until the first."""
        return tf.logical_or(tf.equal(self.factor_updates, 0),
                             tf.equal(tf.cast(iteration, tf.int64) % interval, 0))


def _keeps_sparse(settings: Any, variables, weight_decay) -> list[bool]:
    """Which variables' row-sparse gradients stay sparse (tf_kfac/sparse.py)."""
    whole = (settings.adaptive or bool(settings.l2_reg) or distribute.num_replicas() > 1
             or any(getattr(settings, name, None)
                    for name in ("clipnorm", "clipvalue", "global_clipnorm")))
    return [not whole and weight_decay(v) is None and v.constraint is None
            for v in variables]


def apply_update(
    settings: Any, state: KFACState, estimator: CurvatureEstimator, variables, grads, loss,
    statistics, context, loss_scale, *, iteration: tf.Tensor, lr: tf.Tensor,
    momentum: tf.Tensor, damping: tf.Tensor,
    clip: Callable[[list], list], weight_decay: Callable[[keras.Variable], float | None],
    overflow: tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """Updates statistics, refreshed values, momentum and weights from one step.

    Args:
        settings: the optimizer's hyperparameters (`KFAC` attributes).
        state: its K-FAC variables.
        estimator: the curvature blocks.
        variables: the trainable variables.
        grads: the objective's gradients, one per trainable variable.
        loss: the objective's value h(θ).
        statistics: this batch's statistics per curvature block.
        context: a `training.StepContext` for the adaptive mode.
        loss_scale: c, the loss's scale (per-example loss = c·(−log p)); the
            damping, the KL-clip bound and γ are relative to it.
        iteration: the step count; lr, momentum, damping: their current values.
        clip: Keras's clipping of the update directions.
        weight_decay: a variable's decoupled weight decay, or None.
        overflow: under loss scaling (`tf_kfac/loss_scaling.py`), whether the
            scaled gradients overflowed: such a step writes nothing, and is not
            counted in `skipped_steps` either (the loss scaling skips it).

    Returns:
        The K-FAC scalars for the logs.
    """
    iteration = tf.cast(iteration, tf.int64)
    # λ, κ and γ are relative to the curvature's scale c: the factors (and the
    # gradient) carry c, so λ·c is the damping added to them.
    loss_scale = tf.cast(loss_scale, tf.float32)
    if settings.adapt_gamma:
        gamma = tf.sqrt(loss_scale) * tf.convert_to_tensor(state.gamma)
    else:
        gamma = tf.sqrt(damping * loss_scale + settings.l2_reg)

    grads = sparse.prepare(grads, _keeps_sparse(settings, variables, weight_decay))
    # Across replicas: the objective and gradients are summed (each replica's
    # loss is scaled by 1/replicas), with a count of replicas whose statistics
    # were not finite; the statistics themselves stay local.
    present = [i for i, g in enumerate(grads) if g is not None]
    local_bad = 1.0 - tf.cast(all_finite(tf.nest.flatten(statistics)), tf.float32)
    reduced = distribute.all_reduce(
        "sum", [tf.cast(loss, tf.float32), local_bad, *[grads[i] for i in present]])
    loss, bad = reduced[0], reduced[1]
    for i, g in zip(present, reduced[2:], strict=True):
        grads[i] = g
    if settings.l2_reg:
        grads = [g if g is None else g + tf.cast(settings.l2_reg, g.dtype) * v
                 for g, v in zip(grads, variables, strict=True)]
    ok = tf.logical_and(tf.equal(bad, 0.0),
                        all_finite([loss, *[g for g in grads if g is not None]]))
    counted = tf.constant(1, tf.int64)
    if overflow is not None:
        ok = tf.logical_and(ok, tf.logical_not(overflow))
        counted = 1 - tf.cast(overflow, tf.int64)

    # Statistics: moving averages, debiased at the start.
    update_factors = state.factor_update_due(iteration, settings.factor_update_interval)
    count = tf.cast(state.factor_updates + 1, tf.float32)
    decay = tf.minimum(1.0 - 1.0 / count, settings.factor_decay)
    statistics = estimator.moving_averages(statistics, decay, update_factors)

    # Refreshes: each block every inverse_update_interval steps at its own
    # phase, and all of them until first computed.
    due = [tf.logical_and(ok, d) for d in
           estimator.refresh_due(iteration, tf.equal(state.inverse_updates, 0))]
    refresh = tf.reduce_any(tf.stack(due)) if due else tf.constant(False)
    logs = {"damping": damping}

    def refresh_at(strength, when):
        return estimator.refresh(statistics, strength, when)

    def directions_from(refreshed):
        return estimator.directions(grads, refreshed, loss_scale, statistics)

    if not settings.adaptive:
        refreshed, failed = refresh_at(gamma, due)
        kl_bound = None if settings.kl_clip is None else settings.kl_clip * loss_scale
        updates, buffers, step_logs = rules.fixed_step(
            variables, state.momentums, grads, directions_from(refreshed), lr=lr,
            momentum=momentum, kl_bound=kl_bound, clip=clip, weight_decay=weight_decay)
        writes = [(state.damping, damping, None)]
    else:
        rule = AdaptiveRule(
            settings.l2_reg,
            not (isinstance(settings.momentum, (int, float)) and settings.momentum == 0),
            settings.adapt_gamma, settings.damping_adaptation_interval,
            settings.gamma_adaptation_interval, settings.min_damping, settings.max_damping)
        result = rule.step(
            variables=variables, grads=grads, loss=loss,
            previous=[tf.convert_to_tensor(b) for b in state.momentums], damping=damping,
            gamma=gamma, refresh=due, ok=ok, context=context, loss_scale=loss_scale,
            iteration=iteration,
            state={"damping": state.damping, "rho": state.rho, "alpha": state.alpha,
                   "mu": state.mu, "model_change": state.model_change},
            refresh_at=refresh_at, directions_from=directions_from)
        updates = buffers = result.updates
        refreshed, gamma, failed = result.refreshed, result.gamma, result.failed
        step_logs, writes = result.logs, result.writes
        refresh = tf.logical_or(refresh, result.gamma_adapted)
        due = [tf.logical_or(d, result.gamma_adapted) for d in due]  # γ's: every block
    logs.update(step_logs)
    ok = tf.logical_and(ok, all_finite([u for u in updates if u is not None]))
    # A block whose refresh is not finite keeps its previous values; before the
    # first refresh there are none (the state holds zeros), so the step is
    # skipped and the next one refreshes again. Only a complete refresh counts.
    refreshed_all = tf.equal(failed, 0.0)
    never_refreshed = tf.equal(state.inverse_updates, 0)
    ok = tf.logical_and(ok, tf.logical_or(refreshed_all, tf.logical_not(never_refreshed)))

    # Write statistics, refreshed values, momentum, weights; all kept on a bad
    # step. The statistics are replica-local, everything else the same everywhere.
    estimator.statistics_writes(statistics, tf.logical_and(ok, update_factors))
    writes += estimator.refreshed_writes(refreshed, [tf.logical_and(ok, d) for d in due])
    for variable, buffer, update, new_buffer in zip(
            variables, state.momentums, updates, buffers, strict=True):
        if update is None:
            continue
        if sparse.is_sparse(update):  # rows seen only (one replica: tf_kfac/sparse.py)
            sparse.write_rows(buffer, new_buffer, ok, add=False)
            sparse.write_rows(variable, update, ok, add=True)
            continue
        writes.append((buffer, tf.where(ok, tf.cast(new_buffer, buffer.dtype), buffer), None))
        value = variable + tf.where(ok, update, tf.zeros_like(update))
        if variable.constraint is not None:
            value = variable.constraint(value)
        writes.append((variable, value, None))

    ok64 = tf.cast(ok, tf.int64)
    skipped = state.skipped_steps + (1 - ok64) * counted
    writes += [
        (state.factor_updates,
         state.factor_updates + ok64 * tf.cast(update_factors, tf.int64), None),
        (state.inverse_updates, state.inverse_updates
         + tf.cast(tf.logical_and(refresh, refreshed_all), tf.int64) * ok64, None),
        (state.skipped_steps, skipped, None),
        (state.gamma, tf.where(ok, gamma / tf.sqrt(loss_scale), state.gamma), None),
    ]
    distribute.write(writes)
    logs["skipped_steps"] = skipped
    return logs
