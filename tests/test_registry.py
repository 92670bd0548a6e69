"""`tf_kfac.register_block`: a user's own layer class gets a user's own Kronecker block.

`MyLayer` computes activation(x @ kernel + bias) on (B, d) inputs like Dense, but is
not a Dense subclass, so K-FAC knows nothing about it: it trains first-order until
`register_block(MyLayer, MyBlock)` gives it `MyBlock`, a `KroneckerBlock` that only
says how the layer's input becomes rows. Its factors must then be exactly K-FAC's
(checked against NumPy), and it must train, save and resume like a built-in layer.

Every test that registers isolates the registry (`monkeypatch` replaces the module
list `tf_kfac.blocks._BLOCK_TYPES` by a copy), so no registration leaks out.
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

D_IN, UNITS, D_OUT = 4, 5, 2
BATCH = 8


@keras.saving.register_keras_serializable(package="test_registry")
class MyLayer(keras.layers.Layer):
    """activation(inputs @ kernel + bias) on (B, d) inputs; not a Dense subclass."""

    def __init__(self, units, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units),
                                      initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, inputs):
        outputs = keras.ops.matmul(inputs, self.kernel) + self.bias
        # K-FAC's step sets `activation` to None to record the pre-activation.
        return self.activation(outputs) if self.activation is not None else outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "activation": keras.activations.serialize(self.activation)}


class MyBlock(tf_kfac.blocks.KroneckerBlock):
    """The user's block for MyLayer: its (B, d_in) input is one position per example."""

    kind = "my_dense"

    def input_rows(self, inputs):
        return tf.reshape(inputs, [tf.shape(inputs)[0], 1, self.input_size - 1])


# ----------------------------------------------------------------- helpers
@pytest.fixture
def registry(monkeypatch):
    """An isolated copy of the block registry, with MyLayer → MyBlock registered."""
    monkeypatch.setattr(tf_kfac.blocks, "_BLOCK_TYPES", list(tf_kfac.blocks._BLOCK_TYPES))
    tf_kfac.register_block(MyLayer, MyBlock)
    return tf_kfac.blocks._BLOCK_TYPES


def _model():
    return keras.Sequential([
        keras.Input((D_IN,)),
        MyLayer(UNITS, activation="tanh", name="mine"),
        keras.layers.Dense(D_OUT, name="head"),
    ], name="registry_model")


def _data(n=BATCH * 4, seed=0):
    """A smooth regression target the model can fit: y = sin(x W)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D_IN)).astype("float32")
    w = rng.standard_normal((D_IN, D_OUT)) / np.sqrt(D_IN)
    return x, np.sin(x @ w).astype("float32")


def _compile(model, **kwargs):
    model.compile(optimizer=tf_kfac.KFAC(seed=0, **kwargs), loss="mse")
    return model


def _summary(opt):
    """{name: (kind, curvature)} of the summary's rows, and its last line."""
    lines = opt.summary(print_fn=lambda _: None).splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("---")]
    rows = {}
    for line in lines[rules[1] + 1: rules[2]]:
        name, kind, _, *curvature = re.split(r"\s{2,}", line.rstrip()) + [""]
        rows[name] = (kind, curvature[0])
    return rows, lines[-1]


def _optimizer_state(opt):
    return [(v.path, v.numpy().copy()) for v in opt.variables]


# ------------------------------------------------------------------- tests
def test_unregistered_custom_layer_trains_first_order():
    """Without registration MyLayer's kernel and bias are first-order rows in the
    summary ("no curvature block for this layer kind"), only the Dense head is a
    Kronecker block, `kronecker_factors(MyLayer)` raises, and `fit` still trains
    MyLayer's weights."""
    model = _compile(_model())
    mine = model.get_layer("mine")
    before = [w.numpy().copy() for w in mine.weights]
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    rows, coverage = _summary(model.optimizer)
    assert rows == {
        mine.kernel.path: ("first-order", "no curvature block for this layer kind"),
        mine.bias.path: ("first-order", "no curvature block for this layer kind"),
        model.get_layer("head").path: ("dense", f"A {UNITS + 1}x{UNITS + 1}, G 2x2"),
    }
    head_params, total = (UNITS + 1) * D_OUT, (D_IN + 1) * UNITS + (UNITS + 1) * D_OUT
    assert coverage == (f"Curvature blocks cover {head_params} of {total} trainable "
                        f"parameters ({head_params / total:.1%}).")
    with pytest.raises(ValueError, match="has no Kronecker factors"):
        model.optimizer.kronecker_factors(mine)
    for weight, old in zip(mine.weights, before, strict=True):
        assert np.abs(weight.numpy() - old).max() > 1e-6, weight.path


