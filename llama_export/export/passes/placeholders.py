"""The weight-placeholder contract between tracing and the weights pass.

A traced graph holds no weights: every initializer is an `ir.ExternalTensor` whose location is
`WEIGHTS_PLACEHOLDER` (dtype and shape as the parameter's). `passes.weights.AttachWeightsPass` replaces
each one with the checkpoint's tensor when its segment is written; passes that run before it must
not read or fold a placeholder (`reads_placeholder`).
"""

from __future__ import annotations

import onnx_ir as ir

WEIGHTS_PLACEHOLDER = "__llama_export_weights_not_attached__"


def make_placeholder(value: ir.Value) -> None:
    """Replace `value`'s tensor by a placeholder of the same name, dtype and shape."""
    cv = value.const_value
    value.const_value = ir.ExternalTensor(
        WEIGHTS_PLACEHOLDER, offset=0, length=cv.nbytes, dtype=cv.dtype, shape=cv.shape, name=value.name)


def is_placeholder(value: ir.Value | None) -> bool:
    cv = value.const_value if value is not None else None
    return cv is not None and getattr(cv, "location", None) == WEIGHTS_PLACEHOLDER


def reads_placeholder(node: ir.Node) -> bool:
    return any(is_placeholder(v) for v in node.inputs)


def placeholder_names(model: ir.Model) -> list[str]:
    return [name for name, v in model.graph.initializers.items() if is_placeholder(v)]
