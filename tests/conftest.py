"""Every shared fixture: tiny local models and data, a QDyLoRA-trained adapter (nothing comes from a
hub). The builders they use live in `qdylora.testing`."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

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


@pytest.fixture(scope="session")
def export_base(tmp_path_factory) -> Path:
    from qdylora.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("export-base"), "llama")


@pytest.fixture(scope="session")
def trained(export_base, tmp_path_factory):
    """QDyLoraTrainer, fp32 base, r_max 8, alpha 16, all linear layers, 3 steps + sweep (`testing.Trained`)."""
    from qdylora.testing import Trained, export_lora_model, train_tiny

    tmp = tmp_path_factory.mktemp("trained")
    model = export_lora_model(export_base)
    train_tiny(model, export_base, tmp / "adapter", tmp)
    model.eval()
    return Trained(model, tmp / "adapter", export_base)
