"""Rank recommendation, refinement and the sweep's files."""

import json

import pytest

from qdylora import InputError
from qdylora.sweep_result import SweepResult, recommend_rank, refine_ranks, save_sweep


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


BY_METHOD = {
    "prefix": {1: {"eval_loss": 3.0}, 2: {"eval_loss": 2.0}, 4: {"eval_loss": 1.2}, 8: {"eval_loss": 1.0}},
    "svd": {1: {"eval_loss": 2.0}, 2: {"eval_loss": 1.009}, 4: {"eval_loss": 1.001}, 8: {"eval_loss": 1.0}},
}


def test_two_methods_recommend_a_rank_and_method(tmp_path):
    result = SweepResult({}, by_method=BY_METHOD, tolerance=0.01)
    assert result.methods == ["prefix", "svd"] and result.method == "prefix"
    assert result.results is result.by_method["prefix"]  # old readers see the first method
    # best 1.0 (rank 8, both; the earlier method wins the tie); within 1%: svd at 2 (1.009)
    assert result.best == (8, "prefix")
    assert (result.recommended_rank, result.recommended_method) == (2, "svd")
    assert result.recommend("prefix") == (8, "prefix")
    assert SweepResult({}, by_method=BY_METHOD, tolerance=0.005).recommend() == (4, "svd")
    # AURAC: trapezoids over log2 rank 0, 1, 2, 3, divided by 3
    assert result.aurac("prefix") == pytest.approx(((3.0 + 2.0) / 2 + (2.0 + 1.2) / 2 + (1.2 + 1.0) / 2) / 3)
    assert result.aurac("svd") < result.aurac("prefix")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["recommended_method"] == "svd" and set(data["methods"]) == {"prefix", "svd"}
    assert data["results"] == data["methods"]["prefix"] and data["recommended_rank"] == 2
    assert data["aurac"]["svd"] == pytest.approx(result.aurac("svd"))
    assert SweepResult.from_dict(data) == result
    table = result.table().splitlines()
    assert "prefix" in table[0] and "svd" in table[0]
    assert "<- recommended (svd)" in table[2] and "(best: prefix)" in table[4]
    assert table[-1].split()[0] == "AURAC" and len(table[-1].split()) == 3
    json_path, png = save_sweep(result, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_old_sweep_files_read_as_prefix():
    old = {"metric": "eval_loss", "tolerance": 0.01, "recommended_rank": 4, "best_rank": 8,
           "results": {"1": {"eval_loss": 2.0}, "4": {"eval_loss": 1.5}, "8": {"eval_loss": 1.49}}}
    result = SweepResult.from_dict(old)
    assert result.methods == ["prefix"] and (result.recommended_rank, result.recommended_method) == (4, "prefix")
    assert result.values() == {1: 2.0, 4: 1.5, 8: 1.49}


def test_greater_is_better_across_methods():
    vals = {"prefix": {1: 0.5, 4: 0.9}, "svd": {1: 0.895, 4: 0.9}}
    from qdylora.config import check_methods
    from qdylora.sweep_result import aurac, recommend

    assert recommend(vals, 0.01, greater_is_better=True) == (1, "svd")
    assert recommend(vals, 0.001, greater_is_better=True) == (4, "prefix")
    assert aurac({4: 2.0}) == 2.0
    assert check_methods("prefix, SVD,prefix") == ["prefix", "svd"]
    with pytest.raises(InputError, match="'pca' is not allowed"):
        check_methods("prefix,pca")


def test_results_are_prefix_when_measured_for_old_readers():
    result = SweepResult({}, by_method={"svd": BY_METHOD["svd"], "prefix": BY_METHOD["prefix"]}, method="prefix")
    assert result.methods == ["svd", "prefix"] and result.results == BY_METHOD["prefix"]
    assert result.to_dict()["results"]["8"] == {"eval_loss": 1.0} and result.to_dict()["method"] == "prefix"
    assert SweepResult.from_dict(result.to_dict()).results == BY_METHOD["prefix"]
