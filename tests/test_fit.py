"""`model.fit` integration: K-FAC trains ordinary Keras models, untouched.

Every test uses a tiny model and a few steps; the point is the wiring (which
models, losses, estimators and `fit` options reach K-FAC's training step), not
the optimisation quality.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tf_kfac

CLASSES = 3
FEATURES = 4


# ----------------------------------------------------------------- helpers
def _classification_data(n=48, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, FEATURES).astype("float32")
    logits = x @ rng.randn(FEATURES, CLASSES)
    return x, logits.argmax(axis=1).astype("int32")


def _dense_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))]


def _sequential():
    return keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])


def _functional():
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    skip = keras.layers.Dense(8)(inputs)
    merged = keras.layers.Add()([hidden, skip])
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(merged)
    return keras.Model(inputs, outputs)


class WithTraining(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.dropout = keras.layers.Dropout(0.0)
        self.out = keras.layers.Dense(CLASSES, activation="softmax")

    def call(self, x, training=None):
        return self.out(self.dropout(self.hidden(x), training=training))


class WithoutTraining(keras.Model):
    """`call(self, x)`: Keras's call context says training=None inside fit."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(CLASSES, activation="softmax")

    def call(self, x):
        return self.out(self.hidden(x))


MODEL_KINDS = {
    "sequential": _sequential,
    "functional": _functional,
    "subclassed": WithTraining,
    "subclassed_no_training_arg": WithoutTraining,
}


def _assert_factors_nonzero(opt, model):
    layers = _dense_layers(model)
    assert layers
    for layer in layers:
        a, g = opt.kronecker_factors(layer)
        assert np.abs(a.numpy()).sum() > 0, layer.name
        assert np.abs(g.numpy()).sum() > 0, layer.name


def _summary_rows(text):
    """{layer or variable path: block kind} from `KFAC.summary()`'s table."""
    rows = [line.split() for line in text.splitlines()]
    return {row[0]: row[1] for row in rows if len(row) >= 2}


def _loss(model, loss, x, y):
    """The loss of the model's eager forward pass (no extra traced function)."""
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    return float(keras.ops.mean(loss_fn(y, model(x))))


def _weights(model):
    return [w.numpy().copy() for w in model.weights]


def _assert_weights_equal(first, second, **tolerance):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a, b, **tolerance)


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_model_kinds_train_with_kfac(kind):
    """Sequential, functional and subclassed models (also one whose `call` has
    no `training` argument) train under `fit` with real K-FAC: the loss goes
    down and every Dense layer has non-zero Kronecker factors afterwards."""
    keras.utils.set_random_seed(0)
    x, y = _classification_data()
    model = MODEL_KINDS[kind]()
    opt = tf_kfac.KFAC(seed=1)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    before = _loss(model, "sparse_categorical_crossentropy", x, y)
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    after = _loss(model, "sparse_categorical_crossentropy", x, y)
    assert after < 0.8 * before, (before, after)
    assert history.history["skipped_steps"][-1] == 0
    _assert_factors_nonzero(opt, model)
    assert int(opt.iterations) == 9


def test_validation_data_callbacks_and_logs():
    """`validation_data`, metrics and callbacks work; every batch's logs and
    the History carry the K-FAC scalars damping, skipped_steps and kl_scale."""
    keras.utils.set_random_seed(0)
    x, y = _classification_data()
    x_val, y_val = _classification_data(n=16, seed=1)
    batch_logs = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batch_logs.append(dict(logs))
    )
    model = _sequential()
    model.compile(optimizer=tf_kfac.KFAC(damping=0.01, seed=1),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=16, epochs=2, validation_data=(x_val, y_val),
                        callbacks=[callback], verbose=0)
    expected = {"loss", "accuracy", "damping", "skipped_steps", "kl_scale",
                "val_loss", "val_accuracy"}
    assert expected <= set(history.history)
    assert len(batch_logs) == 6
    for logs in batch_logs:
        assert {"damping", "skipped_steps", "kl_scale"} <= set(logs)
        assert logs["damping"] == pytest.approx(0.01)
        assert 0.0 < logs["kl_scale"] <= 1.0
    assert all(np.isfinite(history.history["val_loss"]))


