"""Real `axolotl train` runs of examples/axolotl/tiny-qdylora.yml, on CPU, in Axolotl's own environment.

Axolotl 0.19 pins transformers/peft/accelerate/datasets versions that cannot share an
environment with the main set, so these tests run Axolotl as a subprocess of the Python
named by QDYLORA_AXOLOTL_PYTHON (`.ci/run` builds .venv-axolotl and sets it, together with
QDYLORA_REQUIRE_AXOLOTL=1 so that a missing environment fails instead of skipping).
The tiny model and the JSONL data are generated here; nothing comes from a hub.

Five Axolotl processes run side by side (module fixture): the example with the plugin,
the same config without the plugin (it must train and draw no rank), a full fine-tuning
config that lists the plugin (must fail at config time), the example on a tiny Falcon
(whose linear layers transformers 5.x would leave unquantized), and a script validating
configs through Axolotl's own `validate_config`.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "axolotl" / "tiny-qdylora.yml"
PLUGIN = "qdylora.plugin.QDyLoraPlugin"
RANK_LOG = re.compile(r"'rank': (\d+)")
TIMEOUT = 600


def axolotl_python() -> Path:
    value = os.environ.get("QDYLORA_AXOLOTL_PYTHON")
    if value and Path(value).is_file():
        return Path(value)
    message = (
        "QDYLORA_AXOLOTL_PYTHON must name the python of an environment built from requirements-axolotl.txt "
        f"(see .ci/run); got {value!r}"
    )
    if os.environ.get("QDYLORA_REQUIRE_AXOLOTL") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _env(python: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",  # axolotl starts `accelerate` from PATH
        PYTHONPATH=str(REPO),  # this checkout's qdylora
        AXOLOTL_DO_NOT_TRACK="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _config(work: Path, name: str, *, plugin: bool = True, **overrides) -> Path:
    """The example with paths pointed at `work`; without the plugin line and qdylora_* keys if asked."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["base_model"] = str(work / "tiny-model")
    cfg["datasets"][0]["path"] = str(work / "train.jsonl")
    cfg["dataset_prepared_path"] = str(work / f"prepared-{name}")
    cfg["output_dir"] = str(work / f"out-{name}")
    if not plugin:
        cfg = {k: v for k, v in cfg.items() if k != "plugins" and not k.startswith("qdylora_")}
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


