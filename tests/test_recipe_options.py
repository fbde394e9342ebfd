"""The issue-8 recipe options: the scaling rule and anchor ranks (two ranks per step)."""

import json

import pytest
import torch
from peft import PeftModel

from qdylora.testing import lora_model
from qdylora import InputError, QDyLoraConfig, load_model, rank_scope
from qdylora.exporters import export_adapter
from test_trainer import datasets_, make_trainer  # noqa: F401  (fixture + builder)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- scaling ---------------------------------------------------------------------------------
def test_scaling_option_is_validated_and_serialised(tmp_path):
    with pytest.raises(InputError, match="scaling='cube'.*linear, sqrt"):
        QDyLoraConfig(scaling="cube")
    c = QDyLoraConfig(scaling="sqrt", anchor_ranks=[8, 8], r_max=8)
    assert c.anchor_ranks == [8]
    c.save_pretrained(tmp_path)
    assert QDyLoraConfig.from_pretrained(tmp_path) == c
    with pytest.raises(InputError, match=r"anchor_ranks \[16\] outside the trained range 1..8"):
        QDyLoraConfig(anchor_ranks=[16]).resolve(8, 0)
    symbolic = QDyLoraConfig(anchor_ranks=["r_max", 2])
    assert symbolic.anchor_ranks == [2, "r_max"]
    assert symbolic.resolve(8, 0).anchor_ranks == [2, 8]
    with pytest.raises(InputError, match='non-empty list of integers or r_max'):
        QDyLoraConfig(anchor_ranks=["max"])


def test_sqrt_scaling_sets_alpha_over_sqrt_b_and_is_stored_as_rslora(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, QDyLoraConfig(scaling="sqrt"), max_steps=2)
    layer = next(m for m in trainer.model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert layer.scaling["default"] == pytest.approx(16 / 8**0.5)
    with rank_scope(trainer.model, 2):
        assert layer.scaling["default"] == pytest.approx(16 / 2**0.5)
    assert layer.scaling["default"] == pytest.approx(16 / 8**0.5)

    # the rule travels with the adapter: the rank-b export in plain PEFT equals rank_scope(b)
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["use_rslora"] is True
    export_adapter(tmp_path / "run", tmp_path / "r3", 3)
    ids = torch.tensor([[5, 17, 42, 9, 33, 61]])
    model = trainer.model.eval()
    with rank_scope(model, 3):
        want = _logits(model, ids)
    exported = PeftModel.from_pretrained(load_model(tiny_llama, compute_dtype="float32"), str(tmp_path / "r3"))
    torch.testing.assert_close(_logits(exported.eval(), ids), want, rtol=1e-4, atol=1e-4)
    # and it differs from what the linear rule would give at rank 3
    with rank_scope(model, 3):
        layer_scale = layer.scaling["default"]
    assert layer_scale != pytest.approx(16 / 3)


def test_linear_scaling_on_an_rslora_adapter_switches_it_back(tiny_llama, datasets_, tmp_path):
    model = lora_model(tiny_llama, r=8, random_init=False, use_rslora=True)
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, QDyLoraConfig(scaling="linear"), model=model)
    assert trainer.model.peft_config["default"].use_rslora is False
    with rank_scope(trainer.model, 4):
        scales = [m.scaling["default"] for m in trainer.model.modules()
                  if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling]
    assert scales and scales == [pytest.approx(16 / 4)] * len(scales)


# -- anchor ranks ----------------------------------------------------------------------------
def test_anchor_ranks_train_the_drawn_rank_and_the_anchor_in_each_step(tiny_llama, datasets_, tmp_path):
    """One step with anchors [8] gives the gradient of mean(loss at b, loss at 8)."""
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, QDyLoraConfig(anchor_ranks=["r_max"]), max_steps=1)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    seen = []
    original = trainer.compute_loss

    def spy(m, inputs, *a, **k):
        seen.append(trainer.dynamic_rank.rank)
        return original(m, inputs, *a, **k)

    trainer.compute_loss = spy
    model.train()
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the step is called by hand here
    loss = trainer.training_step(model, dict(batch))
    b = trainer.rank_history[-1][1]
    assert b != 8 and seen == [b, 8]
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()

    # by hand: loss(b)/2 + loss(8)/2
    losses = []
    for rank in (b, 8):
        with rank_scope(model, rank):
            out = model(**batch)
        (out.loss / 2).backward()
        losses.append(float(out.loss.detach()))
    assert float(loss) == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert got
    for n, p in model.named_parameters():
        if n in got:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)
    # rows past b got gradient only from the rank-8 pass: they are non-zero (a plain step leaves them 0)
    b_name = next(n for n in got if "lora_B" in n)
    assert got[b_name][:, b:].abs().sum() > 0


def test_anchor_equal_to_the_drawn_rank_trains_it_once(tiny_llama, datasets_, tmp_path):
    trainer = make_trainer(tiny_llama, datasets_, tmp_path, QDyLoraConfig(anchor_ranks=[3], ranks=[3]), max_steps=2)
    assert trainer.step_ranks(3) == [3] and trainer.step_ranks(8) == [8, 3]


# -- loss weight -----------------------------------------------------------------------------
def test_inverse_scale_loss_weight_scales_the_gradient_not_the_logged_loss(tiny_llama, datasets_, tmp_path):
    grads, logged = {}, {}
    for mode in ("equal", "inverse_scale"):
        trainer = make_trainer(tiny_llama, datasets_, tmp_path / mode, QDyLoraConfig(loss_weight=mode, ranks=[2]),
                               max_steps=1)
        model = trainer.model.train()
        trainer.model_wrapped = model
        trainer.current_gradient_accumulation_steps = 1
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        logged[mode] = float(trainer.training_step(model, dict(batch)))
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert logged["inverse_scale"] == pytest.approx(logged["equal"], rel=1e-6)
    assert grads["equal"] and grads["equal"].keys() == grads["inverse_scale"].keys()
    for n, g in grads["equal"].items():  # alpha/b scaling, r_max 8, b 2: weight 2/8
        torch.testing.assert_close(grads["inverse_scale"][n], g * 0.25, rtol=1e-4, atol=1e-8)
    with pytest.raises(InputError, match="loss_weight='big' is not allowed"):
        QDyLoraConfig(loss_weight="big")


# -- presets ---------------------------------------------------------------------------------
def test_presets_are_named_recipes_with_overrides():
    from qdylora.config import PRESETS

    assert QDyLoraConfig.preset("paper") == QDyLoraConfig()
    for name, fields in PRESETS.items():
        config = QDyLoraConfig.preset(name, r_min=2)
        assert config.r_min == 2 and all(getattr(config, k) == v for k, v in fields.items())
    assert QDyLoraConfig.from_dict({"preset": "paper", "seed": 3}) == QDyLoraConfig(seed=3)
    assert QDyLoraConfig.preset("balanced").scaling == "sqrt"
    with pytest.raises(InputError, match="unknown preset 'best'; choose one of paper, balanced"):
        QDyLoraConfig.preset("best")
    with pytest.raises(InputError, match="unknown QDyLoRA setting"):
        QDyLoraConfig.from_dict({"presett": "paper"})
