"""Pass: readable, unique names for nodes, values and weights.

    before                                        after
    node_linear_1   (MatMul)                      /model/layers.0/attention/wk/MatMul
    node_view_1     (Reshape)          ──►        /model/layers.0/attention/Reshape_1
    model.layers.0.attention.wk.weight            layers.0.attention.wk.weight
    linear_1        (value)                       /model/layers.0/attention/wk/MatMul_output_0

Node names are module paths taken from the exporter's `pkg.torch.onnx.name_scopes` metadata, then the
op type; a repeated name gets a counter suffix. Graph inputs and outputs keep their names. Weights
(still placeholders, see `trace.py`) lose the tracing wrapper's `model.` prefix, so they carry the
model's parameter names; `passes.weights` later names a transposed weight `<name>_t`.
"""

from __future__ import annotations

import ast
from collections import defaultdict

import onnx

_WRAPPER_PREFIXES = ("model.",)
# Scope the exporter gives nodes that belong to no module (symbolic sizes); shown as the root.
_ANONYMOUS_SCOPES = ("_empty_nn_module_stack_from_metadata_hook",)


def _module_path(node: onnx.NodeProto) -> str:
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
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


def name_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rename in place (and return) nodes, intermediate values and folded weights."""
    g = model.graph
    protected = {v.name for v in g.input} | {v.name for v in g.output}
    used: dict[str, int] = defaultdict(int)
    rename: dict[str, str] = {}
    init_names = {i.name for i in g.initializer}

    for node in g.node:
        path = _module_path(node)
        base = "/" + "/".join(["model", *_components(path), node.op_type])
        n = used[base]
        used[base] += 1
        node.name = base if n == 0 else f"{base}_{n}"
        for i, out in enumerate(node.output):
            if out and out not in protected:
                rename[out] = f"{node.name}_output_{i}"

    taken = set(init_names)
    for init in g.initializer:
        if init.name.startswith(_WRAPPER_PREFIXES) and init.name not in protected:
            new = init.name.split(".", 1)[1]
            if new not in taken:
                rename[init.name] = new
                taken.add(new)

    def r(name: str) -> str:
        return rename.get(name, name)

    for node in g.node:
        node.input[:] = [r(x) for x in node.input]
        node.output[:] = [r(x) for x in node.output]
    for init in g.initializer:
        init.name = r(init.name)
    for vi in g.value_info:
        vi.name = r(vi.name)
    names = [n.name for n in g.node]
    if len(names) != len(set(names)):
        raise AssertionError("naming pass produced duplicate node names")
    return model
