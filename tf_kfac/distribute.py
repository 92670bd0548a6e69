"""K-FAC under `tf.distribute`: what crosses between replicas, and when.

Each replica runs K-FAC's step on its share of the global batch. To make the
run the same as one device with the whole batch:

- the objective and its gradients are summed across replicas every step (Keras
  scales each replica's loss by 1/replicas, so the sum is the global mean),
  together with a flag that says whether any replica saw a non-finite value;
- each replica keeps its own moving averages of the factor statistics
  (replica-local variables, read as their mean across replicas): a moving
  average of per-replica statistics, averaged, equals the moving average of the
  averaged statistics, so no factor crosses on the steps that update factors;
- the exception is what the preconditioner reads at every step, EKFAC's
  rescaling S (`CurvatureBlock.synchronized_statistics`): on the steps that
  update the statistics, each replica's batch S is averaged across replicas
  (one collective for all blocks, d_in × d_out floats per layer) before its
  moving average, which is then the same on every replica;
- when the inverses refresh, the factors are averaged across replicas, each
  layer's damped inverses are computed on one replica (chosen so that the
  inversion work is balanced by its cost, d³ per factor), and shared by a sum
  in which the other replicas contribute zeros;
- the adaptive mode also averages its k×k Fisher products and sums the
  objective at the shifted weights (scalars);
- the updated weights and optimizer state are the same on every replica and
  are written to each replica's copy without communication.

Collectives cannot run inside a `tf.cond` branch under MirroredStrategy, so the
conditional exchanges (factors and inverses, only on refresh steps) always run,
carrying an empty tensor on the steps that need nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

SUPPORTED_STRATEGIES = ("MirroredStrategy", "MultiWorkerMirroredStrategy",
                        "OneDeviceStrategy", "the default (no) strategy")


def check_strategy(strategy: tf.distribute.Strategy, adapt_gamma: bool = False) -> None:
    """Raises a clear error for strategies K-FAC has not been built for."""
    if adapt_gamma and strategy.num_replicas_in_sync > 1:
        raise ValueError(
            "KFAC(adapt_gamma=True) is not supported with more than one replica yet: "
            "choosing γ inverts the factors three times inside a conditional step, "
            "which cannot share work across replicas. Use adapt_gamma=False (γ then "
            "follows the adapted damping) or train on one device.")
    supported = (
        tf.distribute.MirroredStrategy,
        tf.distribute.MultiWorkerMirroredStrategy,
        tf.distribute.OneDeviceStrategy,
    )
    if isinstance(strategy, supported):
        return
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        why = ("its workers update the variables asynchronously, while K-FAC's factors, "
               "inverses and step must be the same for every replica")
    elif isinstance(strategy, tf.distribute.TPUStrategy):
        why = "it has not been tested on TPUs"
    elif isinstance(strategy, tf.distribute.experimental.CentralStorageStrategy):
        why = "it keeps the variables on one device apart from the replicas"
    elif strategy.num_replicas_in_sync == 1:  # the default strategy
        return
    else:
        why = "it has not been built or tested for it"
    raise ValueError(
        f"KFAC does not support {type(strategy).__name__.removesuffix('V2')}: {why}. "
        f"Supported: {', '.join(SUPPORTED_STRATEGIES)}."
    )


def num_replicas() -> int:
    """Replicas in sync: from the replica context when inside one, else the strategy's."""
    context = tf.distribute.get_replica_context()
    if context is not None:
        return context.num_replicas_in_sync
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id() -> int:
    """This replica's index in its sync group (global across workers), as a Python int."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    value = tf.get_static_value(context.replica_id_in_sync_group)
    return 0 if value is None else int(value)


def all_reduce(op: str, tensors: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Sums ("sum") or averages ("mean") float32 tensors across replicas; one call."""
    tensors = list(tensors)
    if num_replicas() == 1 or not tensors:
        return tensors
    reduce_op = tf.distribute.ReduceOp.SUM if op == "sum" else tf.distribute.ReduceOp.MEAN
    return list(tf.distribute.get_replica_context().all_reduce(reduce_op, tensors))


def all_reduce_when(flag: tf.Tensor, op: str, compute: Callable[[], list[tf.Tensor]],
                    otherwise: Callable[[], list[tf.Tensor]]) -> list[tf.Tensor]:
    """`all_reduce` of `compute()` on the steps where `flag` holds, else `otherwise()`."""
    return all_reduce_each_when([flag], op, [compute], [otherwise])[0]


