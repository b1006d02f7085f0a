"""A bare ``import kernels`` never loads our top-level ``kernels/`` folder.

The Triton kernels live in ``kernels/`` at the repository root and are installed as ``beit_fast.kernels``.
PyPI has a package called ``kernels`` too (HuggingFace's kernel hub), which transformers imports. With the
repository root on ``sys.path`` (pytest's rootdir, a ``python`` started in the clone, a script saved there) a
regular ``kernels/__init__.py`` there shadowed it, and collecting the tests failed on a fresh machine. The
folder has no ``__init__.py``: it is only a namespace portion, which loses to any installed regular package,
and the source tree reaches it as ``beit_fast.kernels`` through the ``beit_fast/kernels`` link.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib.util, json, sys
sys.path.insert(0, {root!r})  # what pytest's rootdir conftest and `python` started in the clone both do
spec = importlib.util.find_spec("kernels")
out = {{"origin": spec.origin if spec else None,
        "locations": list(spec.submodule_search_locations or []) if spec else []}}
import beit_fast.kernels.attention as ours
out["ours"] = ours.__file__
print(json.dumps(out))
"""


def _probe() -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(root=str(REPO))], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_folder_is_no_regular_package():
    assert (REPO / "kernels").is_dir() and not (REPO / "kernels" / "__init__.py").exists()
    link = REPO / "beit_fast" / "kernels"
    assert link.is_symlink() and link.resolve() == (REPO / "kernels").resolve()


def test_bare_import_kernels_never_resolves_to_our_regular_package():
    """From the repository root, ``kernels`` is either the installed PyPI package or (without it) at most a
    namespace with no module of its own: never a spec whose origin is a file of ours. Our kernels still
    import as ``beit_fast.kernels``."""
    out = _probe()
    ours = (REPO / "kernels").resolve()
    if out["origin"] is not None:
        assert not Path(out["origin"]).resolve().is_relative_to(ours), out
    assert Path(out["ours"]).resolve().parent == ours


def test_hf_kernel_hub_imports_from_the_repository_root():
    """transformers >= 5.25 imports the PyPI ``kernels`` package here; with it installed it must be that one."""
    pytest.importorskip("transformers")
    try:
        import kernels as hub  # noqa: F401  (the PyPI package, where installed)
    except ImportError:
        hub = None
    code = ("import sys; sys.path.insert(0, {root!r}); import transformers.integrations.hub_kernels; "
            "import kernels, json; print(json.dumps(getattr(kernels, '__file__', None)))").format(root=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    where = json.loads(done.stdout.strip().splitlines()[-1])
    if hub is not None and getattr(hub, "__file__", None):
        assert where is not None and not Path(where).resolve().is_relative_to((REPO / "kernels").resolve())
