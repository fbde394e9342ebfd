"""load_model: NF4 + double quant on every linear that should be, Falcon included."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qdylora import InputError, load_model
from qdylora.loading import bnb_config, check_4bit, unquantized_linears


@pytest.mark.parametrize("arch,expected", [("tiny_llama", 14), ("tiny_falcon", 8)])
def test_every_linear_is_nf4_with_double_quant(arch, expected, request):
    model = load_model(request.getfixturevalue(arch), compute_dtype="float32")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == expected  # 2 layers x (4 attention/MLP linears in Falcon, 7 in Llama)
    for m in quantized.values():
        assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested
        assert m.weight.dtype == torch.uint8
    assert unquantized_linears(model) == []
    assert type(model.lm_head) is nn.Linear  # kept in full precision, as QLoRA does


def test_falcon_linear_keeps_its_class_where_not_converted(tiny_falcon):
    model = load_model(tiny_falcon, compute_dtype="float32")
    assert check_4bit(model) == 8
    # the model still computes: logits are finite
    out = model(torch.randint(0, 300, (1, 8))).logits
    assert torch.isfinite(out).all()


def test_plain_transformers_leaves_falcon_unquantized_and_the_check_catches_it(tiny_falcon):
    """The bug load_model fixes: transformers 5.x skips nn.Linear subclasses without an error."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_falcon, quantization_config=bnb_config("float32"), device_map={"": "cpu"}
    )
    left = unquantized_linears(model)
    if not left:
        pytest.skip("this transformers version quantizes nn.Linear subclasses itself")
    assert any("query_key_value" in n for n in left)
    with pytest.raises(RuntimeError, match="did not happen"):
        check_4bit(model)


def test_prepared_for_kbit_training(tiny_llama):
    model = load_model(tiny_llama, compute_dtype="float32")
    assert not any(p.requires_grad for p in model.parameters())
    assert getattr(model, "is_loaded_in_4bit", False)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_unknown_dtype_is_a_clear_error(tiny_llama):
    with pytest.raises(InputError, match="unknown dtype"):
        load_model(tiny_llama, compute_dtype="float13")


def test_an_evaluation_does_not_change_the_gradients(tiny_llama):
    """bitsandbytes' CPU bf16 inference repacking would silently cut the backward through the base."""
    from qdylora.testing import lora_model

    model = lora_model(tiny_llama, r=4)
    ids = torch.randint(0, 300, (2, 10))

    def grads():
        model.zero_grad(set_to_none=True)
        model.train()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(ids)  # an evaluation forward
    after = grads()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-7)
