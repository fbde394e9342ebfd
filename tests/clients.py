"""Running a script in another client's own environment (Axolotl, vLLM): which python, which env, the result.

Axolotl and vLLM pin transformers below the main set, so their tests run them as a
subprocess of the python named by QDYLORA_<NAME>_PYTHON (`.ci/run` builds those venvs and
sets it, together with QDYLORA_REQUIRE_<NAME>=1 so that a missing environment fails instead
of skipping). This checkout's qdylora is put on PYTHONPATH there.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def client_python(name: str, requirements: str) -> Path:
    """The python of the `name` environment (QDYLORA_<NAME>_PYTHON); skip, or fail when it is required."""
    var = f"QDYLORA_{name.upper()}_PYTHON"
    value = os.environ.get(var)
    if value and Path(value).is_file():
        return Path(value)
    message = f"{var} must name the python of an environment built from {requirements} (see .ci/run); got {value!r}"
    if os.environ.get(f"QDYLORA_REQUIRE_{name.upper()}") == "1":
        pytest.fail(message)
    pytest.skip(message)


def client_env(python: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess of `python`: its bin first on PATH, this checkout's qdylora, offline, 1 thread."""
    env = dict(os.environ)
    env.update(
        PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",  # e.g. axolotl starts `accelerate` from PATH
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def result_of(output: str) -> Any:
    """The JSON a client script printed after `RESULT ` (the rest of its output is logs)."""
    if "RESULT " not in output:
        raise AssertionError("the script printed no RESULT line:\n" + output[-6000:])
    return json.loads(output.split("RESULT ", 1)[1].splitlines()[0])


def start(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """Start `command` with stdout and stderr together, as text (collect it with `wait_all`)."""
    return subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_all(procs: Mapping[str, subprocess.Popen], timeout: float) -> dict[str, tuple[int, str]]:
    """{name: (returncode, output)} of started processes; one that runs past `timeout` s is killed and says so."""
    results = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0] + f"\n[killed after {timeout} s]"
        results[name] = (proc.returncode, output)
    return results
