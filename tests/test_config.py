"""The `xattn` config: defaults, validation messages, threshold files."""
import json

import pytest

from vllm_xattn.config import (
    DEFAULT_MIN_SPARSE_TOKENS,
    XAttnConfig,
    load_threshold_table,
    parse_xattn_config,
)


def test_defaults():
    c = parse_xattn_config(None)
    assert (c.stride, c.threshold, c.block_size, c.selection) == (16, 0.98, 128, "threshold")
    assert (c.granularity, c.executor, c.dense_layers) == ("head", "auto", 0)
    assert c.min_sparse_tokens == DEFAULT_MIN_SPARSE_TOKENS
    assert parse_xattn_config({}) == c


@pytest.mark.parametrize(
    "raw, field, words",
    [
        ({"stride": 7}, "stride", "4, 8, 16 or 32"),
        ({"stride": "eight"}, "stride", "4, 8, 16 or 32"),
        ({"threshold": 0}, "threshold", "greater than 0"),
        ({"threshold": 1.01}, "threshold", "less than or equal to 1"),
        ({"block_size": 256}, "block_size", "64 or 128"),
        ({"selection": "best"}, "selection", "'threshold', 'topk' or 'ratio'"),
        ({"selection": "topk"}, "topk", "integer >= 1"),
        ({"selection": "ratio"}, "ratio", "0 < ratio <= 1"),
        ({"selection": "topk", "topk": 0}, "topk", "greater than or equal to 1"),
        ({"ratio": 1.5}, "ratio", "less than or equal to 1"),
        ({"granularity": "group"}, "granularity", "'head' or 'kv_group'"),
        ({"min_sparse_tokens": -1}, "min_sparse_tokens", "greater than or equal to 1"),
        ({"dense_layers": -2}, "dense_layers", "greater than or equal to 0"),
        ({"executor": "fa2"}, "executor", "'auto', 'fa3' or 'flashinfer'"),
        ({"treshold": 0.9}, "treshold", "allowed keys: stride, threshold"),
    ],
)
def test_bad_values_name_field_and_allowed_values(raw, field, words):
    with pytest.raises(ValueError) as e:
        parse_xattn_config(raw)
    msg = str(e.value)
    assert 'additional_config["xattn"]' in msg
    assert field in msg and words in msg, msg


def test_not_a_dict():
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_xattn_config([0.9])


def test_executor_choices():
    for name in ("auto", "fa3", "flashinfer"):
        assert parse_xattn_config({"executor": name}).executor == name


def test_selection_variants():
    assert parse_xattn_config({"selection": "topk", "topk": 4}).topk == 4
    assert parse_xattn_config({"selection": "ratio", "ratio": 0.1}).ratio == 0.1


def test_frozen():
    with pytest.raises(Exception):
        XAttnConfig().stride = 8


def test_threshold_file(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"thresholds": [[0.9, 0.8], [1, 0.5]]}))
    assert parse_xattn_config({"threshold_file": str(good)}).threshold_file == good
    assert load_threshold_table(good) == [[0.9, 0.8], [1.0, 0.5]]

    for name, body, words in [
        ("missing.json", None, "not a readable JSON file"),
        ("ragged.json", {"thresholds": [[0.9], [0.9, 0.9]]}, "equal-length rows"),
        ("range.json", {"thresholds": [[0.9, 1.2]]}, "thresholds[0][1] = 1.2, allowed 0 < tau <= 1"),
        ("shape.json", [0.9], "per layer"),
    ]:
        path = tmp_path / name
        if body is not None:
            path.write_text(json.dumps(body))
        with pytest.raises(ValueError, match="threshold_file") as e:
            parse_xattn_config({"threshold_file": str(path)})
        assert words in str(e.value)


def test_selection_heads_follow_the_granularity():
    assert XAttnConfig().selection_heads(32, 8) == 32
    assert XAttnConfig(granularity="kv_group").selection_heads(32, 8) == 8
