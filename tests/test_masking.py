import numpy as np
import pytest

from beit_fast.data.masking import MaskingGenerator


def _components(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        while stack:
            i, j = stack.pop()
            if seen[i, j] or not mask[i, j]:
                continue
            seen[i, j] = True
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = i + di, j + dj
                if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1]:
                    stack.append((a, b))
    return count


def test_official_statistics():
    gen = MaskingGenerator((14, 14), 75, min_num_patches=16)
    rng = np.random.default_rng(123)
    masks = [gen(rng) for _ in range(3000)]
    counts = np.array([m.sum() for m in masks])
    assert masks[0].shape == (14, 14) and masks[0].dtype == bool
    assert counts.max() <= 75
    assert 74.0 < counts.mean() < 74.9  # about 74.5
    assert 0.55 < (counts == 75).mean() < 0.75  # about two thirds exactly 75
    # Blocks, not scattered patches: few connected components on average.
    comps = np.array([_components(m) for m in masks[:300]])
    assert comps.mean() < 4


def test_deterministic_under_seed():
    gen = MaskingGenerator()
    a = [gen(np.random.default_rng(7)) for _ in range(3)]
    assert all(np.array_equal(a[0], m) for m in a)
    b = gen(np.random.default_rng(8))
    assert not np.array_equal(a[0], b)


def test_fixed_count_tops_up_exactly():
    gen = MaskingGenerator(fixed_count=True)
    rng = np.random.default_rng(0)
    counts = [gen(rng).sum() for _ in range(500)]
    assert set(counts) == {75}
    comps = np.mean([_components(gen(rng)) for _ in range(200)])
    assert comps < 4


@pytest.mark.parametrize("grid,target", [((7, 7), 20), ((4, 6), 10), ((14, 14), 1), ((20, 20), 160), ((3, 3), 9)])
def test_any_grid_and_target(grid, target):
    gen = MaskingGenerator(grid, target, min_num_patches=min(4, target), fixed_count=True)
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = gen(rng)
        assert m.shape == grid and m.sum() == target
    plain = MaskingGenerator(grid, target, min_num_patches=min(4, target))
    assert all(plain(rng).sum() <= target for _ in range(20))


def test_zero_target_and_errors():
    assert MaskingGenerator((14, 14), 0)(np.random.default_rng(0)).sum() == 0
    with pytest.raises(ValueError, match="larger than the 14x14 grid"):
        MaskingGenerator((14, 14), 197)
    with pytest.raises(ValueError):
        MaskingGenerator((14, 14), -1)
    with pytest.raises(ValueError):
        MaskingGenerator((0, 14), 1)
