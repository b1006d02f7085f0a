"""What a user looks for in the repository: pyproject.toml metadata that agrees with setup.py (which stays
the build script), the MIT license, a citation of the BEiT paper."""
import ast
from pathlib import Path

import pytest

import beit_fast

REPO = Path(__file__).resolve().parents[1]


def _setup_kwargs() -> dict:
    """The literal keyword arguments of the ``setup(...)`` call in setup.py (without running it)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # open("README.md").read()
            pass
    return out


def test_pyproject_agrees_with_setup_py():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    assert any(r.startswith("setuptools") for r in meta["build-system"]["requires"])
    project, setup = meta["project"], _setup_kwargs()
    assert project["name"] == setup["name"]
    assert project["version"] == setup["version"] == beit_fast.__version__
    assert project["description"] == setup["description"]
    assert project["requires-python"] == setup["python_requires"]
    assert project["readme"] == "README.md" and project["license"] == "MIT"
    # one list of dependencies and extras: setup.py's
    assert set(project["dynamic"]) == {"dependencies", "optional-dependencies"}
    assert "dependencies" not in project and "optional-dependencies" not in project
    assert setup["package_dir"]["beit_fast.kernels"] == "kernels"  # installed as beit_fast.kernels, never bare
    assert "tensorboard" in " ".join(setup["extras_require"]["dev"])  # the --log_dir test runs in CI
    assert "torchao" in " ".join(setup["extras_require"]["dev"])  # the FP8 parity tests run in CI


def test_license_and_citation():
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the beit_fast authors" in license_text
    cff = (REPO / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in cff and "BEiT: BERT Pre-Training of Image Transformers" in cff
    for name in ("Bao", "Dong", "Piao", "Wei", "arXiv:2106.08254", "ICLR 2022", "beit_fast"):
        assert name in cff, name
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(cff)
    assert [a["family-names"] for a in data["preferred-citation"]["authors"]] == ["Bao", "Dong", "Piao", "Wei"]
    assert data["preferred-citation"]["year"] == 2022 and data["version"] == beit_fast.__version__


def test_wheel_installs_every_module(tmp_path):
    """A regular (non-editable) install gets every module of the package: build the wheel and compare its
    files with the source tree (beit_fast/** and kernels/** as beit_fast/kernels/**). An editable install
    finds subpackages through the source folder, so only a wheel shows a package missing from setup.py."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # a copy of what the build reads, so no build/ folder lands in the checkout
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("beit_fast", "kernels"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # Build with this environment's setuptools where it is new enough for pyproject.toml (no download); else let
    # pip fetch it into an isolated build environment, as `pip install` does.
    try:
        import setuptools

        local_setuptools = int(setuptools.__version__.split(".")[0]) >= 77
    except ImportError:
        local_setuptools = False
    isolation = ["--no-build-isolation"] if local_setuptools else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("beit_fast-*.whl")
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    in_tree = {p.relative_to(REPO).as_posix() for p in (REPO / "beit_fast").rglob("*.py")}
    in_tree |= {"beit_fast/kernels/" + p.relative_to(REPO / "kernels").as_posix()
                for p in (REPO / "kernels").rglob("*.py")}
    assert sorted(in_tree - in_wheel) == []
