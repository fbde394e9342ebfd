"""benchmarks/real.py's own logic: covariances and Fishers over non-pad / scored tokens only, its activation-aware SVD."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import real  # noqa: E402


def _model(tmp_path, r=8):
    from peft import LoraConfig, get_peft_model

    from qdylora import load_model
    from qdylora.testing import make_tiny_model

    base = make_tiny_model(tmp_path / "base", hidden=64, layers=1)
    model = load_model(str(base), load_in_4bit=False, prepare_for_training=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    return model.eval()


def _collate(rows):
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def test_covariances_ignore_padding(tmp_path):
    model = _model(tmp_path)
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10]}, {"input_ids": [11, 12]}, {"input_ids": [13, 14, 15]}]
    padded = real.masked_input_covariances(model, rows, _collate, batch=3)
    alone = {}
    for row in rows:  # one at a time: no padding at all; weight each by its token count
        c = real.masked_input_covariances(model, [row], _collate, batch=1)
        for k, v in c.items():
            alone[k] = alone.get(k, 0) + v * len(row["input_ids"])
    total = sum(len(r["input_ids"]) for r in rows)
    assert padded.keys() == alone.keys() and len(padded) == 7
    for k in padded:
        torch.testing.assert_close(padded[k], alone[k] / total, rtol=1e-5, atol=1e-6)  # float32 activations


def test_output_fishers_are_sampled_label_gradients_at_scored_tokens(tmp_path):
    """output_fishers = mean over non-pad tokens of g g^T, g the gradient at the layer's output of
    the cross-entropy of labels sampled from the model at the positions whose next label is scored;
    recomputed here with retain_grad on each layer's output, same generator; also on a frozen
    (loaded-for-inference) adapter, whose weights are frozen again afterwards."""
    import torch.nn.functional as F

    from qdylora.ranks import DynamicRank, lora_layers

    model = _model(tmp_path)
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10]}, {"input_ids": [11, 12, 13]}]
    batch = _collate(rows)
    batch["labels"] = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, 12, 13, -100, -100, -100]])
    dr = DynamicRank.of(model)
    layers = lora_layers(dr.model, dr.adapter_name)
    for w in model.parameters():
        w.requires_grad_(False)
    got = real.output_fishers(model, [batch], seed=3)
    assert not any(w.requires_grad for w in model.parameters())

    outs = {}
    handles = [layer.register_forward_hook(lambda m, i, o, n=n: (o.retain_grad(), outs.__setitem__(n, o))[1])
               for n, layer in layers]
    for _, layer in layers:
        layer.lora_A[dr.adapter_name].weight.requires_grad_(True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    scored = torch.zeros(logits.shape[:2], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != -100
    assert scored.sum() == 5  # row 0 predicts 8, 9, 10 from positions 2-4; row 1 predicts 12, 13
    y = torch.multinomial(F.softmax(logits[scored], -1), 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    F.cross_entropy(logits[scored], y, reduction="sum").backward()
    for h in handles:
        h.remove()
    keep = batch["attention_mask"].bool()
    assert got.keys() == outs.keys() and len(got) == 7
    for n, o in outs.items():
        g = o.grad[keep].double()
        torch.testing.assert_close(got[n], g.T @ g / len(g), rtol=1e-5, atol=1e-9)
        assert got[n].abs().max() > 0


def test_asvd_with_identity_covariance_is_plain_svd(tmp_path):
    from qdylora import rank_scope
    from qdylora.ranks import DynamicRank, lora_layers

    model = _model(tmp_path)
    dr = DynamicRank.of(model)
    roots = {n: real.whitening(torch.eye(layer.lora_A[dr.adapter_name].weight.shape[1], dtype=torch.float64))
             for n, layer in lora_layers(dr.model, dr.adapter_name)}
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    full = model(input_ids=ids).logits
    for b in (1, 3):
        with rank_scope(model, b, method="svd"):
            want = model(input_ids=ids).logits
        with real.svd_at_rank(model, b, roots=roots):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, full, atol=1e-4)  # the truncation did change something
    torch.testing.assert_close(model(input_ids=ids).logits, full)  # factors restored


def test_prefix_factors_are_the_prefix_cut_as_a_rank_b_adapter(tmp_path):
    """real.py's +heal from the prefix cut starts from exactly what rank_scope(b) reads: a fresh rank-b
    adapter (same alpha, so scale alpha/b) holding (A[:b], B[:, :b]) gives rank_scope(b)'s logits."""
    from qdylora import load_model, rank_scope

    model = _model(tmp_path)  # alpha 16 = real.ALPHA
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    for b in (1, 3):
        with rank_scope(model, b):
            want = model(input_ids=ids).logits
        base = load_model(str(tmp_path / "base"), load_in_4bit=False, prepare_for_training=False)
        student = real.rank_b_student(base, real.prefix_factors(model, b), b).eval()
        got = student(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with rank_scope(model, b, method="svd"):
            assert not torch.allclose(got, model(input_ids=ids).logits, atol=1e-4)  # not the svd cut
        # planted.py's bprefix start: the same delta (so the same logits), in balanced factors
        balanced = real.prefix_factors(model, b, balanced=True)
        student = real.rank_b_student(load_model(str(tmp_path / "base"), load_in_4bit=False,
                                                 prepare_for_training=False), balanced, b).eval()
        torch.testing.assert_close(student(input_ids=ids).logits, want, rtol=1e-4, atol=5e-5)
        for n, (a, bb) in balanced.items():
            torch.testing.assert_close(a.norm(dim=1), bb.norm(dim=0), rtol=1e-4, atol=1e-6)
            assert not torch.allclose(a, real.prefix_factors(model, b)[n][0], atol=1e-4)


def test_asvd_beats_svd_on_its_own_calibration_inputs():
    """On inputs with covariance C, the whitened rank-b delta has the lower error E||(D - D_b) x||^2."""
    from qdylora.ranks import svd_truncate

    g = torch.Generator().manual_seed(0)
    a, b_ = torch.randn(8, 32, generator=g, dtype=torch.float64), torch.randn(24, 8, generator=g, dtype=torch.float64)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    cov = x.T @ x / len(x)
    root, inv = real.whitening(cov)
    delta = 2.0 * b_ @ a
    na, nb = svd_truncate(a @ root, b_, 2.0, 2, 1.0)
    asvd = nb.double() @ (na.double() @ inv)
    sa, sb = svd_truncate(a, b_, 2.0, 2, 1.0)
    svd = sb.double() @ sa.double()
    err = lambda d: float(((x @ (delta - d).T) ** 2).mean())  # noqa: E731
    assert err(asvd) < err(svd)


def test_report_reads_transfer_split_and_reused_runs_without_it(tmp_path, monkeypatch):
    """GSM8K runs carry a 'transfer' split; quality.py's reused dedicated runs do not: the summary keeps
    each split's numbers apart and the ratio tables compare only what both sides measured."""
    import json

    monkeypatch.setattr(real, "RUNS", tmp_path / "real")
    monkeypatch.setattr(real, "RESULTS", tmp_path)
    monkeypatch.setattr(real, "ROOT", tmp_path)
    (tmp_path / "real" / "gsm8k").mkdir(parents=True)
    (tmp_path / "quality" / "runs").mkdir(parents=True)
    ranks = real.TASKS["gsm8k"]["ranks"]
    split = lambda base: {str(b): base / b for b in ranks}  # noqa: E731
    plain = {"run": "plain", "seed": 0, "r": 64, "readouts": {
        "prefix": {"val": split(1.0), "test": split(1.1), "transfer": split(2.0)},
        "svd": {"val": split(0.5), "test": split(0.6), "transfer": split(4.0)}}}
    (tmp_path / "real" / "gsm8k" / "plain-s0.json").write_text(json.dumps(plain))
    (tmp_path / "quality" / "runs" / "qlora-r1-s0.json").write_text(json.dumps(
        {"spec": {"qlora": 1}, "steps": 100, "lr": 5e-4, "seed": 0, "train_seconds": 1.0,
         "train_cpu_seconds": 1.0, "val": {"1": 0.25}, "test": {"1": 0.3}}))
    data = real.summarise("gsm8k")
    ded, svd = data["arms"]["dedicated"], data["arms"]["lora_rmax_svd"]
    assert ded["ranks"] == {"1": 0.25, "64": 1.0 / 64}  # reused r1 + the plain run at r_max
    assert ded["transfer"] == {"64": 2.0 / 64}  # the reused run has no transfer number: none invented
    assert svd["transfer"]["4"] == 1.0 and svd["ranks"]["4"] == 0.125
    rows = {line.split(" | ")[0]: line for line in real.ratio_table(data, "lora_rmax_svd", "transfer")}
    assert rows["| lora_rmax_prefix"].split(" | ")[1:] == ["0.500", "0.500", "0.500", "0.500 |"]
    rows = {line.split(" | ")[0]: line for line in real.ratio_table(data, "dedicated", "transfer")}
    assert rows["| lora_rmax_svd"].split(" | ")[1:] == ["", "", "", "2.000 |"]  # only r64 measured by both


def test_best_of_two_healings_is_chosen_on_val_rank_by_rank(tmp_path, monkeypatch):
    """lora_short_best+heal (what `qdylora heal --method svd,prefix` ships): per seed and rank, the
    start with the lower VAL loss; its test and transfer numbers are that same start's, never the
    better of the two on test."""
    import json

    monkeypatch.setattr(real, "RUNS", tmp_path / "real")
    monkeypatch.setattr(real, "RESULTS", tmp_path)
    monkeypatch.setattr(real, "ROOT", tmp_path)
    (tmp_path / "real" / "gsm8k").mkdir(parents=True)
    short = {"run": "plain-short", "seed": 0, "r": 64, "readouts": {
        "heal": {"val": {"1": 0.9, "4": 0.5, "16": 0.5, "64": 0.5}, "test": {"1": 0.1, "4": 0.6, "16": 0.6, "64": 0.6},
                 "transfer": {"1": 2.0, "4": 2.0, "16": 2.0, "64": 2.0}},
        "pheal": {"val": {"1": 0.8, "4": 0.7, "16": 0.7, "64": 0.7}, "test": {"1": 0.9, "4": 0.1, "16": 0.1, "64": 0.1},
                  "transfer": {"1": 3.0, "4": 3.0, "16": 3.0, "64": 3.0}}}}
    (tmp_path / "real" / "gsm8k" / "plain-short-s0.json").write_text(json.dumps(short))
    # the run shortened by both healings: the same rule on its own readouts (here heal better at r1)
    short2 = {"run": "plain-short2", "seed": 0, "r": 64, "readouts": {
        "heal": {s: {b: 2 * v for b, v in got.items()} for s, got in short["readouts"]["pheal"].items()},
        "pheal": {s: {b: 2 * v for b, v in got.items()} for s, got in short["readouts"]["heal"].items()}}}
    (tmp_path / "real" / "gsm8k" / "plain-short2-s0.json").write_text(json.dumps(short2))
    arms = real.summarise("gsm8k")["arms"]
    best = arms["lora_short_best+heal"]
    assert best["ranks"] == {"1": 0.8, "4": 0.5, "16": 0.5, "64": 0.5}  # pheal at r1, heal above
    assert best["test"] == {"1": 0.9, "4": 0.6, "16": 0.6, "64": 0.6}  # the val pick's test, not the lower
    assert best["transfer"] == {"1": 3.0, "4": 2.0, "16": 2.0, "64": 2.0}
    assert not best["one_run"]
    best2 = arms["lora_short2_best+heal"]
    assert best2["ranks"] == {"1": 1.6, "4": 1.0, "16": 1.0, "64": 1.0}  # heal at r1, pheal above
    assert best2["test"] == {"1": 1.8, "4": 1.2, "16": 1.2, "64": 1.2}


def test_shortened_runs_leave_exactly_their_healings_steps():
    """plain-short gives up one healing's steps, plain-short2 two (the run plus its healings of the
    shipped rank cost one plain run's steps); other runs train the whole budget."""
    for task, cfg in real.TASKS.items():
        heal = real.heal_steps(task)
        assert heal == round(cfg["steps"] / 10)
        assert real.train_steps(task, "plain") == cfg["steps"]
        assert real.train_steps(task, "lora-r1") == cfg["steps"]
        assert real.train_steps(task, "plain-short") + heal == cfg["steps"]
        assert real.train_steps(task, "plain-short2") + 2 * heal == cfg["steps"]
    assert (real.train_steps("demo", "plain-short2"), real.train_steps("gsm8k", "plain-short2")) == (40, 80)


def test_healing_interpolation_runs_from_the_cut_to_the_healed_adapter(tmp_path, monkeypatch):
    """wheal's heal@t, the rank-b adapter with factors (1 - t) x cut + t x healed: t = 1 gives the
    healed adapter's own losses exactly, t = 0 those of the untrained cut; t = 0.5 is neither."""
    import datasets
    from paper_table import TEMPLATE

    from qdylora import load_model
    from qdylora.data import collator, encode, load_tokenizer

    model = _model(tmp_path)
    base = str(tmp_path / "base")
    tok = load_tokenizer(base)
    rows = datasets.Dataset.from_list([encode(f"What is {i} plus {i}?", f" #### {2 * i}", tok, TEMPLATE, 48)
                                       for i in range(12)])
    monkeypatch.setitem(real.TASKS, "tiny", {"r_max": 8, "ranks": [1, 2, 8], "steps": 20, "batch": 4, "lr": 3e-2,
                                             "max_length": 48, "optim": "adamw_torch", "eval_batch": 4,
                                             "splits": ["val", "test"]})
    ctx = {"model": base, "collate": collator(tok),
           "data": {"train": rows, "val": rows.select(range(6)), "test": rows.select(range(6, 12))}}
    losses, _, mixed = real.healed(model, "tiny", 2, 0, ctx, mixes=(0.0, 0.5, 1.0))
    assert mixed[1.0] == losses
    cut = real.rank_b_student(load_model(base), real.cut_factors(model, 2), 2).eval()
    at_cut = {s: real.answer_loss(cut, ctx["data"][s], ctx["collate"], 4) for s in ("val", "test")}
    for s in at_cut:
        assert abs(mixed[0.0][s] - at_cut[s]) <= 1e-6 * at_cut[s]
        assert abs(losses[s] - at_cut[s]) > 1e-3 * at_cut[s]  # the healing moved it
        assert mixed[0.5][s] not in (losses[s], at_cut[s])


def test_held_out_healing_trains_on_exactly_the_problems_the_run_never_saw():
    """plain-short-ho: the run's data and its healings' data split the training set, the healings' one
    pass (heal_steps x batch) at its end; every other run heals on the whole set it trained on."""
    import datasets

    for task, cfg in real.TASKS.items():
        ctx = {"data": {"train": datasets.Dataset.from_list([{"i": i} for i in range(400)])}}
        run, heal = real.split_training(task, "plain-short-ho", ctx)
        assert len(heal) == real.heal_steps(task) * cfg["batch"]
        assert len(run) == real.train_steps(task, "plain-short-ho") * cfg["batch"]  # one pass each
        assert sorted(list(run["i"]) + list(heal["i"])) == list(range(400)) and not set(run["i"]) & set(heal["i"])
        same = real.split_training(task, "plain-short", ctx)
        assert same[0] is same[1] is ctx["data"]["train"]
