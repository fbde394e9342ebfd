"""`qdylora generate`, `generate_across_ranks`, sweep samples and the sample-logging callback.

One tiny Llama adapter (r_max 8, NF4 base) is trained for a few high-LR steps so that its
ranks really differ; every test reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import qdylora
from qdylora import QDyLoraConfig, QDyLoraTrainer, RankSamplesCallback, generate_across_ranks, load_model
from qdylora.cli import main
from qdylora.data import DataSpec, collator, load_tokenizer, tokenize
from qdylora.errors import InputError
from qdylora.generation import read_prompts, render_prompt
from qdylora.ranks import DynamicRank
from qdylora.testing import make_tiny_model, write_arithmetic_jsonl

R_MAX = 8
PROMPTS = ["What is 3 plus 4?\n", "What is 9 plus 1?\n", "Tom has"]
NEW = 12  # new tokens per answer: enough to tell ranks apart, cheap on CPU


def make_trainer(root: Path, *, max_steps: int, callbacks_eval: bool = False, seed: int = 0) -> QDyLoraTrainer:
    """A QDyLoraTrainer on a fresh tiny 4-bit Llama with a rank-8 LoRA, LR high enough to move it."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    base = make_tiny_model(root / "base", seed=seed)
    data = write_arithmetic_jsonl(root / "data.jsonl", n=32, seed=seed)
    tokenizer = load_tokenizer(str(base))
    ds = tokenize(DataSpec(str(data)), tokenizer)
    model = load_model(base)  # NF4, as users train
    lora = LoraConfig(r=R_MAX, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(root / "out"), max_steps=max_steps, learning_rate=1e-2, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, report_to="none", save_strategy="no", logging_steps=5, seed=seed,
        remove_unused_columns=False, use_cpu=True, eval_strategy="steps" if callbacks_eval else "no",
        eval_steps=max(1, max_steps // 2),
    )
    return QDyLoraTrainer(
        model=model, args=args, train_dataset=ds, eval_dataset=ds.select(range(8)),
        data_collator=collator(tokenizer), processing_class=tokenizer, qdylora_config=QDyLoraConfig(),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trainer after 30 steps, adapter folder saved from it with qdylora_config.json and tokenizer)."""
    root = tmp_path_factory.mktemp("generate")
    trainer = make_trainer(root, max_steps=30)
    trainer.train()
    adapter = root / "adapter"
    trainer.save_model(str(adapter))
    return trainer, adapter


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- generate_across_ranks --------------------------------------------------------------


def test_ranks_answer_differently_and_state_is_restored(trained):
    trainer, _ = trained
    model, tok = trainer.model, trainer.processing_class
    model.train()
    out = generate_across_ranks(model, tok, PROMPTS, [1, R_MAX], max_new_tokens=NEW)
    assert list(out) == [1, R_MAX] and all(len(v) == len(PROMPTS) for v in out.values())
    assert any(a != b for a, b in zip(out[1], out[R_MAX])), out  # the ranks are different models
    assert all(text.strip() for answers in out.values() for text in answers)
    # only new text: no answer starts by repeating its prompt
    assert not any(text.startswith(p.strip()) for answers in out.values() for text, p in zip(answers, PROMPTS))
    # the rank is a switch on one model, not state that leaks: r_max alone gives the same
    assert generate_across_ranks(model, tok, PROMPTS, [R_MAX], max_new_tokens=NEW)[R_MAX] == out[R_MAX]
    assert DynamicRank.of(model).state.rank is None and model.training  # full rank, train mode back


def test_left_padded_batches_equal_one_prompt_at_a_time(trained):
    # fp32 base: NF4 inference on CPU runs bitsandbytes' bf16 kernel, where padding may move
    # a value by one bf16 step (not a padding error, but it can flip a near-tie)
    _, adapter = trained
    model, tok, _ = qdylora.loading.load_adapter(adapter, load_in_4bit=False)
    batched = generate_across_ranks(model, tok, PROMPTS, [2, R_MAX], max_new_tokens=NEW, batch_size=8)
    single = generate_across_ranks(model, tok, PROMPTS, [2, R_MAX], max_new_tokens=NEW, batch_size=1)
    assert batched == single


def test_sampling_is_seeded_per_rank_and_leaves_global_rng_alone(trained):
    trainer, _ = trained
    model, tok = trainer.model, trainer.processing_class
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5)
    rng = torch.get_rng_state()
    a = generate_across_ranks(model, tok, PROMPTS, [1, 4], seed=3, **kw)
    assert torch.equal(rng, torch.get_rng_state())
    # each rank starts from the same seed: rank 4 alone draws what it drew after rank 1
    assert generate_across_ranks(model, tok, PROMPTS, [4], seed=3, **kw)[4] == a[4]
    greedy = generate_across_ranks(model, tok, PROMPTS, [1, 4], max_new_tokens=NEW)
    others = [generate_across_ranks(model, tok, PROMPTS, [1, 4], seed=s, **kw) for s in (4, 5)]
    assert a != greedy and any(o != a for o in others)  # it really samples, and the seed matters


def test_chat_template_applied_unless_told_not_to(trained):
    trainer, _ = trained
    tok = trainer.processing_class
    assert render_prompt(tok, "hi", template="Q: {prompt}\n") == ("Q: hi\n", True)  # no chat template
    chat_tok = load_tokenizer(str(Path(trainer.args.output_dir).parent / "base"))
    chat_tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert render_prompt(chat_tok, "hi") == ("<user>hi<assistant>", False)
    assert render_prompt(chat_tok, "hi", chat_template=False) == ("hi", True)
    # generation really sees the chat-formatted text
    with_chat = generate_across_ranks(trainer.model, chat_tok, ["What is 3 plus 4?"], [R_MAX], max_new_tokens=NEW)
    by_hand = generate_across_ranks(
        trainer.model, chat_tok, ["<user>What is 3 plus 4?<assistant>"], [R_MAX], max_new_tokens=NEW, chat_template=False
    )
    assert with_chat == by_hand


def test_bad_ranks_and_prompts_refused(trained):
    trainer, _ = trained
    model, tok = trainer.model, trainer.processing_class
    with pytest.raises(InputError, match=r"outside the adapter's range 1\.\.8"):
        generate_across_ranks(model, tok, PROMPTS, [1, 9])
    with pytest.raises(InputError, match="no prompts"):
        generate_across_ranks(model, tok, [], [1])
    with pytest.raises(InputError, match="template"):
        generate_across_ranks(model, tok, PROMPTS, [1], template="no placeholder")


def test_matches_exported_rank_b_peft_adapter(trained, tmp_path):
    """Greedy output at rank b == the exported rank-b adapter loaded by plain PEFT on the same base."""
    from peft import PeftModel

    from qdylora import exporters

    _, adapter = trained
    model, tok, _ = qdylora.loading.load_adapter(adapter)
    ours = generate_across_ranks(model, tok, PROMPTS, [1, 3, R_MAX], max_new_tokens=NEW)
    assert ours[1] != ours[R_MAX]
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    for b in (1, 3):
        out = exporters.export_adapter(adapter, tmp_path / f"r{b}", b)
        assert json.loads((Path(out) / "adapter_config.json").read_text())["r"] == b
        plain = PeftModel.from_pretrained(load_model(base, prepare_for_training=False), str(out))
        assert not hasattr(plain, "_qdylora_dynamic_rank")  # PEFT's own forward
        ids = plain.eval().generate(**enc, do_sample=False, max_new_tokens=NEW, pad_token_id=tok.pad_token_id)
        assert tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True) == ours[b]


# -- prompts files ----------------------------------------------------------------------


def test_read_prompts_lines_and_jsonl(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\nsecond {x} prompt\n")
    assert read_prompts(lines) == ["first prompt", "second {x} prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a\\nb", "completion": "x"}\n{"prompt": "c"}\n')
    assert read_prompts(jsonl) == ["a\nb", "c"]
    gsm = tmp_path / "gsm.txt"  # JSON records detected by content; GSM8K's field is "question"
    gsm.write_text('{"question": "q1", "answer": "#### 1"}\n')
    assert read_prompts(gsm) == ["q1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2 is not a JSON object"):
        read_prompts(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "x"}\n')
    with pytest.raises(InputError, match=r"nofield.jsonl:1 has none of the prompt fields"):
        read_prompts(nofield)
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


# -- the CLI ----------------------------------------------------------------------------


@pytest.fixture
def count_loads(monkeypatch):
    """Counts base-model loads (qdylora's load_model and transformers' from_pretrained)."""
    import transformers

    import qdylora.loading as loading

    calls = {"load_model": 0, "from_pretrained": 0}
    real_load, real_fp = loading.load_model, transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counted_load(*a, **k):
        calls["load_model"] += 1
        return real_load(*a, **k)

    def counted_fp(cls, *a, **k):
        calls["from_pretrained"] += 1
        return real_fp(cls, *a, **k)

    monkeypatch.setattr(loading, "load_model", counted_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counted_fp))
    return calls


def test_cli_rank_out_of_range_exits_2_before_loading(trained, count_loads):
    _, adapter = trained
    result = run_cli("generate", adapter, "--ranks", "1,9", "--prompt", "hi")
    assert result.exit_code == 2, result.output
    assert "[9] outside the trained range 1..8" in result.output
    assert count_loads == {"load_model": 0, "from_pretrained": 0}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "1,2"], "at least one --prompt"),
        (["--ranks", "1", "--prompt", "x", "--temperature", "0.7"], "only apply with --do-sample"),
        (["--ranks", "0", "--prompt", "x"], "ranks must be >= 1"),
        (["--ranks", "1", "--prompt", "x", "--json", "/no/such/dir/out.json"], "does not exist"),
    ],
)
def test_cli_bad_options_exit_2(trained, count_loads, args, message):
    _, adapter = trained
    result = run_cli("generate", adapter, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert count_loads["load_model"] == 0


def test_cli_loads_once_prints_side_by_side_and_writes_json(trained, count_loads, tmp_path):
    trainer, adapter = trained
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[1:]))
    out_json = tmp_path / "answers.json"
    ranks = [1, 2, R_MAX]
    result = run_cli(
        "generate", adapter, "--ranks", "1,2,8", "--prompts", prompts_file, "--prompt", PROMPTS[0],
        "--max-new-tokens", NEW, "--json", out_json,
    )
    assert result.exit_code == 0, result.output
    assert count_loads == {"load_model": 1, "from_pretrained": 1}  # one base for three ranks
    assert "generating" in result.stderr  # the progress bar over ranks x prompts

    # same answers as the trained model in memory (same NF4 base, same adapter weights)
    expected = generate_across_ranks(trainer.model, trainer.processing_class, PROMPTS, ranks, max_new_tokens=NEW)
    payload = json.loads(out_json.read_text())
    assert payload["ranks"] == ranks and payload["load_in_4bit"] is True
    assert payload["generation"]["do_sample"] is False and payload["generation"]["max_new_tokens"] == NEW
    assert [rec["prompt"] for rec in payload["prompts"]] == PROMPTS  # --prompt texts, then the file's
    for i, rec in enumerate(payload["prompts"]):
        assert rec["outputs"] == {str(r): expected[r][i] for r in ranks}

    # the printout: each prompt once, then one block per rank in order, with that rank's answer
    text = result.stdout
    for i, p in enumerate(PROMPTS):
        assert text.count(f"=== prompt {i + 1}/3 ===\n{p.rstrip()}\n") == 1
        block = text.split(f"=== prompt {i + 1}/3 ===")[1].split("=== prompt")[0]
        positions = [block.index(f"--- rank {r} ---\n{expected[r][i].strip()}") for r in ranks]
        assert positions == sorted(positions)


def test_cli_sampling_is_reproducible(trained, tmp_path):
    _, adapter = trained
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        result = run_cli(
            "generate", adapter, "--ranks", "2,8", "--prompt", PROMPTS[0], "--max-new-tokens", NEW,
            "--do-sample", "--temperature", "1.5", "--top-p", "0.95", "--seed", "7", "--no-4bit", "--json", out,
        )
        assert result.exit_code == 0, result.output
        runs.append(json.loads(out.read_text()))
    assert runs[0] == runs[1]
    assert runs[0]["generation"]["temperature"] == 1.5 and runs[0]["load_in_4bit"] is False


# -- the sweep --------------------------------------------------------------------------


def test_evaluate_ranks_stores_samples_in_rank_sweep_json(trained, tmp_path):
    from qdylora.trainer_ext import save_sweep

    trainer, _ = trained
    trainer.evaluate_ranks([1, R_MAX], sample_prompts=PROMPTS[:2], sample_kwargs={"max_new_tokens": NEW})
    expected = generate_across_ranks(trainer.model, trainer.processing_class, PROMPTS[:2], [1, R_MAX], max_new_tokens=NEW)
    assert trainer.rank_sweep.samples == expected
    json_path, _ = save_sweep(trainer.rank_sweep, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["sample_prompts"] == PROMPTS[:2]
    assert data["samples"] == {"1": expected[1], str(R_MAX): expected[R_MAX]}
    assert qdylora.SweepResult.from_dict(data).samples == expected  # round trip


def test_cli_sweep_sample_prompts(trained, tmp_path):
    _, adapter = trained
    work = tmp_path / "adapter"
    import shutil

    shutil.copytree(adapter, work)
    data = write_arithmetic_jsonl(tmp_path / "eval.jsonl", n=8, seed=1)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("What is 3 plus 4?\nWhat is 9 plus 1?\n")
    result = run_cli(
        "sweep", work, "--data", data, "--ranks", "1,8", "--sample-prompts", prompts_file,
        "--max-new-tokens", NEW, "--out", tmp_path,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "rank_sweep.json").read_text())
    assert saved["sample_prompts"] == ["What is 3 plus 4?", "What is 9 plus 1?"]
    # written like the evaluation examples: the data template "{prompt}\n", no chat template
    model, tok, _ = qdylora.loading.load_adapter(work)
    expected = generate_across_ranks(
        model, tok, saved["sample_prompts"], [1, R_MAX], max_new_tokens=NEW, template="{prompt}\n", chat_template=False
    )
    assert saved["samples"] == {str(r): v for r, v in expected.items()}
    assert "=== prompt 1/2 ===" in result.stdout and "recommended rank" in result.stdout


def test_sweep_sample_prompts_need_a_tokenizer(trained):
    from qdylora.trainer_ext.sweep import run_sweep

    trainer, _ = trained
    saved, trainer.processing_class = trainer.processing_class, None
    try:
        with pytest.raises(InputError, match="processing_class"):
            run_sweep(trainer, [1], sample_prompts=["x"])
    finally:
        trainer.processing_class = saved


# -- logging during training ------------------------------------------------------------


class SpyWriter:
    """Stands in for a tensorboard SummaryWriter."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []
        self.scalars: list[tuple[str, float, int]] = []

    def add_text(self, tag, text, step=None):
        self.texts.append((tag, text, step))

    def add_scalar(self, tag, value, step=None):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        pass


class FakeWandb:
    """Stands in for the `wandb` module as WandbCallback uses it (no wandb installed)."""

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class _Run:
        summary: dict = {}

    def __init__(self) -> None:
        self.run = self._Run()
        self.logged: list[dict] = []

    def log(self, payload):
        self.logged.append(payload)


def spy_integrations():
    """The real TensorBoardCallback / WandbCallback code, with a spy writer and a fake wandb."""
    from transformers.integrations import TensorBoardCallback, WandbCallback
    from transformers.integrations.integration_utils import WandbLogModel

    class SpyTB(TensorBoardCallback):
        def __init__(self):  # skip the "is tensorboard installed" check
            self._SummaryWriter, self.logging_dir = None, None
            self.tb_writer = self.spy = SpyWriter()

    class SpyWandb(WandbCallback):
        def __init__(self):  # skip the "is wandb installed" check and wandb.init
            self._wandb, self._initialized, self._log_model = FakeWandb(), True, WandbLogModel("false")

    return SpyTB(), SpyWandb()


def test_callback_logs_samples_at_each_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=30, callbacks_eval=True)
    tb, wb = spy_integrations()
    trainer.add_callback(tb)
    trainer.add_callback(wb)
    ranks = [1, R_MAX]
    trainer.add_callback(RankSamplesCallback(trainer, PROMPTS[:2], ranks, max_new_tokens=NEW))
    trainer.train()

    entries = [e for e in trainer.state.log_history if "eval_samples" in e]
    assert [e["step"] for e in entries] == [15, 30]  # once per evaluation
    assert all("eval_loss" not in e for e in entries)  # model cards / best-model logic ignore them
    json.dumps(trainer.state.log_history)  # trainer_state.json stays writable
    # the step-30 evaluation ran on the final model: its rows are what that model answers now
    final = generate_across_ranks(trainer.model, trainer.processing_class, PROMPTS[:2], ranks, max_new_tokens=NEW)
    rows = entries[-1]["eval_samples"]
    assert rows == [{"prompt": p, "rank": r, "output": final[r][i]} for i, p in enumerate(PROMPTS[:2]) for r in ranks]
    assert any(r["output"].strip() for r in rows) and final[1] != final[R_MAX]

    # tensorboard: a markdown table per evaluation, one line per (prompt, rank)
    texts = [(step, text) for tag, text, step in tb.spy.texts if tag == "eval/samples"]
    assert [s for s, _ in texts] == [15, 30]
    table = texts[-1][1].splitlines()
    assert table[0] == "| prompt | rank | output |" and len(table) == 2 + len(rows)
    assert table[2].startswith("| What is 3 plus 4? | 1 | ")
    assert not any("eval_samples" in tag for tag, _, _ in tb.spy.scalars)
    # wandb: a Table on the train/global_step axis
    tables = [p for p in wb._wandb.logged if "eval/samples" in p]
    assert [p["train/global_step"] for p in tables] == [15, 30]
    last = tables[-1]["eval/samples"]
    assert last.columns == ["prompt", "rank", "output"]
    assert last.data == [[r["prompt"], r["rank"], r["output"]] for r in rows]

    # evaluations at one rank (the sweep) and repeats at the same step do not generate again
    trainer.evaluate(rank=1)
    trainer.evaluate()
    assert len([e for e in trainer.state.log_history if "eval_samples" in e]) == 2


def test_callback_checks_its_settings(trained):
    trainer, _ = trained
    with pytest.raises(InputError, match=r"sample ranks \[9\] outside"):
        RankSamplesCallback(trainer, ["x"], [1, 9])
    with pytest.raises(InputError, match="at least one prompt"):
        RankSamplesCallback(trainer, [])
    assert RankSamplesCallback(trainer, ["x"]).ranks == trainer.qdylora_config.sweep_ranks
