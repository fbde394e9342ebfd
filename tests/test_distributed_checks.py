"""The checks of qdylora/distributed.py, in one process: bad engine configs, batch sizes and 4-bit
storage dtypes are refused with one clear line; the shipped example configs pass them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from qdylora.distributed import (
    Engine,
    accumulation_for,
    check_batch,
    check_deepspeed_config,
    check_fsdp_args,
    check_quant_storage,
    load_deepspeed_config,
)
from qdylora.errors import InputError
from qdylora.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize(
    "config, message",
    [
        ({"zero_optimisation": {"stage": 3}}, "did you mean 'zero_optimization'"),
        ({"zero_optimization": {"stage": 4}}, "unknown ZeRO stage 4"),
        ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_sav": True}},
         "stage3_gather_16bit_weights_on_model_sav: Extra inputs are not permitted"),
        ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}, "reduce_bucket_size"),
        ({"zero_optimization": 3}, "must be a JSON object"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both fp16 and bf16"),
        ({"train_batch_size": 0}, "train_batch_size must be a positive integer"),
    ],
)
def test_bad_deepspeed_configs(config, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        check_deepspeed_config(config)


def test_deepspeed_config_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_deepspeed_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(InputError, match="not valid JSON"):
        load_deepspeed_config(bad)
    assert load_deepspeed_config(EXAMPLES / "accelerate" / "ds_zero3.json")["zero_optimization"]["stage"] == 3
    assert check_deepspeed_config({"zero_optimization": {"stage": 2}, "some_new_deepspeed_key": {}}) == 2  # unknown, not a typo


def test_fsdp_args():
    check_fsdp_args("full_shard auto_wrap", {"version": 2})
    check_fsdp_args(True, None)
    with pytest.raises(InputError, match="unknown fsdp option"):
        check_fsdp_args("full_shard auto_wrapp", None)
    with pytest.raises(InputError, match="unknown FSDP version 3"):
        check_fsdp_args(True, {"version": 3})


def test_batch_checks():
    assert accumulation_for(16, 8, 1) == 2 and accumulation_for(16, 1, 1) == 16
    with pytest.raises(InputError, match="global_batch_size 16 is not divisible by world size 3"):
        accumulation_for(16, 3, 1)
    check_batch({"train_batch_size": "auto"}, 3, 2, 1)
    check_batch({"train_batch_size": 12}, 3, 2, 2)
    with pytest.raises(InputError, match="train_batch_size 16 is not divisible by the world size 3"):
        check_batch({"train_batch_size": 16}, 3, 1, 1)
    with pytest.raises(InputError, match="set gradient_accumulation_steps to 4"):
        check_batch({"train_batch_size": 16}, 2, 2, 1)
    with pytest.raises(InputError, match="train_micro_batch_size_per_gpu 4"):
        check_batch({"train_micro_batch_size_per_gpu": 4}, 2, 2, 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from qdylora import load_model
    from qdylora.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("m"))
    return {s: load_model(path, compute_dtype="float32", quant_storage=s, device_map={"": "cpu"})
            for s in (None, "float32", "bfloat16")}


ZERO3_FP32 = Engine("deepspeed", 2, 3, None, True)
ZERO3_BF16 = Engine("deepspeed", 2, 3, torch.bfloat16, True)
ZERO2_BF16 = Engine("deepspeed", 2, 2, torch.bfloat16, False)
FSDP_FP32 = Engine("fsdp", 2, shards_params=True)
FSDP_BF16 = Engine("fsdp", 2, param_dtype=torch.bfloat16, shards_params=True)


@pytest.mark.parametrize(
    "storage, engine, message",
    [
        (None, ZERO3_FP32, r"shards the 4-bit base, whose weights are stored as \['uint8'\].*\(float32\)"),
        ("bfloat16", ZERO3_FP32, r"stored as \['bfloat16'\].*\(float32\)"),
        ("float32", ZERO3_BF16, r"stored as \['float32'\].*quant_storage=torch.bfloat16"),
        ("float32", ZERO2_BF16, "casts float parameters to bfloat16, which would corrupt 4-bit weights"),
        (None, FSDP_FP32, r"FSDP on 2 processes shards the 4-bit base"),
        ("float32", FSDP_BF16, r"\(bfloat16\)"),
        (None, ZERO2_BF16, None),  # uint8 storage is never cast
        ("bfloat16", ZERO2_BF16, None),
        ("float32", ZERO3_FP32, None),
        ("bfloat16", ZERO3_BF16, None),
        ("float32", FSDP_FP32, None),
        ("bfloat16", FSDP_BF16, None),
        (None, Engine("ddp", 2), None),
    ],
)
def test_quant_storage_must_match_the_engine(models, storage, engine, message):
    if message is None:
        check_quant_storage(models[storage], engine)
    else:
        with pytest.raises(InputError, match=message):
            check_quant_storage(models[storage], engine)


def test_deepspeed_really_corrupts_mismatched_storage(models):
    """Why the check exists: DeepSpeed's bf16 cast of fp32-stored packed weights changes their bytes."""
    import bitsandbytes as bnb

    layer = next(m for m in models["float32"].modules() if isinstance(m, bnb.nn.Linear4bit))
    packed = layer.weight.data
    assert not torch.equal(packed.to(torch.bfloat16).to(torch.float32).view(torch.uint8), packed.view(torch.uint8))


