"""K-FAC on the models people build today: a transformer, a 1-d convnet, a MobileNet.

A small functional transformer classifier (token embedding, one self-attention block
with residuals and layer normalisation, a ReLU feed-forward block, pooling, a softmax
head) with Keras's default initialisers gets a Kronecker block for every projection
of its MultiHeadAttention layer and every Dense layer, a diagonal-A block for its
embedding and per-unit (γ, β) blocks for its layer normalisations. It learns a fixed
token-counting task, saves and resumes mid-run exactly, and exports. A Conv1D
sequence model and a MobileNet-like convnet (depthwise convolutions, batch
normalisation, 1×1 convolutions) get curvature for every layer and learn their toy
tasks.
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

SEQ_LEN, VOCAB, D_MODEL, HEADS, KEY_DIM, D_FF, CLASSES = 8, 20, 16, 2, 8, 32, 3
BATCH = 32


# ----------------------------------------------------------------- helpers
def _transformer() -> keras.Model:
    tokens = keras.Input((SEQ_LEN,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(VOCAB, D_MODEL, name="embedding")(tokens)
    attended = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name="attention")(
        embedded, embedded)
    hidden = keras.layers.LayerNormalization(name="norm_1")(
        keras.layers.Add()([embedded, attended]))
    ffn = keras.layers.Dense(D_FF, activation="relu", name="ffn_in")(hidden)
    ffn = keras.layers.Dense(D_MODEL, name="ffn_out")(ffn)
    hidden = keras.layers.LayerNormalization(name="norm_2")(keras.layers.Add()([hidden, ffn]))
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="classifier")(pooled)
    return keras.Model(tokens, outputs, name="transformer")


def _token_data(n=128, seed=0):
    """Random tokens; the label counts the tokens below VOCAB/2: ≤3, 4 or ≥5 of 8."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (n, SEQ_LEN)).astype("int32")
    count = (x < VOCAB // 2).sum(axis=1)
    y = np.where(count <= 3, 0, np.where(count == 4, 1, 2)).astype("int32")
    return x, y


def _compile(model, **kwargs):
    model.compile(optimizer=tf_kfac.KFAC(seed=0, **kwargs),
                  loss="sparse_categorical_crossentropy")
    return model


def _summary(opt):
    """({name: (kind, params, curvature)}, coverage line) parsed from `opt.summary()`."""
    printed = []
    text = opt.summary(print_fn=printed.append)
    assert printed == [text]
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("---")]
    assert len(rules) == 3, text
    header = re.split(r"\s{2,}", lines[rules[0] + 1].strip())
    assert header == ["Layer / variable", "Block", "Params", "Curvature"]
    rows = {}
    for line in lines[rules[1] + 1: rules[2]]:
        cells = re.split(r"\s{2,}", line.rstrip()) + [""]
        name, kind, params, curvature = cells[:4]
        assert name not in rows, name
        rows[name] = (kind, int(params.replace(",", "")), curvature)
    return rows, lines[-1]


def _size(weights) -> int:
    return sum(math.prod(w.shape) for w in weights)


def _coverage_line(curved: int, total: int) -> str:
    return (f"Curvature blocks cover {curved:,} of {total:,} trainable parameters "
            f"({curved / total:.1%}).")


def _kron_text(d_in: int, d_out: int, bias: bool = True) -> str:
    a = d_in + int(bias)
    return f"A {a}x{a}, G {d_out}x{d_out}"


def _assert_rows(rows, expected):
    """The summary has exactly the expected rows: kind, params and curvature text
    (None: a first-order row, which must give a reason)."""
    assert sorted(rows) == sorted(expected)
    for name, (kind, params, curvature) in expected.items():
        assert rows[name][:2] == (kind, params), name
        if curvature is None:
            assert rows[name][2], name
        else:
            assert rows[name][2] == curvature, name


def _assert_finite(model):
    for variable in [*model.weights, *model.optimizer.variables]:
        assert np.isfinite(variable.numpy()).all(), variable.path


