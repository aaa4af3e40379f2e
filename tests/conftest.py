"""Shared pytest fixtures: tiny offline tokenizers and a tiny random HF checkpoint.

Built once per session from `jaxlora.tiny` (no network). Fixtures that other tests may use:
`chatml_tokenizer`, `llama3_tokenizer`, `tiny_model_dir` (a 2-layer llama, ChatML template).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def chatml_tokenizer():
    from jaxlora.tiny import build_tokenizer

    return build_tokenizer(None, template="chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from jaxlora.tiny import build_tokenizer

    return build_tokenizer(None, template="llama3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from jaxlora.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), family="llama")
