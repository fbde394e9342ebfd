"""QDyLoRA composed onto TRL's SFTTrainer, trained for real on a tiny local 4-bit model."""

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402

from qdylora import QDyLoraConfig, QDyLoraMixin  # noqa: E402
from qdylora.ranks import RankSampler  # noqa: E402


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_sft_trainer_trains_logs_rank_and_saves_config(tiny_llama, arithmetic_data, tmp_path):
    """The issue's one-liner: `class SFT(QDyLoraMixin, trl.SFTTrainer)` on a 4-bit base.

    Draws restricted to ranks {1, 2, 3} of an r=8 adapter: if the mixin's truncation really
    ran inside TRL's training loop, rows 3..7 of every lora_A keep their initial values and
    columns 3..7 of every lora_B stay zero, while the first three change.
    """
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from qdylora import load_model
    from qdylora.data import load_tokenizer

    class SFT(QDyLoraMixin, SFTTrainer):
        pass

    model_dir, (train_path, eval_path) = tiny_llama, arithmetic_data
    out = tmp_path / "out"
    args = SFTConfig(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", seed=3,
        max_length=64, per_device_eval_batch_size=8, use_cpu=True,
    )
    trainer = SFT(
        model=load_model(model_dir),
        args=args,
        train_dataset=datasets.load_dataset("json", data_files=str(train_path), split="train"),
        eval_dataset=datasets.load_dataset("json", data_files=str(eval_path), split="train"),
        processing_class=load_tokenizer(str(model_dir)),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
        qdylora_config=QDyLoraConfig(ranks=[1, 2, 3]),
    )
    before = _lora_state(trainer.model)
    trainer.train()

    # rank per optimizer step, from (seed, step) alone, logged with the loss
    logged = [(e["step"], e["rank"]) for e in trainer.state.log_history if "rank" in e]
    expected = RankSampler([1, 2, 3], "uniform", seed=3)
    assert logged == [(s, expected.draw(s - 1)) for s in range(1, 7)]
    assert len({r for _, r in logged}) > 1
    assert trainer.rank_history == logged

    after = _lora_state(trainer.model)
    a_keys = [k for k in after if ".lora_A." in k]
    assert a_keys
    for k in a_keys:
        assert torch.equal(after[k][3:], before[k][3:]), k
        assert not torch.equal(after[k][:3], before[k][:3]), k
        kb = k.replace(".lora_A.", ".lora_B.")
        assert torch.count_nonzero(after[kb][:, 3:]) == 0, kb
        assert torch.count_nonzero(after[kb][:, :3]) > 0, kb

    # evaluate at a rank, under SFTTrainer's own evaluate
    m1, m3 = trainer.evaluate(rank=1), trainer.evaluate(rank=3)
    assert "eval_r1_loss" in m1 and "eval_r3_loss" in m3
    assert m1["eval_r1_loss"] != m3["eval_r3_loss"]

    trainer.save_model(str(out))
    saved = json.loads((out / "qdylora_config.json").read_text())
    assert saved["config"]["r_max"] == 8 and saved["config"]["ranks"] == [1, 2, 3] and saved["config"]["seed"] == 3
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_ready_made_sft_trainer_is_the_composition():
    from trl import SFTTrainer

    from qdylora.sft import QDyLoraSFTTrainer

    mro = QDyLoraSFTTrainer.__mro__
    assert mro.index(QDyLoraMixin) < mro.index(SFTTrainer)
