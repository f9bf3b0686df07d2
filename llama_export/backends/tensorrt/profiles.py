"""Optimization profiles (min/opt/max shape per input) for a segment: one for prefill, one for decode.

Segment inputs carry symbolic shapes from the manifest: ints, the names "batch", "seq", "past", or
expressions of them ("past + seq"). Each profile gives every name a (min, opt, max) range:

    profile   batch               seq                      past
    prefill   1 .. max_batch      1 .. max_seq_len         0 .. max_seq_len - 1   (opt 0: empty cache)
    decode    1 .. max_batch      1                        0 .. max_seq_len - 1   (opt max_seq_len // 2)

opt batch is max_batch (serving runs full batches), opt prefill seq is max_seq_len // 2 (at least 1).

An expression is evaluated at the min, opt and max corners; one that mixes "past" and "seq" counts cache
positions, which the model caps at max_seq_len (past + seq <= max_seq_len), so its max is clamped there.

`past` may be 0. TensorRT accepts zero-length dimensions in profiles and at run time ("empty tensors",
TensorRT developer guide, "Working with Dynamic Shapes" / "Empty Tensors"); the runner binds a valid
dummy address for such inputs (see runner.py).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llama_export.errors import ArtifactError, ConfigError
from llama_export.artifact.manifest import TensorSpec
from llama_export.artifact.schema import DIM_BATCH, DIM_PAST, DIM_SEQ

KNOWN_DIMS = (DIM_BATCH, DIM_SEQ, DIM_PAST)
PROFILE_NAMES = ("prefill", "decode")  # profile index = position here

Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class Profile:
    """Shapes per input name: min, opt and max, each a tuple of ints."""

    name: str
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()},
        }


def dim_ranges(profile: str, *, max_batch: int, max_seq_len: int) -> dict[str, Range]:
    """(min, opt, max) of each named dimension for `profile` ("prefill" or "decode")."""
    if max_batch < 1 or max_seq_len < 1:
        raise ConfigError(f"max_batch={max_batch} and max_seq_len={max_seq_len} must both be >= 1")
    batch = (1, max_batch, max_batch)
    last_past = max_seq_len - 1
    if profile == "prefill":
        return {DIM_BATCH: batch, DIM_SEQ: (1, max(1, max_seq_len // 2), max_seq_len), DIM_PAST: (0, 0, last_past)}
    if profile == "decode":
        return {DIM_BATCH: batch, DIM_SEQ: (1, 1, 1), DIM_PAST: (0, max_seq_len // 2, last_past)}
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
                if {DIM_PAST, DIM_SEQ} <= dim_names(d):
                    v = min(v, max_seq_len)
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
