"""The untuned benchmark suite's generated problems build, are deterministic and score.

No training and no MNIST: the MNIST problems are left to the suite itself.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import suite  # noqa: E402
import suite_problems  # noqa: E402

GENERATED = {"transformer": suite_problems.order_task, "sequence": suite_problems.signal_task,
             "regression": suite_problems.teacher_task}


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_data_is_deterministic(name):
    task = GENERATED[name]
    first, again, other = task(0, 200, 50), task(0, 200, 50), task(1, 200, 50)
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(first[0][0], other[0][0])  # the seed matters
    (x, y), (x_val, y_val) = first
    assert len(x) == len(y) == 200 and len(x_val) == len(y_val) == 50


def test_order_task_labels_are_the_markers_order():
    (x, y), _ = suite_problems.order_task(0, 100, 10)
    markers = suite_problems.MARKERS
    assert ((x >= 1) & (x <= markers)).sum(axis=1).tolist() == [markers] * len(x)
    assert 0 <= y.min() and y.max() < math.factorial(markers)
    first = np.array([row[(row >= 1) & (row <= markers)][0] for row in x])
    # Labels 0 … (markers − 1)! − 1 are the orders that start with marker 1, and so on.
    np.testing.assert_array_equal(first, 1 + y // math.factorial(markers - 1))


def test_signal_task_labels_count_the_motifs(monkeypatch):
    monkeypatch.setattr(suite_problems, "SIGNAL_NOISE", 0.0)
    (x, y), _ = suite_problems.signal_task(0, 100, 10)
    energy = (x[..., 0] ** 2).sum(axis=1) / (suite_problems.motif() ** 2).sum()
    np.testing.assert_allclose(energy, y + 1, rtol=1e-5)  # y + 1 copies, none overlapping


@pytest.mark.parametrize("name", sorted(GENERATED) + ["recurrent"])
def test_generated_problem_builds_and_scores(name):
    problem = suite_problems.BUILDERS[name](seed=0)
    assert problem.batch_size == suite_problems.BATCH[name]
    x, y = next(iter(problem.data))
    assert x.shape[0] == y.shape[0] == problem.batch_size
    logits = problem.model(x)
    assert logits.shape[0] == problem.batch_size
    problem.model.compile(optimizer="sgd", **problem.compile_kwargs)
    error = problem.error(problem.model)
    assert math.isfinite(error) and error > 0
    if suite_problems.UNITS[name].endswith("%"):
        assert error <= 100


def test_suite_tables_cover_every_problem():
    for table in (suite.SWEEPS, suite.BUDGETS, suite.THRESHOLDS, suite.TRACE_S, suite.EVAL_S):
        assert set(table) == set(suite.PROBLEMS)
    for sweep in suite.SWEEPS.values():
        assert set(sweep) == set(suite.OPTIMIZERS) - {"kfac"}
        assert all(len(lrs) == 3 for lrs in sweep.values())
    assert set(suite.KFAC_CONFIGS) == {"autoencoder_paper"}
