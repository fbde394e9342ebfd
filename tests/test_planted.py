"""The planted-rank yardstick (benchmarks/planted.py): its teacher, its limit, AURAC, the svd arm."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import planted  # noqa: E402

RANK, DECAY, SIZE = 8, 0.5, 1.5  # not the defaults, so the options are what is tested


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    args = planted.parse_args(["run", "--vocab", "64", "--hidden", "128", "--layers", "1", "--seq-len", "16",
                               "--train-seqs", "4", "--eval-seqs", "8", "--plant-rank", str(RANK),
                               "--plant-decay", str(DECAY), "--plant-size", str(SIZE)])
    return planted.make_task(args, tmp_path_factory.mktemp("planted"))


def _student(task, r, **lora):
    from peft import LoraConfig, get_peft_model

    from qdylora import load_model

    model = load_model(str(task["base"]))
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=planted.ALPHA, target_modules="all-linear",
                                            lora_dropout=0.0, task_type="CAUSAL_LM", **lora))


def _layers(model):
    from qdylora.ranks import DynamicRank, lora_layers

    dr = DynamicRank.of(model)
    return dr.adapter_name, lora_layers(dr.model, dr.adapter_name)


def test_planted_delta_has_the_requested_rank_and_spectrum(task):
    from qdylora import load_model
    from qdylora.loading import dequantized_weight

    student = load_model(str(task["base"]), prepare_for_training=False)
    w0 = {n: dequantized_weight(m).double() for n, m in planted.target_linears(student).items()}
    assert sorted(task["deltas"]) == sorted(w0) and len(w0) == 7  # q k v o gate up down
    for name, delta in task["deltas"].items():
        sv = torch.linalg.svdvals(delta.double())
        top = SIZE * float(torch.linalg.matrix_norm(w0[name], ord=2))
        want = top * torch.arange(1, RANK + 1, dtype=torch.float64) ** -DECAY
        torch.testing.assert_close(sv[:RANK], want, rtol=1e-5, atol=0)
        torch.testing.assert_close(task["spectra"][name], want)
        assert float(sv[RANK:].max()) < 1e-5 * top  # rank exactly RANK


def test_student_with_the_exact_delta_has_zero_excess(task):
    model = _student(task, 16)
    planted.set_planted_delta(model, task, 0)
    none = planted.excess(model, task)
    planted.set_planted_delta(model, task, 1)
    one = planted.excess(model, task)
    planted.set_planted_delta(model, task, RANK)
    exact = planted.excess(model, task)
    assert none > 1e-3  # the planted delta matters
    assert none > one > 100 * max(exact, 1e-9)
    assert exact < 1e-7, exact  # the teacher sits on dequant(NF4(W)): the limit is exact


def test_aurac_on_a_known_curve():
    # log2 ranks 0, 2, 4, 6; trapezoids 2*(8+4)/2 + 2*(4+2)/2 + 2*(2+1)/2 = 21, over 6
    assert planted.aurac({1: 8.0, 4: 4.0, 16: 2.0, 64: 1.0}) == pytest.approx(3.5)
    # uneven spacing: log2 0, 1, 3 -> (1*(3+1)/2 + 2*(1+2)/2) / 3 = 5/3
    assert planted.aurac({1: 3.0, 2: 1.0, 8: 2.0}) == pytest.approx(5 / 3)
    assert planted.aurac({4: 0.5, 1: 0.5, 64: 0.5}) == pytest.approx(0.5)  # flat: the value, any order
    assert planted.aurac({16: 0.25}) == 0.25


def test_matryoshka_p_is_their_algorithm_1():
    s = {r: 16 / math.sqrt(r) for r in (1, 2, 4)}
    p = planted.matryoshka_p(4, [1, 2, 4], 16)
    torch.testing.assert_close(p, torch.tensor([s[1] + s[2] + s[4], s[2] + s[4], s[4], s[4]]))


@pytest.mark.parametrize("rslora", [False, True])
def test_svd_arm_equals_dense_top_b_svd_of_each_delta(task, rslora):
    from qdylora import rank_scope

    torch.manual_seed(0)
    model = _student(task, 16, use_rslora=rslora, init_lora_weights=False)  # random A and B
    model.eval()
    name, layers = _layers(model)
    ids = task["eval_ids"][:4]
    b = 3
    before = {n: (l.lora_A[name].weight.clone(), l.lora_B[name].weight.clone()) for n, l in layers}
    with torch.no_grad():
        with planted.svd_at_rank(model, b):
            got = model(input_ids=ids).logits
        with rank_scope(model, b):
            prefix = model(input_ids=ids).logits
        # explicit: base output + x @ D_b^T, D_b = dense top-b SVD of scaling * B @ A, adapter off
        handles = []
        for _, layer in layers:
            delta = layer.scaling[name] * (layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double())
            u, s, vh = torch.linalg.svd(delta)
            d_b = ((u[:, :b] * s[:b]) @ vh[:b]).float()
            handles.append(layer.base_layer.register_forward_hook(
                lambda m, inp, out, d=d_b: out + inp[0] @ d.T))
        with model.disable_adapter():
            want = model(input_ids=ids).logits
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (prefix - want).abs().max() > 1e-3  # slicing is not the SVD: the comparison can fail
    for n, layer in layers:  # the r_max adapter is restored afterwards
        assert torch.equal(layer.lora_A[name].weight, before[n][0])
        assert torch.equal(layer.lora_B[name].weight, before[n][1])


def test_a_healed_cut_starts_as_the_cut_in_its_own_rank_b_adapter(task):
    """`train(init=cut_factors(...))` (the +heal arms) starts a fresh rank-b PEFT adapter from the
    cut: with a vanishing LR it computes what `svd_at_rank` computes on the r_max adapter."""
    torch.manual_seed(0)
    model = _student(task, 16, init_lora_weights=False).eval()
    ids = task["eval_ids"][:4]
    b = 3
    with torch.no_grad(), planted.svd_at_rank(model, b):
        want = model(input_ids=ids).logits
    init = planted.cut_factors(model, b)
    args = planted.parse_args(["run", "--batch", "2"])
    healed, *_ = planted.train(task, args, 0, r=b, recipe=None, init=init, steps=1, lr=1e-12)
    name, layers = _layers(healed)
    assert all(layer.lora_A[name].weight.shape[0] == b for _, layer in layers)
    with torch.no_grad():
        got = healed(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_activation_aware_truncation_is_optimal_for_its_inputs():
    from qdylora.ranks import svd_truncate

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 20, generator=g), torch.randn(12, 8, generator=g)
    scale, rank, out_scale = 0.7, 3, 2.0
    delta = scale * (b.double() @ a.double())
    # identity covariance: exactly the plain SVD truncation
    ia, ib = planted.whitened_truncate(a, b, scale, rank, out_scale, torch.eye(20))
    sa, sb = svd_truncate(a, b, scale, rank, out_scale)
    torch.testing.assert_close(out_scale * ib @ ia, out_scale * sb @ sa, rtol=1e-4, atol=1e-5)
    # anisotropic inputs: the weighted error is the Eckart-Young tail of D C^(1/2), below the plain SVD's
    x = torch.randn(500, 20, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 20, dtype=torch.float64)
    cov = x.T @ x / len(x)
    wa, wb = planted.whitened_truncate(a, b, scale, rank, out_scale, cov)

    def err(d_b):
        return float(((delta - d_b) @ x.T).square().sum() / len(x))

    e_asvd, e_svd = err(out_scale * wb.double() @ wa.double()), err(out_scale * sb.double() @ sa.double())
    evals, q = torch.linalg.eigh(cov)
    tail = torch.linalg.svdvals(delta @ (q * evals.sqrt()) @ q.T)[rank:].square().sum()
    assert e_asvd == pytest.approx(float(tail), rel=1e-3)
    assert e_asvd < 0.9 * e_svd


def test_fisher_aware_truncation_is_optimal_for_its_kronecker_norm():
    """With output-gradient covariance G too, the rank-b delta minimises E||G^(1/2) (D - D_b) x||^2:
    its error is the Eckart-Young tail of G^(1/2) D C^(1/2), below the activation-aware pair's;
    G = identity gives the activation-aware pair."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 20, generator=g), torch.randn(12, 8, generator=g)
    scale, rank, out_scale = 0.7, 3, 2.0
    delta = scale * (b.double() @ a.double())
    x = torch.randn(500, 20, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 20, dtype=torch.float64)
    gr = torch.randn(500, 12, generator=g, dtype=torch.float64) * torch.logspace(1, -1, 12, dtype=torch.float64)
    cov, fisher = x.T @ x / len(x), gr.T @ gr / len(gr)
    roots, out_roots = planted.whitening(cov), planted.whitening(fisher)
    aa, ab = planted.whitened_truncate(a, b, scale, rank, out_scale, roots=roots)
    ia, ib = planted.whitened_truncate(a, b, scale, rank, out_scale, roots=roots,
                                       out_roots=planted.whitening(torch.eye(12, dtype=torch.float64)))
    torch.testing.assert_close(ib @ ia, ab @ aa, rtol=1e-4, atol=1e-5)
    fa, fb = planted.whitened_truncate(a, b, scale, rank, out_scale, roots=roots, out_roots=out_roots)
    assert fa.shape == (rank, 20) and fb.shape == (12, rank)

    def err(d_b):
        return float((out_roots[0] @ (delta - d_b) @ roots[0]).square().sum())  # = E||G^1/2 (D - D_b) x||^2

    e_f, e_a = err(out_scale * fb.double() @ fa.double()), err(out_scale * ab.double() @ aa.double())
    tail = torch.linalg.svdvals(out_roots[0] @ delta @ roots[0])[rank:].square().sum()
    assert e_f == pytest.approx(float(tail), rel=1e-3)
    assert e_f < 0.9 * e_a


def test_recipes_are_the_shared_ones_and_a_seed_reproduces(task):
    from qdylora.config import PRESETS

    sys.path.insert(0, str(Path(planted.__file__).parent))
    from quality import VARIANTS

    rec = planted.recipes()
    assert list(rec) == planted.TRAINED
    assert rec["paper"]["qdylora"] == PRESETS["paper"] and rec["balanced"]["qdylora"] == PRESETS["balanced"]
    assert rec["lw_anchor"]["qdylora"] == VARIANTS["lw-anchor"][1]["qdylora"]
    args = planted.parse_args(["run", "--steps", "3", "--batch", "2", "--r-max", "8"])
    runs = []
    for name, seed in (("lw_anchor", 0), ("lw_anchor", 0), ("lw_anchor", 1), ("matryoshka", 0)):
        model, cpu, wall, hooks, loss = planted.train(task, args, seed, r=8, recipe=rec[name])
        runs.append(planted.measure(model, task, [1, 8], hooks=hooks))
    assert runs[0] == runs[1]  # same seed, same numbers
    assert runs[0] != runs[2] and runs[0] != runs[3]
