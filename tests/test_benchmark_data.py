"""The benchmarks' GSM8K copy is in the repository (a clone needs nothing else), and a missing file is one clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_gsm8k_is_vendored_whole():
    from paper_table import GSM8K_DIR

    assert GSM8K_DIR == BENCHMARKS / "data" / "gsm8k"
    assert "MIT License" in (GSM8K_DIR / "LICENSE").read_text()
    assert "openai/grade-school-math" in (GSM8K_DIR / "SOURCE.md").read_text()
    for name, count in (("train.jsonl", 7473), ("test.jsonl", 1319)):
        records = [json.loads(line) for line in (GSM8K_DIR / name).read_text().splitlines()]
        assert len(records) == count
        assert all(set(r) == {"question", "answer"} and "\n#### " in r["answer"] for r in records)


@pytest.mark.parametrize("script", ["paper_table", "quality"])
def test_missing_data_is_one_clear_error(tmp_path, capsys, script):
    module = __import__(script)
    argv = ["--data-dir", str(tmp_path)] if script == "paper_table" else ["run", "paper", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        module.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / 'train.jsonl'} does not exist" in err and "benchmarks/data/gsm8k" in err
