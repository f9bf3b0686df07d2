"""Graph passes: one contract, `onnx_ir`'s pass infrastructure.

Every pass is an `onnx_ir.passes.InPlacePass` (rewrites the `ir.Model` it is given and returns it) or a
`FunctionalPass` (returns a new model), may declare `requires` (precondition) and `ensures`
(postcondition), and returns an `ir.passes.PassResult` saying whether it changed the graph. A
`Pipeline` runs passes in order; when one fails, the error names that pass and the passes that already
ran, except that our own user-facing errors (`LlamaExportError`, which already say what to do) pass
through unchanged.

The export pipeline (`export/exporter.py`):

    trace ─► CleanupPass ─► RepeatLayersPass ─► NameGraphPass ─► CheckRankGraphPass ─► partition ─► per segment:
             AttachWeightsPass ─► write ─► check_model (onnx.checker on the file)

Backend lowerings are passes of the same kind (`backends/ort/lowering.py`, `backends/tensorrt/lowering.py`,
and the plain-ONNX reference decomposition in `export/reference.py`).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from llama_export.errors import LlamaExportError

log = logging.getLogger(__name__)


def _user_error(e: BaseException) -> LlamaExportError | None:
    cause = e.__cause__
    while cause is not None and not isinstance(cause, LlamaExportError):
        cause = cause.__cause__
    return cause


class Pass:
    """Mixin for our passes: prints as its class name (pipeline errors name passes readably), and a
    user-facing error raised in `requires`/`ensures` reaches the caller unwrapped."""

    def __str__(self) -> str:
        return type(self).__name__

    def __call__(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return super().__call__(model)
        except ir.passes.InvariantError as e:
            cause = _user_error(e)
            if cause is None:
                raise
            raise cause from None


class Pipeline(ir.passes.Sequential):
    """Passes run in order on one model (see the module docstring for how failures are reported)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return super().call(model)
        except ir.passes.PassError as e:
            cause = e.__cause__ if isinstance(e.__cause__, LlamaExportError) else _user_error(e)
            if cause is None:
                raise
            log.debug("%s", e)  # which pass failed, after which passes
            raise cause from None
