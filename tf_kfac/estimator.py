"""The curvature estimator: owns the blocks, schedules them, syncs replicas.

The optimizer and the update rules never see a factor: they hand the
estimator the captured calls and gradients, and get back statistics to
commit, refreshed values and update directions. Everything here works on
lists aligned with `CurvatureEstimator.curvature_blocks` (one inner list per
block, one tensor per block variable), so no block is looked up by identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from tf_kfac import distribute, sparse
from tf_kfac.blocks import CurvatureBlock
from tf_kfac.capture import LayerCall, Recording
from tf_kfac.linalg import all_finite

Nested = list[list[tf.Tensor]]


class CurvatureEstimator:
    """The blocks of one model and what K-FAC does with them each step.

    Args:
        blocks: every trainable variable's block, in the order of `var_list`.
        var_list: the optimizer's trainable variables.
        refresh_interval: every block refreshes once per this many steps
            (`inverse_update_interval`), at its own phase (`refresh_schedule`).
    """

    def __init__(self, blocks: Sequence[CurvatureBlock], var_list: Sequence[keras.Variable],
                 refresh_interval: int = 1):
        self.blocks = list(blocks)
        self.curvature_blocks = [b for b in self.blocks if b.layer is not None]
        index = {id(v): i for i, v in enumerate(var_list)}
        self._positions = [[index[id(v)] for v in b.variables] for b in self.blocks]
        self._size = len(var_list)
        self.inversions: tf.Variable | None = None
        self.refresh_interval = refresh_interval

    def build(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Creates every block's state, in block order (saved files rely on it)."""
        for block in self.blocks:
            block.build(optimizer)
        # How many blocks this replica refreshed (diagnostics, not saved).
        self.inversions = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="kfac_inversions",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM)

    @property
    def layers(self) -> list[keras.layers.Layer]:
        return [b.layer for b in self.curvature_blocks]

    def block_for(self, layer: keras.layers.Layer) -> CurvatureBlock | None:
        return next((b for b in self.curvature_blocks if b.layer is layer), None)

    # --------------------------------------------------------- statistics
    def calls(self, recording: Recording) -> list[list[LayerCall]]:
        """Each curvature block's recorded calls; raises for a layer never called."""
        calls = [recording.of(b.layer) for b in self.curvature_blocks]
        missing = [b.name for b, c in zip(self.curvature_blocks, calls, strict=True) if not c]
        if missing:
            raise ValueError(
                f"K-FAC registered the layers {missing}, but the training forward pass did "
                "not call them, so their curvature cannot be measured. Remove the unused "
                "layers from the model, or freeze them (layer.trainable = False) before "
                "compiling."
            )
        return calls

    def batch_statistics(self, calls, gradient_sets, batch_size, g_scale,
                         example_weights) -> Nested:
        """This batch's statistics of every curvature block.

        `gradient_sets` holds, for each of the Fisher estimator's backward
        passes, one list per block of the per-call pre-activation gradients.
        """
        return [block.batch_statistics(block_calls, [grads[i] for grads in gradient_sets],
                                       batch_size, g_scale, example_weights)
                for i, (block, block_calls) in enumerate(
                    zip(self.curvature_blocks, calls, strict=True))]

    def zero_statistics(self) -> Nested:
        return [[tf.zeros(v.shape, tf.float32) for v in b.statistics]
                for b in self.curvature_blocks]

    def _stored(self, attribute: str) -> Nested:
        return [[tf.convert_to_tensor(v) for v in getattr(b, attribute)]
                for b in self.curvature_blocks]

    def moving_averages(self, batch: Nested, decay: tf.Tensor, when: tf.Tensor) -> Nested:
        """The statistics' moving averages with `batch` when `when`, else the stored ones.

        With several replicas, the blocks' `synchronized_statistics` in `batch` are first
        averaged across them (one collective, which carries nothing unless `when`), so
        that their moving averages are the same on every replica.
        """
        if not self.curvature_blocks:
            return []
        batch = self._synchronized(batch, when)

        def updated():
            return [b.moving_average(old, new, decay) for b, old, new in
                    zip(self.curvature_blocks, self._stored("statistics"), batch, strict=True)]

        return tf.cond(when, updated, lambda: self._stored("statistics"))

    def _synchronized(self, batch: Nested, when: tf.Tensor) -> Nested:
        """`batch` with every block's `synchronized_statistics` averaged across replicas."""
        picked = [(k, i) for k, block in enumerate(self.curvature_blocks)
                  for i in block.synchronized_statistics]
        if distribute.num_replicas() == 1 or not picked:
            return batch
        values = [batch[k][i] for k, i in picked]
        averaged = distribute.all_reduce_when(when, "mean", lambda: values, lambda: values)
        out = [list(block_batch) for block_batch in batch]
        for (k, i), value in zip(picked, averaged, strict=True):
            out[k][i] = value
        return out

    def statistics_writes(self, values: Nested, flag: tf.Tensor) -> None:
        """Writes the (replica-local) moving averages when `flag` holds."""
        distribute.write_local([
            (v, value, flag) for b, block_values in zip(self.curvature_blocks, values, strict=True)
            for v, value in zip(b.statistics, block_values, strict=True)])

    # ------------------------------------------------------------ refresh
    def refresh_schedule(self) -> tuple[list[int], list[int]]:
        """(phase, owner) of every curvature block's refresh.

        Block k refreshes on the steps where iteration % refresh_interval
        equals its phase: the blocks are spread over the interval's steps,
        balanced by `refresh_cost` (largest first, to the least-loaded step), so
        that no step pays for every block. With several replicas the blocks of
        one phase are shared among them the same way (ties to the replica with
        the least work over the interval), so the phases, and the training run,
        do not depend on the number of replicas. Deterministic:
        every replica computes the same schedule.
        """
        costs = [b.refresh_cost for b in self.curvature_blocks]
        phases = distribute.inverse_owners(costs, self.refresh_interval)
        replicas = distribute.num_replicas()
        owners = [0] * len(costs)
        total = [0.0] * replicas  # over the interval, so that the first refresh is shared too
        for phase in sorted(set(phases)):
            load = [0.0] * replicas
            for k in sorted((k for k, p in enumerate(phases) if p == phase),
                            key=lambda k: (-costs[k], k)):
                owners[k] = min(range(replicas), key=lambda r: (load[r], total[r], r))
                load[owners[k]] += costs[k]
                total[owners[k]] += costs[k]
        return phases, owners

    def refresh_due(self, iteration: tf.Tensor, everything: tf.Tensor) -> list[tf.Tensor]:
        """Whether each block refreshes this step: all of them when `everything` (the
        first refresh), and from step `refresh_interval` on, each at its phase."""
        phases, _ = self.refresh_schedule()
        iteration = tf.cast(iteration, tf.int64)
        started = iteration >= self.refresh_interval
        phase = iteration % self.refresh_interval
        return [tf.logical_or(everything, tf.logical_and(started, tf.equal(phase, p)))
                for p in phases]

    def refresh(self, statistics: Nested, gamma: tf.Tensor,
                due: Sequence[tf.Tensor] | bool) -> tuple[Nested, tf.Tensor]:
        """Refreshed values at γ of the blocks that are `due`, the stored ones of the others.

        Returns them and how many blocks' fresh values were not finite (each
        of those keeps its stored values). `due` is one flag per block
        (`refresh_due`), or a Python bool for all of them (the γ candidates of
        the adaptive mode, one replica only), which needs no conditional. With
        several replicas the due blocks' statistics (each replica's moving
        averages) are averaged first, each is refreshed on the one replica that
        owns it (`refresh_schedule`), and the results are shared.
        The `synchronized_statistics` are the same everywhere and are not averaged.
        """
        blocks = self.curvature_blocks
        if not blocks:
            return [], tf.constant(0.0)
        _, owners = self.refresh_schedule()
        me = distribute.replica_id()
        stored = self._stored("refreshed")

        def kept(k):
            return lambda: [*stored[k], tf.constant(0.0)]

        def fresh(k, values):
            def compute():  # this replica's block: new values; another's: zeros
                if owners[k] != me:
                    return [*[tf.zeros_like(p) for p in stored[k]], tf.constant(0.0)]
                new = blocks[k].refresh(values, gamma)
                keep = all_finite(new)
                self.inversions.assign_add(1)
                return [*[tf.where(keep, f, p) for f, p in zip(new, stored[k], strict=True)],
                        1.0 - tf.cast(keep, tf.float32)]
            return compute

        if isinstance(due, bool):
            results = [fresh(k, statistics[k])() if due else kept(k)()
                       for k in range(len(blocks))]
        else:
            averaged = statistics
            if distribute.num_replicas() > 1:
                averaged = self._replica_means(statistics, due)
            results = distribute.all_reduce_each_when(
                due, "sum", [fresh(k, averaged[k]) for k in range(len(blocks))],
                [kept(k) for k in range(len(blocks))])
        failed = tf.add_n([r[-1] for r in results])
        return [list(r[:-1]) for r in results], failed

    def _replica_means(self, statistics: Nested, due: Sequence[tf.Tensor]) -> Nested:
        """The due blocks' statistics averaged across replicas, except their
        `synchronized_statistics`, which are the same on every replica already."""
        local = [[i for i in range(len(values)) if i not in block.synchronized_statistics]
                 for block, values in zip(self.curvature_blocks, statistics, strict=True)]
        # Blocks that are not due send nothing, and keep their own values.
        picks = [lambda v=v, keep=keep: [v[i] for i in keep]
                 for v, keep in zip(statistics, local, strict=True)]
        means = distribute.all_reduce_each_when(due, "mean", picks, picks)
        out = [list(values) for values in statistics]
        for block_out, keep, block_means in zip(out, local, means, strict=True):
            for i, mean in zip(keep, block_means, strict=True):
                block_out[i] = mean
        return out

    def refreshed_writes(self, values: Nested, flags: Sequence[tf.Tensor]) -> list[tuple]:
        """`(variable, value, flag)` writes of the refreshed values (mirrored state), one
        flag per block: only the blocks that refreshed are written."""
        return [(v, value, flag)
                for b, block_values, flag in zip(self.curvature_blocks, values, flags,
                                                 strict=True)
                for v, value in zip(b.refreshed, block_values, strict=True)]

    # ------------------------------------------------------- precondition
    def directions(self, grads: Sequence[tf.Tensor | None], refreshed: Nested,
                   loss_scale: tf.Tensor, statistics: Nested) -> list[tf.Tensor | None]:
        """V: every block's preconditioned gradient, one per trainable variable.

        `statistics` are the current moving averages, which a block may use
        besides its refreshed values (`CurvatureBlock.preconditioner`).
        """
        values, averages = iter(refreshed), iter(statistics)
        directions: list[tf.Tensor | None] = [None] * self._size
        for block, positions in zip(self.blocks, self._positions, strict=True):
            block_refreshed = (block.preconditioner(next(values), next(averages))
                               if block.layer is not None else [])
            block_grads = [g if block.sparse_gradients else sparse.dense(g)
                           for g in (grads[i] for i in positions)]
            if any(g is None for g in block_grads):
                continue
            for i, u in zip(positions, block.precondition(block_grads, block_refreshed,
                                                          loss_scale), strict=True):
                directions[i] = u
        return directions

    # ------------------------------------------------------------ summary
    def summary(self, fisher: str) -> str:
        rows = [("Layer / variable", "Block", "Params", "Curvature")]
        total = curved = 0
        for block in self.blocks:
            params = sum(math.prod(v.shape) for v in block.variables)
            total += params
            curved += params if block.layer is not None else 0
            rows.append((block.name, block.kind, f"{params:,}", block.describe()))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        text = [f"KFAC curvature blocks (fisher={fisher!r})", line]
        for i, row in enumerate(rows):
            text.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
            if i == 0:
                text.append(line)
        text.append(line)
        share = curved / total if total else 0.0
        text.append(f"Curvature blocks cover {curved:,} of {total:,} trainable parameters "
                    f"({share:.1%}).")
        return "\n".join(text)
