"""Every docstring example in bcc runs and prints what it says (they are the API's first docs)."""
import doctest
import importlib
import pkgutil

import pytest
import torch

import bcc

# bcc.passes lives in passes/ (mapped by the package config), so walk it explicitly.
MODULES = sorted(m.name for m in pkgutil.walk_packages(bcc.__path__, "bcc.") if not m.name.endswith("__main__"))
MODULES += sorted(f"bcc.passes.{m.name}" for m in pkgutil.iter_modules(importlib.import_module("bcc.passes").__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    torch._dynamo.reset()  # an example's compiled code must not leak into the next one
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
