"""A Keras callback that charges only training steps to a budget, shared by the benchmarks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import keras


class TrainingClock(keras.callbacks.Callback):
    """Times the training steps after the first, evaluates `error` every budget/evaluations.

    The first step (tracing and compiling the train function) and the evaluations are not
    charged. Training stops once `budget` seconds of steps are spent, or when the error is
    not finite.

    Attributes:
        curve: (training seconds, steps, error) at the start and after each evaluation.
        step_times: the charged steps' durations in seconds.
        first_step: the first step's duration.
        eval_s: seconds spent evaluating.
    """

    def __init__(self, error: Callable[[], float], budget: float, evaluations: int):
        super().__init__()
        self.error, self.budget, self.interval = error, budget, budget / evaluations
        self.eval_s = 0.0
        self.step_times: list[float] = []
        self.trained, self.steps, self.first_step = 0.0, 0, 0.0
        self.next_eval = self.interval
        self.curve = [(0.0, 0, self.evaluate())]

    def evaluate(self) -> float:
        start = time.perf_counter()
        value = self.error()
        self.eval_s += time.perf_counter() - start
        return value

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._start
        self.steps += 1
        if self.steps == 1:  # tracing and compiling the train function: not training
            self.first_step = elapsed
            return
        self.step_times.append(elapsed)
        self.trained += elapsed
        if self.trained >= self.next_eval or self.trained >= self.budget:
            value = self.evaluate()
            self.curve.append((self.trained, self.steps, value))
            self.next_eval += self.interval
            if self.trained >= self.budget or not math.isfinite(value):
                self.model.stop_training = True
