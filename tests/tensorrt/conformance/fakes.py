"""Stand-ins for the TensorRT C++ objects that tensorrt.plugin's Python code talks to.

Only C++ objects are faked (their real counterparts need libnvinfer); tensorrt.plugin's Python code
and our plugins run unchanged. Each fake names the real class it stands for (`REAL`), and
`check_fakes.py` asserts that every public name a fake has exists on that class, so a fake cannot
invent API. Shape expressions are small trees that can be evaluated at concrete sizes:

    FakeDimensionExpr     trt.IDimensionExpr   constant or symbol ("batch"), or (op, a, b)
    FakeExprBuilder       trt.IExprBuilder     constant(), operation()
    FakeDimsExprs         trt.DimsExprs        a list of FakeDimensionExpr
    FakeSymExpr           trt.ISymExpr         base of tensorrt.plugin's SymExprImpl (type, dtype, expr)
    FakeKernelLaunchParams  trt.KernelLaunchParams (C++ side, filled by get_launch_params)
    FakeSymExprs          trt.ISymExprs        the extra-argument setter (nbSymExprs, [i] = ...)
    FakePluginRegistry    trt.IPluginRegistry  register_creator(), get_creator()
"""

from __future__ import annotations

from typing import Any

Node = int | str | tuple[str, Any, Any]


class FakeDimensionExpr:
    REAL = "IDimensionExpr"

    def __init__(self, node: Node) -> None:
        self._node = node

    def is_constant(self) -> bool:
        return isinstance(self._node, int)

    def get_constant_value(self) -> int:
        assert isinstance(self._node, int), f"{self!r} is not constant"
        return self._node

    def is_size_tensor(self) -> bool:
        return False

    def _evaluate(self, sizes: dict[str, int]) -> int:
        return _evaluate(self._node, sizes)

    def __repr__(self) -> str:
        return f"Dim({self._node!r})"


_OPS = {
    "SUM": lambda a, b: a + b, "PROD": lambda a, b: a * b, "SUB": lambda a, b: a - b,
    "FLOOR_DIV": lambda a, b: a // b, "CEIL_DIV": lambda a, b: -(-a // b), "MAX": max, "MIN": min,
    "EQUAL": lambda a, b: int(a == b), "LESS": lambda a, b: int(a < b),
}


def _evaluate(node: Node, sizes: dict[str, int]) -> int:
    if isinstance(node, int):
        return node
    if isinstance(node, str):
        return sizes[node]
    op, a, b = node
    return _OPS[op](_evaluate(a, sizes), _evaluate(b, sizes))


class FakeExprBuilder:
    REAL = "IExprBuilder"

    def constant(self, value: int) -> FakeDimensionExpr:
        return FakeDimensionExpr(int(value))

    def operation(self, op: Any, a: FakeDimensionExpr, b: FakeDimensionExpr) -> FakeDimensionExpr:
        if a.is_constant() and b.is_constant():  # TensorRT folds constant expressions too
            return FakeDimensionExpr(_OPS[op.name](a.get_constant_value(), b.get_constant_value()))
        return FakeDimensionExpr((op.name, a._node, b._node))


class FakeDimsExprs(list):
    REAL = "DimsExprs"

    def __init__(self, n: int | list[FakeDimensionExpr] = 0) -> None:
        super().__init__([None] * n if isinstance(n, int) else n)


class FakeSymExpr:
    REAL = "ISymExpr"

    def __init__(self) -> None:
        self.type: Any = None
        self.dtype: Any = None
        self.expr: Any = None


class FakeKernelLaunchParams:
    REAL = "KernelLaunchParams"

    def __init__(self) -> None:
        self.grid_x = self.grid_y = self.grid_z = None
        self.block_x = self.block_y = self.block_z = None
        self.shared_mem = None


class FakeSymExprs:
    REAL = "ISymExprs"

    def __init__(self) -> None:
        self.nbSymExprs = 0
        self._items: dict[int, Any] = {}

    def __setitem__(self, index: int, value: Any) -> None:
        assert 0 <= index < self.nbSymExprs, f"extra arg {index} set beyond nbSymExprs={self.nbSymExprs}"
        self._items[index] = value

    def _values(self) -> list[Any]:
        return [self._items[i] for i in range(self.nbSymExprs)]


class FakePluginRegistry:
    """Plugin creators by (name, version, namespace), matched as onnx-tensorrt's importPluginCreator does."""

    REAL = "IPluginRegistry"

    def __init__(self) -> None:
        self._creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, plugin_namespace: str = "") -> bool:
        assert creator.plugin_namespace == plugin_namespace, "creator registered under another namespace"
        key = (creator.name, creator.plugin_version, creator.plugin_namespace)
        if key in self._creators:
            return False  # as TensorRT: "False if any plugin creator with the same name, version and namespace"
        self._creators[key] = creator
        return True

    def get_creator(self, type: str, version: str, plugin_namespace: str = "") -> Any:  # noqa: A002 (TensorRT's name)
        return self._creators.get((type, version, plugin_namespace))


FAKES = (FakeDimensionExpr, FakeExprBuilder, FakeDimsExprs, FakeSymExpr, FakeKernelLaunchParams, FakeSymExprs,
         FakePluginRegistry)
