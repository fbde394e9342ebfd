"""The shape of the package: imports go one way (no circles, no lower module reaching up),
the CLI starts light and quiet, and a setting added to the config reaches every place
that lists settings (the Axolotl keys, the YAML, `qdylora info`)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qdylora"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "accelerate", "datasets")

# lowest first: a module may import its own layer or a lower one, never a higher one
LAYERS = [
    ["errors", "_lazy"],
    ["config"],
    ["adapter_io", "sweep_result", "data"],
    ["ranks", "distributed"],
    ["loading", "generation"],
    ["trainer_ext", "exporters", "plan"],
    ["recipe", "sft", "testing"],
    ["workflow"],
    ["plugin", "demo"],
    ["cli"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every qdylora module `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c in known and c != name:
                found.add(c)
                break
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items() if name != "qdylora"}


def _top(name: str) -> str:
    return name.split(".")[1]


def test_every_module_has_a_layer_and_a_docstring():
    for name, path in _modules().items():
        if name == "qdylora":
            continue
        assert _top(name) in LAYER, f"{name}: add it to LAYERS in this test"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no module docstring saying what it is for"


def test_imports_go_down_only():
    wrong = [
        f"{a} -> {b}" for a, targets in _graph().items() for b in targets
        if b != "qdylora" and LAYER[_top(b)] > LAYER[_top(a)]
    ]
    assert not wrong, "a lower layer imports a higher one:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = _graph()
    # Tarjan's strongly connected components: any with two or more modules is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles (function-level imports included): {circles}"


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("QDYLORA_VERBOSE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _fake_adapter(folder: Path) -> Path:
    """A qdylora adapter folder written with numpy only (the subprocess must not need torch)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": np.zeros((4, 8), np.float32),
               f"{prefix}.lora_B.weight": np.zeros((8, 4), np.float32)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "base",
    }))
    (folder / "qdylora_config.json").write_text(json.dumps({"qdylora_version": "0.1.0", "config": {"r_max": 4}}))
    return folder


def test_help_and_info_import_no_heavy_library_and_say_nothing_on_stderr(tmp_path):
    adapter = _fake_adapter(tmp_path / "adapter")
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        import qdylora.cli
        for args in (["--help"], ["info", {str(adapter)!r}], ["export", "--help"], ["train", "--help"]):
            res = CliRunner().invoke(qdylora.cli.main, args)
            assert res.exit_code == 0, (args, res.output)
        print("HEAVY:", [m for m in {HEAVY!r} if m in sys.modules])
    """)
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "HEAVY: []" in res.stdout, res.stdout
    # the console command itself: nothing on stderr
    for args in (["--help"], ["info", str(adapter)]):
        run = subprocess.run([sys.executable, "-m", "qdylora.cli", *args], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert run.returncode == 0 and run.stderr == "", (args, run.stderr)
    assert "1..4" in run.stdout and "loss_weight:" in run.stdout


def test_import_qdylora_is_light():
    res = _run("import sys, qdylora, qdylora.config, qdylora.plugin\n"
               f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
               "print(qdylora.QDyLoraConfig.__name__)\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["[]", "QDyLoraConfig"]


def test_noise_is_held_back_unless_verbose():
    """bitsandbytes' kernel notice and DeepSpeed's accelerator line do not reach a CLI user."""
    code = textwrap.dedent("""
        import logging, warnings, sys
        from qdylora.cli import quiet
        quiet.configure(verbose=%s)
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community: x")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
        logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
        warnings.warn("old", FutureWarning)
        logging.getLogger("qdylora.exporters").info("removed a stale temporary folder")
    """)
    quiet = _run(code % "False")
    assert quiet.returncode == 0, quiet.stderr
    assert "gemm_4bit" not in quiet.stderr and "Setting accelerator" not in quiet.stderr
    assert "FutureWarning" not in quiet.stderr
    assert "a real DeepSpeed warning" in quiet.stderr and "removed a stale temporary folder" in quiet.stderr
    loud = _run(code % "True")
    assert "gemm_4bit" in loud.stderr and "Setting accelerator" in loud.stderr and "FutureWarning" in loud.stderr
    env_loud = _run(code % "False", env={"QDYLORA_VERBOSE": "1"})
    assert env_loud.returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QDYLORA_VERBOSE": "1"}
    env_loud = subprocess.run([sys.executable, "-c", code % "False"], capture_output=True, text=True, env=env, timeout=300)
    assert "gemm_4bit" in env_loud.stderr


def test_a_new_config_field_reaches_the_axolotl_keys_the_yaml_and_info(tmp_path):
    """Adding a field to QDyLoraConfig ALONE (in a copy of the package) is enough."""
    pytest.importorskip("pydantic")
    copy = tmp_path / "pkg"
    shutil.copytree(PACKAGE, copy / "qdylora", ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / "qdylora" / "config.py"
    source = config.read_text()
    anchor = "    loss_weight: LossWeight = setting("
    assert anchor in source
    config.write_text(source.replace(anchor, '    warp_factor: int = setting(3, "How fast to go.", min=1)\n' + anchor, 1))
    adapter = _fake_adapter(tmp_path / "adapter")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    code = textwrap.dedent(f"""
        from click.testing import CliRunner
        from qdylora.plugin.args import QDyLoraArgs
        from qdylora.recipe import Recipe
        import qdylora.cli
        field = QDyLoraArgs.model_fields["qdylora_warp_factor"]
        print("AXOLOTL", field.default, field.description)
        print("AXOLOTL-SET", QDyLoraArgs(qdylora_warp_factor=5).to_qdylora_config(8).warp_factor)
        try:
            QDyLoraArgs(qdylora_warp_factor=0)
        except Exception as exc:
            print("AXOLOTL-BAD", "qdylora_warp_factor must be an integer >= 1" in str(exc))
        recipe = Recipe.from_dict({{"model": "m", "data": {str(data)!r}, "training": {{"output_dir": "o"}},
                                    "lora": {{"r": 8}}, "qdylora": {{"warp_factor": 7}}}})
        print("YAML", recipe.qdylora.warp_factor)
        res = CliRunner().invoke(qdylora.cli.main, ["info", {str(adapter)!r}])
        print("INFO", [l for l in res.output.splitlines() if l.startswith("warp_factor:")])
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(copy)}, cwd=tmp_path)  # not the checkout's qdylora
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "AXOLOTL 3 How fast to go." in out
    assert "AXOLOTL-SET 5" in out and "AXOLOTL-BAD True" in out
    assert "YAML 7" in out
    assert "INFO ['warp_factor:   3']" in out
