"""utils/optional.py: one helper for optional dependencies; its install hints name extras that exist."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from mask2former.utils.optional import OPTIONAL_DEPENDENCIES, install_hint, require

REPO_ROOT = Path(__file__).resolve().parents[2]


def _extras() -> dict[str, set[str]]:
    """extra -> the distributions ``pip install 'mask2former[extra]'`` installs (the installed package's metadata)."""
    extras: dict[str, set[str]] = {
        name: set() for name in importlib.metadata.metadata("mask2former").get_all("Provides-Extra")
    }
    for requirement in importlib.metadata.requires("mask2former") or []:
        marker = re.search(r"""extra\s*==\s*["'](\w+)["']""", requirement)
        if marker:
            extras[marker.group(1)].add(re.split(r"[<>=!~\[ ;]", requirement)[0])
    return extras


def test_every_optional_dependency_is_installed_by_the_extra_its_hint_names():
    extras = _extras()
    for module, (extra, distribution) in OPTIONAL_DEPENDENCIES.items():
        assert extra in extras, f"{module}: the hint names mask2former[{extra}], which pyproject does not define"
        assert distribution in extras[extra], f"{module}: mask2former[{extra}] does not install {distribution}"


def test_no_install_hint_in_the_package_names_an_extra_that_does_not_exist():
    # hints go through utils/optional.py; one written out by hand must still name a real extra
    extras = set(_extras())
    skipped = {".venv", "build", "tests"}
    sources = [path for path in REPO_ROOT.rglob("*.py") if not skipped & set(path.relative_to(REPO_ROOT).parts)]
    assert any(path.name == "optional.py" for path in sources)
    named = {
        (str(path.relative_to(REPO_ROOT)), extra)
        for path in [*sources, REPO_ROOT / "README.md"]
        for extra in re.findall(r"mask2former\[(\w+)\]", path.read_text())
    }
    assert {(path, extra) for path, extra in named if extra not in extras} == set()


def test_a_missing_package_fails_at_use_naming_the_feature_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # makes `import pycocotools...` raise ImportError
    monkeypatch.delitem(sys.modules, "pycocotools.mask", raising=False)
    with pytest.raises(ImportError, match=r"mask AP needs `pycocotools`: pip install 'mask2former\[train\]'"):
        require("pycocotools.mask", "mask AP")


def test_require_returns_the_module_and_refuses_a_package_that_is_not_optional():
    import pycocotools.mask

    assert require("pycocotools.mask", "mask AP") is pycocotools.mask
    with pytest.raises(KeyError, match="not an optional dependency"):
        install_hint("numpy")