def _optimizer_state(opt):
    return [(v.path, v.numpy().copy()) for v in opt.variables]


# -------------------------------------------------------- transformer: blocks
@pytest.fixture(scope="module")
def one_step():
    """A transformer after one K-FAC step of `fit` on one batch of 32."""
    keras.utils.set_random_seed(0)
    model = _compile(_transformer())
    x, y = _token_data(BATCH)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    return model


def test_transformer_summary_gives_every_projection_a_kronecker_block(one_step):
    """After a step, `summary()` lists the query, key, value and output EinsumDense
    projections of MultiHeadAttention as "einsum_dense" blocks and the three Dense
    layers as "dense" blocks (each with its parameter count and A, G sizes), the
    embedding as an "embedding" block and each LayerNormalization as a "scale_shift"
    block; the Kronecker layers' parameters are computed here from their weights and,
    independently, from the architecture's sizes, and the coverage line counts every
    parameter."""
    model = one_step
    rows, coverage = _summary(model.optimizer)

    attention = model.get_layer("attention")
    projections = {
        attention.query_dense: (D_MODEL, HEADS * KEY_DIM),
        attention.key_dense: (D_MODEL, HEADS * KEY_DIM),
        attention.value_dense: (D_MODEL, HEADS * KEY_DIM),
        attention.output_dense: (HEADS * KEY_DIM, D_MODEL),
    }
    dense = {model.get_layer(name): (d_in, d_out) for name, d_in, d_out in (
        ("ffn_in", D_MODEL, D_FF), ("ffn_out", D_FF, D_MODEL),
        ("classifier", D_MODEL, CLASSES))}
    expected = {}
    for kind, layers in (("einsum_dense", projections), ("dense", dense)):
        for layer, (d_in, d_out) in layers.items():
            assert layer.bias is not None
            assert _size(layer.trainable_weights) == (d_in + 1) * d_out, layer.name
            expected[layer.path] = (kind, (d_in + 1) * d_out, _kron_text(d_in, d_out))
    embedding = model.get_layer("embedding")
    expected[embedding.path] = ("embedding", VOCAB * D_MODEL,
                                f"A diagonal {VOCAB}, G {D_MODEL}x{D_MODEL}")
    for name in ("norm_1", "norm_2"):
        expected[model.get_layer(name).path] = (
            "scale_shift", 2 * D_MODEL, f"{D_MODEL} x 2x2 Fisher of (γ, β)")
    _assert_rows(rows, expected)

    curved = sum(_size(layer.trainable_weights) for layer in [*projections, *dense])
    total = _size(model.trainable_weights)
    by_architecture = (4 * (D_MODEL + 1) * HEADS * KEY_DIM + (D_MODEL + 1) * D_FF
                       + (D_FF + 1) * D_MODEL + (D_MODEL + 1) * CLASSES)
    assert curved == by_architecture == 2211
    assert total == curved + VOCAB * D_MODEL + 4 * D_MODEL
    assert coverage == _coverage_line(total, total)


def test_transformer_factors_have_the_summary_sizes(one_step):
    """`kronecker_factors` of each MultiHeadAttention projection is (A, G) of sizes
    17×17 and 16×16 (16 inputs plus the bias, 2 heads × 8), symmetric and non-zero,
    with A's bias entry 8: the "expand" flavour sums over the 8 positions."""
    model = one_step
    attention = model.get_layer("attention")
    for layer in (attention.query_dense, attention.key_dense, attention.value_dense,
                  attention.output_dense):
        a, g = (t.numpy() for t in model.optimizer.kronecker_factors(layer))
        assert a.shape == (D_MODEL + 1,) * 2 and g.shape == (HEADS * KEY_DIM,) * 2, layer.name
        np.testing.assert_allclose(a, a.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, g.T, rtol=1e-5, atol=1e-8)
        assert np.abs(g).max() > 0, layer.name
        assert a[-1, -1] == pytest.approx(SEQ_LEN)


