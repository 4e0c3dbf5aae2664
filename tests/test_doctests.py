"""The examples in docstrings are run: every module of apo_core, tasks and flows."""

import doctest
import importlib

import pytest

from tests.test_imports import PACKAGES, modules


@pytest.mark.parametrize("module", [m for p in PACKAGES for m in modules(p)])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
