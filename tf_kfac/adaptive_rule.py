"""The adaptive update rule of Martens & Grosse (2015), §6–7.

δ = αΔ + μδ₀ with α, μ minimising the quadratic model of the objective, the
damping λ adapted by the Levenberg–Marquardt rule, and optionally γ chosen
among {γ, ω₂γ, γ/ω₂} by the quadratic model. The rule sees gradients,
directions and the quadratic model only: refreshed values and directions
come from two callbacks, never from a factor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from tf_kfac import adaptive as qmodel
from tf_kfac import distribute
from tf_kfac.linalg import all_finite

# (refreshed values, failed refreshes) at a γ, refreshing the blocks whose flags hold
# (one per block), or all of them or none (a Python bool).
Refresh = Callable[[tf.Tensor, "list | bool"], tuple[list, tf.Tensor]]
# The update directions V (one per variable) from refreshed values.
Directions = Callable[[list], list]


@dataclasses.dataclass
class AdaptiveResult:
    updates: list
    refreshed: list
    gamma: tf.Tensor
    failed: tf.Tensor
    gamma_adapted: tf.Tensor
    logs: dict
    writes: list


@dataclasses.dataclass
class AdaptiveRule:
    """The settings of the adaptive mode (see `KFAC`'s docstring)."""

    l2_reg: float
    use_momentum: bool
    adapt_gamma: bool
    damping_interval: int
    gamma_interval: int
    min_damping: float
    max_damping: float

    def step(self, *, variables, grads, loss, previous, damping, gamma, refresh, ok, context,
             loss_scale, iteration, state, refresh_at: Refresh,
             directions_from: Directions) -> AdaptiveResult:
        """One adaptive step.

        Args:
            variables, grads: the trainable variables and the objective's gradients.
            loss: h(θ) on this batch.
            previous: δ₀, the previous update of each variable.
            damping: λ (relative to c); gamma: γ (absolute).
            refresh: whether each block's refreshed values are due this step.
            ok: whether the step's inputs are finite.
            context: a `training.StepContext`.
            loss_scale: c.
            iteration: the step count.
            state: the variables `damping`, `rho`, `alpha`, `mu`, `model_change`.
            refresh_at: the refreshed values at a γ.
            directions_from: the directions V from refreshed values.
        """
        model = qmodel.QuadraticModel(context.output, variables, grads, previous,
                                      damping * loss_scale, self.l2_reg, self.use_momentum)

        def proposal(refreshed):  # Δ = −V
            return [None if d is None else -d for d in directions_from(refreshed)]

        gamma_due = tf.constant(False)
        if self.adapt_gamma:
            gamma_due = tf.logical_and(ok, tf.equal(iteration % self.gamma_interval, 0))
            omega = qmodel.gamma_factor(self.gamma_interval)

            def choose_gamma():
                candidates = [gamma, gamma * omega, gamma / omega]
                results, failed = [], tf.constant(0.0)
                for candidate in candidates:
                    refreshed, candidate_failed = refresh_at(candidate, True)
                    failed += candidate_failed
                    change = model.best_step(proposal(refreshed)).model_change
                    results.append((tf.nest.flatten(refreshed), change))
                values = tf.stack([tf.where(tf.math.is_finite(v), v, float("inf"))
                                   for _, v in results])
                best = tf.argmin(values)
                flat = [tf.gather(tf.stack(parts), best)
                        for parts in zip(*(r for r, _ in results), strict=True)]
                return [tf.gather(tf.stack(candidates), best), failed, *flat]

            def keep_gamma():
                refreshed, failed = refresh_at(gamma, refresh)
                return [gamma, failed, *tf.nest.flatten(refreshed)]

            template, _ = refresh_at(gamma, False)
            chosen = tf.cond(gamma_due, choose_gamma, keep_gamma)
            gamma, failed = chosen[0], chosen[1]
            refreshed = tf.nest.pack_sequence_as(template, list(chosen[2:]))
        else:
            refreshed, failed = refresh_at(gamma, refresh)

        delta = proposal(refreshed)
        step = model.best_step(delta)
        updates = [None if d is None else tf.cast(step.alpha, d.dtype) * d
                   + tf.cast(step.mu, d.dtype) * p for d, p in zip(delta, previous, strict=True)]

        # Levenberg–Marquardt: ρ on the same batch, every T₁ steps. h(θ + δ) is
        # this replica's share of the objective (a forward pass, only when due);
        # the shares are summed outside the conditional.
        rho_due = tf.logical_and(ok, tf.equal(iteration % self.damping_interval, 0))
        after = tf.cond(rho_due, lambda: tf.cast(context.objective_at(updates), tf.float32),
                        lambda: tf.constant(0.0))
        (after,) = distribute.all_reduce("sum", [after])

        def measured():
            values = [tf.convert_to_tensor(v) for v in variables]
            return qmodel.reduction_ratio(loss, after, values, updates, self.l2_reg,
                                          step.undamped_change)

        rho = tf.cond(rho_due, measured, lambda: tf.convert_to_tensor(state["rho"]))
        rho_ok = tf.logical_and(rho_due, tf.math.is_finite(rho))
        new_damping = qmodel.adapt_damping(damping, rho, self.damping_interval,
                                           self.min_damping, self.max_damping)
        keep = tf.logical_and(ok, all_finite([step.alpha, step.mu, step.model_change]))
        adapted = tf.logical_and(keep, rho_ok)
        # A skipped step keeps (and logs) the last finite values.
        values = {
            "damping": tf.where(adapted, new_damping, damping),
            "rho": tf.where(adapted, rho, state["rho"]),
            "alpha": tf.where(keep, step.alpha, state["alpha"]),
            "mu": tf.where(keep, step.mu, state["mu"]),
            "model_change": tf.where(keep, step.model_change, state["model_change"]),
        }
        writes = [(state[name], value, None) for name, value in values.items()]
        logs = {"gamma": gamma / tf.sqrt(loss_scale),
                **{name: value for name, value in values.items() if name != "damping"}}
        return AdaptiveResult(updates, refreshed, gamma, failed, gamma_due, logs, writes)