# --------------------------------------------------------- transformer: fit
def test_transformer_fit_learns_the_token_counting_task():
    """`fit` for 32 steps (8 epochs of 4 batches, Keras default initialisers, K-FAC
    defaults) brings the training loss below half its initial value (it starts
    near log 3) and every weight and optimizer variable stays finite."""
    model = _compile(_transformer())
    x, y = _token_data()
    initial = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=8, shuffle=False, verbose=0)
    final = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    assert int(model.optimizer.iterations) == 32
    assert final < 0.5 * initial, (initial, final)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["skipped_steps"][-1] == 0
    _assert_finite(model)


def test_transformer_keras_file_resumes_exactly(tmp_path):
    """A transformer saved to `.keras` after 6 steps, loaded and trained on the next 6
    batches equals the run that never stopped: every weight and every optimizer
    variable (momentum, factors, inverses, counters, seed) to rtol 1e-6. The loaded
    state equals the saved one exactly, and the resumed steps use the restored
    inverses (step 6) and refresh them (step 8, inverse_update_interval=4)."""
    x, y = _token_data(12 * 16)
    first, second = slice(0, 6 * 16), slice(6 * 16, None)
    model = _compile(_transformer(), factor_update_interval=2, inverse_update_interval=4)
    model.fit(x[first], y[first], batch_size=16, shuffle=False, verbose=0)
    opt = model.optimizer
    assert int(opt.iterations) == 6
    saved = _optimizer_state(opt)
    for part in ("kfac_A", "kfac_G_inverse", "momentum"):
        values = [value for path, value in saved if part in path]
        assert values and all(np.abs(v).sum() > 0 for v in values), part
    model.save(tmp_path / "run.keras")
    model.fit(x[second], y[second], batch_size=16, shuffle=False, verbose=0)

    loaded = keras.models.load_model(tmp_path / "run.keras")
    assert isinstance(loaded.optimizer, tf_kfac.KFAC)
    state = _optimizer_state(loaded.optimizer)
    assert len(state) == len(saved)
    for (_, actual), (path, expected) in zip(state, saved, strict=True):
        np.testing.assert_array_equal(actual, expected, err_msg=path)
    loaded.fit(x[second], y[second], batch_size=16, shuffle=False, verbose=0)

    assert int(loaded.optimizer.iterations) == int(opt.iterations) == 12
    for (_, actual), (path, expected) in zip(_optimizer_state(loaded.optimizer),
                                             _optimizer_state(opt), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7, err_msg=path)
    assert len(loaded.weights) == len(model.weights)
    for actual, expected in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=expected.path)


