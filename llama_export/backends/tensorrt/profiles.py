"""Optimization profiles (min/opt/max shape per input) for a segment: one for prefill, one for decode.

Segment inputs carry symbolic shapes from the manifest: ints, the names "batch", "seq", "capacity"
(`artifact/schema.py`), or expressions of them. Each profile gives every name a (min, opt, max) range:

    profile   batch               seq                      capacity (KV cache slots per row)
    prefill   1 .. max_batch      1 .. max_seq_len         max_seq_len
    decode    1 .. max_batch      1                        max_seq_len

opt batch is max_batch (serving runs full batches), opt prefill seq is max_seq_len // 2 (at least 1).
The v2 graph inputs are covered by these names: tokens [batch, seq], cache_lengths and token_lengths
[batch] (int64), past_* [batch, kv_heads, capacity, head_dim]. The capacity is pinned to max_seq_len,
the build's `--max-seq-len` (default the model's): TensorRT's KV-cache-update layer (what the ONNX
TensorScatter of the lowered attention becomes) wants a static cache length, so the runner allocates
TensorRT caches of that length (the manifest beside the engines records it: `build.engines_manifest`). Tested on the
segments of real exports (tests/tensorrt/test_lowering.py); unverified here: no TensorRT build ran in
this project's environment.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llama_export.errors import ArtifactError, ConfigError
from llama_export.artifact.manifest import TensorSpec
from llama_export.artifact.schema import DIM_BATCH, DIM_CAPACITY, DIM_SEQ

KNOWN_DIMS = (DIM_BATCH, DIM_SEQ, DIM_CAPACITY)
PROFILE_NAMES = ("prefill", "decode")  # profile index = position here

Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class Profile:
    """Shapes per input name: min, opt and max, each a tuple of ints."""

    name: str
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def dim_ranges(profile: str, *, max_batch: int, max_seq_len: int) -> dict[str, Range]:
    """(min, opt, max) of each named dimension for `profile` ("prefill" or "decode")."""
    if max_batch < 1 or max_seq_len < 1:
        raise ConfigError(f"max_batch={max_batch} and max_seq_len={max_seq_len} must both be >= 1")
    batch = (1, max_batch, max_batch)
    capacity = (max_seq_len, max_seq_len, max_seq_len)
    if profile == "prefill":
        return {DIM_BATCH: batch, DIM_SEQ: (1, max(1, max_seq_len // 2), max_seq_len), DIM_CAPACITY: capacity}
    if profile == "decode":
        return {DIM_BATCH: batch, DIM_SEQ: (1, 1, 1), DIM_CAPACITY: capacity}
    raise ConfigError(f"unknown profile {profile!r}; use one of {PROFILE_NAMES}")


_ALLOWED = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Name, ast.Load, ast.Constant)


def dim_names(dim: int | str) -> frozenset[str]:
    """Names used by one symbolic dimension; raises ArtifactError on anything but + - * // of names/ints."""
    if isinstance(dim, int):
        return frozenset()
    try:
        tree = ast.parse(dim, mode="eval")
    except SyntaxError:
        raise ArtifactError(f"shape dimension {dim!r} is not an expression of {KNOWN_DIMS}") from None
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED) or (isinstance(node, ast.Constant) and type(node.value) is not int):
            raise ArtifactError(f"shape dimension {dim!r} may only use + - * // on {KNOWN_DIMS} and ints")
        if isinstance(node, ast.Name):
            names.add(node.id)
    unknown = names - set(KNOWN_DIMS)
    if unknown:
        raise ArtifactError(
            f"shape dimension {dim!r} uses {sorted(unknown)}; the TensorRT profiles know only {KNOWN_DIMS}"
        )
    return frozenset(names)


def eval_dim(dim: int | str, env: Mapping[str, int]) -> int:
    """Value of one dimension with the names bound by `env`."""
    if isinstance(dim, int):
        return dim
    dim_names(dim)  # validates
    value = eval(compile(ast.parse(dim, mode="eval"), "<dim>", "eval"), {"__builtins__": {}}, dict(env))  # noqa: S307
    return int(value)


def plan_profile(
    inputs: Sequence[TensorSpec], profile: str, *, max_batch: int, max_seq_len: int
) -> Profile:
    """Min/opt/max shapes of every input of one segment for `profile`."""
    ranges = dim_ranges(profile, max_batch=max_batch, max_seq_len=max_seq_len)
    corners = [{k: r[i] for k, r in ranges.items()} for i in range(3)]
    shapes = {}
    for spec in inputs:
        per_corner = []
        for env in corners:
            dims = []
            for d in spec.shape:
                v = eval_dim(d, env)
                if v < 0:
                    raise ArtifactError(f"input {spec.name!r}: dimension {d!r} is negative ({v}) for {env}")
                dims.append(v)
            per_corner.append(tuple(dims))
        shapes[spec.name] = (per_corner[0], per_corner[1], per_corner[2])
    return Profile(name=profile, shapes=shapes)


def plan_profiles(inputs: Sequence[TensorSpec], *, max_batch: int, max_seq_len: int) -> tuple[Profile, ...]:
    """The prefill and decode profiles (in that order: profile index 0 and 1 of every engine)."""
    return tuple(plan_profile(inputs, p, max_batch=max_batch, max_seq_len=max_seq_len) for p in PROFILE_NAMES)


def choose_profile(profiles: Sequence[Profile], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose ranges contain every given input shape (decode preferred for seq 1)."""
    order = sorted(range(len(profiles)), key=lambda i: profiles[i].name != "decode")
    for i in order:
        p = profiles[i]
        if all(
            name in p.shapes
            and len(shape) == len(p.shapes[name][0])
            and all(lo <= v <= hi for v, lo, hi in zip(shape, p.shapes[name][0], p.shapes[name][2]))
            for name, shape in shapes.items()
        ):
            return i
    raise ArtifactError(f"input shapes {dict(shapes)} fit no optimization profile of this engine")
