"""Generation: turning a rank's step function into tokens.

`generate.py` is the loop of one batch (prefill in groups of similar length, then one token per row
per step; sampling), which `run`, `eval` and the comparison use. `engine.py` is the long-lived engine:
opened once on a model, it admits requests into KV cache slots as they come and runs one step for all of
them (continuous batching), behind a thread-safe Python API:

    from llama_export.engine import open_engine
    from llama_export.runner.source import ModelSource
    with open_engine(ModelSource(Backend.ORT, artifacts=path).resolve(), slots=8) as engine:
        engine.generate(["def ", "class "], max_tokens=32)

It sits above `runner` (rank processes, the step across segments and collectives) and below the
commands that use it (`commands/`, `validate/`).
"""

from llama_export.engine.engine import Completion, Engine, Handle, Request, open_engine

__all__ = ["Completion", "Engine", "Handle", "Request", "open_engine"]
