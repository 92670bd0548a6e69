"""Every misuse fails with a clear message, and non-finite steps are skipped.

"Never silently degrade": when K-FAC cannot do its job it says what to do
instead; when one batch is not finite, that step changes nothing and training
goes on.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac


# ----------------------------------------------------------------- helpers
def _mlp(outputs=3, activation="softmax"):
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(outputs, activation=activation),
    ])


def _data(n=32, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 4).astype("float32")
    return x, (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")


def _regression_data(n=32, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 4).astype("float32")
    return x, np.stack([x[:, 0] - x[:, 1], x[:, 2]], axis=1).astype("float32")


def _snapshot(model, opt):
    """Copies of the model's weights and of every optimizer variable, by path."""
    state = {f"model/{v.path}": v.numpy().copy() for v in model.weights}
    state.update({f"opt/{v.path}": v.numpy().copy() for v in opt.variables})
    return state


@pytest.fixture
def float32_policy():
    """Restores the float32 dtype policy after a test that changes it."""
    yield
    keras.mixed_precision.set_global_policy("float32")


# ------------------------------------------------------- hyperparameters
BAD_HYPERPARAMETERS = [
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"damping": -1e-3}, "damping"),
    ({"damping": 0.0}, "damping"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": 1.5}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"l2_reg": -1.0}, "l2_reg"),
    ({"fisher": "natural"}, "fisher.*sampled.*empirical.*exact"),
    ({"fisher": None}, "fisher"),
    ({"factor_decay": 1.0}, "factor_decay"),
    ({"factor_decay": -0.5}, "factor_decay"),
    ({"factor_update_interval": 0}, "factor_update_interval"),
    ({"factor_update_interval": 1.5}, "factor_update_interval"),
    ({"factor_update_interval": True}, "factor_update_interval"),
    ({"inverse_update_interval": 0}, "inverse_update_interval"),
    ({"inverse_update_interval": 20.0}, "inverse_update_interval"),
    ({"kl_clip": 0.0}, "kl_clip"),
    ({"kl_clip": -1e-3}, "kl_clip"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "42"}, "seed"),
    ({"use_ema": True}, "use_ema"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"quadratic_model_fraction": 0.0}, "quadratic_model_fraction"),
    ({"quadratic_model_fraction": 1.5}, "quadratic_model_fraction"),
    ({"damping_adaptation_interval": 0}, "damping_adaptation_interval"),
    ({"gamma_adaptation_interval": 2.5}, "gamma_adaptation_interval"),
    ({"min_damping": 0.0}, "min_damping"),
    ({"min_damping": 1.0, "max_damping": 0.5}, "max_damping"),
    ({"adapt_gamma": True}, "adapt_gamma.*adaptive=True"),
    ({"adaptive": True, "clipnorm": 1.0}, "adaptive=True.*clipnorm"),
    ({"adaptive": True, "damping": keras.optimizers.schedules.ExponentialDecay(1.0, 5, 0.5)},
     "adaptive=True.*schedule"),
    ({"adaptive": True, "damping": 10.0, "max_damping": 1.0}, "damping.*max_damping"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_HYPERPARAMETERS,
                         ids=[",".join(f"{k}={v!r}"[:40] for k, v in kw.items())
                              for kw, _ in BAD_HYPERPARAMETERS])