VALIDATE = textwrap.dedent(
    """
    import json, sys, yaml
    from axolotl.cli.config import gpu_capabilities, prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    out = {}
    for name, raw in json.loads(sys.argv[1]).items():
        cfg = DictDefault(raw)
        prepare_plugins(cfg)
        try:
            valid = validate_config(cfg, *gpu_capabilities())  # as `axolotl train` does
            out[name] = {k: valid.get(k) for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "qdylora_r_min")}
        except Exception as exc:
            out[name] = {"error": str(exc)}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every Axolotl process at once, wait for all; {name: (returncode, output, config)}."""
    python = axolotl_python()
    from qdylora.testing import make_tiny_model, write_arithmetic_jsonl

    work = tmp_path_factory.mktemp("axolotl")
    make_tiny_model(work / "tiny-model", "llama")
    make_tiny_model(work / "tiny-falcon", "falcon")
    write_arithmetic_jsonl(work / "train.jsonl", 64, seed=0)

    configs = {
        # vLLM-ready exports: padded to an allowed max_lora_rank, still plain PEFT adapters
        "plugin": _config(work, "plugin", qdylora_export_vllm=True),
        "no_plugin": _config(work, "no_plugin", plugin=False),
        "full_finetune": _config(work, "full_finetune", adapter=None, load_in_4bit=None, lora_r=None),
        # Falcon's FalconLinear subclasses nn.Linear: transformers 5.x would leave it unquantized
        "falcon": _config(work, "falcon", base_model=str(work / "tiny-falcon"), max_steps=4, val_set_size=None,
                          qdylora_eval_ranks=None, qdylora_export_ranks=None),
    }
    axolotl = str(python.parent / "axolotl")
    procs = {
        name: subprocess.Popen([axolotl, "train", str(path)], cwd=work, env=_env(python), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        for name, path in configs.items()
    }

    base = yaml.safe_load(configs["plugin"].read_text())
    variants = {
        "kernels_unset": {k: v for k, v in base.items() if not k.endswith("_kernel")},
        "kernels_unset_no_plugin": {
            k: v for k, v in base.items() if not k.endswith("_kernel") and k != "plugins" and not k.startswith("qdylora_")
        },
        "kernel_on": {**base, "lora_qkv_kernel": True},
        "bad_distribution": {**base, "qdylora_distribution": "gaussian"},
        "export_above_r_max": {**base, "qdylora_export_ranks": [2, 9]},
        "recommended_without_eval": {**base, "val_set_size": 0.0},
        # the shipped examples are valid Axolotl configs with the plugin
        "example_falcon": yaml.safe_load((EXAMPLE.parent / "falcon-40b-qdylora.yml").read_text()),
        "example_llama": yaml.safe_load((EXAMPLE.parent / "llama-qdylora.yml").read_text()),
    }
    procs["validate"] = subprocess.Popen([str(python), "-c", VALIDATE, json.dumps(variants)], cwd=work,
                                         env=_env(python), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output += f"\n[killed after {TIMEOUT} s]"
        results[name] = (proc.returncode, output, yaml.safe_load(configs[name].read_text()) if name in configs else None)
    return results


def _ok(runs, name):
    code, output, cfg = runs[name]
    assert code == 0, f"axolotl train ({name}) failed:\n{output[-6000:]}"
    return output, cfg, Path(cfg["output_dir"])


def test_plugin_draws_a_rank_per_step_and_logs_it(runs):
    from qdylora.ranks import RankSampler

    output, cfg, out = _ok(runs, "plugin")
    # QDyLoRA was composed onto Axolotl's own trainer, not a plain Trainer
    assert "QDyLoraAxolotlTrainer (QDyLoraMixin + AxolotlTrainer)" in output
    log = (out / "debug.log").read_text()
    ranks = [int(r) for r in RANK_LOG.findall(log)]
    sampler = RankSampler(range(1, cfg["lora_r"] + 1), cfg["qdylora_distribution"], seed=cfg["seed"])
    assert ranks == [sampler.draw(step) for step in range(cfg["max_steps"])]
    assert len(set(ranks)) > 1


def test_plugin_writes_config_sweep_and_exports_that_peft_loads(runs):
    import torch
    from peft import PeftModel

    from qdylora import load_model, rank_scope
    from qdylora.config import read_config_file
    from qdylora.exporters import read_export_info, vllm_rank

    output, cfg, out = _ok(runs, "plugin")
    saved = read_config_file(out)
    assert saved["config"]["r_max"] == cfg["lora_r"] and saved["config"]["seed"] == cfg["seed"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == cfg["lora_r"]

    # the rank sweep on the eval split (val_set_size), recorded in qdylora_config.json too
    sweep = json.loads((out / "rank_sweep.json").read_text())
    assert sorted(int(r) for r in sweep["results"]) == cfg["qdylora_eval_ranks"]
    losses = [m["eval_loss"] for m in sweep["results"].values()]
    assert len(set(losses)) == len(losses)
    assert saved["sweep"]["recommended_rank"] == sweep["recommended_rank"]
    assert (out / "rank_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the exports: rank 2 and the recommended rank, vLLM-ready (zero-padded), loaded by plain PEFT
    wanted = sorted({2, sweep["recommended_rank"]})
    exports = out / "qdylora-exports"
    assert sorted(p.name for p in exports.iterdir()) == [f"rank-{b}" for b in wanted]
    assert "serve with:" in output and "--max-lora-rank" in output

    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 64]])
    base_dir = cfg["base_model"]

    def peft_model(adapter, load_in_4bit):
        base = load_model(base_dir, load_in_4bit=load_in_4bit, prepare_for_training=False)
        return PeftModel.from_pretrained(base, str(adapter)).eval()

    # Exactness on the full-precision base; on the NF4 base (how QLoRA users load it)
    # bitsandbytes' CPU kernels round activations, which turns 1e-7 differences in the
    # order of summation into ~1e-4, so the tolerance there is looser.
    for load_in_4bit, tol in ((False, 1e-5), (True, 5e-3)):
        trained = peft_model(out, load_in_4bit)
        for b in wanted:
            folder = exports / f"rank-{b}"
            info = read_export_info(folder)
            assert info["rank"] == b and info["r"] == vllm_rank(b)  # padded to vLLM's smallest max_lora_rank >= b
            with torch.no_grad(), rank_scope(trained, b):
                expected = trained(input_ids=ids).logits
            with torch.no_grad():
                got = peft_model(folder, load_in_4bit)(input_ids=ids).logits
            torch.testing.assert_close(got, expected, atol=tol, rtol=0)
            with torch.no_grad():
                full = trained(input_ids=ids).logits
            if b < cfg["lora_r"]:
                assert (full - expected).abs().max() > 10 * tol  # rank b really differs from r_max


def test_same_run_without_the_plugin_trains_but_draws_no_rank(runs):
    output, cfg, out = _ok(runs, "no_plugin")
    log = (out / "debug.log").read_text()
    assert log.count("'loss':") >= cfg["max_steps"]  # the same log lines, just no rank in them
    assert not RANK_LOG.search(log)
    assert "QDyLora" not in output
    assert (out / "adapter_model.safetensors").is_file()
    for name in ("qdylora_config.json", "rank_sweep.json", "qdylora-exports"):
        assert not (out / name).exists(), name


def test_plugin_with_a_non_lora_adapter_fails_at_config_time(runs):
    code, output, cfg = runs["full_finetune"]
    assert code != 0
    assert "trains LoRA adapters, but adapter is None: set `adapter: qlora`" in output
    assert "Loading weights" not in output  # stopped before any model was loaded
    assert not (Path(cfg["output_dir"]) / "config.json").exists()


def test_falcon_is_really_quantized_and_trained_with_random_ranks(runs):
    output, cfg, out = _ok(runs, "falcon")
    # 2 layers x (query_key_value, dense, dense_h_to_4h, dense_4h_to_h), all FalconLinear
    assert "QDyLoRA: base model in 4 bits (8 Linear4bit layers)" in output
    ranks = [int(r) for r in RANK_LOG.findall((out / "debug.log").read_text())]
    assert len(ranks) == cfg["max_steps"] and len(set(ranks)) > 1
    assert (out / "qdylora_config.json").is_file() and not (out / "rank_sweep.json").exists()


def test_config_validation_inside_axolotl(runs):
    code, output, _ = runs["validate"]
    assert code == 0, output[-6000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    # Axolotl auto-enables its fused LoRA kernels when none is set; the plugin keeps them off
    assert result["kernels_unset_no_plugin"]["lora_qkv_kernel"] is True
    assert {result["kernels_unset"][k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")} == {False}
    assert result["kernels_unset"]["qdylora_r_min"] == 1
    assert "lora_qkv_kernel: false" in result["kernel_on"]["error"]
    assert "distribution='gaussian' is not allowed" in result["bad_distribution"]["error"]
    assert "qdylora_export_ranks [9] outside the trained range 1..8" in result["export_above_r_max"]["error"]
    assert "'recommended', which comes from the rank sweep" in result["recommended_without_eval"]["error"]
    for name in ("example_falcon", "example_llama"):
        assert "error" not in result[name], result[name]
        assert {result[name][k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")} == {False}
