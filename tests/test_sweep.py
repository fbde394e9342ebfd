"""Rank recommendation, refinement and the sweep's files."""

import json

import pytest

from qdylora import InputError
from qdylora.trainer_ext.sweep import SweepResult, recommend_rank, refine_ranks, save_sweep


def test_recommends_the_smallest_rank_within_tolerance():
    losses = {1: 1.10, 2: 1.02, 4: 1.005, 8: 1.00, 16: 0.999, 64: 1.03}
    assert recommend_rank(losses, 0.01) == 4  # 1.005 <= 0.999 * 1.01; 1.02 is not
    assert recommend_rank(losses, 0.0) == 16
    assert recommend_rank(losses, 0.2) == 1
    assert recommend_rank({1: 0.5, 2: 0.9}, 0.1, greater_is_better=True) == 2
    with pytest.raises(InputError):
        recommend_rank({}, 0.01)


def test_refine_looks_between_the_best_coarse_neighbours():
    assert refine_ranks({1: 3.0, 2: 2.0, 4: 1.0, 8: 1.5, 16: 2.0}, 1, 16) == [3, 5, 6, 7]
    assert refine_ranks({1: 1.0, 4: 2.0}, 1, 8) == [2, 3]
    assert refine_ranks({2: 2.0, 8: 1.0}, 1, 8) == [3, 4, 5, 6, 7]


def test_results_round_trip_and_files(tmp_path):
    result = SweepResult({1: {"eval_loss": 2.0}, 4: {"eval_loss": 1.5}, 8: {"eval_loss": 1.49}}, tolerance=0.01)
    assert result.recommended_rank == 4 and result.best_rank == 8
    again = SweepResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    json_path, png = save_sweep(result, tmp_path)
    assert json.loads(json_path.read_text())["recommended_rank"] == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.table()
    assert "<- recommended" in table.splitlines()[2] and "(best)" in table.splitlines()[3]
