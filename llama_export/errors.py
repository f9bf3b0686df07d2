"""One exception family for llama_export; every message names the problem and the fix."""

from __future__ import annotations


class LlamaExportError(Exception):
    """Base class: a user-facing error whose message says what to do."""


class ConfigError(LlamaExportError, ValueError):
    """A model or parallel configuration that cannot work."""


class ParallelError(ConfigError):
    """A tensor-parallel degree that does not fit the model."""


class CheckpointError(LlamaExportError):
    """A checkpoint that is missing, truncated, or does not match its config."""


class InputError(LlamaExportError, ValueError):
    """Bad run-time input: token ids, prompt length, batch shape."""


class NonFiniteError(LlamaExportError):
    """A model that computed NaN or Inf logits: non-finite weights, or an overflow (fp16)."""


class ArtifactError(LlamaExportError):
    """An export directory or manifest that is incomplete, tampered with or unsafe."""


class OutputError(LlamaExportError):
    """An output destination that cannot be written: a file where a folder is needed, read-only, full,
    or being written by another process."""


class BackendUnavailableError(LlamaExportError):
    """An optional backend whose library is not installed (the message says what to install)."""


class RankFailedError(LlamaExportError):
    """A rank process died or a collective timed out."""


class PeerLostError(RankFailedError):
    """A collective failed on this rank because another rank died, stopped or timed out (the cause is
    elsewhere: the launcher names the rank that caused it)."""
