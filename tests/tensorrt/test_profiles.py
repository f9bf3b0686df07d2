"""Optimization profile planning from a segment's symbolic input shapes."""

from __future__ import annotations

import pytest

from llama_export.backends.tensorrt import profiles
from llama_export.errors import ArtifactError
from llama_export.artifact.manifest import TensorSpec

INPUTS = (
    TensorSpec("tokens", "int64", ("batch", "seq")),
    TensorSpec("past_key_0", "float16", ("batch", 2, "capacity", 16)),
    TensorSpec("cache_lengths", "int64", ("batch",)),
    TensorSpec("window", "float16", ("batch", 1, "seq", "capacity - seq")),
    TensorSpec("token_lengths", "int64", ("batch",)),
)


def test_prefill_and_decode_profiles() -> None:
    prefill, decode = profiles.plan_profiles(INPUTS, max_batch=4, max_seq_len=64)
    assert prefill.name == "prefill" and decode.name == "decode"
    assert prefill.shapes["tokens"] == ((1, 1), (4, 32), (4, 64))
    # the cache capacity is pinned to max_seq_len in both profiles
    assert prefill.shapes["past_key_0"] == ((1, 2, 64, 16), (4, 2, 64, 16), (4, 2, 64, 16))
    assert prefill.shapes["cache_lengths"] == prefill.shapes["token_lengths"] == ((1,), (4,), (4,))
    assert decode.shapes["cache_lengths"] == decode.shapes["token_lengths"] == ((1,), (4,), (4,))
    assert prefill.shapes["window"] == ((1, 1, 1, 63), (4, 1, 32, 32), (4, 1, 64, 0))
    assert decode.shapes["tokens"] == ((1, 1), (4, 1), (4, 1))
    assert decode.shapes["past_key_0"] == prefill.shapes["past_key_0"]
    assert decode.shapes["window"] == ((1, 1, 1, 63), (4, 1, 1, 63), (4, 1, 1, 63))
    for p in (prefill, decode):
        for name, (lo, opt, hi) in p.shapes.items():
            if name != "window":  # an expression may fall as its names grow
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def test_tiny_limits() -> None:
    prefill, decode = profiles.plan_profiles(INPUTS[:2], max_batch=1, max_seq_len=1)
    assert prefill.shapes["tokens"] == ((1, 1), (1, 1), (1, 1))
    assert decode.shapes["past_key_0"][2] == (1, 2, 1, 16)


def test_unknown_dimension_is_a_clear_error() -> None:
    with pytest.raises(ArtifactError, match=r"\['tokens_len'\].*know only"):
        profiles.plan_profiles((TensorSpec("x", "int64", ("batch", "tokens_len")),), max_batch=1, max_seq_len=8)
    with pytest.raises(ArtifactError, match="may only use"):
        profiles.eval_dim("__import__('os')", {"batch": 1})


def test_choose_profile() -> None:
    ps = profiles.plan_profiles(INPUTS[:2], max_batch=2, max_seq_len=16)
    assert profiles.choose_profile(ps, {"tokens": (2, 1), "past_key_0": (2, 2, 16, 16)}) == 1
    assert profiles.choose_profile(ps, {"tokens": (2, 7), "past_key_0": (2, 2, 16, 16)}) == 0
    with pytest.raises(ArtifactError, match="no optimization profile"):
        profiles.choose_profile(ps, {"tokens": (2, 1), "past_key_0": (2, 2, 8, 16)})  # capacity != max_seq_len
    with pytest.raises(ArtifactError, match="no optimization profile"):
        profiles.choose_profile(ps, {"tokens": (3, 1)})


def test_a_profile_as_build_manifest_json_and_back() -> None:
    import dataclasses
    import json

    from llama_export.backends.tensorrt.build import ProfileRecord
    from llama_export.parsing import parse_json

    p = profiles.plan_profile(INPUTS[:1], "decode", max_batch=2, max_seq_len=8)
    raw = json.dumps(dataclasses.asdict(ProfileRecord.of(p)))
    assert json.loads(raw) == {"name": "decode", "shapes": {"tokens": {"min": [1, 1], "opt": [2, 1], "max": [2, 1]}}}
    assert parse_json(raw, ProfileRecord, source="x", fix="y").profile() == p