def _recipe(tmp_path, **extra):
    raw = {"model": "some/model", "data": "d.jsonl", "training": {"output_dir": str(tmp_path / "o")}}
    for key, value in extra.items():
        if key == "training":
            raw["training"].update(value)
        else:
            raw[key] = value
    return raw


def test_recipe_engine_checks_run_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InputError, match="global_batch_size 16 is not divisible by world size 3"):
        Recipe.from_dict(_recipe(tmp_path, global_batch_size=16, training={"per_device_train_batch_size": 1}))
    with pytest.raises(InputError, match="not both"):
        Recipe.from_dict(_recipe(tmp_path, global_batch_size=15, training={"gradient_accumulation_steps": 2}))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(InputError, match="unknown ZeRO stage 5"):
        Recipe.from_dict(_recipe(tmp_path, training={"deepspeed": "ds.json"}), base_dir=tmp_path)
    with pytest.raises(InputError, match="choose one engine"):
        Recipe.from_dict(_recipe(tmp_path, training={"deepspeed": str(EXAMPLES / "accelerate" / "ds_zero2.json"),
                                                      "fsdp": "full_shard"}))
    with pytest.raises(InputError, match="DeepSpeed config missing.json does not exist"):
        Recipe.from_dict(_recipe(tmp_path, training={"deepspeed": "missing.json"}), base_dir=tmp_path)
    r = Recipe.from_dict(_recipe(tmp_path, global_batch_size=12, training={"per_device_train_batch_size": 2,
                                                                            "deepspeed": "accelerate/ds_zero2.json"}),
                         base_dir=EXAMPLES)
    assert r.training["deepspeed"] == str(EXAMPLES / "accelerate" / "ds_zero2.json")  # relative to the recipe
    monkeypatch.delenv("WORLD_SIZE")  # TrainingArguments would then try to join a process group
    monkeypatch.setattr("qdylora.recipe.world_size", lambda: 2)
    r = Recipe.from_dict(_recipe(tmp_path, global_batch_size=12, training={"per_device_train_batch_size": 2}))
    assert r.training_args(use_cpu=True).gradient_accumulation_steps == 3


def test_cli_train_bad_engine_config_exits_2(tmp_path):
    from click.testing import CliRunner

    from qdylora.cli import main

    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(tmp_path, training={"deepspeed": {"zero_optimisation": {"stage": 3}}})))
    result = CliRunner().invoke(main, ["train", str(cfg)])
    assert result.exit_code == 2 and "did you mean 'zero_optimization'" in result.output


def test_shipped_examples_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((EXAMPLES / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys fail
        kinds[path.stem] = str(config.distributed_type.value if hasattr(config.distributed_type, "value") else config.distributed_type)
        ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
        if ds_file:
            check_deepspeed_config(json.loads((ROOT / ds_file).read_text()))
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3_qlora": "DEEPSPEED",
                     "fsdp_qlora": "FSDP"}


def test_falcon_40b_recipe_is_the_papers_setting():
    r = Recipe.from_yaml(EXAMPLES / "falcon-40b" / "qdylora.yaml")
    assert r.load_in_4bit and r.quant_storage == "bfloat16"
    assert r.lora["r"] == 64 and r.lora["lora_alpha"] == 16 and r.lora["target_modules"] == "all-linear"
    t = r.training
    assert t["optim"] == "paged_adamw_32bit" and t["max_grad_norm"] == 0.3 and t["warmup_steps"] == 0.03
    assert t["lr_scheduler_type"] == "constant" and t["gradient_checkpointing"] is True
    assert t["adam_beta2"] == 0.999 and t["weight_decay"] == 0.0 and t["per_device_train_batch_size"] == 1
    lora = r.lora_config()
    assert lora.r == 64 and lora.lora_alpha == 16
    from qdylora.loading import bnb_config

    q = bnb_config(r.compute_dtype, r.quant_storage)
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant and q.load_in_4bit
