"""QDyLoraTrainer: rank per step, accumulation, logging, resume, evaluation, saving."""

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

from qdylora.testing import lora_model
from qdylora import InputError, QDyLoraConfig, QDyLoraMixin, QDyLoraTrainer, load_model
from qdylora.data import DataSpec, collator, load_tokenizer, tokenize


@pytest.fixture(scope="module")
def datasets_(tiny_llama, arithmetic_data):
    tok = load_tokenizer(str(tiny_llama))
    train = tokenize(DataSpec(str(arithmetic_data[0]), max_length=48), tok)
    evals = tokenize(DataSpec(str(arithmetic_data[1]), max_length=48), tok)
    return tok, train, evals


def make_trainer(model_dir, datasets_, tmp_path, config=None, cls=QDyLoraTrainer, model=None, **args):
    tok, train, evals = datasets_
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=11,
        disable_tqdm=True,
    )
    defaults.update(args)
    torch.manual_seed(0)  # the same LoRA initialisation in every trainer built here
    return cls(
        model=model if model is not None else lora_model(model_dir, r=8, random_init=False),
        args=TrainingArguments(**defaults),
        train_dataset=train,
        eval_dataset=evals,
        data_collator=collator(tok),
        processing_class=tok,
        **({"qdylora_config": config} if issubclass(cls, QDyLoraMixin) else {}),  # a plain Trainer takes none
    )


def _record_ranks_per_microbatch(trainer):
    """Wrap compute_loss to see the rank each micro-batch actually ran at."""
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append((trainer.state.global_step, trainer.dynamic_rank.rank))
        return original(model, inputs, *a, **k)

    trainer.compute_loss = spy
    return seen


def test_gradient_accumulation_window_shares_one_rank(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, gradient_accumulation_steps=4, max_steps=5,
                           per_device_train_batch_size=2)
    seen = _record_ranks_per_microbatch(trainer)
    trainer.train()
    assert len(seen) == 20
    by_step = {}
    for step, rank in seen:
        by_step.setdefault(step, set()).add(rank)
    assert all(len(r) == 1 for r in by_step.values()), by_step
    assert [next(iter(by_step[s])) for s in range(5)] == [r for _, r in trainer.rank_history]
    assert [r for _, r in trainer.rank_history] == [trainer.rank_sampler.draw(s) for s in range(5)]
    # outside training the adapter is back at r_max
    assert trainer.dynamic_rank.rank == 8


def test_micro_batch_sampling_draws_per_micro_batch(tiny_llama, datasets_, tmp_path):
    config = QDyLoraConfig(sample_every="micro_batch")
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, config, gradient_accumulation_steps=4, max_steps=3,
                           per_device_train_batch_size=2)
    seen = _record_ranks_per_microbatch(trainer)
    trainer.train()
    expected = [trainer.rank_sampler.draw(step, m) for step in range(3) for m in range(4)]
    assert [r for _, r in seen] == expected
    assert any(len({r for s, r in seen if s == step}) > 1 for step in range(3))


def test_rank_is_logged_with_the_loss(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path)
    trainer.train()
    logged = [h["rank"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [r for _, r in trainer.rank_history]
    assert len(set(logged)) > 1


def test_seed_defaults_to_training_args_and_config_seed_wins(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path)
    assert trainer.qdylora_config.seed == 11 and trainer.qdylora_config.r_max == 8
    trainer2 = make_trainer(tiny_llama, datasets_, tmp_path, QDyLoraConfig(seed=5))
    assert trainer2.qdylora_config.seed == 5


def test_resumed_run_draws_the_same_sequence(tiny_llama, datasets_, tmp_path):
    full = make_trainer(tiny_llama, datasets_, tmp_path / "a", max_steps=8, save_strategy="steps", save_steps=4)
    full.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "qdylora_config.json").is_file()

    resumed = make_trainer(tiny_llama, datasets_, tmp_path / "b", max_steps=8)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.rank_history == full.rank_history[4:]
    # the same ranks and data order give the same adapter as the uninterrupted run
    a = {k: v for k, v in full.model.named_parameters() if v.requires_grad}
    b = {k: v for k, v in resumed.model.named_parameters() if v.requires_grad}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_training_lowers_eval_loss_at_several_ranks(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, max_steps=30, learning_rate=3e-3)
    before = trainer.evaluate_ranks([1, 2, 4, 8])
    trainer.train()
    after = trainer.evaluate_ranks([1, 2, 4, 8])
    for r in (1, 2, 4, 8):
        assert after[r]["eval_loss"] < before[r]["eval_loss"] - 0.1, (r, before[r], after[r])
    assert trainer.rank_sweep.recommended_rank in (1, 2, 4, 8)
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"eval_r1_loss", "eval_r8_loss"} <= logged