def test_invalid_hyperparameter_is_rejected(kwargs, match):
    """Each out-of-range or mistyped hyperparameter (and each unsupported base
    optimizer option) raises a ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        tf_kfac.KFAC(**kwargs)


# ------------------------------------------------------------------ model
def test_model_without_dense_or_conv2d():
    """A model with only layers that have no curvature block (a custom layer, pooling)
    is refused, by `fit` and by `attach`, with a message saying so and suggesting a
    first-order optimizer."""

    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, x):
            return keras.ops.mean(x * self.scale, axis=1)

    model = keras.Sequential([keras.Input((3, 2)), keras.layers.Dropout(0.1), Scale()])
    model.compile(optimizer=tf_kfac.KFAC(), loss="mse")
    x = (np.arange(48).reshape(8, 3, 2) % 10).astype("float32")
    y = np.zeros((8, 2), "float32")
    match = r"no layer with a curvature block(.|\n)*first-order optimizer"
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=4, verbose=0)
    with pytest.raises(ValueError, match=match):
        tf_kfac.KFAC().attach(model)


def _huber_like(y_true, y_pred):
    return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)


@pytest.mark.parametrize("loss", ["huber", _huber_like], ids=["huber", "custom_function"])
@pytest.mark.parametrize("fisher", ["sampled", "exact"])
def test_unsupported_loss_needs_empirical(loss, fisher):
    """A loss without a known predictive distribution is refused for fisher
    "sampled"/"exact" at the first step, before any weight changes, with a
    message listing the supported losses and the "empirical" option."""
    x, y = _regression_data(n=16)
    model = _mlp(outputs=2, activation=None)
    model.compile(optimizer=tf_kfac.KFAC(fisher=fisher), loss=loss)
    before = [w.numpy().copy() for w in model.weights]
    match = (r"Supported losses: sparse_categorical_crossentropy, "
             r"categorical_crossentropy, binary_crossentropy, mean_squared_error"
             r"(.|\n)*fisher='empirical'")
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=8, verbose=0)
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, new.numpy())


@pytest.mark.parametrize("loss", ["huber", _huber_like], ids=["huber", "custom_function"])
def test_unsupported_loss_trains_with_empirical_fisher(loss):
    """The same losses train with fisher="empirical": the loss goes down and
    the Kronecker factors are filled."""
    keras.utils.set_random_seed(0)
    x, y = _regression_data(n=48)
    model = _mlp(outputs=2, activation=None)
    opt = tf_kfac.KFAC(fisher="empirical")
    model.compile(optimizer=opt, loss=loss)
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    before = float(keras.ops.mean(loss_fn(y, model(x))))
    history = model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
    after = float(keras.ops.mean(loss_fn(y, model(x))))
    assert after < 0.9 * before, (before, after)
    assert history.history["skipped_steps"][-1] == 0
    a, g = opt.kronecker_factors(model.layers[0])
    assert np.abs(a.numpy()).sum() > 0 and np.abs(g.numpy()).sum() > 0


# ---------------------------------------------------------------- the API
def test_apply_gradients_directly_points_to_attach_and_step():
    """`opt.apply_gradients` cannot precondition bare gradients: it raises and
    points to `attach` + `step` (or `model.fit`)."""
    model = _mlp()
    opt = tf_kfac.KFAC()
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"attach(.|\n)*step"):
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))


def test_custom_train_step_with_apply_gradients_points_to_step():
    """A model whose own `train_step` calls `optimizer.apply_gradients` gets
    the same clear error from `fit`, not a silent first-order update."""

    class Custom(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
            return {"loss": loss}

    inputs = keras.Input((4,))
    model = Custom(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(optimizer=tf_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    x, y = _data(n=8)
    with pytest.raises(ValueError, match=r"attach(.|\n)*step"):
        model.fit(x, y, batch_size=4, verbose=0)


def test_step_before_attach():
    """`opt.step` on an optimizer that was never attached says to call
    `attach(model, loss=...)` first."""
    x, y = _data(n=4)
    with pytest.raises(ValueError, match=r"attach\(model"):
        tf_kfac.KFAC().step(x, y)


def test_one_optimizer_per_model():
    """Attaching one KFAC instance to a second model is refused."""
    opt = tf_kfac.KFAC()
    first = _mlp()  # KFAC holds its model weakly: keep it alive
    opt.attach(first, loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="one KFAC instance per model"):
        opt.attach(_mlp(), loss="sparse_categorical_crossentropy")


def test_inspection_before_and_outside_registration():
    """`summary()` before any attach, `kronecker_factors` before the first
    step and `kronecker_factors` of a layer without a Kronecker block each
    explain themselves."""
    opt = tf_kfac.KFAC()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.PReLU()])
    with pytest.raises(ValueError, match="fit or attach"):
        opt.summary()
    with pytest.raises(ValueError, match="train for one step"):
        opt.kronecker_factors(model.layers[0])
    opt.attach(model, loss="mse")
    with pytest.raises(ValueError, match="no Kronecker factors(.|\n)*summary"):
        opt.kronecker_factors(model.layers[1])


@pytest.mark.usefixtures("float32_policy")
def test_mixed_float16_policy():
    """Under the 'mixed_float16' policy `compile` wraps KFAC in a
    LossScaleOptimizer and `fit` trains with float32 factors
    (tests/test_mixed_precision.py has the details); a float16 model whose
    KFAC is not wrapped (a custom loop's `attach` on an uncompiled model) is
    refused with a message naming the wrapper and the policy."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _mlp()
    opt = tf_kfac.KFAC()
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = _data(n=8)
    model.fit(x, y, batch_size=4, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert all(f.dtype == tf.float32 for f in opt.kronecker_factors(model.layers[0]))
    match = r"LossScaleOptimizer(.|\n)*mixed_float16"
    with pytest.raises(ValueError, match=match):
        tf_kfac.KFAC().attach(_mlp(), loss="sparse_categorical_crossentropy")
    other = _mlp()  # compiled with a wrapper around another KFAC than the attached one
    other.compile(optimizer=tf_kfac.KFAC(), loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=match):
        tf_kfac.KFAC().attach(other)


@pytest.mark.usefixtures("float32_policy")
def test_float16_weights_are_refused():
    """A layer with float16 weights (the 'float16' policy) cannot take K-FAC's
    small updates; the message says to keep float32 weights."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, dtype="float16"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(tf_kfac.KFAC()),
                  loss="sparse_categorical_crossentropy")
    x, y = _data(n=8)
    with pytest.raises(ValueError, match=r"float16 weights(.|\n)*mixed_float16"):
        model.fit(x, y, batch_size=4, verbose=0)


# ------------------------------------------------------------- non-finite
def _poison(x, y, batch, where, batch_size=8):
    x, y = x.copy(), y.copy()
    row = batch * batch_size + 3
    if where == "nan_input":
        x[row, 1] = np.nan
    elif where == "inf_input":
        x[row, 2] = np.inf
    else:
        y[row, 0] = np.inf
    return x, y


@pytest.mark.parametrize(("where", "bad_batch", "adaptive"), [
    ("nan_input", 2, False), ("inf_input", 0, False), ("inf_target", 1, False),
    ("nan_input", 2, True),
])
def test_non_finite_batch_skips_the_step(where, bad_batch, adaptive):
    """A batch with NaN/inf in its inputs, or an inf loss, changes nothing but
    the step counters: weights, factors, inverses, momentum (and, in the
    adaptive mode, damping and γ) keep their previous values exactly (also
    when it is the very first step); the next finite batches train again and
    "skipped_steps" counts the step."""
    keras.utils.set_random_seed(0)
    x, y = _poison(*_regression_data(n=32), bad_batch, where)
    model = _mlp(outputs=2, activation=None)
    opt = tf_kfac.KFAC(inverse_update_interval=1, factor_update_interval=1, seed=1,
                       adaptive=adaptive,
                       damping=1.0 if adaptive else 1e-3, damping_adaptation_interval=1)
    model.compile(optimizer=opt, loss="mse")
    states, batch_logs = [], []

    def record(batch, logs):
        states.append(_snapshot(model, opt))
        batch_logs.append(dict(logs))

    model.build((None, 4))
    opt.attach(model)
    initial = _snapshot(model, opt)
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                        callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=record)])
    # The step counters move; in the fixed mode kfac_damping only records the
    # (scheduled) damping in use, in the adaptive mode it is state.
    counters = ("iteration", "kfac_skipped_steps") + (() if adaptive else ("kfac_damping",))
    previous = [initial, *states][bad_batch]
    skipped = states[bad_batch]
    assert int(skipped["opt/kfac/iteration"]) == int(previous["opt/kfac/iteration"]) + 1
    assert int(skipped["opt/kfac/kfac_skipped_steps"]) == 1
    for key, value in previous.items():
        if not key.endswith(counters):
            np.testing.assert_array_equal(skipped[key], value, err_msg=key)
    assert bad_batch + 1 < len(states)
    for earlier, later in zip(states[bad_batch:], states[bad_batch + 1 :], strict=False):
        changed = {k for k in later if not np.array_equal(later[k], earlier[k])}
        assert any(k.startswith("model/") for k in changed), "a later batch did not train"
        assert any("kfac_A" in k for k in changed), "factors stopped updating after the skip"
        assert all(np.isfinite(later[k]).all() for k in later), "non-finite state"
    assert [int(entry["skipped_steps"]) for entry in batch_logs] == (
        [0] * bad_batch + [1] * (len(batch_logs) - bad_batch)
    )
    assert history.history["skipped_steps"][-1] == 1
    assert all(np.isfinite(np.asarray(w)).all() for w in model.get_weights())


@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "binary_crossentropy"])
def test_non_finite_logits_skip_the_sampled_step(loss):
    """With fisher="sampled", a NaN example makes the logits non-finite; drawing
    targets from them must not crash (a categorical draw from a NaN row is out
    of range): the step is skipped, counted, and leaves the weights alone."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((16, 4)).astype("float32")
    x[5, 0] = np.nan
    if loss == "binary_crossentropy":
        y = (x[:, 1:2] > 0.5).astype("float32")
        head = keras.layers.Dense(1, activation="sigmoid")
    else:
        y = np.random.default_rng(1).integers(0, 3, 16)
        head = keras.layers.Dense(3, activation="softmax")
    model = keras.Sequential([keras.Input((4,)), head])
    model.compile(optimizer=tf_kfac.KFAC(seed=0, fisher="sampled"), loss=loss)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert history.history["skipped_steps"] == [1]
    for new, old in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("name", ["learning_rate", "damping", "kl_clip", "l2_reg", "max_damping"])
def test_a_value_beyond_float32_is_refused(name):
    """A finite float64 above float32's largest value would be stored as inf in the float32
    state (found by the property tests: learning_rate=3.4028235677973366e38)."""
    with pytest.raises(ValueError, match=name):
        tf_kfac.KFAC(**{name: 3.4028235677973366e38})
