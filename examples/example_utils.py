"""Small pieces the examples share: the history they return and the export check."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

REPO_ROOT = Path(__file__).resolve().parent.parent


def training_parser(description: str, name: str, batch_size: int,
                    epochs: int) -> argparse.ArgumentParser:
    """The options every MNIST example has: data, budget, optimizer, outputs.

    `name` names the plot (`<name>.png`) and the export directory
    (`saved_models/<name>`); `finish_args` checks and completes the result.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the MNIST IDX files (default: tensorflow_datasets)")
    parser.add_argument("--split", default="train",
                        help="MNIST split to use: train (60,000; default) or test (10,000)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs ({epochs}; unlimited when --seconds is given)")
    parser.set_defaults(default_epochs=epochs)
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop after this many seconds of training (wall clock; the "
                             "end-of-epoch evaluation is not counted)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"batch size ({batch_size})")
    parser.add_argument("--optimizer", choices=("kfac", "adam"), default="kfac",
                        help="K-FAC (default) or Adam, for comparison")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="Adam's, or fixed-mode K-FAC's, learning rate (their defaults)")
    parser.add_argument("--kl-clip", type=float, default=None,
                        help="fixed-mode K-FAC's KL-clip bound (KFAC's default); raise it "
                             "when the logged kl_scale stays well below 1")
    parser.add_argument("--plot", type=Path, default=Path(f"{name}.png"),
                        help=f"learning-curve PNG ({name}.png in the current directory)")
    parser.add_argument("--export", type=Path, default=REPO_ROOT / "saved_models" / name,
                        help=f"SavedModel directory (saved_models/{name} in the repository)")
    return parser


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks the shared options and fills in the number of epochs."""
    if args.epochs is None:
        args.epochs = 10**9 if args.seconds is not None else args.default_epochs
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def fixed_mode_options(args: argparse.Namespace) -> dict:
    """The fixed-mode K-FAC hyperparameters given on the command line."""
    given = {"learning_rate": args.learning_rate, "kl_clip": args.kl_clip}
    return {key: value for key, value in given.items() if value is not None}


class History(dict):
    """The per-epoch history (name → list of values); `.model` is the exported model."""

    model: keras.Model | None = None


def export_and_check(model: keras.Model, export_dir: Path, x: np.ndarray) -> None:
    """Exports `model` as a SavedModel and checks that it serves what `predict` returns."""
    expected = model.predict(x, verbose=0)
    model.export(str(export_dir), verbose=False)
    served = tf.saved_model.load(str(export_dir))  # keep a reference while serving
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected,
                               rtol=1e-5, atol=1e-6)
    print(f"Exported the SavedModel to {export_dir}: serve() matches predict().")


class Monitor(keras.callbacks.Callback):
    """Training clock, time budget and one record per epoch (printed by `print_row`).

    `seconds` counts training only: from each epoch's start to its last batch,
    so end-of-epoch evaluations are not charged to the optimizer. Subclasses
    add their own end-of-epoch measurements in `measure`.
    """

    def __init__(self, budget=None, print_row=None):
        super().__init__()
        self.budget = budget
        self.print_row = print_row
        self.records: list[dict] = []

    def measure(self) -> dict:
        """Extra values for this epoch's record (none by default)."""
        return {}

    def on_train_begin(self, logs=None):
        self.elapsed = 0.0
        self.steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()
        self.steps += 1
        if self.budget is not None and self.elapsed + self._last - self._start >= self.budget:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.elapsed += self._last - self._start
        record = {"epoch": epoch + 1, "steps": self.steps, "seconds": self.elapsed,
                  **self.measure()}
        for key, value in (logs or {}).items():
            record[key] = float(value)
        self.records.append(record)
        if self.print_row is not None:
            self.print_row(record)