def test_transformer_export_serves_like_predict(tmp_path):
    """`model.export(dir)` of a K-FAC-trained transformer gives a SavedModel whose
    `serve` on int32 tokens equals `model.predict`."""
    model = _compile(_transformer())
    x, y = _token_data(64)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    model.export(str(tmp_path / "exported"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    actual = served.serve(tf.constant(x)).numpy()
    expected = model.predict(x, verbose=0)
    assert actual.shape == (64, CLASSES)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - expected.mean(axis=0)).max() > 1e-3  # inputs matter


# --------------------------------------------------------- convnets
def _conv1d_model() -> keras.Model:
    return keras.Sequential([
        keras.Input((16, 2)),
        keras.layers.Conv1D(8, 3, activation="relu", name="conv_a"),
        keras.layers.Conv1D(8, 3, padding="causal", activation="relu", name="conv_b"),
        keras.layers.Dense(8, activation="relu", name="per_position"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2, activation="softmax", name="classifier"),
    ], name="sequence_convnet")


def _sequence_data(n=96, seed=0):
    """Noise sequences; the label says whether channel 0 rises or falls over time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    ramp = np.linspace(-1.0, 1.0, 16)
    x = 0.5 * rng.standard_normal((n, 16, 2))
    x[:, :, 0] += np.where(y[:, None] == 1, ramp, -ramp)
    return x.astype("float32"), y.astype("int32")


def _mobilenet() -> keras.Model:
    def normalised(name):
        # momentum=0.9: the moving statistics that `evaluate` uses catch up in 24 steps.
        return [keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn"),
                keras.layers.ReLU(name=f"{name}_relu")]

    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem"),
        *normalised("stem"),
        keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise"),
        *normalised("depthwise"),
        keras.layers.Conv2D(16, 1, use_bias=False, name="pointwise"),
        *normalised("pointwise"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(CLASSES, activation="softmax", name="classifier"),
    ], name="mobilenet_like")


def _image_data(n=96, seed=0):
    """Noise images; the label is the colour channel with the brighter centre."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = 0.5 * rng.standard_normal((n, 8, 8, CLASSES))
    x[np.arange(n), 2:6, 2:6, y] += 1.0
    return x.astype("float32"), y.astype("int32")


CONVNETS = {
    "conv1d": (_conv1d_model, _sequence_data, {
        "conv_a": ("conv1d", _kron_text(3 * 2, 8)),
        "conv_b": ("conv1d", _kron_text(3 * 8, 8)),
        "per_position": ("dense", _kron_text(8, 8)),
        "classifier": ("dense", _kron_text(8, 2)),
    }),
    "mobilenet": (_mobilenet, _image_data, {
        "stem": ("conv2d", _kron_text(3 * 3 * 3, 8, bias=False)),
        "depthwise": ("depthwise_conv", "8 x (A 9x9, G 1x1)"),
        "pointwise": ("conv2d", _kron_text(8, 16, bias=False)),
        "classifier": ("dense", _kron_text(16, CLASSES)),
    }),
}


@pytest.mark.parametrize("name", list(CONVNETS))
def test_convnet_summary_has_curvature_for_every_conv_and_dense_layer(name):
    """`summary()` of the Conv1D sequence model and of the MobileNet-like model shows
    a Kronecker block (kind, parameter count, factor sizes) for every Conv1D, Conv2D,
    DepthwiseConv2D and Dense layer (one A, G pair per channel for the depthwise
    convolution), and a "scale_shift" block for every BatchNormalization."""
    make_model, make_data, expected_blocks = CONVNETS[name]
    model = _compile(make_model())
    x, y = make_data()
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0)
    rows, coverage = _summary(model.optimizer)
    kinds = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
             keras.layers.Dense)
    curvature_layers = [layer for layer in model.layers if isinstance(layer, kinds)]
    assert sorted(layer.name for layer in curvature_layers) == sorted(expected_blocks)
    expected = {}
    for layer in curvature_layers:
        kind, curvature = expected_blocks[layer.name]
        expected[layer.path] = (kind, _size(layer.trainable_weights), curvature)
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        units = layer.gamma.shape[0]
        expected[layer.path] = ("scale_shift", 2 * units, f"{units} x 2x2 Fisher of (γ, β)")
    _assert_rows(rows, expected)
    total = _size(model.trainable_weights)
    assert sum(_size(layer.trainable_weights) for layer in curvature_layers + norms) == total
    assert coverage == _coverage_line(total, total)


@pytest.mark.parametrize("name", list(CONVNETS))
def test_convnet_fit_decreases_the_loss(name):
    """`fit` (24 steps: 8 epochs of 3 batches) brings the Conv1D sequence model's
    and the MobileNet-like model's training loss below 30% of its initial value (it
    starts near log 2 and log 3) in one of the last three epochs, and every weight and
    optimizer variable stays finite. (On 96 examples at batch 32 the sampled Fisher is
    noisy and a single late step can spike the loss, so the final step alone is not
    the test.)"""
    make_model, make_data, _ = CONVNETS[name]
    model = _compile(make_model())
    x, y = make_data()
    initial = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=8, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations) == 24
    losses = history.history["loss"]
    assert min(losses[-3:]) < 0.3 * initial, (initial, losses)
    assert history.history["skipped_steps"][-1] == 0
    _assert_finite(model)
