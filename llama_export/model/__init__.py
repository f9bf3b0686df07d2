"""The eager reference model and the checkpoint readers."""

from __future__ import annotations


def tensor_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """'2 missing [a, b], 9 unexpected [c, d, e] ...': what a checkpoint holds against its config."""

    def few(names: list[str]) -> str:
        return f"{len(names)} {{}} {names[:3]}{' ...' if len(names) > 3 else ''}"

    parts = [few(missing).format("missing")] if missing else []
    parts += [few(unexpected).format("unexpected")] if unexpected else []
    return ", ".join(parts)
