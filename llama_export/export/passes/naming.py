"""Pass: readable, unique names for nodes, values and weights.

    before                                        after
    node_linear_1   (MatMul)                      /model/layers.0/attention/wk/MatMul
    node_view_1     (Reshape)          ──►        /model/layers.0/attention/Reshape_1
    model.layers.0.attention.wk.weight            layers.0.attention.wk.weight
    linear_1        (value)                       /model/layers.0/attention/wk/MatMul_output_0

Node names are module paths taken from the exporter's `pkg.torch.onnx.name_scopes` metadata, then the
op type; a repeated name gets a counter suffix. Graph inputs and outputs keep their names. Weights
(still placeholders) lose the tracing wrapper's `model.` prefix, so they carry the model's parameter
names; `passes.weights` later names a transposed weight `<name>_t`. Constants the cleanup folded into
initializers (named by the exporter's value counter, e.g. `val_142`) are named after their first reader:
`/model/Range_input_0`.
"""

from __future__ import annotations

import ast
from collections import defaultdict

import onnx_ir as ir

from llama_export.export.passes import Pass
from llama_export.export.passes.placeholders import is_placeholder

_WRAPPER_PREFIXES = ("model.",)
# Scope the exporter gives nodes that belong to no module (symbolic sizes); shown as the root.
_ANONYMOUS_SCOPES = ("_empty_nn_module_stack_from_metadata_hook",)


def module_path(node: ir.Node) -> str:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return ""
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return ""
    path = parts[-2] if len(parts) >= 2 else ""
    if path in _ANONYMOUS_SCOPES:
        return ""
    for prefix in _WRAPPER_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    else:
        if path == "model":
            path = ""
    return path


def _components(path: str) -> list[str]:
    """'layers.0.attention.wq' -> ['layers.0', 'attention', 'wq']"""
    out: list[str] = []
    for part in path.split(".") if path else []:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}.{part}"
        else:
            out.append(part)
    return out


class NameGraphPass(Pass, ir.passes.InPlacePass):
    """Rename nodes, intermediate values and weights as the module docstring shows."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        protected = {id(v) for v in (*g.inputs, *g.outputs)}
        used: dict[str, int] = defaultdict(int)
        for node in g:
            base = "/" + "/".join(["model", *_components(module_path(node)), node.op_type])
            n = used[base]
            used[base] += 1
            node.name = base if n == 0 else f"{base}_{n}"
            for i, out in enumerate(node.outputs):
                if id(out) not in protected:
                    out.name = f"{node.name}_output_{i}"
        order = list(g.initializers.values())
        position = {node: i for i, node in enumerate(g)}
        for value in order:
            if id(value) in protected:
                continue
            new = None
            if value.name.startswith(_WRAPPER_PREFIXES):
                new = value.name.split(".", 1)[1]
            elif not is_placeholder(value) and value.uses():
                reader, index = min(value.uses(), key=lambda use: (position[use[0]], use[1]))
                new = f"{reader.name}_input_{index}"
            if new is not None and new not in g.initializers:
                value.name = new
        # Renaming moves an initializer to the end of the graph's table; keep the traced order.
        g.initializers.clear()
        for value in order:
            g.initializers[value.name] = value
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        names = [n.name for n in model.graph]
        if len(names) != len(set(names)):
            raise ValueError("naming produced duplicate node names")