def all_reduce_each_when(flags: Sequence[tf.Tensor], op: str,
                         computes: Sequence[Callable[[], list[tf.Tensor]]],
                         otherwise: Sequence[Callable[[], list[tf.Tensor]]]
                         ) -> list[list[tf.Tensor]]:
    """For each k, `all_reduce` of `computes[k]()` where `flags[k]` holds, else
    `otherwise[k]()`.

    One flat collective that always runs: the tensors of the parts whose flag
    holds, concatenated (an empty tensor when none does), so nothing but the
    call crosses and a part costs nothing on the steps it is not due. Each flag
    must be the same on every replica; `computes[k]` and `otherwise[k]` return
    float32 tensors of the same static shapes. With one replica, one `tf.cond`
    per part.
    """
    if num_replicas() == 1:
        return [tf.cond(flag, compute, other)
                for flag, compute, other in zip(flags, computes, otherwise, strict=True)]
    templates: list[list[tf.TensorShape]] = [[] for _ in flags]

    def payload(k):
        def send():
            tensors = [tf.convert_to_tensor(t, tf.float32) for t in computes[k]()]
            templates[k][:] = [t.shape for t in tensors]
            return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)
        return tf.cond(flags[k], send, lambda: tf.zeros([0], tf.float32))

    sent = tf.concat([payload(k) for k in range(len(flags))], 0)
    (reduced,) = all_reduce(op, [sent])
    sizes = [tf.where(flag, sum(shape.num_elements() for shape in template), 0)
             for flag, template in zip(flags, templates, strict=True)]
    parts = tf.split(reduced, tf.stack(sizes), num=len(flags))
    out = []
    for flag, part, template, other in zip(flags, parts, templates, otherwise, strict=True):
        def unpack(part=part, template=template):
            pieces = tf.split(part, [shape.num_elements() for shape in template])
            return [tf.reshape(p, shape) for p, shape in zip(pieces, template, strict=True)]
        out.append(tf.cond(flag, unpack, other))
    return out


def inverse_owners(costs: Sequence[float], replicas: int) -> list[int]:
    """The replica that inverts each layer's factors, balancing the total cost.

    Longest job first, each to the replica with the least work so far;
    deterministic, so every replica computes the same assignment.
    """
    loads = [0.0] * replicas
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        replica = min(range(replicas), key=lambda r: (loads[r], r))
        owners[index] = replica
        loads[replica] += costs[index]
    return owners


def write(assignments: Sequence[tuple]) -> None:
    """Writes mirrored variables from replica context, each on every device.

    Args:
        assignments: `(variable, value, flag)` triples; `flag` is None for an
            unconditional write, else a boolean tensor (the write happens
            only when it holds). Values must be the same on every replica:
            each device's copy is assigned its own replica's value, so nothing
            crosses between replicas.
    """
    assignments = list(assignments)
    if not assignments:
        return
    if num_replicas() == 1:
        write_local(assignments)
        return

    def merge(strategy, values, flags):
        for (variable, _, _), value, flag in zip(assignments, values, flags, strict=True):
            strategy.extended.update(_tf_variable(variable), _assign_fn(flag is not None),
                                     args=(value,) if flag is None else (value, flag),
                                     group=False)

    values = [value for _, value, _ in assignments]
    flags = [flag for _, _, flag in assignments]
    context = tf.distribute.get_replica_context()
    if context is None or _supports_no_merge_call():
        # Already in cross-replica context, or a strategy whose updates run from
        # replica context (multi-worker collectives), as Keras's optimizers do.
        merge(tf.distribute.get_strategy(), values, flags)
    else:
        context.merge_call(merge, args=(values, flags))


def _supports_no_merge_call() -> bool:
    """TensorFlow's own test (internal API) of whether the strategy avoids merge_call."""
    check = getattr(getattr(tf.__internal__, "distribute", None),
                    "strategy_supports_no_merge_call", None)
    return bool(check()) if check is not None else False


def _tf_variable(variable):
    return getattr(variable, "value", variable)


def _assign_fn(conditional: bool):
    def assign(variable, value):
        return variable.assign(tf.cast(value, variable.dtype))

    def assign_if(variable, value, flag):
        return tf.cond(flag, lambda: assign(variable, value), lambda: tf.identity(variable))

    return assign_if if conditional else assign


def write_local(assignments: Sequence[tuple]) -> None:
    """Writes replica-local variables (or any variable on one device).

    `(variable, value, flag)` triples as for `write`; under a strategy each
    replica writes its own copy. Conditional writes are grouped per flag.
    """
    groups: dict[int, tuple[tf.Tensor, list]] = {}
    for variable, value, flag in assignments:
        if flag is None:
            variable.assign(tf.cast(value, variable.dtype))
        else:
            groups.setdefault(id(flag), (flag, []))[1].append((variable, value))
    for flag, pairs in groups.values():
        def assign_all(pairs=pairs):
            for variable, value in pairs:
                variable.assign(tf.cast(value, variable.dtype))
            return tf.constant(True)

        tf.cond(flag, assign_all, lambda: tf.constant(False))
