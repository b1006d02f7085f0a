"""The fast subset of the mutation check (tests/mutation_check.py) in CI: each planted bug is caught by
the model-level tests. The whole list: ``python tests/mutation_check.py`` (README, Testing)."""
import io

import mutation_check as mc


def test_mutation_list_is_current():
    """Every snippet of the whole list occurs exactly once in its file (a stale entry would test nothing)."""
    for m in mc.MUTATIONS:
        text = (mc.ROOT / m.path).read_text()
        assert text.count(m.old) == 1, f"{m.name}: snippet found {text.count(m.old)} times in {m.path}"
        assert m.old != m.new and m.tests
    assert len({m.name for m in mc.MUTATIONS}) == len(mc.MUTATIONS)


def test_fast_mutations_are_caught():
    """2-3 mutations (model scale, mask token, the loss's padded rows), each caught (about 40 s on 2 cores;
    the unmutated tests run in this suite anyway, so no baseline run here)."""
    fast = [m for m in mc.MUTATIONS if m.fast]
    assert 2 <= len(fast) <= 3
    log = io.StringIO()
    results = mc.check(fast, timeout=300, baseline=False, out=log)
    assert all(r.startswith("caught") for r in results.values()), log.getvalue()
