"""The K-FAC optimizer."""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tf_kfac import _keras_internals as internals
from tf_kfac import adaptive as qmodel
from tf_kfac import capture, distribute
from tf_kfac.blocks import KroneckerBlock, block_type_for, blocks_for_model
from tf_kfac.linalg import all_finite
from tf_kfac.losses import SUPPORTED_LOSSES, LossSpec, UnsupportedLossError, resolve_loss

FISHER_ESTIMATORS = ("sampled", "empirical", "exact")
FIXED_DAMPING = 3e-4
ADAPTIVE_DAMPING = 1.0

_UNSUPPORTED_BASE_ARGS = {
    "use_ema": "K-FAC keeps no moving average of the weights",
    "gradient_accumulation_steps": "K-FAC's curvature is measured per batch",
    "loss_scale_factor": "K-FAC computes its own objective",
}


def _is_schedule(value: Any) -> bool:
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule) or (
        callable(value) and not isinstance(value, (int, float))
    )


def _check_number(name: str, value: Any, low: float, high: float | None, closed_low: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number; received {name}={value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number; received {name}={value!r}.")
    ok = value >= low if closed_low else value > low
    if high is not None:
        ok = ok and value < high
    if not ok:
        bound = f"{'≥' if closed_low else '>'} {low}" + (f" and < {high}" if high else "")
        raise ValueError(f"`{name}` must be {bound}; received {name}={value!r}.")


def _check_interval(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a whole number ≥ 1; received {name}={value!r}.")


@keras.saving.register_keras_serializable(package="tf_kfac")
class KFAC(keras.optimizers.Optimizer):
    """K-FAC: Kronecker-factored approximate natural-gradient descent.

    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature" (ICML 2015); convolutions as in Grosse & Martens,
    "A Kronecker-factored approximate Fisher matrix for convolution layers"
    (ICML 2016).

    Each Dense and Conv2D layer's block of the Fisher matrix is approximated by
    A ⊗ G, A from the layer's inputs and G from the gradients at its
    pre-activation, so the gradient W̄ of the layer (kernel, with the bias as a
    last row) is preconditioned as V = (A + πγI)⁻¹ ∇W̄ (G + (γ/π)I)⁻¹ with
    γ = √(damping·c + l2_reg). Every other trainable variable (normalisation,
    embeddings, custom layers) trains with the first-order fallback: its update
    direction is its gradient divided by c. The directions are scaled by the
    KL-clip factor ν = min(1, √(kl_clip·c / (lr² Σ⟨V, ∇⟩))) and applied with
    heavy-ball momentum: m ← momentum·m + ν·V, w ← w − lr·m.

    c is the loss's scale: Keras's per-example loss is c·(−log p(y|z)), so
    c = 1 for a classifier's cross-entropy, 1/d for `binary_crossentropy` and
    `mse` averaged over d outputs, times the loss weight, times the batch
    size and the positions with `reduction="sum"`. The Fisher, the gradient
    and the objective all carry c; `damping` and `kl_clip` are relative to it,
    so multiplying the loss by any constant (a mean or a sum over pixels, a
    loss weight) leaves the training run unchanged, as with Adam. `damping`
    is the damping of the curvature of the negative log-likelihood summed over
    the outputs, and `kl_clip` bounds the predicted KL divergence per example
    of the model's predictive distribution (summed over its outputs). For a
    loss that tf_kfac does not know (`fisher="empirical"`), c = 1.

    With `adaptive=True` the step follows the paper's §6–7 instead: the update
    δ = αΔ + μδ₀ (Δ = −V, δ₀ the previous update) takes α and μ from the
    quadratic model of the objective with the exact mini-batch Fisher, and the
    damping λ adapts by the Levenberg–Marquardt rule. The first-order fallback
    variables join the quadratic model with Δ = −∇ and share its α and μ. The
    scalars that steer the run (`damping`, `gamma`, `alpha`, `mu`, `rho`,
    `model_change`, `skipped_steps`, `kl_scale`) are in `fit`'s logs.

    Use it like any Keras optimizer: `model.compile(optimizer=tf_kfac.KFAC(),
    loss=...)` then `model.fit(...)`, also inside the scope of a
    `MirroredStrategy` or `MultiWorkerMirroredStrategy` (the step is then the
    one a single device would take with the global batch; see
    docs/distributed.md). The first `fit` registers every Dense and
    Conv2D layer; `summary()` shows which variable got which treatment. For a
    custom training loop, call `attach(model, loss)` once and `step(x, y)` per
    batch.

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
        inverse_update_interval: recompute the damped inverses every this many
            steps. Defaults to `20`. Factors and inverses are always refreshed
            from the first step's batch.
        kl_clip: the KL-clip bound κ > 0 on the predicted KL divergence of the
            model's predictive distribution per example (κ·c in the loss's
            units), or `None` to turn it off. Defaults to `3e-3`.
            Ignored when `adaptive=True`.
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
            Fisher products use. Defaults to `1.0`. The paper used a quarter, with
            large batches and λ₀ = 150; with small batches and small λ a subset
            lets the model miss the gradient's component outside the subset's
            curvature and take far too long steps.
        damping_adaptation_interval: T₁, steps between λ adaptations (ρ is
            measured on those steps only). Defaults to `5`.
        gamma_adaptation_interval: T₂, steps between γ adaptations. Defaults to
            `20`.
        min_damping, max_damping: bounds on the adapted λ (relative to c, as
            λ is). Default to `1e-8` and `1e8`.
        seed: int seed of the sampled targets; `None` draws one. The seed is kept
            in the config and in the optimizer's state, so a reloaded or restored
            optimizer continues the same draws.
        weight_decay, clipnorm, clipvalue, global_clipnorm, name: as for every
            Keras optimizer; clipping applies to the final update directions.

    Raises:
        ValueError: for a hyperparameter out of range; for a model without a
            Dense or Conv2D layer, or a loss whose predictive distribution is
            unknown with `fisher="sampled"` or `"exact"` (at the first step).
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
        kl_clip: float | None = 3e-3,
        adaptive: bool = False,
        adapt_gamma: bool = False,
        quadratic_model_fraction: float = 1.0,
        damping_adaptation_interval: int = 5,
        gamma_adaptation_interval: int = 20,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        seed: int | None = None,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        name: str = "kfac",
        **kwargs,
    ):
        for arg, why in _UNSUPPORTED_BASE_ARGS.items():
            if kwargs.get(arg):
                raise ValueError(f"KFAC does not support `{arg}`: {why}.")
            kwargs.pop(arg, None)
        kwargs.pop("ema_momentum", None)
        kwargs.pop("ema_overwrite_frequency", None)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            name=name,
            **kwargs,
        )
        if not _is_schedule(learning_rate):
            _check_number("learning_rate", learning_rate, 0.0, None, closed_low=False)
        if not _is_schedule(momentum):
            _check_number("momentum", momentum, 0.0, 1.0, closed_low=True)
        if damping is None:
            damping = ADAPTIVE_DAMPING if adaptive else FIXED_DAMPING
        if not _is_schedule(damping):
            _check_number("damping", damping, 0.0, None, closed_low=False)
        _check_number("l2_reg", l2_reg, 0.0, None, closed_low=True)
        if fisher not in FISHER_ESTIMATORS:
            raise ValueError(
                f"`fisher` must be one of {', '.join(map(repr, FISHER_ESTIMATORS))}; "
                f"received fisher={fisher!r}."
            )
        _check_number("factor_decay", factor_decay, 0.0, 1.0, closed_low=True)
        _check_interval("factor_update_interval", factor_update_interval)
        _check_interval("inverse_update_interval", inverse_update_interval)
        if kl_clip is not None:
            _check_number("kl_clip", kl_clip, 0.0, None, closed_low=False)
        _check_number("quadratic_model_fraction", quadratic_model_fraction, 0.0, None,
                      closed_low=False)
        if quadratic_model_fraction > 1:
            raise ValueError("`quadratic_model_fraction` must be in (0, 1]; received "
                             f"quadratic_model_fraction={quadratic_model_fraction!r}.")
        _check_interval("damping_adaptation_interval", damping_adaptation_interval)
        _check_interval("gamma_adaptation_interval", gamma_adaptation_interval)
        _check_number("min_damping", min_damping, 0.0, None, closed_low=False)
        _check_number("max_damping", max_damping, 0.0, None, closed_low=False)
        if not max_damping > min_damping:
            raise ValueError(f"`min_damping` must be below `max_damping`; received "
                             f"min_damping={min_damping!r}, max_damping={max_damping!r}.")
        if adapt_gamma and not adaptive:
            raise ValueError("`adapt_gamma=True` needs `adaptive=True`: γ is chosen by the "
                             "quadratic model, which only the adaptive mode builds.")
        if adaptive:
            conflicts = [arg for arg, value in (
                ("weight_decay", weight_decay), ("clipnorm", clipnorm),
                ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm)) if value]
            if conflicts:
                raise ValueError(
                    f"`adaptive=True` chooses the step by the quadratic model and cannot "
                    f"honour {', '.join(conflicts)}. Use `l2_reg` for L2 regularisation "
                    "(the quadratic model accounts for it), or adaptive=False."
                )
            if _is_schedule(damping):
                raise ValueError("`adaptive=True` adapts the damping itself; pass a float "
                                 "initial `damping`, not a schedule.")
            if not min_damping <= damping <= max_damping:
                raise ValueError(f"`damping`={damping!r} lies outside [min_damping, "
                                 f"max_damping] = [{min_damping}, {max_damping}].")
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int or None; received seed={seed!r}.")

        self.momentum = momentum
        self.damping = damping
        self.l2_reg = float(l2_reg)
        self.fisher = fisher
        self.factor_decay = float(factor_decay)
        self.factor_update_interval = factor_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.adaptive = bool(adaptive)
        self.adapt_gamma = bool(adapt_gamma)
        self.quadratic_model_fraction = float(quadratic_model_fraction)
        self.damping_adaptation_interval = damping_adaptation_interval
        self.gamma_adaptation_interval = gamma_adaptation_interval
        self.min_damping = float(min_damping)
        self.max_damping = float(max_damping)
        self.seed = int(seed)
        # Python-side state, kept out of Keras/TF tracking: never saved.
        self._kfac = _Registration()

    # ------------------------------------------------------------------ attach
    def attach(self, model: keras.Model, loss: Any = None) -> None:
        """Registers a model's Dense and Conv2D layers with this optimizer.

        `model.fit` calls this itself. Call it for a custom training loop
        (then use `step`), or before restoring a `tf.train.Checkpoint` into a
        fresh optimizer, so that its variables exist to be restored.

        Args:
            model: the Keras model this optimizer trains.
            loss: the training loss (a string, function or `keras.losses.Loss`);
                defaults to the loss the model was compiled with.

        Raises:
            ValueError: when the model has no Dense or Conv2D layer, when the
                loss has no known predictive distribution for `fisher`
                `"sampled"`/`"exact"`, or when the optimizer already belongs to
                another model.
        """
        state = self._kfac
        if not isinstance(model, keras.Model):
            raise ValueError(f"KFAC.attach needs a keras.Model; received {type(model).__name__}.")
        attached = state.model()
        if attached is not None and attached is not model:
            raise ValueError(
                "This KFAC optimizer already trains another model. Create one KFAC "
                "instance per model."
            )
        half = [layer.name for layer in internals.flatten_layers(model)
                if getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None)
                == "float16"]
        if model.dtype_policy.name == "mixed_float16" or half or isinstance(
            getattr(model, "optimizer", None), keras.optimizers.LossScaleOptimizer
        ):
            where = f" (layers computing in float16: {', '.join(half)})" if half else ""
            raise ValueError(
                "KFAC does not support float16 computation and its loss scaling (the "
                f"'mixed_float16' policy) yet{where}. Train in float32, or with the "
                "'mixed_bfloat16' policy, which needs no loss scaling."
            )
        self._check_distribution()
        if state.registered and attached is model and (loss is None or state.loss_given == loss):
            return
        candidates = [
            layer for layer in internals.flatten_layers(model) if block_type_for(layer)
        ]
        if not candidates:
            raise ValueError(
                f"KFAC found no Dense or Conv2D layer in model '{model.name}', so it has no "
                "curvature to approximate. Use a first-order optimizer such as "
                "keras.optimizers.Adam for this model."
            )
        state.spec = self._resolve_spec(model, loss)
        if self.adaptive and state.spec is None:
            raise UnsupportedLossError(
                "KFAC(adaptive=True) builds the quadratic model from the output Hessian "
                "of the loss, which tf_kfac knows only for these losses: "
                + ", ".join(SUPPORTED_LOSSES) + ". Compile with one of them, or use "
                "adaptive=False with fisher='empirical'."
            )
        state.loss_fn = _as_loss_object(loss)
        state.loss_given = loss
        for layer in candidates:
            capture.wrap_layer(layer)
        state.candidates = candidates
        state.model = weakref.ref(model)
        state.registered = True
        if not self.built and model.built:
            self.build(model.trainable_variables)

    def _check_distribution(self) -> None:
        strategy = tf.distribute.get_strategy()
        distribute.check_strategy(strategy)
        if self.adapt_gamma and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "KFAC(adapt_gamma=True) is not supported with more than one replica yet: "
                "choosing γ inverts the factors three times inside a conditional step, "
                "which cannot share work across replicas. Use adapt_gamma=False (γ then "
                "follows the adapted damping) or train on one device."
            )

    def _resolve_spec(self, model, loss) -> LossSpec | None:
        if loss is None:
            loss, loss_weights = internals.compiled_loss(model)
        else:
            loss_weights = None
        try:
            return resolve_loss(loss, loss_weights, getattr(model, "output_names", None))
        except UnsupportedLossError:
            if self.fisher == "empirical":
                return None
            raise

    @property
    def _candidate_layers(self):
        return self._kfac.candidates

    @property
    def _loss_spec(self) -> LossSpec | None:
        return self._kfac.spec

    @property
    def _blocks(self):
        return self._kfac.blocks

    # ------------------------------------------------------------------- build
    def build(self, var_list):
        """Creates the K-FAC state for the model's trainable variables.

        The variables depend only on the model and `var_list`, in a fixed
        order, so `.keras` files and checkpoints restore them by position.
        """
        if self.built:
            return
        model = self._kfac.model()
        if model is None:
            model = internals.find_model_in_call_stack(self)
        if model is None:
            raise ValueError(
                "KFAC could not tell which model it is built for. Call "
                "`optimizer.attach(model)` first (model.fit does this itself)."
            )
        if self._kfac.model() is None:
            self._kfac.model = weakref.ref(model)
        self._check_distribution()
        super().build(var_list)
        blocks = blocks_for_model(internals.flatten_layers(model), var_list)
        if not any(isinstance(b, KroneckerBlock) for b in blocks):
            raise ValueError(
                f"KFAC found no trainable Dense or Conv2D layer in model '{model.name}'. "
                "Use a first-order optimizer such as keras.optimizers.Adam for it."
            )
        def scalar(name, dtype="float32", value=0.0):
            init = keras.initializers.Constant(value)
            return self.add_variable((), initializer=init, dtype=dtype, name=name)

        initial_damping = 0.0 if _is_schedule(self.damping) else float(self.damping)
        self._damping = scalar("kfac_damping", value=initial_damping)
        self._skipped_steps = scalar("kfac_skipped_steps", "int64", 0)
        self._factor_updates = scalar("kfac_factor_updates", "int64", 0)
        self._inverse_updates = scalar("kfac_inverse_updates", "int64", 0)
        # The paper's adaptive quantities (§6–7); constant in the fixed mode.
        self._gamma = scalar("kfac_gamma", value=(initial_damping + self.l2_reg) ** 0.5)
        self._alpha = scalar("kfac_alpha")
        self._mu = scalar("kfac_mu")
        self._rho = scalar("kfac_rho")
        self._model_change = scalar("kfac_model_change")
        # The sampling seed as state too, so a tf.train.Checkpoint carries it.
        self._seed = scalar("kfac_seed", "int64", self.seed)
        self._momentums = [self.add_variable_from_reference(v, "momentum") for v in var_list]
        for block in blocks:
            block.build(self)
        self._kfac.blocks = blocks
        # How many layers' inverses this replica computed (diagnostics, not saved).
        self._kfac.inversions = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="kfac_inversions",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM)

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
        from tf_kfac.training import curvature_step

        model = self._kfac.model()
        if model is None or self._kfac.loss_fn is None:
            raise ValueError(
                "Call `optimizer.attach(model, loss=...)` once before `optimizer.step`."
            )
        if distribute.num_replicas() > 1 and tf.distribute.in_cross_replica_context():
            raise ValueError(
                "Under a distribution strategy, call `optimizer.step` inside "
                "`strategy.run(optimizer.step, args=(x, y))`, so that every replica "
                "runs it on its share of the batch."
            )
        loss_fn = self._kfac.loss_fn
        training_arg = internals.call_has_training_arg(model)

        def forward(inputs):
            return model(inputs, training=True) if training_arg else model(inputs)

        def objective(y_pred):
            value = loss_fn(y, y_pred, sample_weight=sample_weight)
            if model.losses:
                # Like Keras: under a strategy each replica carries 1/replicas of them.
                extra = tf.add_n([tf.cast(v, value.dtype) for v in model.losses])
                value = value + extra / tf.cast(distribute.num_replicas(), value.dtype)
            return value

        _, loss, logs = curvature_step(self, model, x, y, sample_weight, forward, objective)
        return {"loss": loss, **logs}

    def kronecker_factors(self, layer: keras.layers.Layer) -> tuple[tf.Tensor, tf.Tensor]:
        """The current (A, G) of a Dense or Conv2D layer, as float32 tensors.

        A = (1/B) Σ āāᵀ over the layer input with the bias coordinate appended
        last (Ω, over patches, for Conv2D) and G over the pre-activation
        gradients, moving averages over steps, so that kron(A, G) approximates
        the GGN block of the objective over the row-major vec of W̄ (kernel
        reshaped to (d_in, d_out), bias as last row). No damping is included.
        """
        for block in self._kfac.blocks or ():
            if isinstance(block, KroneckerBlock) and block.layer is layer:
                return tf.convert_to_tensor(block.a_factor), tf.convert_to_tensor(block.g_factor)
        if not self.built:
            raise ValueError("KFAC has no factors yet: train for one step first.")
        raise ValueError(
            f"Layer '{getattr(layer, 'name', layer)}' has no Kronecker factors: it is "
            "not a trainable Dense or Conv2D layer of the model this optimizer trains. "
            "See optimizer.summary()."
        )

    def summary(self, print_fn: Callable[[str], None] | None = None) -> str:
        """Prints (and returns) which curvature each trainable variable gets."""
        if not self._kfac.blocks:
            raise ValueError("KFAC has no layers registered yet: call fit or attach first.")
        rows = [("Layer / variable", "Block", "Params", "Curvature")]
        for block in self._kfac.blocks:
            params = sum(math.prod(v.shape) for v in block.variables)
            rows.append((block.name, block.kind, f"{params:,}", block.describe()))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        text = [f"KFAC curvature blocks (fisher={self.fisher!r})", line]
        for i, row in enumerate(rows):
            text.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
            if i == 0:
                text.append(line)
        text.append(line)
        out = "\n".join(text)
        (print_fn or print)(out)
        return out

    def apply(self, grads, trainable_variables=None):
        """Not available: K-FAC needs more than gradients (see the message)."""
        raise ValueError(
            "KFAC cannot precondition bare gradients: it needs each layer's inputs and "
            "pre-activation gradients, which only its own training step captures. Use "
            "model.fit with Keras's default train_step, or, in a custom training loop "
            "or a custom train_step, call optimizer.attach(model, loss=...) once and "
            "optimizer.step(x, y) per batch instead of apply_gradients."
        )

    # ------------------------------------------------------- the update
    def _current(self, value):
        if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
            return tf.cast(value(self.iterations), tf.float32)
        if callable(value):
            return tf.cast(value(), tf.float32)
        return tf.constant(value, tf.float32)

    def _sampling_seed(self) -> tf.Tensor:
        # Before the first build (an unbuilt model is built by its first forward
        # pass) the state does not exist yet; it holds this same seed.
        seed = tf.convert_to_tensor(self._seed) if self.built else tf.constant(self.seed, tf.int64)
        seed = tf.stack([seed, tf.cast(self.iterations, tf.int64)])
        if distribute.num_replicas() > 1:  # different draws on every replica
            seed = tf.random.experimental.stateless_fold_in(seed, distribute.replica_id())
        return seed

    def _factor_update_due(self) -> tf.Tensor:
        """Whether this step updates the factors: every interval, and until the first."""
        return tf.logical_or(
            tf.equal(self._factor_updates, 0),
            tf.equal(tf.cast(self.iterations, tf.int64) % self.factor_update_interval, 0),
        )

    def _apply_kfac_update(self, grads, loss, batch_factors, context,
                           loss_scale) -> dict[str, tf.Tensor]:
        """Updates factors, inverses, momentum and weights from one step.

        Args:
            grads: the objective's gradients, one per trainable variable.
            loss: the objective's value h(θ).
            batch_factors: this batch's (A, G) per Kronecker block (by id).
            context: a `training.StepContext` (network output, objective at
                shifted weights) for the adaptive mode.
            loss_scale: c, the loss's scale (per-example loss = c·(−log p));
                the damping, the KL-clip bound and γ are relative to it.

        A step whose loss, gradients, statistics or update are not all finite
        changes nothing but the step counters.
        """
        var_list = self._trainable_variables
        kron = [b for b in self._kfac.blocks if isinstance(b, KroneckerBlock)]
        step = tf.cast(self.iterations, tf.int64)
        damping = (tf.convert_to_tensor(self._damping) if self.adaptive
                   else self._current(self.damping))
        # λ, κ and γ are relative to the curvature's scale c: the factors (and
        # the gradient) carry c, so λ·c is the damping added to them.
        loss_scale = tf.cast(loss_scale, tf.float32)
        if self.adapt_gamma:
            gamma = tf.sqrt(loss_scale) * tf.convert_to_tensor(self._gamma)
        else:
            gamma = tf.sqrt(damping * loss_scale + self.l2_reg)

        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                 for g in grads]
        statistics = [t for b in kron for t in batch_factors[id(b)]]
        # Across replicas: the objective and gradients are summed (each replica's
        # loss is scaled by 1/replicas), with a count of replicas whose
        # statistics were not finite; the statistics themselves stay local.
        present = [i for i, g in enumerate(grads) if g is not None]
        local_bad = 1.0 - tf.cast(all_finite(statistics), tf.float32)
        reduced = distribute.all_reduce(
            "sum", [tf.cast(loss, tf.float32), local_bad, *[grads[i] for i in present]])
        loss, bad = reduced[0], reduced[1]
        for i, g in zip(present, reduced[2:], strict=True):
            grads[i] = g
        if self.l2_reg:
            grads = [g if g is None else g + tf.cast(self.l2_reg, g.dtype) * v
                     for g, v in zip(grads, var_list, strict=True)]
        ok = tf.logical_and(tf.equal(bad, 0.0),
                            all_finite([loss, *[g for g in grads if g is not None]]))

        # Factors: moving averages, debiased at the start.
        update_factors = self._factor_update_due()
        count = tf.cast(self._factor_updates + 1, tf.float32)
        decay = tf.minimum(1.0 - 1.0 / count, self.factor_decay)
        factor_vars = [v for b in kron for v in (b.a_factor, b.g_factor)]
        batch = [t for b in kron for t in batch_factors[id(b)]]

        def moving_averages():
            return [decay * old + (1.0 - decay) * new
                    for old, new in zip(factor_vars, batch, strict=True)]

        def current_factors():
            return [tf.convert_to_tensor(v) for v in factor_vars]

        factors = tf.cond(update_factors, moving_averages, current_factors) if kron else []

        # Inverses: every inverse_update_interval steps, and until first computed.
        refresh = tf.logical_and(ok, tf.logical_or(
            tf.equal(self._inverse_updates, 0),
            tf.equal(step % self.inverse_update_interval, 0),
        ))
        logs = {"damping": damping}
        if not self.adaptive:
            inverses, failed = self._inverses(kron, factors, gamma, refresh)
            updates, buffers, step_logs = self._fixed_step(grads, inverses, loss_scale)
            writes = [(self._damping, damping, None)]
        else:
            updates, buffers, inverses, gamma, step_logs, writes, failed = (
                self._adaptive_step(grads, loss, factors, gamma, damping, refresh, ok, context,
                                    loss_scale))
            refresh = tf.logical_or(refresh, self._gamma_adaptation_due(ok))
        logs.update(step_logs)
        ok = tf.logical_and(ok, all_finite([u for u in updates if u is not None]))
        # A layer whose refreshed inverse is not finite keeps its previous one; before
        # the first refresh there is none (the state holds zeros), so the step is
        # skipped and the next one inverts again. Only a complete refresh counts.
        inverted = tf.equal(failed, 0.0)
        never_inverted = tf.equal(self._inverse_updates, 0)
        ok = tf.logical_and(ok, tf.logical_or(inverted, tf.logical_not(never_inverted)))

        # Write factors, inverses, momentum, weights; all kept on a bad step.
        # Factors and inverses are written only on the steps that change them;
        # the factors are replica-local, everything else the same everywhere.
        distribute.write_local([(v, value, tf.logical_and(ok, update_factors))
                                for v, value in zip(factor_vars, factors, strict=True)])
        fresh = tf.logical_and(ok, refresh)
        writes += [(v, value, fresh) for v, value in zip(
            [v for b in kron for v in (b.a_inverse, b.g_inverse)], inverses, strict=True)]
        for variable, buffer, update, new_buffer in zip(
                var_list, self._momentums, updates, buffers, strict=True):
            if update is None:
                continue
            writes.append((buffer, tf.where(ok, new_buffer, buffer), None))
            value = variable + tf.where(ok, update, tf.zeros_like(update))
            if variable.constraint is not None:
                value = variable.constraint(value)
            writes.append((variable, value, None))

        ok64 = tf.cast(ok, tf.int64)
        skipped = self._skipped_steps + (1 - ok64)
        writes += [
            (self._factor_updates,
             self._factor_updates + ok64 * tf.cast(update_factors, tf.int64), None),
            (self._inverse_updates, self._inverse_updates
             + tf.cast(tf.logical_and(refresh, inverted), tf.int64) * ok64, None),
            (self._skipped_steps, skipped, None),
            (self._gamma, tf.where(ok, gamma / tf.sqrt(loss_scale), self._gamma), None),
        ]
        distribute.write(writes)
        self._iterations.assign_add(1)
        logs["skipped_steps"] = skipped
        return logs

    def _inverses(self, kron, factors, gamma, refresh):
        """Damped inverses at γ when `refresh`, else the stored ones (flat, A⁻¹ then G⁻¹).

        Returns the inverses and how many layers' fresh inverses were not finite
        (each of those keeps its stored inverse). With several replicas the
        factors (each replica's moving averages) are averaged first, each layer
        is inverted on the one replica that owns it, and the inverses are shared
        (tf_kfac/distribute.py).
        """
        if not kron:
            return [], tf.constant(0.0)
        replicas = distribute.num_replicas()
        owners = distribute.inverse_owners([b.inverse_cost for b in kron], replicas)
        me = distribute.replica_id()

        def old():
            stored = [tf.convert_to_tensor(v) for b in kron for v in (b.a_inverse, b.g_inverse)]
            return [*stored, tf.constant(0.0)]

        def owned(averaged):  # this replica's layers' inverses; zeros for the others'
            out, failed = [], []
            for i, block in enumerate(kron):
                previous = (block.a_inverse, block.g_inverse)
                if owners[i] != me:
                    out.extend(tf.zeros(v.shape, tf.float32) for v in previous)
                    continue
                pair = block.damped_inverses(averaged[2 * i], averaged[2 * i + 1], gamma)
                keep = all_finite(pair)
                failed.append(1.0 - tf.cast(keep, tf.float32))
                self._kfac.inversions.assign_add(1)
                out.extend(tf.where(keep, fresh, tf.convert_to_tensor(v))
                           for fresh, v in zip(pair, previous, strict=True))
            return [*out, tf.add_n(failed) if failed else tf.constant(0.0)]

        if isinstance(refresh, bool):  # the γ candidates (one replica only)
            result = owned(factors) if refresh else old()
        else:
            averaged = factors
            if replicas > 1:
                averaged = distribute.all_reduce_when(refresh, "mean", lambda: factors,
                                                      lambda: factors)
            result = distribute.all_reduce_when(refresh, "sum", lambda: owned(averaged), old)
        return list(result[:-1]), result[-1]

    def _directions(self, grads, inverses, loss_scale) -> list[tf.Tensor | None]:
        """V: each block's preconditioned gradient.

        A first-order block's direction is its gradient divided by the loss's
        scale c: its curvature is taken as c·I, so that its step, like the
        Kronecker blocks', does not depend on the scale of the objective.
        """
        var_list = self._trainable_variables
        index = {id(v): i for i, v in enumerate(var_list)}
        kron_index = 0
        directions: list[tf.Tensor | None] = [None] * len(var_list)
        for block in self._kfac.blocks:
            pair = None
            if isinstance(block, KroneckerBlock):
                pair = (inverses[2 * kron_index], inverses[2 * kron_index + 1])
                kron_index += 1
            positions = [index[id(v)] for v in block.variables]
            block_grads = [grads[i] for i in positions]
            if any(g is None for g in block_grads):
                continue
            preconditioned = block.precondition(block_grads, pair)
            if pair is None:
                preconditioned = [u / tf.cast(loss_scale, u.dtype) for u in preconditioned]
            for i, u in zip(positions, preconditioned, strict=True):
                directions[i] = u
        return directions

    def _fixed_step(self, grads, inverses, loss_scale):
        """Learning rate, KL-clip, Keras clipping, heavy-ball momentum, weight decay."""
        var_list = self._trainable_variables
        lr = tf.cast(self._get_current_learning_rate(), tf.float32)
        momentum = self._current(self.momentum)
        directions = self._directions(grads, inverses, loss_scale)
        logs = {}
        if self.kl_clip is not None:
            inner = qmodel.inner_product(directions, grads)
            bound = self.kl_clip * loss_scale
            scale = tf.minimum(1.0, tf.sqrt(bound / tf.maximum(lr * lr * inner, 1e-30)))
            directions = [None if d is None else d * tf.cast(scale, d.dtype) for d in directions]
            logs["kl_scale"] = scale
        present = [i for i, d in enumerate(directions) if d is not None]
        clipped = self._clip_gradients([directions[i] for i in present])
        updates = [None] * len(var_list)
        buffers = [None] * len(var_list)
        for i, direction in zip(present, clipped, strict=True):
            variable, buffer = var_list[i], self._momentums[i]
            buffers[i] = tf.cast(momentum, buffer.dtype) * buffer + direction
            delta = tf.cast(lr, variable.dtype) * buffers[i]
            if self.weight_decay is not None and self._use_weight_decay(variable):
                delta += tf.cast(lr * self.weight_decay, variable.dtype) * variable
            updates[i] = -delta
        return updates, buffers, logs

    def _gamma_adaptation_due(self, ok) -> tf.Tensor:
        if not self.adapt_gamma:
            return tf.constant(False)
        step = tf.cast(self.iterations, tf.int64)
        return tf.logical_and(ok, tf.equal(step % self.gamma_adaptation_interval, 0))

    def _adaptive_step(self, grads, loss, factors, gamma, damping, refresh, ok, context,
                       loss_scale):
        """δ = αΔ + μδ₀ from the quadratic model; λ by Levenberg–Marquardt; γ (§6.6)."""
        var_list = self._trainable_variables
        kron = [b for b in self._kfac.blocks if isinstance(b, KroneckerBlock)]
        previous = [tf.convert_to_tensor(b) for b in self._momentums]
        use_momentum = not (isinstance(self.momentum, (int, float)) and self.momentum == 0)
        model = qmodel.QuadraticModel(context.output, var_list, grads, previous,
                                      damping * loss_scale, self.l2_reg, use_momentum)

        def proposal(inverses):
            return [None if d is None else -d
                    for d in self._directions(grads, inverses, loss_scale)]

        if self.adapt_gamma:
            omega = qmodel.gamma_factor(self.gamma_adaptation_interval)

            def choose_gamma():
                candidates = [gamma, gamma * omega, gamma / omega]
                results = []
                failed = tf.constant(0.0)
                for candidate in candidates:
                    inverses, candidate_failed = self._inverses(kron, factors, candidate, True)
                    failed += candidate_failed
                    results.append((inverses, model.best_step(proposal(inverses)).model_change))
                values = tf.stack([tf.where(tf.math.is_finite(v), v, float("inf"))
                                   for _, v in results])
                best = tf.argmin(values)
                chosen = tf.gather(tf.stack(candidates), best)
                flat = [tf.gather(tf.stack(parts), best)
                        for parts in zip(*(inv for inv, _ in results), strict=True)]
                return [chosen, failed, *flat]

            def keep_gamma():
                inverses, failed = self._inverses(kron, factors, gamma, refresh)
                return [gamma, failed, *inverses]

            chosen = tf.cond(self._gamma_adaptation_due(ok), choose_gamma, keep_gamma)
            gamma, failed, inverses = chosen[0], chosen[1], list(chosen[2:])
        else:
            inverses, failed = self._inverses(kron, factors, gamma, refresh)

        delta = proposal(inverses)
        step = model.best_step(delta)
        updates = [None if d is None else tf.cast(step.alpha, d.dtype) * d
                   + tf.cast(step.mu, d.dtype) * p
                   for d, p in zip(delta, previous, strict=True)]

        # Levenberg–Marquardt: ρ on the same batch, every T₁ steps.
        iteration = tf.cast(self.iterations, tf.int64)
        rho_due = tf.logical_and(ok, tf.equal(iteration % self.damping_adaptation_interval, 0))

        # h(θ + δ) is this replica's share of the objective (a forward pass, only
        # when due); the shares are summed outside the conditional.
        after = tf.cond(rho_due, lambda: tf.cast(context.objective_at(updates), tf.float32),
                        lambda: tf.constant(0.0))
        (after,) = distribute.all_reduce("sum", [after])

        def measured():
            values = [tf.convert_to_tensor(v) for v in var_list]
            return qmodel.reduction_ratio(loss, after, values, updates, self.l2_reg,
                                          step.undamped_change)

        rho = tf.cond(rho_due, measured, lambda: tf.convert_to_tensor(self._rho))
        rho_ok = tf.logical_and(rho_due, tf.math.is_finite(rho))
        new_damping = qmodel.adapt_damping(damping, rho, self.damping_adaptation_interval,
                                           self.min_damping, self.max_damping)
        finite_step = all_finite([step.alpha, step.mu, step.model_change])
        keep = tf.logical_and(ok, finite_step)
        adapted = tf.logical_and(keep, rho_ok)
        # A skipped step keeps (and logs) the last finite values.
        state = {
            "damping": (self._damping, tf.where(adapted, new_damping, damping)),
            "rho": (self._rho, tf.where(adapted, rho, self._rho)),
            "alpha": (self._alpha, tf.where(keep, step.alpha, self._alpha)),
            "mu": (self._mu, tf.where(keep, step.mu, self._mu)),
            "model_change": (self._model_change,
                             tf.where(keep, step.model_change, self._model_change)),
        }
        writes = [(variable, value, None) for variable, value in state.values()]
        logs = {"gamma": gamma / tf.sqrt(loss_scale),
                **{name: value for name, (_, value) in state.items() if name != "damping"}}
        buffers = [None if u is None else tf.cast(u, b.dtype)
                   for u, b in zip(updates, self._momentums, strict=True)]
        return updates, buffers, inverses, gamma, logs, writes, failed

    def load_own_variables(self, store):
        """Restores the K-FAC state from a `.keras` file, or raises if it does not fit.

        Keras itself only warns and keeps fresh state when the saved optimizer
        has a different number of variables; K-FAC's factors, inverses,
        momentum and counters would then restart silently.
        """
        saved, built = len(store.keys()), len(self.variables)
        if saved != built:
            raise ValueError(
                f"The saved optimizer state has {saved} variables, but this K-FAC optimizer, "
                f"built for the loaded model, has {built}: the file comes from another "
                "version of tf_kfac or another model. Loading it would silently restart "
                "K-FAC's factors, inverses, momentum and step counters. To use the weights "
                "without the optimizer state, load with "
                "`keras.models.load_model(path, compile=False)` and compile again with a new "
                "tf_kfac.KFAC()."
            )
        super().load_own_variables(store)

    # ------------------------------------------------------------- config
    def get_config(self):
        config = super().get_config()
        for arg in _UNSUPPORTED_BASE_ARGS:
            config.pop(arg, None)
        config.pop("ema_momentum", None)
        config.pop("ema_overwrite_frequency", None)
        config.update(
            {
                "momentum": _serialize(self.momentum),
                "damping": _serialize(self.damping),
                "l2_reg": self.l2_reg,
                "fisher": self.fisher,
                "factor_decay": self.factor_decay,
                "factor_update_interval": self.factor_update_interval,
                "inverse_update_interval": self.inverse_update_interval,
                "kl_clip": self.kl_clip,
                "adaptive": self.adaptive,
                "adapt_gamma": self.adapt_gamma,
                "quadratic_model_fraction": self.quadratic_model_fraction,
                "damping_adaptation_interval": self.damping_adaptation_interval,
                "gamma_adaptation_interval": self.gamma_adaptation_interval,
                "min_damping": self.min_damping,
                "max_damping": self.max_damping,
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("momentum", "damping"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return super().from_config(config, custom_objects=custom_objects)


def _as_loss_object(loss: Any) -> keras.losses.Loss | None:
    """A `keras.losses.Loss` (mean over the batch, sample weights) for any loss form."""
    if loss is None or isinstance(loss, keras.losses.Loss):
        return loss
    function = keras.losses.get(loss) if isinstance(loss, str) else loss
    if not callable(function):
        raise ValueError(f"Unknown loss {loss!r}: pass a Keras loss name, function or object.")
    return internals.wrap_loss_function(function)


def _serialize(value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(value)
    return value


class _Registration:
    """What KFAC knows about the model it trains (Python only, never saved)."""

    def __init__(self):
        self.model: Callable[[], keras.Model | None] = lambda: None
        self.candidates: list[keras.layers.Layer] = []
        self.blocks: list | None = None
        self.spec: LossSpec | None = None
        self.loss_fn: Any = None
        self.loss_given: Any = None
        self.registered = False  # layers wrapped and loss read (attach ran)
