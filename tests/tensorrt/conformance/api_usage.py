"""Every tensorrt / tensorrt.plugin name the package uses, read from its source, checked against the package.

`check_sources(files, trt)` parses each file (AST) and follows TensorRT values through the code with a
small type inference, using the live modules for every answer:

    trt, trtp                       the modules (`trt = import_tensorrt()`, `import tensorrt.plugin as trtp`)
    trt.X / Class.X / obj.X         the attribute must exist (module attribute, class member, enum member,
                                    method or property; an instance attribute for tensorrt.plugin's
                                    Python classes); stored attributes too
    f(...)                          positional count and keyword names must bind to one signature:
                                    pybind11 docstrings ("name(self: T, a: A, b: B = ...) -> R", every
                                    overload) or inspect.signature for Python code; literal and TensorRT
                                    arguments must match the declared type
    results                         typed by the docstring's return type (Builder.create_builder_config
                                    -> IBuilderConfig), by constructors, by our own annotations
                                    (`runtime: trt.Runtime`, `-> trt.IExecutionContext`, `seg: _Segment`)
                                    and by the `self.x = ...` assignments of our classes

A value the inference cannot type (an untyped parameter, a torch tensor) is not checked: annotate
TensorRT parameters. `getattr` / `hasattr` on a TensorRT value with a computed name is a problem, as it
cannot be checked, except `getattr(x, name, default)`: a lookup that handles absence itself, listed in
`Report.dynamic` (the names it reads need their own check). Returns the uses found and the problems,
each naming file:line.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BINDINGS = "tensorrt_bindings.tensorrt."
# Python literal types a pybind11 parameter type accepts (bool is an int, as in pybind11).
_LITERALS: dict[str, type | tuple[type, ...]] = {
    "bool": bool, "int": int, "SupportsInt": int, "float": (float, int), "SupportsFloat": (float, int),
    "str": str, "bytes": bytes, "Buffer": bytes,
}


@dataclass(frozen=True)
class T:
    """An inferred type: `kind` is "module", "class" (the class object), "inst" (an instance of `obj`),
    "func" (a module-level callable), "method" (`obj` is the class, `name` the method) or "ours"
    (`obj` is one of the scanned classes), "container" (`obj` the element type)."""

    kind: str
    obj: Any
    name: str = ""


@dataclass
class Report:
    uses: set[tuple[str, str]] = field(default_factory=set)  # (owner, attribute)
    problems: list[str] = field(default_factory=list)
    dynamic: list[str] = field(default_factory=list)  # file:line of getattr(x, computed, default)


# ---- pybind11 signatures -----------------------------------------------------------------------------


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(<{":
            depth += 1
        elif ch in "])>}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


@dataclass(frozen=True)
class Overload:
    params: tuple[tuple[str, str, bool], ...]  # (name, type text, has default), self excluded
    returns: str

    def bind(self, n_pos: int, keywords: list[str]) -> str | None:
        if n_pos > len(self.params):
            return f"takes {len(self.params)} positional arguments, got {n_pos}"
        names = [p[0] for p in self.params]
        for k in keywords:
            if k not in names or re.fullmatch(r"arg\d+", k):
                return f"has no keyword {k!r} (parameters: {', '.join(names)})"
            if names.index(k) < n_pos:
                return f"got {k!r} both positionally and by keyword"
        missing = [p[0] for p in self.params[n_pos:] if not p[2] and p[0] not in keywords]
        return f"misses required {missing}" if missing else None


def pybind_overloads(fn: Any, name: str, *, method: bool) -> list[Overload] | None:
    """Signatures from a pybind11 docstring, or None when `fn` has none (then it is Python code)."""
    doc = getattr(fn, "__doc__", None) or ""
    found = []
    for m in re.finditer(r"^(?:\d+\. )?" + re.escape(name) + r"\((.*)\) -> (.*)$", doc, re.M):
        args = _split_top(m.group(1))
        if args == ["*args", "**kwargs"]:
            continue
        params = []
        for a in args[1:] if method else args:
            pname, _, rest = a.partition(":")
            params.append((pname.strip(), rest.split("=")[0].strip(), "=" in rest))
        found.append(Overload(tuple(params), m.group(2).strip()))
    return found or None


# ---- the checker --------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, trt: Any, trtp: Any, report: Report) -> None:
        self.trt, self.trtp, self.report = trt, trtp, report
        self.classes: dict[str, ast.ClassDef] = {}
        self.attrs: dict[str, dict[str, T | None]] = {}  # our class -> self.<attr> -> type
        self.where = ""
        self.final = False

    # -- reporting
    def problem(self, node: ast.AST, msg: str) -> None:
        if self.final:
            self.report.problems.append(f"{self.where}:{getattr(node, 'lineno', '?')}: {msg}")

    def use(self, owner: str, name: str) -> None:
        if self.final:
            self.report.uses.add((owner, name))

    # -- type helpers
    def module_type(self, name: str) -> T | None:
        return {"trt": T("module", self.trt), "trtp": T("module", self.trtp)}.get(name)

    def of_object(self, obj: Any, owner_cls: type | None = None) -> T | None:
        if obj is self.trt or obj is self.trtp:
            return T("module", obj)
        if isinstance(obj, types.ModuleType):
            return None  # e.g. tensorrt.plugin.op: a namespace of registered plugins, not API
        if isinstance(obj, type):
            return T("class", obj)
        if owner_cls is not None and isinstance(obj, owner_cls):
            return T("inst", owner_cls)  # an enum member
        if callable(obj):
            return T("func", obj)
        return T("inst", type(obj)) if type(obj).__module__.startswith("tensorrt") else None

    def resolve_text(self, text: str) -> T | None:
        m = re.search(re.escape(_BINDINGS) + r"([\w.]+)", text)
        if m is None:
            return None
        obj: Any = self.trt
        for part in m.group(1).split("."):
            obj = getattr(obj, part, None)
        return T("inst", obj) if isinstance(obj, type) else None

    def annotation(self, node: ast.AST | None, env: dict[str, T | None]) -> T | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self.annotation(ast.parse(node.value, mode="eval").body, env)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.annotation(node.left, env) or self.annotation(node.right, env)
        if isinstance(node, ast.Name) and node.id in self.classes:
            return T("ours", node.id)
        if isinstance(node, ast.Subscript):  # dict[K, V], list[V], tuple[V, ...]
            base = node.value.id if isinstance(node.value, ast.Name) else ""
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if base in ("dict", "list", "tuple", "Sequence"):
                elem = self.annotation(args[-1] if base == "dict" else args[0], env)
                return T("container", elem) if elem else None
            return None
        t = self.expr(node, {**env, "trt": self.module_type("trt"), "trtp": self.module_type("trtp")})
        return T("inst", t.obj) if t and t.kind == "class" else None

    # -- attribute access
    def attribute(self, node: ast.Attribute, base: T | None) -> T | None:
        name = node.attr
        if base is None:
            return None
        if base.kind == "ours":
            cls = self.classes[base.obj]
            for item in cls.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return T("ours_method", item)
            return self.attrs.get(base.obj, {}).get(name)
        if base.kind == "module":
            owner = base.obj.__name__
            self.use(owner, name)
            if not hasattr(base.obj, name):
                self.problem(node, f"{owner} has no attribute {name!r}")
                return None
            return self.of_object(getattr(base.obj, name))
        if base.kind in ("class", "inst"):
            cls = base.obj
            owner = f"{'tensorrt.plugin' if '.plugin' in cls.__module__ else 'tensorrt'}.{cls.__qualname__}"
            self.use(owner, name)
            if not (hasattr(cls, name) or (base.kind == "inst" and name in _instance_attributes(cls))):
                self.problem(node, f"{owner} has no attribute {name!r}")
                return None
            member = inspect.getattr_static(cls, name, None)
            if base.kind == "class":
                return self.of_object(getattr(cls, name), owner_cls=cls)
            if isinstance(member, property) and inspect.isfunction(member.fget):
                ret = inspect.signature(member.fget).return_annotation
                return T("inst", ret) if isinstance(ret, type) and ret.__module__.startswith("tensorrt") else None
            if callable(getattr(cls, name, None)) and not isinstance(member, property):
                return T("method", cls, name)
            return None
        return None

    # -- calls
    def call(self, node: ast.Call, ft: T | None, env: dict[str, T | None]) -> T | None:
        arg_types = [self.expr(a, env) for a in node.args]
        kw_types = {k.arg: self.expr(k.value, env) for k in node.keywords if k.arg}
        if isinstance(node.func, ast.Name) and node.func.id == "import_tensorrt":
            return T("module", self.trt)
        if ft is None:
            return None
        if ft.kind == "ours_method":
            return self.annotation(ft.obj.returns, env)
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return None  # *args / **kwargs: arity unknown
        if ft.kind == "class":
            fn, name, method, result = ft.obj.__init__, "__init__", True, T("inst", ft.obj)
        elif ft.kind == "method":
            fn, name, method, result = getattr(ft.obj, ft.name), ft.name, True, None
        elif ft.kind == "func":
            fn, name, method, result = ft.obj, getattr(ft.obj, "__name__", ""), False, None
        else:
            return None
        overloads = pybind_overloads(fn, name, method=method)
        literal = [a.value if isinstance(a, ast.Constant) else _UNKNOWN for a in node.args]
        if overloads is None:  # Python code (tensorrt.plugin, tensorrt/__init__.py)
            try:
                sig = inspect.signature(ft.obj if ft.kind != "method" else fn)
                sig.bind(*(["self"] if ft.kind == "method" else []), *literal, **{k: _UNKNOWN for k in kw_types})
            except TypeError as e:
                self.problem(node, f"{_label(ft)}(...) does not match {sig}: {e}")
            except ValueError:
                pass  # no signature available
            return result
        errors = []
        for ov in overloads:
            err = ov.bind(len(node.args), list(kw_types)) or self.types_match(ov, arg_types, kw_types, node)
            if err is None:
                return result or self.resolve_text(ov.returns)
            errors.append(err)
        self.problem(node, f"{_label(ft)}(...) matches no TensorRT 11.4 signature: {'; '.join(errors)}")
        return result

    def types_match(self, ov: Overload, pos: list[T | None], kw: dict[str, T | None], node: ast.Call) -> str | None:
        declared = dict((n, t) for n, t, _ in ov.params)
        pairs = [(ov.params[i][0], a, t) for i, (a, t) in enumerate(zip(node.args, pos))]
        pairs += [(k.arg, k.value, kw[k.arg]) for k in node.keywords]
        for pname, arg, t in pairs:
            want = declared[pname]
            if isinstance(arg, ast.Constant) and arg.value is not None:
                accepted = [_LITERALS[w] for w in re.findall(r"\w+", want) if w in _LITERALS]
                if not accepted and _BINDINGS not in want:
                    continue  # a type we cannot judge (object, typing.Any, ...)
                if not any(isinstance(arg.value, t) for t in accepted):
                    return f"{pname} wants {want}, got {type(arg.value).__name__}"
            elif t is not None and t.kind == "inst" and isinstance(t.obj, type) and _BINDINGS in want:
                expected = self.resolve_text(want)
                if expected is not None and not issubclass(t.obj, expected.obj):
                    return f"{pname} wants {want}, got {t.obj.__qualname__}"
        return None

    # -- expressions
    def expr(self, node: ast.AST | None, env: dict[str, T | None]) -> T | None:
        if node is None:
            return None
        if isinstance(node, ast.Name):
            return env.get(node.id) if node.id in env else self.module_type(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(node, self.expr(node.value, env))
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") and node.args:
                base = self.expr(node.args[0], env)
                if base is not None and base.kind in ("module", "class", "inst"):
                    name = node.args[1] if len(node.args) > 1 else None
                    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                        if node.func.id == "getattr" and len(node.args) == 3:
                            if self.final:
                                self.report.dynamic.append(f"{self.where}:{node.lineno}")
                        else:
                            self.problem(node, f"{node.func.id} on a TensorRT value with a computed name cannot be checked")
                        for a in node.args[1:]:
                            self.expr(a, env)
                        return None
                    fake = ast.Attribute(value=node.args[0], attr=name.value, ctx=ast.Load(), lineno=node.lineno)
                    return self.attribute(fake, base)
            return self.call(node, self.expr(node.func, env), env)
        if isinstance(node, ast.Subscript):
            base = self.expr(node.value, env)
            self.expr(node.slice, env)
            return base.obj if base is not None and base.kind == "container" else None
        if isinstance(node, ast.Lambda):
            return None
        for child in ast.iter_child_nodes(node):
            self.expr(child, env)
        return None

    # -- statements
    def assign(self, target: ast.AST, t: T | None, env: dict[str, T | None], cls: str | None) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = t
        elif isinstance(target, ast.Attribute):
            if isinstance(target.value, ast.Name) and target.value.id == "self" and cls:
                self.attrs.setdefault(cls, {})[target.attr] = t or self.attrs.get(cls, {}).get(target.attr)
            else:
                self.attribute(target, self.expr(target.value, env))
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.assign(elt, None, env, cls)

    def body(self, stmts: list[ast.stmt], env: dict[str, T | None], cls: str | None) -> None:
        for st in stmts:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.function(st, dict(env), cls if cls and st in self.classes[cls].body else None)
            elif isinstance(st, ast.ClassDef):
                self.body(st.body, dict(env), st.name)
            elif isinstance(st, ast.Assign):
                t = self.expr(st.value, env)
                for target in st.targets:
                    self.assign(target, t, env, cls)
            elif isinstance(st, ast.AnnAssign):
                t = self.expr(st.value, env) if st.value is not None else None
                self.assign(st.target, self.annotation(st.annotation, env) or t, env, cls)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                for a in st.names:
                    full = a.name if isinstance(st, ast.Import) else f"{st.module}.{a.name}"
                    if full in ("tensorrt", "tensorrt.plugin"):
                        env[a.asname or a.name] = T("module", self.trt if full == "tensorrt" else self.trtp)
            elif isinstance(st, (ast.For, ast.AsyncFor)):
                self.expr(st.iter, env)
                self.assign(st.target, None, env, cls)
                self.body(st.body + st.orelse, env, cls)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                for item in st.items:
                    self.expr(item.context_expr, env)
                self.body(st.body, env, cls)
            elif isinstance(st, ast.Try):
                self.body(st.body + [s for h in st.handlers for s in h.body] + st.orelse + st.finalbody, env, cls)
            elif isinstance(st, (ast.If, ast.While)):
                self.expr(st.test, env)
                self.body(st.body + st.orelse, env, cls)
            else:
                for child in ast.iter_child_nodes(st):
                    if isinstance(child, ast.expr):
                        self.expr(child, env)

    def function(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, env: dict[str, T | None], cls: str | None) -> None:
        for d in fn.decorator_list:
            self.expr(d, env)
        args = fn.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            env[a.arg] = T("ours", cls) if a.arg == "self" and cls else self.annotation(a.annotation, env)
            if a.arg in ("trt", "trtp") and env[a.arg] is None:
                env[a.arg] = self.module_type(a.arg)  # by convention the tensorrt modules
        self.annotation(fn.returns, env)
        self.body(fn.body, env, cls)


class _Unknown:
    def __repr__(self) -> str:
        return "<value>"


_UNKNOWN = _Unknown()


def _label(t: T) -> str:
    if t.kind == "method":
        return f"{t.obj.__qualname__}.{t.name}"
    return getattr(t.obj, "__qualname__", getattr(t.obj, "__name__", str(t.obj)))


def _instance_attributes(cls: type) -> set[str]:
    """Attributes a Python class's __init__ assigns on self (tensorrt.plugin's classes set them there)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        except (OSError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return names


def check_sources(files: list[Path], trt: Any, trtp: Any) -> Report:
    """Check every TensorRT use in `files` against the imported `trt` / `trtp` modules."""
    report = Report()
    for path in files:
        checker = _Checker(trt, trtp, report)
        checker.where = path.name
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        checker.classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for final in (False, False, True):  # two passes to learn self.<attr> types, then report
            checker.final = final
            checker.body(tree.body, {}, None)
    report.problems = list(dict.fromkeys(report.problems))
    report.dynamic = list(dict.fromkeys(report.dynamic))
    return report
