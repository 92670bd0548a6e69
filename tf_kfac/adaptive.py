"""The paper's step-size, momentum and damping control (Martens & Grosse 2015, §6–7).

Given K-FAC's proposal Δ = −F̆⁻¹∇h and the previous update δ₀, the update is
δ = αΔ + μδ₀ with (α, μ) minimising the quadratic model

    M(δ) = ½ δᵀ C δ + ∇hᵀ δ,   C = F + (λ + η) I,

(λ here is the absolute damping: λ·c in terms of KFAC's relative `damping`),

where F is the exact mini-batch Fisher/GGN, used only through products
(forward-mode Jacobian-vector products of the network output and the loss's
output Hessian). The 2×2 system is

    [[ΔᵀCΔ, ΔᵀCδ₀], [δ₀ᵀCΔ, δ₀ᵀCδ₀]] · [α, μ]ᵀ = −[∇hᵀΔ, ∇hᵀδ₀]ᵀ,

which becomes 1×1 when δ₀ = 0 (or momentum is off).

Levenberg–Marquardt damping (§6.5): ρ = (h(θ+δ) − h(θ)) / (M̃(δ) − M̃(0)) on
the same mini-batch, with M̃ the model *without* λ (λ is the trust-region
device that ρ judges; kfac-jax and the old TF library make the same choice);
every T₁ steps λ ← ω₁λ if ρ > ¾ and λ ← λ/ω₁ if ρ < ¼, ω₁ = (19/20)^T₁.

γ adaptation (§6.6): every T₂ steps, the factored-Tikhonov strength γ is
chosen among {γ, ω₂γ, γ/ω₂}, ω₂ = √(19/20)^T₂, as the one whose proposal,
with its own best (α, μ), gives the lowest M(δ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from tf_kfac import distribute, sparse
from tf_kfac.losses import LossSpec, broadcastable

RHO_HIGH = 0.75
RHO_LOW = 0.25
DECAY_BASE = 19.0 / 20.0


def damping_factor(interval: int) -> float:
    """ω₁ = (19/20)^T₁."""
    return DECAY_BASE**interval


def gamma_factor(interval: int) -> float:
    """ω₂ = √(19/20)^T₂."""
    return DECAY_BASE ** (0.5 * interval)


def adapt_damping(damping, rho, interval: int, low: float, high: float):
    """The Levenberg–Marquardt rule for λ, clipped to [low, high]."""
    omega = damping_factor(interval)
    damping = tf.where(rho > RHO_HIGH, damping * omega, damping)
    damping = tf.where(rho < RHO_LOW, damping / omega, damping)
    return tf.clip_by_value(damping, low, high)


def inner_product(xs: Sequence[tf.Tensor | None], ys: Sequence[tf.Tensor | None]) -> tf.Tensor:
    """Σ over the pairs of ⟨x, y⟩, skipping pairs with a None; a float32 scalar."""
    terms = [sparse.inner(x, y) for x, y in zip(xs, ys, strict=True)
             if x is not None and y is not None]
    return tf.add_n(terms) if terms else tf.constant(0.0)


@dataclasses.dataclass
class OutputContext:
    """What the quadratic model needs from the training step.

    Attributes:
        network_output: maps model inputs to the network output z (logits
            for the cross-entropies), with no side effects on model state.
        inputs: the subset of the batch the quadratic model uses.
        example_weights: the subset's weights of the loss's terms: one per
            example, or one per output position for a masked output.
        spec: the loss's predictive distribution.
        batch_size: the full (global, across replicas) batch size B, for the
            `"sum"` reduction.
        scale: c on this replica's batch, or None for the spec's c of the
            network output (which does not count an output mask).
    """

    network_output: Callable
    inputs: object
    example_weights: tf.Tensor
    spec: LossSpec
    batch_size: tf.Tensor
    scale: tf.Tensor | None = None


def output_jvp(context: OutputContext, variables, tangents) -> tuple[tf.Tensor, tf.Tensor]:
    """z and J·v at the current weights, by forward-mode differentiation."""
    primals, vectors = [], []
    for variable, tangent in zip(variables, tangents, strict=True):
        primals.append(variable.value if isinstance(variable, keras.Variable) else variable)
        vectors.append(tf.zeros(variable.shape, variable.dtype) if tangent is None
                       else tf.cast(tangent, variable.dtype))
    with keras.StatelessScope():
        with tf.autodiff.ForwardAccumulator(primals, vectors) as accumulator:
            z = context.network_output(context.inputs)
        jvp = accumulator.jvp(z)
    if jvp is None:  # the output does not depend on the variables
        jvp = tf.zeros_like(z)
    return z, tf.cast(jvp, tf.float32)


def fisher_gram(context: OutputContext, jvps: Sequence[tf.Tensor], z: tf.Tensor) -> tf.Tensor:
    """The matrix [uᵢᵀ F uⱼ] from the Jacobian-vector products J·uᵢ.

    F = (1/n) Σ over the n examples of c·wᵢ·Jᵢᵀ Hᵢ Jᵢ, H the Hessian of
    −log p with respect to z (wᵢ per term of the loss for a masked output).
    """
    n = tf.cast(tf.shape(z)[0], tf.float32)
    scale = (context.spec.scale(z, context.batch_size) if context.scale is None
             else context.scale)
    weights = scale * broadcastable(context.example_weights, z.shape.rank) / n
    products = [context.spec.output_hessian_product(z, j) for j in jvps]
    k = len(jvps)
    rows = []
    for i in range(k):
        rows.append(tf.stack([tf.reduce_sum(weights * jvps[i] * products[j]) for j in range(k)]))
    return tf.stack(rows)


@dataclasses.dataclass
class Step:
    """The chosen update coefficients and what the quadratic model predicts."""

    alpha: tf.Tensor
    mu: tf.Tensor
    model_change: tf.Tensor  # M(δ) with C = F + (λ+η)I
    undamped_change: tf.Tensor  # M̃(δ) with F + ηI, for ρ


class QuadraticModel:
    """M(δ) around the current weights for one mini-batch.

    Holds J·δ₀ and the gradient, so that several proposals Δ (the γ
    candidates) can be evaluated with one more forward-mode pass each.
    """

    def __init__(self, context, variables, gradients, previous_update, damping, l2_reg,
                 use_momentum: bool):
        self.context = context
        self.variables = list(variables)
        self.gradients = list(gradients)
        self.previous = list(previous_update)
        self.damping = damping
        self.l2_reg = l2_reg
        self.use_momentum = use_momentum
        if use_momentum:
            self.z, self.previous_jvp = output_jvp(context, self.variables, self.previous)
        else:
            self.z = self.previous_jvp = None

    def best_step(self, proposal: Sequence[tf.Tensor | None]) -> Step:
        """(α, μ) minimising M(αΔ + μδ₀), and M's value there."""
        z, proposal_jvp = output_jvp(self.context, self.variables, proposal)
        vectors = [list(proposal)]
        jvps = [proposal_jvp]
        if self.use_momentum:
            vectors.append(self.previous)
            jvps.append(self.previous_jvp)
        # Each replica's products are over its share of the batch: average them.
        (fisher,) = distribute.all_reduce("mean", [fisher_gram(self.context, jvps, z)])
        k = len(vectors)
        dots = tf.stack([tf.stack([inner_product(vectors[i], vectors[j]) for j in range(k)])
                         for i in range(k)])
        grad = tf.stack([inner_product(self.gradients, v) for v in vectors])
        undamped = fisher + self.l2_reg * dots
        damped = undamped + self.damping * dots
        alpha1 = -grad[0] / tf.maximum(damped[0, 0], 1e-30)
        coefficients = tf.stack([alpha1] + [tf.constant(0.0)] * (k - 1))
        if k == 2:
            a, b, d = damped[0, 0], damped[0, 1], damped[1, 1]
            det = a * d - b * b
            solvable = tf.logical_and(d > 1e-30, det > 1e-7 * a * d)
            safe_det = tf.where(solvable, det, 1.0)
            two = tf.stack([(-grad[0] * d + grad[1] * b) / safe_det,
                            (-grad[1] * a + grad[0] * b) / safe_det])
            coefficients = tf.where(solvable, two, coefficients)
        c = coefficients[:, None]
        model_change = 0.5 * tf.reduce_sum(c * tf.matmul(damped, c)) + tf.reduce_sum(
            coefficients * grad)
        undamped_change = 0.5 * tf.reduce_sum(c * tf.matmul(undamped, c)) + tf.reduce_sum(
            coefficients * grad)
        mu = coefficients[1] if k == 2 else tf.constant(0.0)
        return Step(coefficients[0], mu, model_change, undamped_change)


def reduction_ratio(loss_before, loss_after, variables, update, l2_reg: float,
                    undamped_change) -> tf.Tensor:
    """ρ = (h(θ+δ) − h(θ)) / M̃(δ), h including the L2 term η/2‖θ‖²."""
    actual = tf.cast(loss_after, tf.float32) - tf.cast(loss_before, tf.float32)
    if l2_reg:
        actual += l2_reg * (inner_product(variables, update) + 0.5 * inner_product(update, update))
    return actual / tf.minimum(undamped_change, -1e-30)
