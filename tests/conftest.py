"""Shared fixtures: tiny local models and data (nothing comes from a hub)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from qdylora.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_falcon(tmp_path_factory):
    from qdylora.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-falcon"), "falcon")


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory):
    """(train.jsonl, eval.jsonl) of prompt/completion sums."""
    from qdylora.testing import write_arithmetic_jsonl

    d = tmp_path_factory.mktemp("data")
    return write_arithmetic_jsonl(d / "train.jsonl", 64, seed=0), write_arithmetic_jsonl(d / "eval.jsonl", 16, seed=1)
