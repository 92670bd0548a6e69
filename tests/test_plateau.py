"""Leaving a plateau with the defaults, on a model written as a Keras user writes it.

A deep sigmoid autoencoder with Keras's default initialisation (Glorot uniform,
zero biases) and `BinaryCrossentropy(from_logits=True)` with its default mean
over the outputs starts on the mean-output plateau: it reconstructs every input
as the mean image. `tf_kfac.KFAC()` with no argument must leave it within a
few hundred steps, where Adam at the best of three learning rates does not.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_kfac

PIXELS, PROTOTYPES, EXAMPLES = 64, 8, 2048
STEPS = 200
LEVEL = 9.0  # per-case squared reconstruction error; the plateau is at 12.4


def make_images() -> np.ndarray:
    """Binary 64-pixel images, each the union of a random subset of 8 prototypes."""
    rng = np.random.default_rng(0)
    prototypes = (rng.uniform(size=(PROTOTYPES, PIXELS)) < 0.25).astype("float32")
    present = (rng.uniform(size=(EXAMPLES, PROTOTYPES)) < 0.3).astype("float32")
    return np.clip(present @ prototypes, 0.0, 1.0).astype("float32")


def make_autoencoder() -> keras.Model:
    """64-48-32-16-6-16-32-48-64: sigmoid hidden layers, a linear code, logits out."""
    keras.utils.set_random_seed(1)
    sizes = [48, 32, 16, 6, 16, 32, 48]
    activations = ["sigmoid"] * 3 + [None] + ["sigmoid"] * 3
    layers = [keras.layers.Dense(units, activation=activation)
              for units, activation in zip(sizes, activations, strict=True)]
    return keras.Sequential([keras.Input((PIXELS,)), *layers, keras.layers.Dense(PIXELS)])


def reconstruction_error(model, x) -> float:
    x_hat = tf.sigmoid(model(x))
    return float(tf.reduce_mean(tf.reduce_sum(tf.square(x - x_hat), axis=-1)))


def train(optimizer, x) -> float:
    model = make_autoencoder()
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    data = tf.data.Dataset.from_tensor_slices((x, x)).shuffle(EXAMPLES, seed=0).batch(256)
    model.fit(data.repeat(), steps_per_epoch=STEPS, epochs=1, verbose=0)
    return reconstruction_error(model, x)


@pytest.fixture(scope="module")
def images():
    return make_images()


def test_the_model_starts_on_the_mean_output_plateau(images):
    plateau = float(np.mean(np.sum(np.square(images - images.mean(axis=0)), axis=-1)))
    assert 12.0 < plateau < 12.8
    # A step budget that Adam's best spends without leaving it (checked below).
    assert LEVEL < plateau - 3.0


def test_kfac_defaults_leave_the_plateau(images):
    assert train(tf_kfac.KFAC(seed=0), images) < LEVEL


@pytest.mark.parametrize("learning_rate", [1e-3, 3e-3, 1e-2])
def test_adam_at_each_of_three_learning_rates_does_not(images, learning_rate):
    """The control: the plateau is real for a strong first-order baseline."""
    assert train(keras.optimizers.Adam(learning_rate), images) > LEVEL
