"""Every docstring example of the installed package runs and prints what it says.

The examples are collected from the imported package (``vfm_adapters.__file__``), not from
``src/``, so the same command checks an editable install and a regular one (a wheel in
site-packages) without pytest's "import file mismatch".
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vfm_adapters


def _modules_with_examples() -> list[str]:
    names = [vfm_adapters.__name__]
    for info in pkgutil.walk_packages(vfm_adapters.__path__, prefix=f"{vfm_adapters.__name__}."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_every_module_is_found() -> None:
    assert {"vfm_adapters.api", "vfm_adapters.cli", "vfm_adapters.configs", "vfm_adapters.seg.training"} <= set(MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS, verbose=False)  # pytest -v must not turn passes into failures
    failures = []
    for test in finder.find(module, module_name):
        runner.run(test, out=failures.append)
    assert not failures, "".join(failures)
