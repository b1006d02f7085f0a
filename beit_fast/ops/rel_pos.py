"""BEiT's relative position bias: the table size, the index, the gather. The one place for these formulas.

For a patch grid ``(Gh, Gw)`` the table has ``T = (2Gh - 1)(2Gw - 1) + 3`` rows (one per relative offset,
plus [CLS]->patch, patch->[CLS] and [CLS]->[CLS]) and one column per head. The model, the checkpoint
loaders and converters, and the attention op all use these functions (``beit_fast.model.beit`` re-exports them).
Plain PyTorch, no other beit_fast import: the ops layer imports it without importing the model.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "relative_position_table_size",
    "square_grid_for_table_size",
    "relative_position_index",
    "gather_relative_position_bias",
]


def relative_position_table_size(grid: tuple[int, int]) -> int:
    """Rows ``T = (2Gh - 1)(2Gw - 1) + 3`` of the relative position bias table of patch grid ``(Gh, Gw)``."""
    gh, gw = int(grid[0]), int(grid[1])
    return (2 * gh - 1) * (2 * gw - 1) + 3


def square_grid_for_table_size(rows: int) -> int | None:
    """The side G of the square grid whose table has ``rows`` rows (``(2G - 1)^2 + 3``), or None if no square
    grid has that table size (the inverse of :func:`relative_position_table_size` for square grids)."""
    rows = int(rows)
    side = math.isqrt(rows - 3) if rows > 3 else 0
    if side * side != rows - 3 or side % 2 == 0:
        return None
    return (side + 1) // 2


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """Index into the relative position bias table for every (query, key) pair, ``int64[N+1, N+1]``.

    Patch i to patch j: ``(dh + Gh - 1) * (2 Gw - 1) + (dw + Gw - 1)``; [CLS] query to any key: T - 3;
    any query to the [CLS] key: T - 2; [CLS] to [CLS]: T - 1; T = :func:`relative_position_table_size`.
    """
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
    num_table = relative_position_table_size(grid)
    index = torch.zeros((gh * gw + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)
    index[0, :] = num_table - 3
    index[:, 0] = num_table - 2
    index[0, 0] = num_table - 1
    return index


def gather_relative_position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table [T, heads]`` looked up at ``index int64[N+1, N+1]``: the bias ``[heads, N+1, N+1]``."""
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
