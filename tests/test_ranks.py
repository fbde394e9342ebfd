"""Rank mechanics: truncated forward, gradients, sampler, rank_scope."""

import math

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

from qdylora.testing import lora_model
from qdylora import InputError, RankSampler, rank_scope
from qdylora.loading import dequantized_weight
from qdylora.ranks import DynamicRank, lora_layers


def _first_lora_layer(model):
    return lora_layers(model, "default")[0][1]


def _hand_forward(layer, x, b, alpha, rslora=False):
    """W0 x + s(b) B[:, :b] A[:b] x, from the dequantized NF4 weight and the raw LoRA matrices."""
    w0 = dequantized_weight(layer.base_layer).float()
    a = layer.lora_A["default"].weight[:b]
    bm = layer.lora_B["default"].weight[:, :b]
    scale = alpha / math.sqrt(b) if rslora else alpha / b
    out = x @ w0.T + scale * (x @ a.T @ bm.T)
    if layer.base_layer.bias is not None:
        out = out + layer.base_layer.bias
    return out


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_falcon"])
@pytest.mark.parametrize("rslora", [False, True])
def test_truncated_forward_matches_hand_computation(arch, rslora, request):
    model = lora_model(request.getfixturevalue(arch), r=8, alpha=16, use_rslora=rslora)
    model.train()  # (dropout is 0) in eval mode bitsandbytes' CPU kernel may compute the base in bf16
    layer = _first_lora_layer(model)
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        for b in (1, 3, 8):
            with rank_scope(model, b):
                got = layer(x)
            want = _hand_forward(layer, x, b, 16, rslora)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # outside any scope: full rank r_max
        torch.testing.assert_close(layer(x), _hand_forward(layer, x, 8, 16, rslora), rtol=1e-5, atol=1e-5)


def test_ranks_really_differ_and_scope_restores(tiny_llama):
    model = lora_model(tiny_llama, r=8)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        with rank_scope(model, 2):
            low = model(ids).logits
            with rank_scope(model, 8):
                nested = model(ids).logits
            again = model(ids).logits
        after = model(ids).logits
    assert (full - low).abs().max() > 1e-3
    torch.testing.assert_close(nested, full)
    torch.testing.assert_close(again, low)
    torch.testing.assert_close(after, full)
    with pytest.raises(RuntimeError):
        with rank_scope(model, 3):
            raise RuntimeError("boom")
    assert DynamicRank.of(model).rank == 8


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, True])
def test_rank_scope_refuses_ranks_outside_range(tiny_llama, bad):
    model = lora_model(tiny_llama, r=8)
    with pytest.raises(InputError, match="outside"):
        with rank_scope(model, bad):
            pass


def test_rank_scope_needs_a_peft_lora_model(tiny_llama):
    from qdylora import load_model

    base = load_model(tiny_llama, compute_dtype="float32")
    with pytest.raises(InputError, match="LlamaForCausalLM"):
        rank_scope(base, 2)


def _grads(model, b, frozen=False, truncation="slice"):
    dyn = DynamicRank.of(model)
    dyn.state.truncation = truncation
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 300, (2, 10))
    with dyn.scope(b, frozen=frozen):
        model(ids, labels=ids).loss.backward()
    layer = _first_lora_layer(model)
    return layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()


@pytest.mark.parametrize("truncation", ["slice", "mask"])
def test_full_update_gradients_beyond_b_are_exactly_zero(tiny_llama, truncation):
    model = lora_model(tiny_llama, r=8)
    for b in (1, 5):
        ga, gb = _grads(model, b, truncation=truncation)
        assert torch.count_nonzero(ga[b:]) == 0 and torch.count_nonzero(gb[:, b:]) == 0
        assert torch.count_nonzero(ga[:b]) > 0 and torch.count_nonzero(gb[:, :b]) > 0


@pytest.mark.parametrize("truncation", ["slice", "mask"])
def test_frozen_update_changes_only_row_and_column_b_minus_1(tiny_llama, truncation):
    model = lora_model(tiny_llama, r=8)
    b = 4
    ga, gb = _grads(model, b, frozen=True, truncation=truncation)
    rows = torch.nonzero(ga.abs().sum(1)).flatten().tolist()
    cols = torch.nonzero(gb.abs().sum(0)).flatten().tolist()
    assert rows == [b - 1] and cols == [b - 1]
    # one optimizer step: only row/column b-1 of every LoRA pair moves
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _grads(model, b, frozen=True, truncation=truncation)
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        changed = (p.detach() != before[n])
        if "lora_A" in n:
            assert changed[torch.arange(8) != b - 1].sum() == 0 and changed[b - 1].any(), n
        else:
            assert changed[:, torch.arange(8) != b - 1].sum() == 0 and changed[:, b - 1].any(), n


def test_mask_and_slice_truncation_agree(tiny_llama):
    model = lora_model(tiny_llama, r=8)
    torch.manual_seed(0)
    ga_s, gb_s = _grads(model, 3, truncation="slice")
    torch.manual_seed(0)
    ga_m, gb_m = _grads(model, 3, truncation="mask")
    # fp32 rounding only: the mask path sums over the full rank dimension (zeros included), so
    # its matmuls add in another order (7e-7 absolute seen on this CPU's kernels)
    torch.testing.assert_close(ga_s, ga_m, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(gb_s, gb_m, rtol=1e-4, atol=2e-6)


def test_sampler_is_a_pure_function_of_seed_and_step():
    a, b = RankSampler(range(1, 65), seed=7), RankSampler(range(1, 65), seed=7)
    seq = [a.draw(s) for s in range(200)]
    assert seq == [b.draw(s) for s in range(200)]
    assert seq[100:] == [a.draw(s) for s in range(100, 200)]  # no hidden state: resuming reproduces
    assert seq != [RankSampler(range(1, 65), seed=8).draw(s) for s in range(200)]
    assert [a.draw(3, m) for m in range(4)] != [a.draw(3)] * 4 or len({a.draw(3, m) for m in range(20)}) > 1


def _chi_square(counts, probs, n):
    expected = np.asarray(probs) * n
    return float(((np.asarray(counts) - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("distribution", ["uniform", "log_uniform"])
def test_sampler_follows_distribution(distribution):
    ranks = list(range(1, 9))
    sampler = RankSampler(ranks, distribution, seed=123)
    n = 16000
    draws = np.array([sampler.draw(s) for s in range(n)])
    counts = [(draws == r).sum() for r in ranks]
    weights = np.ones(8) if distribution == "uniform" else 1.0 / np.array(ranks)
    stat = _chi_square(counts, weights / weights.sum(), n)
    assert stat < 24.32, (stat, counts)  # chi2(df=7) at p = 0.001
    # and a wrong distribution is rejected by the same test
    other = np.ones(8) if distribution == "log_uniform" else 1.0 / np.array(ranks)
    assert _chi_square(counts, other / other.sum(), n) > 24.32


def test_sampler_draws_only_from_the_given_set():
    sampler = RankSampler([1, 8, 16, 32, 64], seed=0)
    draws = {sampler.draw(s) for s in range(500)}
    assert draws == {1, 8, 16, 32, 64}
