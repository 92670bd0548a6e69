"""The K-FAC optimizer: the Keras glue around the curvature estimator and the rules.

`KFAC` keeps the hyperparameters, registers the model's layers, creates the state and
runs a step: `training.py` measures, `estimator.py` gives statistics, refreshed values
and directions, `rules.py` or `adaptive_rule.py` the update, `step.py` commits it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tf_kfac import _keras_internals as internals
from tf_kfac import distribute, registration, training
from tf_kfac import hyperparameters as hp
from tf_kfac.blocks import blocks_for_model
from tf_kfac.estimator import CurvatureEstimator
from tf_kfac.fit import custom_loop_step
from tf_kfac.loss_scaling import LossScaling
from tf_kfac.step import KFACState, apply_update


@keras.saving.register_keras_serializable(package="tf_kfac")
class KFAC(keras.optimizers.Optimizer):
    """K-FAC: Kronecker-factored approximate natural-gradient descent.

    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature" (ICML 2015); convolutions as in Grosse & Martens,
    "A Kronecker-factored approximate Fisher matrix for convolution layers"
    (ICML 2016).

    Every layer of a kind with a curvature block gets one (README, "What gets
    curvature"; `tf_kfac.register_block` adds kinds): A ⊗ G for Dense,
    EinsumDense (so MultiHeadAttention), the convolutions and Embedding, A from
    the layer's inputs and G from the gradients at its pre-activation, so that
    W̄ (kernel as (d_in, d_out), bias as last row) is preconditioned as V =
    (A + πγI)⁻¹ ∇W̄ (G + (γ/π)I)⁻¹, γ = √(damping·c + l2_reg); the exact
    per-unit Fisher of (γ, β) for LayerNormalization and BatchNormalization.
    Other variables train with the first-order fallback, direction ∇/c. The
    directions are scaled by ν = min(1, √(kl_clip·c / (lr² Σ⟨V, ∇⟩))) and
    applied with heavy-ball momentum: m ← momentum·m + ν·V, w ← w − lr·m.

    c is the loss's scale: Keras's per-example loss is c·(−log p(y|z)) (1 for
    a classifier's cross-entropy, 1/d for `binary_crossentropy` and `mse` over
    d outputs, times the loss weight, times B and the positions with
    `reduction="sum"`; with a Keras mask on the output, only its real positions
    count; 1 for a loss tf_kfac does not know). `damping` and
    `kl_clip` are relative to it, so multiplying the loss by a constant leaves
    the run unchanged, as with Adam: `kl_clip` bounds the predicted KL
    divergence per example of the model's predictive distribution.

    With `adaptive=True` the step follows the paper's §6–7: δ = αΔ + μδ₀ (Δ =
    −V, δ₀ the previous update) with α, μ from the quadratic model with the
    exact mini-batch Fisher, and λ adapted by the Levenberg–Marquardt rule.
    The scalars that steer the run (`damping`, `gamma`, `alpha`, `mu`, `rho`,
    `model_change`, `skipped_steps`, `kl_scale`) are in `fit`'s logs.

    Use it like any Keras optimizer, `model.compile(optimizer=tf_kfac.KFAC(),
    loss=...)` then `model.fit(...)`, also under a `MirroredStrategy` or
    `MultiWorkerMirroredStrategy` (docs/distributed.md). `summary()` shows
    which variable got which curvature. For a custom training loop, call
    `attach(model, loss)` once and `step(x, y)` per batch.

    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
            Defaults to `0.1`. Ignored when `adaptive=True`.
        momentum: float in [0, 1), or a schedule. Defaults to `0.5` (0.9, common
            for SGD, overshoots once the KL-clip stops binding late in training).
        damping: the Tikhonov damping λ > 0 relative to the loss's scale c
            (λ·c is added to the curvature), or a schedule. Defaults to
            `3e-4`, and with `adaptive=True` to `1.0`, λ's initial value.
        l2_reg: the paper's L2 coefficient η ≥ 0: η·w is added to every
            gradient and η to the damping. It is part of the objective, in its
            own units (not relative to c): a loss scaled by c meets the same η,
            so the run changes with c when η > 0. Defaults to `0.0`. (Keras's
            `weight_decay` keeps its decoupled meaning.)
        fisher: how G is estimated. `"sampled"` (default): targets drawn from
            the model's predictive distribution (the true Fisher). `"empirical"`:
            the real targets' gradients; works with any loss. `"exact"`: one
            backward pass per output element; for small outputs and tests. All
            three estimate the same scale, so a damping value means the same.
        factor_decay: moving-average decay ε of the factors, in [0, 1); the k-th
            update uses min(1 − 1/k, factor_decay), and 0 keeps only the latest
            batch's statistics. Defaults to `0.95`.
        factor_update_interval: update the factors every this many steps.
            Defaults to `5`: the statistics (and the estimator's extra backward
            pass) cost as much as a forward-backward pass or more (convolutions:
            several times more), and refreshing them every step buys little.
        inverse_update_interval: recompute each layer's damped inverses every
            this many steps, the layers spread over the steps of the interval
            by their cost. Defaults to `20`. Factors and inverses are always
            refreshed from the first step's batch.
        kl_clip: the KL-clip bound κ > 0 on the predicted KL divergence of the
            model's predictive distribution per example (κ·c in the loss's
            units), or `None` to turn it off. Defaults to `1e-3`.
            Ignored when `adaptive=True`.
        weight_sharing: how a layer applied at several positions per example
            (a Dense or EinsumDense on sequences, a convolution) shares its
            curvature over them (Eschenhagen et al., NeurIPS 2023):
            `"expand"` (default) treats every position as an example, exact
            for deep linear networks whose loss sums over the positions;
            `"reduce"` uses the positions' mean input and summed output
            gradient, exact when the positions are pooled before the loss, and
            cheaper. A dict maps layer names to flavours, the others expand.
            Depthwise convolutions always expand.
        adaptive: use the paper's §6–7 control instead of the learning rate,
            momentum and KL-clip: the update is δ = αΔ + μδ₀ with α, μ minimising
            the quadratic model built from exact mini-batch Fisher products, and
            λ adapted by the Levenberg–Marquardt rule. `damping` is then λ's
            initial value (the paper starts its autoencoder at 150); `momentum=0`
            drops the μ term. Defaults to `False`.
        adapt_gamma: with `adaptive=True`, also choose the factored-Tikhonov
            strength γ every `gamma_adaptation_interval` steps among {γ, ω₂γ,
            γ/ω₂} by the quadratic model (§6.6); otherwise γ = √(λc + η). The
            adapted γ is kept and logged relative to √c.
            Defaults to `False`.
        quadratic_model_fraction: fraction of the batch the quadratic model's
            Fisher products use. Defaults to `1.0` (the paper's quarter lets a
            small batch's model miss curvature and take far too long steps).
        damping_adaptation_interval: T₁, steps between λ adaptations (ρ is
            measured on those steps only). Defaults to `5`.
        gamma_adaptation_interval: T₂, steps between γ adaptations. Defaults to
            `20`.
        min_damping, max_damping: bounds on the adapted λ (relative to c, as
            λ is). Default to `1e-8` and `1e8`.
        seed: int seed of the sampled targets; `None` draws one. The seed is kept
            in the config and in the optimizer's state, so a reloaded or restored
            optimizer continues the same draws.
        curvature: `"kfac"` (default) or `"ekfac"`: EKFAC's rescaling of the Kronecker
            blocks in their eigenbasis (George et al., NeurIPS 2018; docs/design.md §7).
        weight_decay, clipnorm, clipvalue, global_clipnorm, name: as for every
            Keras optimizer; clipping applies to the final update directions.

    Raises:
        ValueError: for a hyperparameter out of range; for a model without a
            layer that has a curvature block, or a loss whose predictive
            distribution is unknown with `fisher="sampled"` or `"exact"`.
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.1,
        momentum: float | keras.optimizers.schedules.LearningRateSchedule = 0.5,
        damping: float | keras.optimizers.schedules.LearningRateSchedule | None = None,
        l2_reg: float = 0.0,
        fisher: str = "sampled",
        factor_decay: float = 0.95,
        factor_update_interval: int = 5,
        inverse_update_interval: int = 20,
        kl_clip: float | None = 1e-3,
        weight_sharing: str | dict[str, str] = "expand",
        adaptive: bool = False,
        adapt_gamma: bool = False,
        quadratic_model_fraction: float = 1.0,
        damping_adaptation_interval: int = 5,
        gamma_adaptation_interval: int = 20,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        seed: int | None = None,
        curvature: str = "kfac",
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        name: str = "kfac",
        **kwargs,
    ):
        hp.check_base_kwargs(kwargs)
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay,
                         clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, name=name, **kwargs)
        given = locals()
        settings = hp.validate(learning_rate, weight_decay, clipnorm, clipvalue,
                               global_clipnorm, **{k: given[k] for k in hp.NAMES})
        for key, value in settings.items():
            setattr(self, key, value)
        # Python-side state, kept out of Keras/TF tracking: never saved.
        self._kfac = registration.Registration()

    # ------------------------------------------------------------------ attach
    def attach(self, model: keras.Model, loss: Any = None) -> None:
        """Registers a model's layers with this optimizer.

        `model.fit` calls this itself. Call it for a custom training loop
        (then use `step`), or before restoring a `tf.train.Checkpoint` into a
        fresh optimizer, so that its variables exist to be restored.

        Args:
            model: the Keras model this optimizer trains.
            loss: the training loss (a string, function or `keras.losses.Loss`);
                defaults to the loss the model was compiled with.

        Raises:
            ValueError: when the model has no layer with a curvature block, when
                the loss has no known predictive distribution for `fisher`
                `"sampled"`/`"exact"`, or when the optimizer already belongs to
                another model.
        """
        state = self._kfac
        if not isinstance(model, keras.Model):
            raise ValueError(f"KFAC.attach needs a keras.Model; received {type(model).__name__}.")
        attached = state.model()
        if attached is not None and attached is not model:
            raise ValueError("This KFAC optimizer already trains another model. Create one "
                             "KFAC instance per model.")
        registration.check_dtype_policies(model, self)
        self._check_distribution()
        if state.registered and attached is model and (loss is None or state.loss_given == loss):
            return
        state.register(model, loss, self.fisher, self.adaptive)
        if not self.built and model.built:
            self.build(model.trainable_variables)

    def _check_distribution(self) -> None:
        distribute.check_strategy(tf.distribute.get_strategy(), self.adapt_gamma)

    @property
    def _blocks(self):
        estimator = self._kfac.estimator
        return estimator.blocks if estimator is not None else None

    # ------------------------------------------------------------------- build
    def build(self, var_list):
        """Creates the K-FAC state for the model's trainable variables.

        The variables depend only on the model and `var_list`, in a fixed
        order, so `.keras` files and checkpoints restore them by position.
        """
        if self.built:
            return
        model = self._kfac.model_to_build_for(self)
        self._check_distribution()
        layers = internals.flatten_layers(model)
        super().build(var_list)
        estimator = CurvatureEstimator(blocks_for_model(
            layers, var_list, self.weight_sharing, self.curvature), var_list,
            self.inverse_update_interval)
        if not estimator.curvature_blocks:
            raise ValueError(
                f"KFAC found no trainable layer with a curvature block in model "
                f"'{model.name}'. Use a first-order optimizer such as keras.optimizers.Adam.")

        initial_damping = 0.0 if hp.is_schedule(self.damping) else float(self.damping)
        self._kfac.state = KFACState.create(self, var_list, initial_damping, self.l2_reg,
                                            self.seed)
        estimator.build(self)
        self._kfac.estimator = estimator

    # ------------------------------------------------------------- user API
    def step(self, x, y, sample_weight=None) -> dict[str, tf.Tensor]:
        """One K-FAC training step for a custom training loop.

        Call `attach(model, loss)` once first. Works eagerly and inside
        `tf.function`. The objective is `loss(y, model(x), sample_weight)`
        plus the model's regularisation losses.

        Under a distribution strategy, call it through `strategy.run`; the
        returned loss is then this replica's share of the objective (reduce it
        with `"SUM"`).

        Returns:
            A dict with `"loss"` and the K-FAC scalars (`"damping"`,
            `"skipped_steps"`, and `"kl_scale"` when KL-clipping is on).
        """
        model = self._kfac.model()
        if model is None or self._kfac.loss_fn is None:
            raise ValueError(
                "Call `optimizer.attach(model, loss=...)` once before `optimizer.step`.")
        if distribute.num_replicas() > 1 and tf.distribute.in_cross_replica_context():
            raise ValueError(
                "Under a distribution strategy, call `optimizer.step` inside "
                "`strategy.run(optimizer.step, args=(x, y))`, so that every replica "
                "runs it on its share of the batch.")
        forward, objective = custom_loop_step(model, self._kfac.loss_fn, y, sample_weight)
        _, loss, logs = self._run_step(model, x, sample_weight, forward, objective)
        return {"loss": loss, **logs}

    def kronecker_factors(self, layer: keras.layers.Layer) -> tuple[tf.Tensor, tf.Tensor]:
        """A layer's current curvature factors, as float32 tensors, without damping.

        For a Kronecker block (A, G): A = (1/B) Σ āāᵀ over the layer input with
        the bias coordinate appended last (over patches for convolutions), G over
        the pre-activation gradients, moving averages over steps, so that
        kron(A, G) approximates the GGN block of the objective over the
        row-major vec of W̄ (kernel as (d_in, d_out), bias as last row). A
        depthwise convolution's are batches over the channels, an Embedding's A
        is the vector of its diagonal, a separable convolution gives the
        depthwise and the pointwise pair, and a normalisation layer (F,): its
        per-unit blocks over (γᵢ, βᵢ).
        """
        block = self._kfac.estimator.block_for(layer) if self._kfac.estimator else None
        if block is not None and hasattr(block, "kronecker_factors"):
            return block.kronecker_factors()
        if not self.built:
            raise ValueError("KFAC has no factors yet: train for one step first.")
        raise ValueError(
            f"Layer '{getattr(layer, 'name', layer)}' has no Kronecker factors: it is not a "
            "trainable layer with a Kronecker block in the model this optimizer trains. "
            "See optimizer.summary().")

    def summary(self, print_fn: Callable[[str], None] | None = None) -> str:
        """Prints (and returns) which curvature each trainable variable gets."""
        if self._kfac.estimator is None:
            raise ValueError("KFAC has no layers registered yet: call fit or attach first.")
        out = self._kfac.estimator.summary(self.fisher)
        (print_fn or print)(out)
        return out

    def apply(self, grads, trainable_variables=None):
        """Not available: K-FAC needs more than gradients (see the message)."""
        raise ValueError(
            "KFAC cannot precondition bare gradients: it needs each layer's inputs and "
            "pre-activation gradients, which only its own training step captures. Use "
            "model.fit with Keras's default train_step, or, in a custom training loop "
            "or a custom train_step, call optimizer.attach(model, loss=...) once and "
            "optimizer.step(x, y) per batch instead of apply_gradients.")

    # ------------------------------------------------------------ the step
    def _current(self, value):
        if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
            return tf.cast(value(self.iterations), tf.float32)
        if callable(value):
            return tf.cast(value(), tf.float32)
        return tf.constant(value, tf.float32)

    def _sampling_seed(self) -> tf.Tensor:
        # Before the first build (an unbuilt model is built by its first forward
        # pass) the state does not exist yet; it holds this same seed.
        seed = (tf.convert_to_tensor(self._kfac.state.seed) if self.built
                else tf.constant(self.seed, tf.int64))
        seed = tf.stack([seed, tf.cast(self.iterations, tf.int64)])
        if distribute.num_replicas() > 1:  # different draws on every replica
            seed = tf.random.experimental.stateless_fold_in(seed, distribute.replica_id())
        return seed

    def _run_step(self, model, x, sample_weight, forward, objective):
        """Measures one batch and applies the update; (y_pred, loss, logs)."""
        state = self._kfac
        scaling = LossScaling.for_step(model, self)  # float16: tf_kfac/loss_scaling.py
        measured = training.forward_pass(state.candidates, state.spec, self.fisher,
                                         self._sampling_seed, x, sample_weight, forward,
                                         objective, None if scaling is None else scaling.scale)
        if not self.built:
            self.build(model.trainable_variables)
        var_list = self._trainable_variables
        registration.check_variables_unchanged(model, var_list)
        grads, statistics, loss_scale = training.gradients_and_statistics(
            measured, state.estimator, var_list, state.spec, self.fisher, sample_weight,
            state.state.factor_update_due(self.iterations, self.factor_update_interval))
        context = None
        if self.adaptive:
            context = training.step_context(
                state.spec, state.candidates, self.quadratic_model_fraction, var_list, x,
                measured.output.weights, measured.global_batch, forward, objective, measured.c)
        overflow = None if scaling is None else scaling.overflowed(grads, statistics)
        damping = (tf.convert_to_tensor(self._kfac.state.damping) if self.adaptive
                   else self._current(self.damping))
        logs = apply_update(
            self, self._kfac.state, self._kfac.estimator, self._trainable_variables, grads,
            measured.loss, statistics, context, loss_scale, iteration=self.iterations,
            lr=tf.cast(self._get_current_learning_rate(), tf.float32),
            momentum=self._current(self.momentum), damping=damping,
            clip=self._clip_gradients, weight_decay=self._decay_of, overflow=overflow)
        self._iterations.assign_add(1 if overflow is None else 1 - tf.cast(overflow, "int64"))
        if scaling is not None:
            scaling.build(var_list)
            logs.update(scaling.update(overflow))
        return measured.y_pred, measured.loss, logs

    def _decay_of(self, variable) -> float | None:
        if self.weight_decay is not None and self._use_weight_decay(variable):
            return self.weight_decay
        return None

    # ---------------------------------------------------------- saving
    def load_own_variables(self, store):
        """Restores the K-FAC state from a `.keras` file, or raises if it does not fit.

        Keras itself only warns and keeps fresh state when the saved optimizer
        has a different number of variables; K-FAC's factors, inverses,
        momentum and counters would then restart silently.
        """
        registration.check_saved_state(len(store.keys()), len(self.variables))
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        for arg in (*hp.UNSUPPORTED_BASE_ARGS, *hp.IGNORED_BASE_ARGS):
            config.pop(arg, None)
        config.update({name: hp.serialize(getattr(self, name)) for name in hp.NAMES})
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return super().from_config(hp.deserialize(config, custom_objects),
                                   custom_objects=custom_objects)

