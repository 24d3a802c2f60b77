"""The public names of both packages stay what they name, whatever was imported before.

A package attribute that shares its name with a submodule is replaced by that module as soon
as anything imports the submodule (`import trainer.fit` sets `trainer.fit`), so `from trainer
import fit` would hand a user the module, depending on import order. Each check runs in a fresh
interpreter that first imports every submodule of the package.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import importlib, inspect, pkgutil, sys, types
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    if ".testing" not in info.name and not info.name.endswith("__main__"):
        importlib.import_module(info.name)
modules = [n for n in package.__all__ if isinstance(getattr(package, n), types.ModuleType)]
print(" ".join(modules))
"""


@pytest.mark.parametrize("package", ["trainer", "logitcache"])
def test_no_public_name_is_shadowed_by_a_submodule(package):
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, package], capture_output=True, text=True, check=True
    )
    assert proc.stdout.split() == [], f"{package}: these public names are modules: {proc.stdout}"
