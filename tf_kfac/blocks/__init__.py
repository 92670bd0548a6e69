"""Curvature blocks: one small class per layer kind behind one interface.

Adding a layer kind means writing one `KroneckerBlock` subclass and adding it
to `BLOCK_TYPES`; `blocks_for_model` does the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tf_kfac.blocks.base import CurvatureBlock, FirstOrderBlock, KroneckerBlock
from tf_kfac.blocks.conv2d import Conv2DBlock
from tf_kfac.blocks.dense import DenseBlock

# Checked in order: the first layer class that matches gives the block.
BLOCK_TYPES: tuple[tuple[type, type[KroneckerBlock]], ...] = (
    (keras.layers.Conv2D, Conv2DBlock),
    (keras.layers.Dense, DenseBlock),
)

__all__ = [
    "BLOCK_TYPES",
    "Conv2DBlock",
    "CurvatureBlock",
    "DenseBlock",
    "FirstOrderBlock",
    "KroneckerBlock",
    "block_type_for",
    "blocks_for_model",
]


def block_type_for(layer: keras.layers.Layer) -> type[KroneckerBlock] | None:
    for layer_class, block_type in BLOCK_TYPES:
        if isinstance(layer, layer_class):
            return block_type
    return None


def _kronecker_obstacle(layer, trainable_ids) -> str | None:
    """Why a Dense/Conv2D layer cannot get a Kronecker block, or None."""
    if getattr(layer, "lora_enabled", False):
        return "LoRA-enabled layer: its LoRA factors train first-order"
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution (groups={layer.groups})"
    kernel = getattr(layer, "_kernel", None)
    if kernel is None:
        kernel = getattr(layer, "kernel", None)
    if kernel is None or id(kernel) not in trainable_ids:
        return "kernel is not trainable"
    bias = getattr(layer, "bias", None)
    if bias is not None and id(bias) not in trainable_ids:
        return "kernel trainable but bias frozen"
    return None


def blocks_for_model(
    layers: Sequence[keras.layers.Layer], var_list: Sequence[keras.Variable]
) -> list[CurvatureBlock]:
    """One block per Dense/Conv2D layer, one first-order block per other variable.

    The order of the blocks follows `var_list` (by the first variable of each
    block), so it depends only on the model, never on the order of calls.
    """
    trainable_ids = {id(v) for v in var_list}
    owner: dict[int, CurvatureBlock] = {}
    notes: dict[int, str] = {}
    for layer in layers:
        block_type = block_type_for(layer)
        if block_type is None or not layer.built:
            continue
        obstacle = _kronecker_obstacle(layer, trainable_ids)
        if obstacle is not None:
            for variable in layer.trainable_variables:
                notes[id(variable)] = f"{type(layer).__name__} '{layer.name}': {obstacle}"
            continue
        block = block_type(layer)
        for variable in block.variables:
            owner.setdefault(id(variable), block)
    blocks: list[CurvatureBlock] = []
    seen: set[int] = set()
    for variable in var_list:
        block = owner.get(id(variable))
        if block is None:
            reason = notes.get(id(variable), "not a Dense or Conv2D variable")
            blocks.append(FirstOrderBlock(variable, reason))
        elif id(block) not in seen:
            seen.add(id(block))
            blocks.append(block)
    return blocks
