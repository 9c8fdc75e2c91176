"""SGLang's HTTP test kits (sglang/test/kits) that apply to a text model, as unittest classes bound to
the live compat server. See catalog.KITS for the shrunk ones and catalog.NOT_APPLICABLE_KITS."""
from __future__ import annotations

import importlib
import unittest

import pytest

from tests.compat.catalog import CI_KITS, KITS
from tests.compat.conftest import RUN_ALL
from tests.compat.runner import model_path

pytest.importorskip("sglang")
pytest.importorskip("openai")
pytest.importorskip("requests")


def _kit_class(key: str) -> type:
    kit = KITS[key]
    mixin = getattr(importlib.import_module(f"sglang.test.kits.{kit.module}"), kit.mixin)
    known = {name: _expected_failure(getattr(mixin, name), failure) for name, failure in kit.known_model_failures.items()}
    return type(f"Test_{key}", (mixin, unittest.TestCase), {"__doc__": kit.note or None, **kit.attrs, **known})


def _expected_failure(method, failure):
    """A kit test the default model fails on content: xfail with the transformers evidence as the reason
    when it raises AssertionError; anything else (or a pass) is reported as it is."""
    def run(self):
        try:
            method(self)
        except AssertionError as exc:
            pytest.xfail(f"known model failure ({failure.assertion}): {exc}; transformers on the same weights and "
                         f"prompt: {failure.evidence}")

    run.__name__ = method.__name__
    return run


@pytest.fixture(autouse=True, scope="class")
def _bind_server(request, compat_server):
    if request.cls is not None:
        request.cls.base_url = compat_server.url
        request.cls.model = model_path(compat_server.url)
        request.cls.process = compat_server.proc


for _key in (KITS if RUN_ALL else CI_KITS):
    globals()[f"Test_{_key}"] = _kit_class(_key)
