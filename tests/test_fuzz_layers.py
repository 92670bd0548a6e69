"""Property-based tests over layer shapes, strides, dilations, paddings, dtypes and batches.

Hypothesis draws one layer with a curvature block (Dense on rank 2 or 3 inputs, Conv1D,
Conv2D, DepthwiseConv2D, SeparableConv2D, EinsumDense, SimpleRNN, LSTM, GRU, Embedding,
LayerNormalization, BatchNormalization) with its shape options, a compute dtype
(float32 or mixed_bfloat16), a Fisher estimator, the fixed or the adaptive mode, and a
dataset whose size leaves a partial last batch (batch sizes down to 1). Every draw must
either train an epoch to finite weights and optimizer state, or be refused by Keras or
tf_kfac with a ValueError before training; never a crash deep inside TensorFlow. The
number of examples is fixed (30; each traces a new model's training step)
so that the run time is bounded; the counts are printed. A longer run found the adaptive
mode's failure on recurrent layers (forward mode through TensorFlow's while loop), now fixed:
raise `max_examples` locally to search further.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_kfac

COUNTS = {"tried": 0, "trained": 0, "refused": 0, "non-finite": 0}


@st.composite
def layer_cases(draw):
    """(input shape without the batch, integer inputs?, the layer)."""
    kind = draw(st.sampled_from([
        "dense", "dense_seq", "conv1d", "conv2d", "depthwise", "separable", "einsum",
        "simple_rnn", "lstm", "gru", "embedding", "layer_norm", "batch_norm"]))
    units = draw(st.integers(1, 5))
    activation = draw(st.sampled_from([None, "tanh", "relu", "softmax"]))
    use_bias = draw(st.booleans())
    if kind == "dense":
        return (draw(st.integers(1, 6)),), False, keras.layers.Dense(
            units, activation=activation, use_bias=use_bias)
    if kind == "dense_seq":
        return (draw(st.integers(1, 4)), draw(st.integers(1, 5))), False, keras.layers.Dense(
            units, activation=activation, use_bias=use_bias)
    if kind == "einsum":
        return (draw(st.integers(1, 4)), 3), False, keras.layers.EinsumDense(
            "btd,dhk->bthk", output_shape=(None, 2, units), bias_axes="hk" if use_bias else None)
    if kind in ("simple_rnn", "lstm", "gru"):
        layer_class = {"simple_rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM,
                       "gru": keras.layers.GRU}[kind]
        return (draw(st.integers(1, 5)), draw(st.integers(1, 4))), False, layer_class(
            units, use_bias=use_bias, return_sequences=draw(st.booleans()),
            go_backwards=draw(st.booleans()))
    if kind == "embedding":
        return (draw(st.integers(1, 5)),), True, keras.layers.Embedding(
            draw(st.integers(2, 9)), units, mask_zero=draw(st.booleans()))
    if kind in ("layer_norm", "batch_norm"):
        norm_class = (keras.layers.LayerNormalization if kind == "layer_norm"
                      else keras.layers.BatchNormalization)
        return (draw(st.integers(1, 4)), draw(st.integers(1, 4))), False, norm_class(
            center=draw(st.booleans()), scale=draw(st.booleans()))
    rank = 1 if kind == "conv1d" else 2
    size = tuple(draw(st.integers(1, 7)) for _ in range(rank))
    channels = draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    padding = draw(st.sampled_from(["valid", "same"] + (["causal"] if rank == 1 else [])))
    strides = draw(st.integers(1, 2))
    dilation = 1 if strides > 1 else draw(st.integers(1, 2))  # Keras refuses both > 1
    options = dict(padding=padding, strides=strides, dilation_rate=dilation,
                   activation=activation, use_bias=use_bias)
    if kind == "conv1d":
        layer = keras.layers.Conv1D(units, kernel, **options)
    elif kind == "conv2d":
        layer = keras.layers.Conv2D(units, kernel, **options)
    elif kind == "depthwise":
        layer = keras.layers.DepthwiseConv2D(kernel, depth_multiplier=units, **options)
    else:
        layer = keras.layers.SeparableConv2D(units, kernel, **options)
    return (*size, channels), False, layer


def _build(shape, integers, layer, dtype):
    inputs = keras.Input(shape, dtype="int32" if integers else "float32")
    h = layer(inputs)
    if len(h.shape) > 2:
        h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3, dtype="float32")(h)
    return keras.Model(inputs, outputs)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_cases(),
       dtype=st.sampled_from(["float32", "mixed_bfloat16"]),
       fisher=st.sampled_from(["sampled", "exact", "empirical"]),
       adaptive=st.booleans(),
       examples=st.integers(1, 11), batch_size=st.integers(1, 4))
def test_every_layer_configuration_trains_to_finite_state_or_is_refused(
        case, dtype, fisher, adaptive, examples, batch_size):
    shape, integers, layer = case
    COUNTS["tried"] += 1
    keras.mixed_precision.set_global_policy(dtype)
    try:
        try:
            model = _build(shape, integers, layer, dtype)
        except ValueError:  # Keras refuses the shape (e.g. a kernel larger than the input)
            COUNTS["refused"] += 1
            return
        rng = np.random.default_rng(0)
        if integers:
            x = rng.integers(0, layer.input_dim, size=(examples, *shape))
        else:
            x = rng.normal(size=(examples, *shape)).astype("float32")
        y = rng.integers(0, 3, size=(examples,))
        model.compile(optimizer=tf_kfac.KFAC(fisher=fisher, adaptive=adaptive,
                                             factor_update_interval=1, inverse_update_interval=2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    finite = all(np.all(np.isfinite(np.asarray(v.numpy(), np.float64)))
                 for v in [*model.weights, *model.optimizer.variables])
    COUNTS["trained"] += 1
    COUNTS["non-finite"] += int(not finite)
    assert finite, (layer.name, shape, dtype, fisher, adaptive)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    # A warning reaches pytest's summary, also from a pytest-xdist worker.
    warnings.warn("layer draws: " + ", ".join(f"{v} {k}" for k, v in COUNTS.items()),
                  stacklevel=1)
