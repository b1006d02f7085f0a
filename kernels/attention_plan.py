"""The index plan of the attention kernels' table path: the compact relative position index, its transpose and
the table-gradient position list, cached per index tensor."""
from __future__ import annotations

import torch

_PLAN_CACHE: dict[tuple, tuple] = {}
_PLAN_CACHE_SIZE = 64


def index_plan(index: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(compact [Nq, Nk], compact^T [Nk, Nq], positions [T, C])`` for ``index`` (int, [Nq, Nk]) into a
    table of ``num_rows`` rows: int16 copies of the index (int32 when T > 32767) and, for every table row
    t, the flat positions i * Nk + j with index[i, j] == t in increasing order, padded with -1 to the
    largest count C.

    Computed once per index tensor (and version): the entry keeps a reference to ``index`` so its memory
    cannot be reused by another tensor while cached. Validating the values and sizing C read the index
    on the host: one synchronisation per new index, none afterwards. Raises ValueError for values
    outside [0, num_rows)."""
    key = (index.device, index.data_ptr(), index._version, tuple(index.shape), tuple(index.stride()), num_rows)
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit[1:]
    for (dev, _, _, shape, _, rows), entry in list(_PLAN_CACHE.items()):
        # another tensor with the same values (fine-tuning: one index buffer per block, all equal): share its
        # plan instead of keeping a copy per block (about 6 MB each at N = 577)
        if (dev, shape, rows) == key[:1] + key[3:4] + key[5:] and torch.equal(entry[0], index):
            _PLAN_CACHE[key] = (index,) + entry[1:]
            return entry[1:]
    nq, nk = index.shape
    flat = index.reshape(-1).to(torch.int64)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(
                f"relative position index values must be in [0, {num_rows}) (the table has {num_rows} rows); "
                f"found values in [{lo}, {hi}]"
            )
    small = torch.int16 if num_rows <= torch.iinfo(torch.int16).max else torch.int32
    compact = index.to(small).contiguous()
    compact_t = compact.t().contiguous()
    counts = torch.bincount(flat, minlength=num_rows)
    width = max(1, int(counts.max())) if flat.numel() else 1
    order = torch.argsort(flat, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    positions = torch.full((num_rows, width), -1, dtype=torch.int32, device=flat.device)
    positions[flat[order], rank] = order.to(torch.int32)
    if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = (index, compact, compact_t, positions)
    return compact, compact_t, positions
