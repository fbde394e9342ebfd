"""QDyLoraConfig validation and its JSON file."""

import json

import pytest

from qdylora import InputError, QDyLoraConfig
from qdylora.config import default_eval_ranks, read_config_file


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r_min": 0}, "r_min"),
        ({"r_min": 5, "r_max": 4}, "r_max"),
        ({"distribution": "gaussian"}, "uniform, log_uniform"),
        ({"update": "partial"}, "full, frozen"),
        ({"sample_every": "epoch"}, "optimizer_step, micro_batch"),
        ({"ranks": [1, 70], "r_max": 64}, r"\[70\] outside"),
        ({"ranks": []}, "non-empty"),
        ({"eval_ranks": [0, 2]}, r"\[0\] outside"),
        ({"seed": -1}, "seed"),
        ({"truncation": "cut"}, "slice, mask"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QDyLoraConfig(**kwargs)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


def test_defaults_follow_the_paper():
    c = QDyLoraConfig().resolve(r_max=64, seed=3)
    assert (c.r_min, c.r_max, c.distribution, c.update, c.sample_every, c.seed) == (
        1, 64, "uniform", "full", "optimizer_step", 3)
    assert c.candidate_ranks == list(range(1, 65))
    assert c.sweep_ranks == [1, 2, 4, 8, 16, 32, 64]


def test_eval_ranks_spread_and_explicit_sets():
    assert default_eval_ranks(3, 24) == [3, 4, 8, 16, 24]
    c = QDyLoraConfig(ranks=[16, 1, 8]).resolve(64, 0)
    assert c.ranks == [1, 8, 16] and c.candidate_ranks == [1, 8, 16] and c.sweep_ranks == [1, 8, 16]


def test_round_trip_through_the_json_file(tmp_path):
    c = QDyLoraConfig(r_min=2, distribution="log_uniform", ranks=[2, 4, 8], update="frozen").resolve(8, 9)
    sweep = {"results": {"4": {"eval_loss": 1.0}}, "recommended_rank": 4}
    c.save_pretrained(tmp_path, sweep=sweep)
    assert QDyLoraConfig.from_pretrained(tmp_path) == c
    data = read_config_file(tmp_path)
    assert data["sweep"] == sweep and data["qdylora_version"]
    # saving again keeps what it does not replace
    c.save_pretrained(tmp_path)
    assert read_config_file(tmp_path)["sweep"] == sweep


def test_unknown_keys_and_bad_files_are_reported(tmp_path):
    with pytest.raises(InputError, match="unknown QDyLoRA setting"):
        QDyLoraConfig.from_dict({"r_mni": 1})
    with pytest.raises(InputError, match="not trained with qdylora"):
        read_config_file(tmp_path)
    (tmp_path / "qdylora_config.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        read_config_file(tmp_path)
    (tmp_path / "qdylora_config.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(InputError, match="no 'config'"):
        read_config_file(tmp_path)