def test_steps_per_execution_matches_single_steps():
    """`steps_per_execution=3` runs K-FAC on every step of the fused loop: the
    step counter counts each batch and the weights equal a run with one step
    per execution (deterministic `fisher="exact"`)."""
    x, y = _classification_data()
    results = []
    for steps in (1, 3):
        keras.utils.set_random_seed(0)
        model = _sequential()
        opt = tf_kfac.KFAC(fisher="exact", inverse_update_interval=2, seed=1)
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy",
                      steps_per_execution=steps)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        assert int(opt.iterations) == 6
        _assert_factors_nonzero(opt, model)
        results.append(_weights(model))
    _assert_weights_equal(*results, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_run_eagerly_matches_compiled(fisher):
    """`run_eagerly=True` runs the real K-FAC step (not a fallback): two steps
    give the same weights and factors as the compiled train function."""
    x, y = _classification_data(n=16)
    results = []
    for eager in (False, True):
        keras.utils.set_random_seed(0)
        model = _sequential()
        opt = tf_kfac.KFAC(fisher=fisher, seed=1)
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy",
                      run_eagerly=eager)
        initial = _weights(model)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        assert int(opt.iterations) == 2
        _assert_factors_nonzero(opt, model)
        assert any(not np.array_equal(a, b) for a, b in zip(initial, _weights(model),
                                                             strict=True))
        factors = [f.numpy() for layer in _dense_layers(model)
                   for f in opt.kronecker_factors(layer)]
        results.append(_weights(model) + factors)
    _assert_weights_equal(*results, rtol=1e-5, atol=1e-6)


def _prelu_model():
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.PReLU()(keras.layers.Dense(8)(inputs))
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(hidden)
    return keras.Model(inputs, outputs), keras.layers.PReLU


def _group_normalization_model():
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    hidden = keras.layers.GroupNormalization(groups=2)(hidden)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(hidden)
    return keras.Model(inputs, outputs), keras.layers.GroupNormalization


@pytest.mark.parametrize("build", [
    pytest.param(_prelu_model, id="prelu"),
    pytest.param(_group_normalization_model, id="group_normalization"),
])
def test_first_order_fallback_trains_other_layers(build):
    """Variables of layers without a curvature block (PReLU, GroupNormalization)
    train (they change) through the first-order fallback, and `summary()` lists
    each of them as "first-order" while each Dense gets a "dense" block."""
    keras.utils.set_random_seed(0)
    model, others = build()
    x, y = _classification_data(n=32)
    opt = tf_kfac.KFAC(seed=1)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    lines = []
    text = opt.summary(print_fn=lines.append)
    assert lines == [text]
    rows = _summary_rows(text)
    fallback = [layer for layer in model.layers if isinstance(layer, others)]
    assert fallback
    for layer in fallback:
        assert layer.trainable_variables
        for variable in layer.trainable_variables:
            assert rows[variable.path] == "first-order", variable.path
            assert not np.array_equal(before[variable.path], variable.numpy()), (
                f"{variable.path} did not train"
            )
    for layer in _dense_layers(model):
        assert rows[layer.path] == "dense"
    _assert_factors_nonzero(opt, model)


def test_every_dense_and_conv2d_is_registered():
    """Each Dense and Conv2D, including ones nested in an inner model and in a
    custom layer, gets its own Kronecker block in `summary()`; a Conv2D model
    trains under `fit`."""

    class Head(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(6, activation="relu")

        def call(self, x):
            return self.inner(x)

    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.layers.Dense(5, activation="relu")], name="inner")
    inputs = keras.Input((6, 6, 2))
    hidden = keras.layers.Conv2D(3, 3, activation="relu")(inputs)
    hidden = keras.layers.Conv2D(4, 2, strides=2, padding="same")(hidden)
    hidden = keras.layers.Flatten()(hidden)
    hidden = inner(Head()(hidden))
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.RandomState(0)
    x = rng.randn(16, 6, 6, 2).astype("float32")
    y = rng.randint(0, CLASSES, size=16).astype("int32")
    opt = tf_kfac.KFAC(seed=1)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    before = _loss(model, "sparse_categorical_crossentropy", x, y)
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    assert _loss(model, "sparse_categorical_crossentropy", x, y) < before
    text = opt.summary(print_fn=lambda _: None)
    kinds = _summary_rows(text)
    layers = _dense_layers(model)
    assert len(layers) == 5
    for layer in layers:
        expected = "conv2d" if isinstance(layer, keras.layers.Conv2D) else "dense"
        assert kinds.get(layer.path) == expected, (layer.path, text)
    assert "first-order" not in text
    _assert_factors_nonzero(opt, model)