def test_evaluate_at_a_rank(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, model=lora_model(tiny_llama, r=8, random_init=True))
    m2 = trainer.evaluate(rank=2)
    m8 = trainer.evaluate(rank=8)
    full = trainer.evaluate()
    assert "eval_r2_loss" in m2 and "eval_r8_loss" in m8
    assert m8["eval_r8_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    assert m2["eval_r2_loss"] != pytest.approx(full["eval_loss"], rel=1e-4)
    with pytest.raises(InputError, match="outside"):
        trainer.evaluate(rank=9)


def test_r_min_is_enforced_in_evaluation(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, QDyLoraConfig(r_min=2))
    with pytest.raises(InputError, match="outside"):
        trainer.evaluate(rank=1)
    assert min(r for _, r in [(0, trainer.rank_sampler.draw(s)) for s in range(200)]) == 2


def test_save_writes_adapter_and_qdylora_config(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, max_steps=2)
    trainer.train()
    trainer.evaluate_ranks([1, 8])
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    data = json.loads((out / "qdylora_config.json").read_text())
    assert data["config"]["r_max"] == 8 and data["config"]["seed"] == 11
    assert data["qdylora_version"]
    assert set(data["sweep"]["results"]) == {"1", "8"}
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8  # the standard PEFT adapter, at r_max
    assert QDyLoraConfig.from_pretrained(out) == trainer.qdylora_config


def test_non_lora_models_are_refused_with_what_was_found(tiny_llama, datasets_, tmp_path):
    base = load_model(tiny_llama, compute_dtype="float32")
    with pytest.raises(InputError, match="LlamaForCausalLM"):
        make_trainer(tiny_llama, datasets_, tmp_path, model=base)


def test_mixin_composes_with_any_trainer_subclass(tiny_llama, datasets_, tmp_path):
    class Custom(Trainer):
        calls = 0

        def compute_loss(self, *a, **k):
            Custom.calls += 1
            return super().compute_loss(*a, **k)

    class Mine(QDyLoraMixin, Custom):
        pass

    trainer = make_trainer(tiny_llama, datasets_, tmp_path, cls=Mine, max_steps=3)
    trainer.train()
    assert Custom.calls == 3 and len(trainer.rank_history) == 3


def test_r_max_mismatch_is_explained(tiny_llama, datasets_, tmp_path):
    with pytest.raises(InputError, match="r=8"):
        make_trainer(tiny_llama, datasets_, tmp_path, QDyLoraConfig(r_max=16))


def test_gradient_checkpointing_recomputes_at_the_drawn_rank(tiny_llama, datasets_, tmp_path):
    """The backward recomputation must see the step's rank: same adapter with and without checkpointing."""
    plain = make_trainer(tiny_llama, datasets_, tmp_path / "a", max_steps=4)
    plain.train()
    ckpt = make_trainer(tiny_llama, datasets_, tmp_path / "b", max_steps=4, gradient_checkpointing=True,
                        gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    assert ckpt.rank_history == plain.rank_history
    a = dict(plain.model.named_parameters())
    for name, p in ckpt.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[name], rtol=1e-4, atol=1e-6)


def test_preset_plain_is_plain_lora_training_read_by_svd(tiny_llama, datasets_, tmp_path):
    """preset "plain" trains exactly what a plain transformers.Trainer trains (same seed, same
    data order: identical LoRA weights), records that only r_max was trained, its lower ranks
    are read by svd, and its sweep measures svd and prefix (which is better depends on the task)."""
    from qdylora.adapter_io import check_adapter

    plain = make_trainer(tiny_llama, datasets_, tmp_path / "plain", cls=Trainer, max_steps=4)
    plain.train()
    ours = make_trainer(tiny_llama, datasets_, tmp_path / "ours", config=QDyLoraConfig.preset("plain"), max_steps=4)
    ours.train()
    assert [rank for _, rank in ours.rank_history] == [8, 8, 8, 8]
    a, b = dict(plain.model.named_parameters()), dict(ours.model.named_parameters())
    lora = [k for k in a if "lora_" in k]
    assert lora and all(torch.equal(a[k], b[k]) for k in lora)
    config = ours.qdylora_config
    assert (config.ranks, config.lower_ranks_trained, config.default_method) == ([8], False, "svd")
    assert config.sweep_ranks == [1, 2, 4, 8]
    ours.save_model(str(tmp_path / "unswept"))
    files = check_adapter(tmp_path / "unswept")
    assert files.default_method == "svd"
    with pytest.raises(InputError, match="trained at its full rank only"):  # its prefix cut: never measured
        check_adapter(tmp_path / "unswept", methods=["prefix"])
    returned = ours.evaluate_ranks()
    assert ours.rank_sweep.method == "svd" and returned == ours.rank_sweep.by_method["svd"]  # the run's reading
    assert config.sweep_methods == ["svd", "prefix"] and QDyLoraConfig().resolve(8, 0).sweep_methods == ["prefix"]
    assert ours.rank_sweep.methods == ["svd", "prefix"]
    assert ours.rank_sweep.by_method["svd"] != ours.rank_sweep.by_method["prefix"]  # two readings, measured apart
    ours.save_model(str(tmp_path / "adapter"))
    assert check_adapter(tmp_path / "adapter", methods=["prefix"]).default_method == "svd"  # measured: accepted
    assert QDyLoraConfig().resolve(8, 0).default_method == "prefix"  # the paper recipe: its prefixes
