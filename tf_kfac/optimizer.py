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
from tf_kfac import capture
from tf_kfac.blocks import KroneckerBlock, block_type_for, blocks_for_model
from tf_kfac.linalg import all_finite
from tf_kfac.losses import LossSpec, UnsupportedLossError, resolve_loss

FISHER_ESTIMATORS = ("sampled", "empirical", "exact")

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
    γ = √(damping + l2_reg). Every other trainable variable (normalisation,
    embeddings, custom layers) trains with the first-order fallback: its update
    direction is its gradient. The directions are scaled by the KL-clip factor
    ν = min(1, √(kl_clip / (lr² Σ⟨V, ∇⟩))) and applied with heavy-ball
    momentum: m ← momentum·m + ν·V, w ← w − lr·m.

    Use it like any Keras optimizer: `model.compile(optimizer=tf_kfac.KFAC(),
    loss=...)` then `model.fit(...)`. The first `fit` registers every Dense and
    Conv2D layer; `summary()` shows which variable got which treatment. For a
    custom training loop, call `attach(model, loss)` once and `step(x, y)` per
    batch.

    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
            Defaults to `0.1`.
        momentum: float in [0, 1), or a schedule. Defaults to `0.9`.
        damping: the Tikhonov damping λ > 0, or a schedule. Defaults to `1e-3`.
        l2_reg: the paper's L2 coefficient η ≥ 0: η·w is added to every
            gradient and η to the damping. Defaults to `0.0`. (Keras's
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
            Defaults to `1`.
        inverse_update_interval: recompute the damped inverses every this many
            steps. Defaults to `20`. Factors and inverses are always refreshed
            from the first step's batch.
        kl_clip: the KL-clip bound κ > 0, or `None` to turn it off. Defaults to
            `1e-3`.
        seed: int seed of the sampled targets; `None` draws one (and stores it in
            the config, so a reloaded optimizer continues the same draws).
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
        momentum: float | keras.optimizers.schedules.LearningRateSchedule = 0.9,
        damping: float | keras.optimizers.schedules.LearningRateSchedule = 1e-3,
        l2_reg: float = 0.0,
        fisher: str = "sampled",
        factor_decay: float = 0.95,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 20,
        kl_clip: float | None = 1e-3,
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
        if model.dtype_policy.name == "mixed_float16" or isinstance(
            getattr(model, "optimizer", None), keras.optimizers.LossScaleOptimizer
        ):
            raise ValueError(
                "KFAC does not support loss scaling (the 'mixed_float16' policy) yet. "
                "Train in float32, or with the 'mixed_bfloat16' policy, which needs no "
                "loss scaling."
            )
        if tf.distribute.has_strategy() and (
            tf.distribute.get_strategy().num_replicas_in_sync > 1
        ):
            raise ValueError(
                "KFAC does not support distribution strategies with more than one "
                "replica yet. Train on one device (no strategy scope)."
            )
        if attached is model and (loss is None or state.loss_given == loss):
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
        state.loss_fn = _as_loss_object(loss)
        state.loss_given = loss
        for layer in candidates:
            capture.wrap_layer(layer)
        state.candidates = candidates
        state.model = weakref.ref(model)
        if not self.built and model.built:
            self.build(model.trainable_variables)

    def _resolve_spec(self, model, loss) -> LossSpec | None:
        if loss is None:
            loss, loss_weights = internals.compiled_loss(model)
        else:
            loss_weights = None
        try:
            return resolve_loss(loss, loss_weights)
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
        super().build(var_list)
        blocks = blocks_for_model(internals.flatten_layers(model), var_list)
        if not any(isinstance(b, KroneckerBlock) for b in blocks):
            raise ValueError(
                f"KFAC found no trainable Dense or Conv2D layer in model '{model.name}'. "
                "Use a first-order optimizer such as keras.optimizers.Adam for it."
            )
        self._damping = self.add_variable((), initializer="zeros", dtype="float32",
                                          name="kfac_damping")
        self._skipped_steps = self.add_variable((), dtype="int64", name="kfac_skipped_steps")
        self._factor_updates = self.add_variable((), dtype="int64", name="kfac_factor_updates")
        self._inverse_updates = self.add_variable((), dtype="int64",
                                                  name="kfac_inverse_updates")
        self._momentums = [self.add_variable_from_reference(v, "momentum") for v in var_list]
        for block in blocks:
            block.build(self)
        self._kfac.blocks = blocks

    # ------------------------------------------------------------- user API
    def step(self, x, y, sample_weight=None) -> dict[str, tf.Tensor]:
        """One K-FAC training step for a custom training loop.

        Call `attach(model, loss)` once first. Works eagerly and inside
        `tf.function`. The objective is `loss(y, model(x), sample_weight)`
        plus the model's regularisation losses.

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
        loss_fn = self._kfac.loss_fn
        training_arg = internals.call_has_training_arg(model)

        def forward(inputs):
            return model(inputs, training=True) if training_arg else model(inputs)

        def objective(y_pred):
            value = loss_fn(y, y_pred, sample_weight=sample_weight)
            if model.losses:
                value = value + tf.add_n([tf.cast(v, value.dtype) for v in model.losses])
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
        return tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.iterations, tf.int64)])

    def _factor_update_due(self) -> tf.Tensor:
        """Whether this step updates the factors: every interval, and until the first."""
        return tf.logical_or(
            tf.equal(self._factor_updates, 0),
            tf.equal(tf.cast(self.iterations, tf.int64) % self.factor_update_interval, 0),
        )

    def _apply_kfac_update(self, grads, loss, batch_factors) -> dict[str, tf.Tensor]:
        """Updates factors, inverses, momentum and weights from one step.

        A step whose loss, gradients or statistics are not all finite changes
        nothing but the step counters.
        """
        var_list = self._trainable_variables
        blocks = self._kfac.blocks
        kron = [b for b in blocks if isinstance(b, KroneckerBlock)]
        step = tf.cast(self.iterations, tf.int64)
        lr = tf.cast(self._get_current_learning_rate(), tf.float32)
        damping = self._current(self.damping)
        momentum = self._current(self.momentum)
        gamma = tf.sqrt(damping + self.l2_reg)

        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                 for g in grads]
        if self.l2_reg:
            grads = [g if g is None else g + tf.cast(self.l2_reg, g.dtype) * v
                     for g, v in zip(grads, var_list, strict=True)]
        statistics = [t for b in kron for t in batch_factors[id(b)]]
        ok = all_finite([loss, *[g for g in grads if g is not None], *statistics])

        # Factors: moving averages, debiased at the start.
        update_factors = self._factor_update_due()
        count = tf.cast(self._factor_updates + 1, tf.float32)
        decay = tf.minimum(1.0 - 1.0 / count, self.factor_decay)
        factors = {}
        for block in kron:
            a_batch, g_batch = batch_factors[id(block)]
            factors[id(block)] = tuple(
                tf.where(update_factors, decay * old + (1.0 - decay) * new, old)
                for old, new in ((block.a_factor, a_batch), (block.g_factor, g_batch))
            )

        # Inverses: every inverse_update_interval steps, and until first computed.
        refresh = tf.logical_and(ok, tf.logical_or(
            tf.equal(self._inverse_updates, 0),
            tf.equal(step % self.inverse_update_interval, 0),
        ))

        def new_inverses():
            out = []
            for block in kron:
                pair = block.damped_inverses(*factors[id(block)], gamma)
                keep = all_finite(pair)
                out.extend(tf.where(keep, new, tf.convert_to_tensor(old))
                           for new, old in zip(pair, (block.a_inverse, block.g_inverse),
                                               strict=True))
            return out

        def old_inverses():
            return [tf.convert_to_tensor(v) for b in kron for v in (b.a_inverse, b.g_inverse)]

        flat_inverses = tf.cond(refresh, new_inverses, old_inverses) if kron else []
        inverses = {id(b): tuple(flat_inverses[2 * i : 2 * i + 2]) for i, b in enumerate(kron)}

        # Preconditioned directions, block by block.
        index = {id(v): i for i, v in enumerate(var_list)}
        directions: list[tf.Tensor | None] = [None] * len(var_list)
        for block in blocks:
            positions = [index[id(v)] for v in block.variables]
            block_grads = [grads[i] for i in positions]
            if any(g is None for g in block_grads):
                continue
            updates = block.precondition(block_grads, inverses.get(id(block)))
            for i, u in zip(positions, updates, strict=True):
                directions[i] = u

        logs = {"damping": damping}
        if self.kl_clip is not None:
            inner = tf.add_n([
                tf.reduce_sum(tf.cast(d, tf.float32) * tf.cast(g, tf.float32))
                for d, g in zip(directions, grads, strict=True) if d is not None
            ])
            scale = tf.minimum(1.0, tf.sqrt(self.kl_clip / tf.maximum(lr * lr * inner, 1e-30)))
            directions = [None if d is None else d * tf.cast(scale, d.dtype) for d in directions]
            logs["kl_scale"] = scale
        present = [i for i, d in enumerate(directions) if d is not None]
        clipped = self._clip_gradients([directions[i] for i in present])
        for i, d in zip(present, clipped, strict=True):
            directions[i] = d
        ok = tf.logical_and(ok, all_finite([d for d in directions if d is not None]))

        # Assign: factors, inverses, momentum, weights; all kept on a bad step.
        for block in kron:
            for var, new in zip((block.a_factor, block.g_factor), factors[id(block)], strict=True):
                var.assign(tf.where(ok, new, var))
            for var, new in zip((block.a_inverse, block.g_inverse), inverses[id(block)],
                                strict=True):
                var.assign(tf.where(ok, new, var))
        for i in present:
            variable, buffer, direction = var_list[i], self._momentums[i], directions[i]
            new_buffer = tf.cast(momentum, buffer.dtype) * buffer + direction
            buffer.assign(tf.where(ok, new_buffer, buffer))
            delta = tf.cast(lr, variable.dtype) * new_buffer
            if self.weight_decay is not None and self._use_weight_decay(variable):
                delta += tf.cast(lr * self.weight_decay, variable.dtype) * variable
            variable.assign_sub(tf.where(ok, delta, tf.zeros_like(delta)))
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))

        ok64 = tf.cast(ok, tf.int64)
        self._factor_updates.assign_add(ok64 * tf.cast(update_factors, tf.int64))
        self._inverse_updates.assign_add(tf.cast(refresh, tf.int64) * ok64)
        self._skipped_steps.assign_add(1 - ok64)
        self._damping.assign(damping)
        self._iterations.assign_add(1)
        logs["skipped_steps"] = tf.convert_to_tensor(self._skipped_steps)
        return logs

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
