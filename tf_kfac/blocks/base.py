"""The interface every curvature block shares, and the first-order fallback.

A block is one diagonal block of K-FAC's block-diagonal curvature. It owns the
optimizer variables that hold its curvature and all the maths on them: what a
batch's statistics are, how they enter their moving averages, how they are
refreshed (inverted, or eigendecomposed) and how a gradient is preconditioned.
It returns new values and never writes a variable: the estimator
(`tf_kfac/estimator.py`) schedules and writes, the optimizer commits.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import keras
import tensorflow as tf

from tf_kfac import _keras_internals as internals
from tf_kfac import capture, sparse
from tf_kfac.capture import LayerCall


def add_state(optimizer: keras.optimizers.Optimizer, block_name: str, suffix: str, shape,
              replica_local: bool = False) -> keras.Variable:
    """A zero-initialised float32 optimizer variable of a block.

    Moving averages are replica-local: each replica keeps its own, and they are
    averaged across replicas only when the block refreshes (tf_kfac/distribute.py).
    """
    name = f"{block_name.replace('/', '_')}_{suffix}"
    if replica_local:
        return internals.add_replica_local_variable(optimizer, shape, name)
    return optimizer.add_variable(shape, initializer="zeros", dtype="float32", name=name)


class CurvatureBlock(abc.ABC):
    """One block of K-FAC's block-diagonal curvature approximation.

    Attributes:
        kind: short name shown in the summary table.
        name: the layer's or variable's path.
        variables: the model variables this block preconditions, in order.
        sparse_gradients: whether `precondition` takes a row-sparse gradient
            (`tf.IndexedSlices` with unique rows, tf_kfac/sparse.py) as it is;
            other blocks receive it dense.
    """

    kind: str = ""
    sparse_gradients: bool = False

    def __init__(self, name: str, variables: Sequence[keras.Variable]):
        self.name = name
        self.variables = list(variables)

    # -------------------------------------------------------------- state
    @property
    def layer(self) -> keras.layers.Layer | None:
        """The layer whose calls this block needs recorded (None: needs none)."""
        return None

    # How the layer's pre-activation and intermediates are computed while it is
    # recorded (`capture.Preactivation`); None runs its own `call` without
    # the activation.
    preactivation = None

    @classmethod
    def eigenbasis_variant(cls) -> type | None:
        """This kind's own EKFAC block (`curvature="ekfac"`), if it has one beyond the
        generic variant of Kronecker kinds (tf_kfac/blocks/ekfac.py)."""
        return None

    @classmethod
    def record_calls(cls, layer: keras.layers.Layer) -> None:
        """Makes `layer` record its calls inside K-FAC's step: by default its
        input and its output before its activation (see `preactivation`)."""
        capture.wrap_layer(layer, cls.preactivation)

    def build(self, optimizer: keras.optimizers.Optimizer) -> None:  # noqa: B027
        """Creates the block's optimizer variables (none by default)."""

    @property
    def statistics(self) -> tuple[keras.Variable, ...]:
        """Moving averages of the batch statistics (replica-local), in order."""
        return ()

    # The positions in `statistics` of the moving averages that the preconditioner reads at
    # every step (EKFAC's rescaling). Under a strategy with several replicas their batch
    # values are averaged across the replicas on every statistics step, before the moving
    # average, so that they are the same on every replica, and a refresh does not average
    # them again. The other statistics stay replica-local until a refresh averages them.
    synchronized_statistics: tuple[int, ...] = ()

    @property
    def refreshed(self) -> tuple[keras.Variable, ...]:
        """What a refresh computes from the statistics (damped inverses), in order."""
        return ()

    @property
    def state(self) -> tuple[keras.Variable, ...]:
        """All of the block's optimizer variables, in creation order."""
        return (*self.statistics, *self.refreshed)

    @property
    def refresh_cost(self) -> float:
        """The work of one refresh, for sharding refreshes over replicas."""
        return 0.0

    # -------------------------------------------------------------- maths
    def batch_statistics(self, calls: Sequence[LayerCall],
                         output_gradients: Sequence[Sequence[tf.Tensor]],
                         batch_size: tf.Tensor, g_scale: tf.Tensor,
                         example_weights: tf.Tensor | None) -> list[tf.Tensor]:
        """This batch's statistics, one tensor per `statistics` variable.

        Args:
            calls: the recorded calls of `layer` in this forward pass.
            output_gradients: for each of the estimator's gradient sets, for
                each call, the per-example gradients at its `targets` (the
                intermediates, then the pre-activation s last).
            batch_size: B, this replica's batch.
            g_scale: what turns the gradient rows into c-scaled per-example
                gradients (the loss's scale c for the sampled and exact
                estimators).
            example_weights: the objective's per-example weights, or None.
        """
        return []

    def moving_average(self, old: Sequence[tf.Tensor], new: Sequence[tf.Tensor],
                       decay: tf.Tensor) -> list[tf.Tensor]:
        """The statistics' new moving averages: decay·old + (1 − decay)·new."""
        return [decay * o + (1.0 - decay) * n for o, n in zip(old, new, strict=True)]

    def refresh(self, statistics: Sequence[tf.Tensor], gamma: tf.Tensor) -> list[tf.Tensor]:
        """New values of `refreshed` from the statistics at damping strength γ."""
        return []

    def preconditioner(self, refreshed: Sequence[tf.Tensor],
                       statistics: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """What `precondition` receives as `refreshed`: by default the refreshed
        values; a block whose preconditioner also follows its current moving
        averages (EKFAC's rescaling) combines both here."""
        return list(refreshed)

    @abc.abstractmethod
    def precondition(self, gradients: Sequence[tf.Tensor], refreshed: Sequence[tf.Tensor],
                     loss_scale: tf.Tensor) -> list[tf.Tensor]:
        """Update directions for `gradients` (one per variable), from `refreshed`."""

    def describe(self) -> str:
        """One line on the curvature this block keeps, for the summary table."""
        return ""


class FirstOrderBlock(CurvatureBlock):
    """The documented fallback for a variable outside any curvature block.

    Its curvature is taken as c·I (c the loss's scale), so its direction is its
    gradient divided by c: the variable trains like SGD with momentum, with the
    K-FAC blocks' learning rate, KL-clip scale and momentum, and its step does
    not depend on the scale of the objective.
    """

    kind = "first-order"
    sparse_gradients = True

    def __init__(self, variable: keras.Variable, reason: str):
        super().__init__(variable.path, [variable])
        self.reason = reason

    def precondition(self, gradients, refreshed, loss_scale):
        return [sparse.map_values(g, lambda v: v / tf.cast(loss_scale, v.dtype))
                for g in gradients]

    def describe(self) -> str:
        return self.reason


class PartsBlock(CurvatureBlock):
    """A layer's block made of independent parts, each a block with its own state (the
    curvature between the parts is not kept): a separable convolution's depthwise and
    pointwise kernels, a recurrent layer's input and recurrent kernels.

    Subclasses set `parts` and say how the layer's calls and gradients become each
    part's (`batch_statistics`) and how the gradients are shared out (`precondition`).
    """

    parts: tuple[CurvatureBlock, ...] = ()

    def __init__(self, layer: keras.layers.Layer, variables: Sequence[keras.Variable]):
        super().__init__(layer.path, variables)
        self._layer = layer

    @property
    def layer(self) -> keras.layers.Layer:
        return self._layer

    def build(self, optimizer: keras.optimizers.Optimizer) -> None:
        for part in self.parts:
            part.build(optimizer)

    @property
    def statistics(self):
        return tuple(v for part in self.parts for v in part.statistics)

    @property
    def synchronized_statistics(self):
        out, start = [], 0
        for part in self.parts:
            out += [start + i for i in part.synchronized_statistics]
            start += len(part.statistics)
        return tuple(out)

    @property
    def refreshed(self):
        return tuple(v for part in self.parts for v in part.refreshed)

    @property
    def state(self):
        return tuple(v for part in self.parts for v in part.state)

    @property
    def refresh_cost(self) -> float:
        return sum(part.refresh_cost for part in self.parts)

    def shares(self, values: Sequence, attribute: str) -> list[list]:
        """`values` (aligned with `statistics` or `refreshed`) cut into each part's."""
        out, start = [], 0
        for part in self.parts:
            count = len(getattr(part, attribute))
            out.append(list(values[start:start + count]))
            start += count
        return out

    def moving_average(self, old, new, decay):
        return [value for part, old_share, new_share in zip(
                    self.parts, self.shares(old, "statistics"), self.shares(new, "statistics"),
                    strict=True)
                for value in part.moving_average(old_share, new_share, decay)]

    def refresh(self, statistics, gamma):
        return [value for part, share in zip(self.parts, self.shares(statistics, "statistics"),
                                             strict=True)
                for value in part.refresh(share, gamma)]
