"""Small pieces the examples share: the history they return and the export check."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


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
