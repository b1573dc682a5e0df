"""What a version is: the identity the runner computes from what a stage declares.

A version id (storage.store.version_id) covers the stage, the store's file format, the config fields the
stage reads, its inputs and the code that computes it; part reuse covers the same minus the inputs read
part by part. This module computes the code part and the content digests of inputs named by path.

Code. A hand-written version string is only as good as the memory of whoever edits the code, so a stage's
code version is `<label>+<digest>`: the label (`clean-3`) names it for people, and the digest covers the
source of the stage's module, of the modules it declares it runs (`Stage.code`, the stages of `Stage.runs`)
and of every project module they import, directly or not, read as syntax trees without docstrings: editing
a comment, a docstring or the layout keeps the version; any other edit of code the stage runs makes a new
one, so an upgrade never hands back outputs of older code.

Infrastructure is not code a stage runs: the store (`storage/`: how bytes are placed, checked, listed), the
engine (`tasks.engine`: runner, config loading, progress, caches), inspection and the flows and CLI decide
where and when a result is computed, never what it is, so editing them recomputes nothing. What they could
change is the bytes a stage's output is written as: those are the store's file format, whose version
(`storage.FORMAT_VERSION`) is in every version id, and tests/test_format.py holds golden bytes that fail
until that version moves. This follows Dagster's `code_version` (declared, per asset) and Bazel's actions
(an action is its declared inputs, hashed by content; see docs/architecture.md for what we take from each).

Data files (tag lists, ground truth, a pretrained encoder) are inputs: they enter by their content
(`content_digest`), never by their path, so a moved file is the same input.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import threading
import time
from pathlib import Path

# The packages whose modules can be code a stage runs, and the modules in them that are infrastructure:
# a closure stops at them (their own imports are not followed either).
CODE_PACKAGES = ("tasks", "ram_model")
INFRASTRUCTURE = ("tasks.engine", "tasks.inspection")


def code_version(modules: str | tuple[str, ...], label: str) -> str:
    """`label+digest` for code that lives in `modules` (e.g. "tasks.stages.clean", "clean-3")."""
    modules = (modules,) if isinstance(modules, str) else tuple(modules)
    return f"{label}+{code_digest(modules)}"


def is_infrastructure(module: str) -> bool:
    top = module.split(".")[0]
    return top not in CODE_PACKAGES or any(module == m or module.startswith(m + ".") for m in INFRASTRUCTURE)


@functools.lru_cache(maxsize=None)
def code_digest(modules: tuple[str, ...]) -> str:
    """A digest of `modules` and every project module they import, transitively, up to infrastructure."""
    h = hashlib.sha256()
    for name in sorted(code_closure(modules)):
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


def code_closure(modules: tuple[str, ...]) -> set[str]:
    """`modules` and the project modules they import, transitively; infrastructure is neither included nor
    followed (a stage's own module always is)."""
    return module_closure(modules, CODE_PACKAGES, stop=is_infrastructure)


def module_closure(modules: tuple[str, ...] | str, packages: tuple[str, ...], stop=lambda name: False) -> set[str]:
    seen: set[str] = set()
    todo = [modules] if isinstance(modules, str) else list(modules)
    first = set(todo)
    while todo:
        name = todo.pop()
        if name in seen or (name not in first and stop(name)):
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


# ---------------------------------------------------------------- inputs named by path: their content

_DIGESTS: dict[tuple, str] = {}
_DIGESTS_LOCK = threading.Lock()


def content_digest(path: str | os.PathLike) -> str:
    """The content of a local file, or of a folder (every file's relative path and bytes), as a digest: what
    identifies an input named by path, wherever it lies. Cached per (path, size, mtime) in this process and
    in the local cache folder, so a 1.9 GB checkpoint is read once per change, not once per run."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(p.resolve()), stamp)
    with _DIGESTS_LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    h = hashlib.sha256()
    for f in files:
        rel = "" if f == p else f.relative_to(p).as_posix()
        h.update(rel.encode() + b"\0" + _file_sha256(f).encode() + b"\0")
    value = h.hexdigest()[:16]
    with _DIGESTS_LOCK:
        _DIGESTS[key] = value
    return value


def _file_sha256(f: Path) -> str:
    from .cache import cache_dir

    st = f.stat()
    stamp = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    record = cache_dir() / "digests" / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".json")
    try:
        return json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    from storage.fs import open_fs, sha256_of

    sha = sha256_of(*open_fs(str(f)))[1]
    try:   # a cache: failing to write it costs a re-read next time, nothing else
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"file": str(f.resolve()), "sha256": sha}))
        tmp.replace(record)
    except OSError:
        pass
    return sha
