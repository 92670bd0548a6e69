"""Small pieces the examples share: the history they return and the export check."""

from __future__ import annotations

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