def _targets(kind, x):
    labels = (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 0.5).astype("int32")
    if kind == "sparse":
        return labels
    if kind == "onehot":
        return np.eye(CLASSES, dtype="float32")[labels]
    if kind == "binary":
        return np.stack([x[:, 0] > 0, x[:, 1] > 0], axis=1).astype("float32")
    return np.stack([x[:, 0] - x[:, 1], 0.5 * x[:, 2]], axis=1).astype("float32")


L = keras.losses
# Each likelihood family meets every Fisher estimator, each loss spelling once.
LOSS_CASES = [
    # id, loss, output units, output activation, targets, fisher
    ("scce-string", "sparse_categorical_crossentropy", CLASSES, "softmax", "sparse", "sampled"),
    ("scce-object", L.SparseCategoricalCrossentropy(), CLASSES, "softmax", "sparse", "exact"),
    ("scce-logits", L.SparseCategoricalCrossentropy(from_logits=True), CLASSES, None, "sparse",
     "empirical"),
    ("cce-string", "categorical_crossentropy", CLASSES, "softmax", "onehot", "exact"),
    ("cce-object", L.CategoricalCrossentropy(), CLASSES, "softmax", "onehot", "empirical"),
    ("cce-logits", L.CategoricalCrossentropy(from_logits=True), CLASSES, None, "onehot",
     "sampled"),
    ("bce-string", "binary_crossentropy", 2, "sigmoid", "binary", "sampled"),
    ("bce-object", L.BinaryCrossentropy(), 2, "sigmoid", "binary", "empirical"),
    ("bce-logits", L.BinaryCrossentropy(from_logits=True), 2, None, "binary", "exact"),
    ("mse-string", "mse", 2, None, "regression", "sampled"),
    ("mse-object", L.MeanSquaredError(), 2, None, "regression", "exact"),
    ("mse-function", L.mean_squared_error, 2, None, "regression", "empirical"),
]


def _train_with_loss(loss, units, activation, targets, fisher):
    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).randn(48, FEATURES).astype("float32")
    y = _targets(targets, x)
    model = keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(units, activation=activation),
    ])
    opt = tf_kfac.KFAC(fisher=fisher, seed=1)
    model.compile(optimizer=opt, loss=loss)
    before = _loss(model, loss, x, y)
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    after = _loss(model, loss, x, y)
    assert np.isfinite(after)
    assert after < 0.9 * before, (before, after)
    assert history.history["skipped_steps"][-1] == 0
    _assert_factors_nonzero(opt, model)


@pytest.mark.parametrize(("loss", "units", "activation", "targets", "fisher"),
                         [case[1:] for case in LOSS_CASES], ids=[c[0] for c in LOSS_CASES])
def test_supported_losses_and_estimators_train(loss, units, activation, targets, fisher):
    """Each supported loss, as a string, a loss object or a function, with a
    softmax/sigmoid output or `from_logits=True`, trains under `fit`, and each
    Fisher estimator ("sampled", "empirical", "exact") trains each likelihood
    family (categorical, Bernoulli, Gaussian): the loss goes down, no step is
    skipped, and the factors fill."""
    _train_with_loss(loss, units, activation, targets, fisher)


def _sampled_run(seed):
    keras.utils.set_random_seed(0)
    x, y = _classification_data(n=32)
    model = _sequential()
    model.compile(optimizer=tf_kfac.KFAC(fisher="sampled", seed=seed),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return _weights(model)


def test_sampled_fisher_is_reproducible_by_seed():
    """With fisher="sampled", two runs with the same seed give identical
    weights, and a different seed gives different weights."""
    first, again, other = _sampled_run(5), _sampled_run(5), _sampled_run(6)
    _assert_weights_equal(first, again, rtol=0, atol=0)
    assert any(not np.allclose(a, b, rtol=1e-6, atol=1e-7)
               for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_unbuilt_subclassed_model_trains_with_sampled_fisher(run_eagerly):
    """A subclassed model never called before `fit` is built by K-FAC's first
    forward pass, which already draws sampled targets (before the optimizer's
    state exists); training works and the factors are set."""

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(4, activation="tanh")
            self.head = keras.layers.Dense(3, activation="softmax")

        def call(self, x):
            return self.head(self.hidden(x))

    rng = np.random.default_rng(0)
    model = Net()
    opt = tf_kfac.KFAC(fisher="sampled", seed=5)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", run_eagerly=run_eagerly)
    history = model.fit(rng.normal(size=(16, 5)).astype("float32"), rng.integers(0, 3, 16),
                        batch_size=8, verbose=0)
    assert history.history["skipped_steps"] == [0]
    _, g = opt.kronecker_factors(model.head)
    assert np.abs(g.numpy()).sum() > 0
