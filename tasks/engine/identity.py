"""Each stage's code version, derived from the code it runs.

A version id covers the stage's code version (storage.store.version_id), and part reuse covers it too
(the config digest). A hand-written version string is only as good as the memory of whoever edits the
code, so the code version is `<label>+<digest>`: the label (`clean-1`) names the stage for people, and
the digest covers the source of the stage's module and of every project module it imports, directly or
not (`tasks`, `ram_model`, `storage`), read as syntax trees without docstrings: editing a comment, a
docstring or the layout keeps the version; any other edit of code the stage runs makes a new one, so an
upgrade never hands back outputs of older code. Data files (tag lists, configs) are inputs: they enter
versions through the config and parents, not here.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import threading
import time
from pathlib import Path

PROJECT_PACKAGES = ("tasks", "ram_model", "storage")


def code_version(module: str, label: str) -> str:
    """`label+digest` for the stage whose logic lives in `module` (e.g. "tasks.stages.clean", "clean-1")."""
    return f"{label}+{source_digest(module)}"


@functools.lru_cache(maxsize=None)
def source_digest(module: str, packages: tuple[str, ...] = PROJECT_PACKAGES) -> str:
    """A digest of `module` and every module of `packages` it imports, transitively."""
    h = hashlib.sha256()
    for name in sorted(module_closure(module, packages)):
        h.update(name.encode() + b"\0" + _normal_form(read_source(module_file(name))).encode() + b"\0")
    return h.hexdigest()[:12]


def module_file(name: str) -> Path:
    """The source file of a project module, found without importing it (imports would load torch)."""
    path = _find_file(name)
    if path is None:
        raise ImportError(f"code_version: cannot find the source of module {name}")
    return path


def _find_file(name: str) -> Path | None:
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)  # top-level packages only: their __init__ files are light
    if spec is None or not spec.origin:
        return None
    if not rest:
        return Path(spec.origin)
    base = Path(spec.origin).parent.joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


_PARSE_LOCK = threading.Lock()


def parse_source(source: str, filename: str = "<unknown>") -> ast.Module:
    """`ast.parse`, one at a time in this process and retried on CPython's spurious "AST constructor
    recursion depth mismatch" SystemError: CPython 3.11 counts the AST constructor's depth per
    interpreter, so another thread parsing at the same moment (a library's, e.g. Prefect's) can make a
    sound parse fail (python/cpython#106905; seen in our suite on 3.11.7)."""
    for attempt in range(5):
        try:
            with _PARSE_LOCK:
                return ast.parse(source, filename=filename)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def module_closure(module: str, packages: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        tree = parse_source(read_source(path), str(path))
        is_package = path.name == "__init__.py"
        todo += [m for m in _imports(tree, name, is_package, packages) if m not in seen]
    return seen


def imported_names(tree: ast.AST, module: str, is_package: bool = False) -> list[tuple[str, list[str]]]:
    """Every import in a module's tree (function-level ones included) as (absolute module, names taken from
    it): relative imports resolved against `module`; `import a.b` gives ("a.b", [])."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.append((base, [alias.name for alias in node.names]))
    return found


def _imports(tree: ast.AST, name: str, is_package: bool, packages: tuple[str, ...]) -> list[str]:
    """Project modules named by every import in the module (function-level ones included)."""
    found = []
    for base, names in imported_names(tree, name, is_package):
        if not base or base.split(".")[0] not in packages:
            continue
        found.append(base)
        # `from storage import schemas`: a submodule, when there is one
        found += [f"{base}.{n}" for n in names if _find_file(f"{base}.{n}") is not None]
    return found


@functools.lru_cache(maxsize=256)
def _normal_form(source: str) -> str:
    """The syntax tree without docstrings: comments and layout never reach it."""
    tree = parse_source(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)
