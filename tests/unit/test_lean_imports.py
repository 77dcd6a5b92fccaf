"""`lean_imports.import_hiding`: a module imported while some packages are hidden sees them as not installed
(an ImportError, ``find_spec`` None, transformers' cached availability check False), and they come back after."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import lru_cache

import pytest

from orpo_ray.lean_imports import import_hiding

TARGET = """
import importlib.util, sys
try:
    import {hidden}
    IMPORTED = True
except ImportError:
    IMPORTED = False
SPEC_FOUND = importlib.util.find_spec("{hidden}") is not None
checks = sys.modules.get("transformers.utils.import_utils")
check = getattr(checks, "is_{hidden}_available", None)
AVAILABLE = check() if check is not None else None
"""


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Two fresh top-level modules, ``lean_target_*`` (imports ``lean_hidden_*``), removed from sys.modules after."""
    suffix = tmp_path.name.replace("-", "_")
    target, hidden = f"lean_target_{suffix}", f"lean_hidden_{suffix}"
    (tmp_path / f"{hidden}.py").write_text("VALUE = 42\n")
    (tmp_path / f"{target}.py").write_text(TARGET.format(hidden=hidden))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield target, hidden
    for name in (target, hidden):
        sys.modules.pop(name, None)


def test_hidden_while_the_module_loads_and_importable_after(packages):
    target, hidden = packages
    assert import_hiding(target, [hidden]) == (hidden,)
    module = sys.modules[target]
    assert module.IMPORTED is False and module.SPEC_FOUND is False
    assert hidden not in sys.modules  # the marker is gone
    assert importlib.import_module(hidden).VALUE == 42


def test_a_package_already_imported_is_not_hidden(packages):
    target, hidden = packages
    importlib.import_module(hidden)
    assert import_hiding(target, [hidden]) == ()
    assert sys.modules[target].IMPORTED is True


def test_nothing_is_hidden_when_the_module_was_already_imported(packages):
    target, hidden = packages
    importlib.import_module(target)
    assert sys.modules[target].IMPORTED is True
    assert import_hiding(target, [hidden]) == ()
    assert hidden in sys.modules and sys.modules[hidden] is not None


def test_the_marker_is_removed_when_the_import_fails(tmp_path, monkeypatch, packages):
    _, hidden = packages
    (tmp_path / "lean_broken_target.py").write_text(f"import {hidden}\n")  # fails while hidden
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError):
        import_hiding("lean_broken_target", [hidden])
    sys.modules.pop("lean_broken_target", None)
    assert hidden not in sys.modules
    assert importlib.import_module(hidden).VALUE == 42


def test_transformers_cached_availability_is_asked_again_inside_and_after(packages, monkeypatch):
    """transformers caches is_<package>_available(): an answer cached before the window (True) must not leak into
    it, and the window's answer (False) must not outlive it."""
    target, hidden = packages
    checks = types.ModuleType("transformers.utils.import_utils")

    @lru_cache
    def is_available() -> bool:
        return importlib.util.find_spec(hidden) is not None

    setattr(checks, f"is_{hidden}_available", is_available)
    monkeypatch.setitem(sys.modules, "transformers.utils.import_utils", checks)
    assert is_available() is True  # cached before the window
    import_hiding(target, [hidden])
    assert sys.modules[target].AVAILABLE is False
    assert is_available() is True
