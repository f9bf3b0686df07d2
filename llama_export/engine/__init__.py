"""Generation: turning a rank's step function into tokens.

`engine.py` is the one generation loop: opened on a model, it admits requests into KV cache slots as
they come and runs one step for all of them (continuous batching, prompts prefilled in grouped chunks),
on a thread of its own behind a thread-safe Python API, or driven by its caller (`run`'s rank processes,
`eval`'s scoring requests, `batch.generate`: one batch). `generate.py` holds what it is made of
(sampling, prompt checks, prefill grouping, one step on cache rows):

    from llama_export.engine import open_engine
    from llama_export.runner.source import ModelSource
    with open_engine(ModelSource(Backend.ORT, artifacts=path).resolve(), slots=8) as engine:
        engine.generate(["def ", "class "], max_tokens=32)

It sits above `runner` (rank processes, the step across segments and collectives) and below the
commands that use it (`commands/`, `validate/`).
"""

from llama_export.engine.engine import Completion, Engine, Handle, Request, open_engine

__all__ = ["Completion", "Engine", "Handle", "Request", "open_engine"]
