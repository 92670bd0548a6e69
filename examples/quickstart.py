"""Quickstart: K-FAC against Adam on a small convnet, with scikit-learn's digits.

Trains the same convnet (same initial weights, same data order) twice, once with
`tf_kfac.KFAC()` at its default hyperparameters and once with
`keras.optimizers.Adam()` at its defaults, and prints a per-epoch table: train
loss, held-out loss and accuracy, and seconds per epoch for each. Then it
plots both runs, prints which curvature each layer got (`opt.summary()`), saves
the K-FAC model as a `.keras` file and exports it as a SavedModel, and checks
that the reloaded files predict exactly what the trained model predicts.

The digits (1,797 8x8 images, bundled with scikit-learn) need no download.

    python examples/quickstart.py                 # from the repository root
    python examples/quickstart.py --epochs 5 --plot digits.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

_START = time.perf_counter()  # the total time printed at the end includes the imports
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from example_utils import export_and_check  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import tf_kfac  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPORT_DIR = REPO_ROOT / "saved_models" / "quickstart"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40, help="epochs per optimizer (40)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, split, order (0)")
    parser.add_argument(
        "--plot", type=Path, default=Path("quickstart.png"),
        help="where to save the plot (quickstart.png in the current directory)",
    )
    return parser.parse_args(argv)


def load_data(seed: int):
    """Digits scaled to [0, 1], shape (N, 8, 8, 1); a stratified 80/20 split."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def build_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(10, activation="softmax", name="classifier"),
        ],
        name="digits_convnet",
    )


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch (training and the held-out evaluation)."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def train(optimizer, initial_weights, data, args) -> tuple[keras.Model, dict]:
    x_train, x_val, y_train, y_val = data
    keras.utils.set_random_seed(args.seed)  # the same shuffling for both optimizers
    model = build_model()
    model.set_weights(initial_weights)
    model.compile(
        optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    timer = EpochTimer()
    history = model.fit(
        x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
        validation_data=(x_val, y_val), callbacks=[timer], verbose=0,
    )
    return model, {**history.history, "seconds": timer.seconds}


def print_table(runs: dict[str, dict]) -> None:
    names = list(runs)
    columns = ("train loss", "val loss", "val acc", "s/epoch")
    width = 9
    group = len(columns) * (width + 1) - 1
    print("epoch  " + "  ".join(f"{name:^{group}}" for name in names))
    print("       " + "  ".join(" ".join(f"{c:>{width}}" for c in columns) for _ in names))
    for epoch in range(len(runs[names[0]]["loss"])):
        cells = []
        for name in names:
            h = runs[name]
            cells.append(" ".join([
                f"{h['loss'][epoch]:>{width}.4f}",
                f"{h['val_loss'][epoch]:>{width}.4f}",
                f"{h['val_accuracy'][epoch]:>{width}.2%}",
                f"{h['seconds'][epoch]:>{width}.2f}",
            ]))
        print(f"{epoch + 1:>5}  " + "  ".join(cells))


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, h), color in zip(runs.items(), ("C0", "C1"), strict=False):
        epochs = np.arange(1, len(h["loss"]) + 1)
        ax_loss.plot(epochs, h["loss"], color=color, label=f"{name} train")
        ax_loss.plot(epochs, h["val_loss"], color=color, linestyle="--", label=f"{name} held-out")
        ax_acc.plot(epochs, h["val_accuracy"], color=color, marker="o", label=name)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Digits convnet: K-FAC (defaults) vs Adam (defaults)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_saved_model(model: keras.Model, x: np.ndarray) -> None:
    expected = model.predict(x, verbose=0)

    with tempfile.TemporaryDirectory() as tmp:
        keras_file = Path(tmp) / "quickstart.keras"
        model.save(keras_file)  # weights and the full K-FAC state
        reloaded = keras.models.load_model(keras_file)
        np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
        print(f"Saved and reloaded {keras_file.name}: predictions match.")

    export_and_check(model, EXPORT_DIR, x)


def main(argv=None) -> None:
    args = parse_args(argv)
    data = load_data(args.seed)
    x_train, x_val, _, _ = data
    print(f"digits: {len(x_train)} training and {len(x_val)} held-out images, "
          f"batch size {args.batch_size}, {args.epochs} epochs")

    keras.utils.set_random_seed(args.seed)
    initial_weights = build_model().get_weights()

    runs, models = {}, {}
    opt = tf_kfac.KFAC(seed=args.seed)  # default hyperparameters; seed of the sampled targets
    for name, optimizer in (("K-FAC", opt), ("Adam", keras.optimizers.Adam())):
        models[name], runs[name] = train(optimizer, initial_weights, data, args)

    print()
    print_table(runs)
    print()
    plot(runs, args.plot)
    print(f"Plot saved to {args.plot}")
    print()
    opt.summary()
    print()
    check_saved_model(models["K-FAC"], x_val)


if __name__ == "__main__":
    main()
    print(f"Total time: {time.perf_counter() - _START:.1f} s")
