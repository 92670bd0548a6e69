"""The problems of the untuned benchmark suite (benchmarks/suite.py).

Each problem is written the way an ordinary Keras user would write it: Keras's
default initialisers (Glorot uniform kernels, zero biases), a standard Keras
loss with its default reduction, a usual batch size; the exception is
`autoencoder_paper`, the paper's setup (sparse initialisation, cross-entropy
summed over the pixels with `loss_weights`). A problem builder takes
`(seed, data_dir)` and returns a `Problem`: the model, the `compile` keyword
arguments besides the optimizer, the training data as a `tf.data` pipeline,
the batch size and an `error(model)` function (lower is better).

    from suite_problems import BUILDERS

    problem = BUILDERS["transformer"](seed=0, data_dir=None)
    problem.model.compile(optimizer="adam", **problem.compile_kwargs)
    problem.model.fit(problem.data, steps_per_epoch=problem.steps_per_epoch, epochs=1)
    print(problem.error(problem.model))

The MNIST problems read the 10,000 test images, from the IDX files in
`data_dir` (e.g. `path/to/mnist`) or, when it is `None`, from
tensorflow_datasets. The other three generate their data with NumPy from the
seed, in-process (`order_task`, `signal_task`, `teacher_task`). Call
`keras.utils.set_random_seed(seed)` before a builder to fix the initial
weights; the data order is fixed by the seed of the pipeline's shuffle.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

UNITS = {
    "autoencoder": "squared reconstruction error per case",
    "autoencoder_paper": "squared reconstruction error per case",
    "convnet": "held-out error %",
    "transformer": "held-out error %",
    "sequence": "held-out error %",
    "recurrent": "held-out error %",
    "regression": "held-out mean squared error",
}
BATCH = {"autoencoder": 1000, "autoencoder_paper": 1000, "convnet": 128,
         "transformer": 64, "sequence": 64, "recurrent": 64, "regression": 256}

# The generated tasks (sizes as in the suite; see the task functions).
VOCAB, SEQUENCE_LENGTH, MARKERS = 100, 32, 4
SIGNAL_LENGTH, MOTIF_LENGTH, MAX_MOTIFS, SIGNAL_NOISE = 128, 12, 4, 0.3
TEACHER_INPUTS, TEACHER_HIDDEN, TEACHER_OUTPUTS, TEACHER_NOISE = 32, (128, 128), 64, 0.1


@dataclasses.dataclass
class Problem:
    """One problem: what `compile` and `fit` need, and how to score the model.

    Attributes:
        model: the Keras model, built and not compiled.
        compile_kwargs: keyword arguments of `model.compile` besides the optimizer.
        data: the training batches, an endless (repeated) `tf.data.Dataset`.
        steps_per_epoch: batches in one pass over the training data.
        batch_size: examples a batch.
        error: `error(model)`, the score to minimise (see `UNITS`).
    """

    model: Any
    compile_kwargs: dict
    data: Any
    steps_per_epoch: int
    batch_size: int
    error: Callable[[Any], float]


def _pipeline(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """Shuffle (reshuffled each epoch, seeded) → batch → repeat; full batches only."""
    import tensorflow as tf

    dataset = (tf.data.Dataset.from_tensor_slices((x, y))
               .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size, drop_remainder=True)
               .repeat()
               .prefetch(tf.data.AUTOTUNE))
    return dataset, len(x) // batch_size


def _classification_error(x: np.ndarray, y: np.ndarray) -> Callable[[Any], float]:
    def error(model) -> float:
        logits = model.predict(x, batch_size=2000, verbose=0)
        return float(100.0 * np.mean(np.argmax(logits, axis=-1) != y))

    return error


def _example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return __import__(name)


def _split(arrays: tuple[np.ndarray, ...], n_train: int):
    return tuple(a[:n_train] for a in arrays), tuple(a[n_train:] for a in arrays)


# ------------------------------------------------------------------ MNIST problems
def _autoencoder(seed: int, data_dir: str | None, paper: bool) -> Problem:
    import keras

    mnist_data, ae = _example("mnist_data"), _example("mnist_autoencoder")
    images, _ = mnist_data.load_mnist(data_dir, "test")
    x = mnist_data.to_float(images, flatten=True)
    model = ae.build_model(init="sparse" if paper else "glorot", seed=seed)
    compile_kwargs = {"loss": keras.losses.BinaryCrossentropy(from_logits=True)}
    if paper:  # the paper's objective: the cross-entropy summed over the pixels
        compile_kwargs["loss_weights"] = float(ae.PIXELS)

    def error(model) -> float:
        logits = model.predict(x, batch_size=2000, verbose=0)
        return float(np.mean(keras.ops.convert_to_numpy(ae.reconstruction_error(x, logits))))

    batch = BATCH["autoencoder_paper" if paper else "autoencoder"]
    data, steps = _pipeline(x, x, batch, seed)
    return Problem(model, compile_kwargs, data, steps, batch, error)


def autoencoder(seed: int, data_dir: str | None = None) -> Problem:
    """The MNIST deep autoencoder, Keras's Glorot init, mean binary cross-entropy."""
    return _autoencoder(seed, data_dir, paper=False)