def test_registered_block_factors_equal_numpy(registry, rel_err):
    """With `register_block(MyLayer, MyBlock)`, one `fit` step (fisher="empirical",
    mse over 2 outputs so c = 1/2, factor_decay=0) gives MyLayer the summary row
    "my_dense" and `kronecker_factors` equal to NumPy's at the step's weights:
    A = (1/B) Σ āāᵀ with ā = [x; 1], and G = c·(1/B) Σ gᵢgᵢᵀ with gᵢ = (B/c)·∂h/∂sᵢ,
    h the batch's mean squared error and s = x·kernel + bias, by hand-written
    backpropagation through the tanh and the Dense head."""
    assert registry[0] == (MyLayer, MyBlock)
    model = _compile(_model(), fisher="empirical", factor_decay=0.0)
    mine, head = model.get_layer("mine"), model.get_layer("head")
    x, y = _data(BATCH)
    kernel, bias, head_kernel, head_bias = (np.asarray(w, np.float64)
                                            for w in model.get_weights())
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)

    rows, coverage = _summary(model.optimizer)
    assert rows[mine.path] == ("my_dense", f"A {D_IN + 1}x{D_IN + 1}, G {UNITS}x{UNITS}")
    assert rows[head.path][0] == "dense"
    assert coverage.endswith("(100.0%).")

    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    a_bar = np.concatenate([x64, np.ones((BATCH, 1))], axis=1)
    a_ref = a_bar.T @ a_bar / BATCH
    s = x64 @ kernel + bias
    z = np.tanh(s) @ head_kernel + head_bias
    dh_dz = 2.0 * (z - y64) / (BATCH * D_OUT)  # h = (1/B) Σᵢ (1/k) Σⱼ (zᵢⱼ − yᵢⱼ)²
    dh_ds = (dh_dz @ head_kernel.T) * (1.0 - np.tanh(s) ** 2)
    c = 1.0 / D_OUT
    g_rows = (BATCH / c) * dh_ds
    g_ref = c * g_rows.T @ g_rows / BATCH

    a, g = model.optimizer.kronecker_factors(mine)
    assert a.shape == (D_IN + 1,) * 2 and g.shape == (UNITS,) * 2
    assert rel_err(a, a_ref) < 1e-5
    assert rel_err(g, g_ref) < 1e-4
    assert np.abs(g_ref).max() > 1e-3  # the reference itself is not trivially zero


def test_registered_layer_trains_with_its_block(registry):
    """With MyBlock registered, `fit` (40 steps) brings the training set's mse below
    a fifth of its initial value, MyLayer's factors and momentum are non-zero and
    finite, and no step was skipped."""
    model = _compile(_model())
    x, y = _data()
    initial = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=10, shuffle=False, verbose=0)
    final = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    assert final < 0.2 * initial, (initial, final)
    assert history.history["skipped_steps"][-1] == 0
    a, g = model.optimizer.kronecker_factors(model.get_layer("mine"))
    for factor in (a, g):
        assert np.isfinite(factor.numpy()).all() and np.abs(factor.numpy()).max() > 0
    for variable in [*model.weights, *model.optimizer.variables]:
        assert np.isfinite(variable.numpy()).all(), variable.path


def test_registered_layer_keras_file_resumes_exactly(registry, tmp_path):
    """A model with the registered MyLayer saved to `.keras` after 6 steps and loaded
    (registration still in place) restores every optimizer variable exactly, gives
    MyLayer its MyBlock again, and trained on the next 6 batches equals the run that
    never stopped (every weight and optimizer variable to rtol 1e-6)."""
    model = _compile(_model(), factor_update_interval=2, inverse_update_interval=4)
    x, y = _data(BATCH * 12)
    first, second = slice(0, BATCH * 6), slice(BATCH * 6, None)
    model.fit(x[first], y[first], batch_size=BATCH, shuffle=False, verbose=0)
    saved = _optimizer_state(model.optimizer)
    a_saved, _ = model.optimizer.kronecker_factors(model.get_layer("mine"))
    assert np.abs(a_saved.numpy()).max() > 0
    model.save(tmp_path / "run.keras")
    model.fit(x[second], y[second], batch_size=BATCH, shuffle=False, verbose=0)

    loaded = keras.models.load_model(tmp_path / "run.keras")
    assert isinstance(loaded.get_layer("mine"), MyLayer)
    state = _optimizer_state(loaded.optimizer)
    assert len(state) == len(saved)
    for (_, actual), (path, expected) in zip(state, saved, strict=True):
        np.testing.assert_array_equal(actual, expected, err_msg=path)
    loaded.fit(x[second], y[second], batch_size=BATCH, shuffle=False, verbose=0)
    rows, _ = _summary(loaded.optimizer)
    assert rows[loaded.get_layer("mine").path][0] == "my_dense"
    for (_, actual), (path, expected) in zip(_optimizer_state(loaded.optimizer),
                                             _optimizer_state(model.optimizer), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7, err_msg=path)
    for actual, expected in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=expected.path)


@pytest.mark.parametrize(("layer_class", "block_class", "argument"), [
    pytest.param(int, MyBlock, "layer_class", id="layer-not-a-layer-class"),
    pytest.param(MyLayer(3), MyBlock, "layer_class", id="layer-instance"),
    pytest.param("MyLayer", MyBlock, "layer_class", id="layer-name"),
    pytest.param(MyLayer, object, "block_class", id="block-not-a-block-class"),
    pytest.param(MyLayer, keras.layers.Dense, "block_class", id="block-is-a-layer-class"),
    pytest.param(MyLayer, tf_kfac.blocks.DenseBlock.input_rows, "block_class",
                 id="block-function"),
])
def test_register_block_rejects_non_layer_and_non_block_classes(layer_class, block_class,
                                                                argument, monkeypatch):
    """`register_block` raises TypeError naming the wrong argument for anything but a
    keras Layer subclass and a CurvatureBlock subclass, and leaves the registry as
    it was."""
    monkeypatch.setattr(tf_kfac.blocks, "_BLOCK_TYPES", list(tf_kfac.blocks._BLOCK_TYPES))
    before = list(tf_kfac.blocks._BLOCK_TYPES)
    with pytest.raises(TypeError, match=f"`{argument}`"):
        tf_kfac.register_block(layer_class, block_class)
    assert tf_kfac.blocks._BLOCK_TYPES == before
