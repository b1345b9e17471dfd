"""``import purekd`` is lazy (no torch until a name is used), yet every module of the package is
an attribute of it on first use, as when the import was eager."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_import_purekd_loads_no_torch():
    assert _run("import sys, purekd; print('torch' in sys.modules)").strip() == "False"


@pytest.mark.parametrize("name", ["runner", "distillers", "configs", "integrations", "losses",
                                  "teacher_cache", "functional", "projections"])
def test_every_module_is_an_attribute_on_first_use(name):
    out = _run(f"import purekd; m = purekd.{name}; print(m.__name__)")
    assert out.strip() == f"purekd.{name}"


def test_an_unknown_name_is_an_attribute_error():
    out = _run("import purekd\ntry:\n    purekd.no_such_thing\nexcept AttributeError as e:\n"
               "    print(e)")
    assert out.strip() == "module 'purekd' has no attribute 'no_such_thing'"