def autoencoder_paper(seed: int, data_dir: str | None = None) -> Problem:
    """The same network in the paper's setup: sparse init, cross-entropy summed over pixels."""
    return _autoencoder(seed, data_dir, paper=True)


def convnet(seed: int, data_dir: str | None = None) -> Problem:
    """examples/mnist_convnet.py's classifier on an 80/20 split of the test images."""
    import keras

    mnist_data, cn = _example("mnist_data"), _example("mnist_convnet")
    images, labels = mnist_data.load_mnist(data_dir, "test")
    (x, y), (x_val, y_val) = mnist_data.train_heldout_split(
        mnist_data.to_float(images, flatten=False), labels, 0.2, seed)
    data, steps = _pipeline(x, y, BATCH["convnet"], seed)
    return Problem(cn.build_model(),
                   {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                   data, steps, BATCH["convnet"], _classification_error(x_val, y_val))


# ------------------------------------------------------------------ generated tasks
def order_task(seed: int, n_train: int = 8000, n_heldout: int = 2000):
    """Sequences of random tokens; the label is the order in which the marker tokens occur.

    Each sequence of `SEQUENCE_LENGTH` tokens holds the `MARKERS` marker
    tokens 1 … `MARKERS` once each, at random positions, among filler tokens
    drawn uniformly from the rest of the `VOCAB` tokens. The label is the index
    of the markers' order among the `MARKERS`! permutations (24 classes).
    Every sequence holds the same bag of markers, so a model that ignores
    positions stays at chance (96% error).

    Returns:
        `((x_train, y_train), (x_heldout, y_heldout))`: int32 tokens of shape
        (N, `SEQUENCE_LENGTH`) and int64 labels.
    """
    rng = np.random.default_rng([1, seed])
    n = n_train + n_heldout
    x = rng.integers(MARKERS + 1, VOCAB, (n, SEQUENCE_LENGTH))
    positions = np.argsort(rng.random((n, SEQUENCE_LENGTH)), axis=1)[:, :MARKERS]
    x[np.arange(n)[:, None], positions] = np.arange(1, MARKERS + 1)
    order = np.argsort(positions, axis=1)  # order[:, k]: the marker at the k-th place
    index = {perm: i for i, perm in enumerate(itertools.permutations(range(MARKERS)))}
    y = np.array([index[tuple(row)] for row in order], np.int64)
    return _split((x.astype(np.int32), y), n_train)


def signal_task(seed: int, n_train: int = 8000, n_heldout: int = 2000):
    """Noisy signals holding 1 to `MAX_MOTIFS` copies of a motif; the label is the count − 1.

    Each signal has `SIGNAL_LENGTH` samples of Gaussian noise (standard
    deviation `SIGNAL_NOISE`) to which the motif (`MOTIF_LENGTH` samples of a
    windowed sinusoid, peak 1) is added 1 to `MAX_MOTIFS` times, at random
    positions that do not overlap (one in each of as many randomly chosen
    slots of `SIGNAL_LENGTH` / 8 samples, at a random offset within it).

    Returns:
        `((x_train, y_train), (x_heldout, y_heldout))`: float32 signals of
        shape (N, `SIGNAL_LENGTH`, 1) and int64 labels in 0 … `MAX_MOTIFS` − 1.
    """
    rng = np.random.default_rng([2, seed])
    n, slots = n_train + n_heldout, 8
    width = SIGNAL_LENGTH // slots
    y = rng.integers(0, MAX_MOTIFS, n)
    x = SIGNAL_NOISE * rng.standard_normal((n, SIGNAL_LENGTH))
    chosen = np.argsort(rng.random((n, slots)), axis=1)[:, :MAX_MOTIFS]
    starts = chosen * width + rng.integers(0, width - MOTIF_LENGTH + 1, chosen.shape)
    present = np.arange(MAX_MOTIFS) <= y[:, None]  # the first y + 1 of the chosen slots
    rows = np.broadcast_to(np.arange(n)[:, None, None], (n, MAX_MOTIFS, MOTIF_LENGTH))
    cols = starts[:, :, None] + np.arange(MOTIF_LENGTH)
    np.add.at(x, (rows[present], cols[present]), np.broadcast_to(motif(), cols.shape)[present])
    return _split((x[..., None].astype(np.float32), y.astype(np.int64)), n_train)


def motif() -> np.ndarray:
    """The motif of `signal_task`: a sinusoid under a Gaussian window, peak 1."""
    t = np.linspace(-1.0, 1.0, MOTIF_LENGTH)
    wave = np.sin(3.0 * np.pi * t) * np.exp(-4.0 * t**2)
    return wave / np.abs(wave).max()


def teacher_task(seed: int, n_train: int = 20000, n_heldout: int = 4000):
    """Regression on a fixed random tanh teacher network with many outputs.

    Inputs are `TEACHER_INPUTS`-dimensional standard Gaussians; targets are
    the `TEACHER_OUTPUTS` outputs of a random tanh MLP (hidden widths
    `TEACHER_HIDDEN`, weights N(0, 2²/fan-in)), scaled to unit variance, plus
    Gaussian noise of standard deviation `TEACHER_NOISE` (so the best
    held-out MSE is about `TEACHER_NOISE`²).

    Returns:
        `((x_train, y_train), (x_heldout, y_heldout))`, all float32.
    """
    rng = np.random.default_rng([3, seed])
    n = n_train + n_heldout
    x = rng.standard_normal((n, TEACHER_INPUTS))
    h = x
    for width in TEACHER_HIDDEN:
        weights = rng.standard_normal((h.shape[1], width)) * 2.0 / np.sqrt(h.shape[1])
        h = np.tanh(h @ weights + 0.1 * rng.standard_normal(width))
    h = h @ rng.standard_normal((h.shape[1], TEACHER_OUTPUTS))
    y = h / h.std() + TEACHER_NOISE * rng.standard_normal(h.shape)
    return _split((x.astype(np.float32), y.astype(np.float32)), n_train)


def _position_embedding_layer():
    import keras

    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned vector per position (initialised like `keras.layers.Embedding`)."""

        def build(self, input_shape):
            self.positions = self.add_weight(shape=tuple(input_shape[-2:]),
                                             initializer="uniform", name="positions")

        def call(self, inputs):
            return inputs + self.positions

    return PositionEmbedding(name="position_embedding")


def transformer_model(n_classes: int, d_model: int = 64, blocks: int = 2):
    """Embedding + learned positions, `blocks` post-norm encoder blocks, mean pooling, logits."""
    import keras
    from keras import layers

    tokens = keras.Input((SEQUENCE_LENGTH,), dtype="int32")
    x = layers.Embedding(VOCAB, d_model)(tokens)
    x = _position_embedding_layer()(x)
    for _ in range(blocks):
        attention = layers.MultiHeadAttention(num_heads=4, key_dim=16)(x, x)
        x = layers.LayerNormalization()(layers.Add()([x, attention]))
        ffn = layers.Dense(128, activation="relu")(x)
        ffn = layers.Dense(d_model)(ffn)
        x = layers.LayerNormalization()(layers.Add()([x, ffn]))
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, layers.Dense(n_classes)(x), name="transformer")


def transformer(seed: int, data_dir: str | None = None) -> Problem:
    """A small transformer classifier on `order_task`."""
    import keras

    (x, y), (x_val, y_val) = order_task(seed)
    data, steps = _pipeline(x, y, BATCH["transformer"], seed)
    model = transformer_model(n_classes=math.factorial(MARKERS))
    return Problem(model,
                   {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                   data, steps, BATCH["transformer"], _classification_error(x_val, y_val))


def _signal_problem(name: str, seed: int, body: list) -> Problem:
    """A classifier of `signal_task` with the layers `body` before its Dense head."""
    import keras

    (x, y), (x_val, y_val) = signal_task(seed)
    model = keras.Sequential([keras.Input((SIGNAL_LENGTH, 1)), *body,
                              keras.layers.Dense(MAX_MOTIFS)], name=name)
    data, steps = _pipeline(x, y, BATCH[name], seed)
    return Problem(model,
                   {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                   data, steps, BATCH[name], _classification_error(x_val, y_val))


def sequence(seed: int, data_dir: str | None = None) -> Problem:
    """A Conv1D classifier on `signal_task`."""
    from keras import layers

    return _signal_problem("sequence", seed, [
        layers.Conv1D(32, 5, activation="relu"), layers.Conv1D(64, 5, activation="relu"),
        layers.GlobalAveragePooling1D()])


def recurrent(seed: int, data_dir: str | None = None) -> Problem:
    """An LSTM classifier on `signal_task`, as `sequence` but recurrent."""
    from keras import layers

    return _signal_problem("recurrent", seed, [layers.LSTM(64)])


def regression(seed: int, data_dir: str | None = None) -> Problem:
    """A 256-256-256 relu MLP fitted with MSE to `teacher_task`."""
    import keras
    from keras import layers

    (x, y), (x_val, y_val) = teacher_task(seed)
    model = keras.Sequential([
        keras.Input((TEACHER_INPUTS,)),
        layers.Dense(256, activation="relu"),
        layers.Dense(256, activation="relu"),
        layers.Dense(256, activation="relu"),
        layers.Dense(TEACHER_OUTPUTS),
    ], name="regression")

    def error(model) -> float:
        return float(np.mean((model.predict(x_val, batch_size=4000, verbose=0) - y_val) ** 2))

    data, steps = _pipeline(x, y, BATCH["regression"], seed)
    return Problem(model, {"loss": "mse"}, data, steps, BATCH["regression"], error)


BUILDERS: dict[str, Callable[..., Problem]] = {
    "autoencoder": autoencoder, "autoencoder_paper": autoencoder_paper, "convnet": convnet,
    "transformer": transformer, "sequence": sequence, "recurrent": recurrent,
    "regression": regression,
}
MNIST_PROBLEMS = ("autoencoder", "autoencoder_paper", "convnet")
