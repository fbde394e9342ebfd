"""SVD truncation of LoRA pairs: `ranks.svd_truncate`, `rank_scope(method="svd")`, and PEFT's conversion."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from qdylora import InputError, rank_scope  # noqa: E402
from qdylora.ranks import lora_scale, svd_truncate  # noqa: E402

REL = 1e-4


def dense_top(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> torch.Tensor:
    """The top-`rank` SVD of scale * B @ A, from a dense torch.linalg.svd (float64)."""
    u, s, vh = torch.linalg.svd(scale * b.double() @ a.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def pair(out_f: int = 48, in_f: int = 40, r: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_equals_dense_svd(rank, use_rslora):
    a, b = pair()
    scale = lora_scale(16, 8, use_rslora)
    out_scale = lora_scale(16, rank, use_rslora)
    new_a, new_b = svd_truncate(a, b, scale, rank, out_scale)
    assert new_a.shape == (rank, 40) and new_b.shape == (48, rank) and new_a.dtype == torch.float32
    ref = dense_top(a, b, scale, rank)
    assert rel(out_scale * new_b @ new_a, ref) < REL
    if rank < 8:  # the truncation matters, and the plain prefix is not it
        assert rel(ref, scale * b @ a) > 1e-2
        assert rel(out_scale * b[:, :rank] @ a[:rank], ref) > 1e-2


def test_wide_and_tall_layers_and_negative_scale():
    for out_f, in_f in ((6, 40), (40, 6)):  # r = 8 above one side: rank capped at min(in, out)
        a, b = pair(out_f, in_f)
        new_a, new_b = svd_truncate(a, b, 2.0, 6, 16 / 6)
        assert rel(16 / 6 * new_b @ new_a, 2.0 * b @ a) < REL  # rank 6 holds the whole delta
        with pytest.raises(InputError, match=r"outside 1\.\.6"):
            svd_truncate(a, b, 2.0, 7, 16 / 7)
    a, b = pair()
    new_a, new_b = svd_truncate(a, b, 2.0, 3, -0.5)
    assert rel(-0.5 * new_b @ new_a, dense_top(a, b, 2.0, 3)) < REL


@pytest.mark.parametrize("rank", [0, 9, -1, 2.0, True])
def test_bad_rank(rank):
    a, b = pair()
    with pytest.raises(InputError, match="SVD rank"):
        svd_truncate(a, b, 2.0, rank, 1.0)
    with pytest.raises(InputError, match="out_scale"):
        svd_truncate(a, b, 2.0, 2, 0.0)


def test_nested_and_balanced():
    """The first b' rows/columns of a rank-b SVD pair are the rank-b' SVD; both factors carry sqrt(S)."""
    a, b = pair()
    new_a, new_b = svd_truncate(a, b, 2.0, 6, 1.0)
    assert rel(new_b[:, :2] @ new_a[:2], dense_top(a, b, 2.0, 2)) < REL
    s = torch.linalg.svdvals(2.0 * b.double() @ a.double())[:6]
    assert torch.allclose((new_a.double() @ new_a.double().T), torch.diag(s), rtol=0, atol=1e-5 * s[0].item())
    assert torch.allclose((new_b.double().T @ new_b.double()), torch.diag(s), rtol=0, atol=1e-5 * s[0].item())


def test_bf16_factors():
    a, b = pair()
    new_a, new_b = svd_truncate(a.bfloat16(), b.bfloat16(), 2.0, 4, 4.0)
    assert new_a.dtype == new_b.dtype == torch.bfloat16
    assert rel(4.0 * new_b.double() @ new_a.double(), dense_top(a.bfloat16(), b.bfloat16(), 2.0, 4)) < 2e-2


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(40, 48)
        self.down = torch.nn.Linear(48, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _lora_net(**lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["up", "down"], init_lora_weights=False, **lora)
    return get_peft_model(_Net(), config).eval()


def test_same_delta_as_peft_conversion_but_a_different_split():
    """PEFT 0.21's convert_to_lora on a plain fp32 LoRA model: same product, all of S in lora_B."""
    from peft.tuners.lora.conversion import convert_to_lora

    model = _lora_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Converting a PEFT adapter to LoRA that is already a LoRA adapter"
        config, state = convert_to_lora(model, 3)
    assert config.r == config.lora_alpha == 3  # PEFT writes scale 1
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        a, b, scale = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        peft_a = state[f"base_model.model.{name}.lora_A.weight"]
        peft_b = state[f"base_model.model.{name}.lora_B.weight"]
        new_a, new_b = svd_truncate(a, b, scale, 3, lora_scale(16, 3, False))
        assert rel(lora_scale(16, 3, False) * new_b @ new_a, peft_b @ peft_a) < REL
        assert rel(peft_b @ peft_a, dense_top(a, b, scale, 3)) < REL
        # PEFT: orthonormal A rows (S entirely in B); ours: A A^T = S / out_scale (the even split)
        assert torch.allclose(peft_a @ peft_a.T, torch.eye(3), atol=1e-5)
        assert not torch.allclose(new_a @ new_a.T, torch.eye(3), atol=1e-2)


@pytest.mark.parametrize("patterns", [False, True])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_svd_scope_computes_the_truncated_model(rank, patterns):
    """Every layer runs its dense top-min(b, r_m) SVD; per-module r / alpha (patterns) respected."""
    extra = {"rank_pattern": {"up": 4}, "alpha_pattern": {"down": 40}} if patterns else {}
    model = _lora_net(lora_dropout=0.0, **extra)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = model.base_model.model
    scales = {name: getattr(net, name).scaling["default"] for name in ("up", "down")}

    def dense(name: str, h: torch.Tensor) -> torch.Tensor:
        layer = getattr(net, name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return layer.base_layer(h) + h @ dense_top(a, b, layer.scaling["default"], min(rank, a.shape[0])).T.float()

    with torch.no_grad():
        expected = dense("down", torch.relu(dense("up", x)))
        with rank_scope(model, rank, method="svd"):
            got = model(x)
        full = model(x)
        with rank_scope(model, rank):
            prefix = model(x)
    assert rel(got, expected) < REL
    if rank < 8:
        assert rel(got, prefix) > 1e-3
    if rank >= 8:
        assert rel(got, full) < REL  # b = r: the SVD refactoring is the adapter itself
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # factors restored
    assert {name: getattr(net, name).scaling["default"] for name in ("up", "down")} == scales


def test_svd_scope_bad_input():
    model = _lora_net()
    with pytest.raises(InputError, match="method"):
        rank_scope(model, 2, method="svg")
    with pytest.raises(InputError, match="outside"):
        with rank_scope(model, 9, method="svd"):
            pass
