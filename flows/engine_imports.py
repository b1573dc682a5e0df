"""Which `flows`, `tasks`, `storage`, `ram_model` and `configs` a process imports: the engine's, or something
that shadows them.

Runs in the flow's process and on every Dask worker. It imports nothing of the engine, so the client ships it
by value (`cloudpickle.register_pickle_by_value`) and it runs even where the engine's packages do not import:
that is where it is needed.

Two kinds of shadow:

* a *folder* of the same name with no `__init__.py` earlier on `sys.path`: a namespace package. A Dask worker
  puts its local directory first on `sys.path`, and that directory holds Dask's spill folder `storage/`.
  Python's path finder takes a namespace folder only when no regular package of that name is on `sys.path`,
  but an editable install that works through an import hook (setuptools' default for a flat layout) is
  asked after the path finder, so the folder won. The project installs as a path entry instead (see
  pyproject.toml), and `prefer_engine_packages` makes such a folder lose to the engine's package on a
  worker whatever the install: a folder is never the engine's package.
* a real package (or module) of the same name earlier on `sys.path` (a user's own `flows/` or `tasks/`
  package): that is someone's code, so it is not overridden; `import_problems` names it and the run stops
  before any part is submitted.
"""
from __future__ import annotations

import importlib.util
import os
import sys

PACKAGES = ("flows", "tasks", "storage", "ram_model", "configs")
ANCHOR = ("flows", "runners.py")  # a file only the engine's `flows` package has: its parent folder holds the rest


def _find(name: str):
    """The spec `import name` uses (the imported module's, once imported), or the exception finding it raised."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__spec__", None)
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        return exc


def _package_dir(spec) -> str | None:
    """The folder of a regular package (one with `__init__.py`); None for a namespace folder or a module."""
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith("__init__.py"):
        return None
    return os.path.dirname(origin)


def _where(spec) -> str:
    origin = getattr(spec, "origin", None)
    if origin and origin != "namespace":
        return f"{origin} (a module, not a package)" if not origin.endswith("__init__.py") else os.path.dirname(origin)
    folders = list(getattr(spec, "submodule_search_locations", None) or [])
    return f"{folders[0] if folders else '?'} (a folder without __init__.py)"


def engine_root() -> str | None:
    """The folder that holds the engine's packages in this process, or None when `flows` is not the engine's."""
    folder = _package_dir(_find(ANCHOR[0]))
    if folder and os.path.isfile(os.path.join(folder, ANCHOR[1])):
        return os.path.dirname(folder)
    return None


def import_problems() -> list[str]:
    """One line per engine package that does not resolve to the engine's own (empty: all is well)."""
    root = engine_root()
    problems = []
    for name in PACKAGES:
        spec = _find(name)
        if spec is None or isinstance(spec, Exception):
            problems.append(f"cannot import {name} with {sys.executable} ({spec or 'not found'}): the engine is not "
                            f"installed in this environment; install it as on the client (pip install ram-data-engine, "
                            f"or pip install -e . in a checkout)")
            continue
        folder = _package_dir(spec)
        if folder is None:
            problems.append(f"{name} resolves to {_where(spec)}, which shadows the engine's package: rename it or "
                            f"take its folder off sys.path")
        elif root is None and name == ANCHOR[0]:
            problems.append(f"flows resolves to {folder}, another package named flows that shadows the engine's: "
                            f"rename it or take {os.path.dirname(folder)} off sys.path / PYTHONPATH")
        elif root is not None and os.path.dirname(folder) != root:
            problems.append(f"{name} resolves to {folder}, another package named {name} that shadows the engine's "
                            f"{os.path.join(root, name)}: rename it or take {os.path.dirname(folder)} off sys.path / "
                            f"PYTHONPATH")
    return problems


class _EngineFinder:
    """A meta path finder that hands out the engine's own packages (found once) before anything on sys.path."""

    def __init__(self, specs: dict):
        self.specs = specs

    def find_spec(self, fullname, path=None, target=None):
        spec = self.specs.get(fullname)
        if spec is None:
            return None
        return importlib.util.spec_from_file_location(fullname, spec.origin,
                                                      submodule_search_locations=[os.path.dirname(spec.origin)])


def prefer_engine_packages() -> list[str]:
    """Where an engine package would import as a namespace folder (Dask's `storage/` spill folder on a worker's
    path, under an editable install that works through an import hook), make it import the engine's package
    instead: ask the other import finders for a regular package of that name and put a finder first that returns
    it. Real packages are left alone (`import_problems` reports them). Returns the names redirected."""
    specs = {}
    for name in PACKAGES:
        if name in sys.modules:
            continue
        spec = _find(name)
        if spec is None or isinstance(spec, Exception) or _package_dir(spec) is not None:
            continue
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if find is None or isinstance(finder, _EngineFinder):
                continue
            try:
                candidate = find(name, None)
            except Exception:
                continue
            if _package_dir(candidate) is not None:
                specs[name] = candidate
                break
    if specs:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _EngineFinder)]
        sys.meta_path.insert(0, _EngineFinder(specs))
        importlib.invalidate_caches()
    return sorted(specs)


def check_here() -> dict:
    """What a worker reports before parts are submitted: the packages it redirected, and its problems."""
    return {"redirected": prefer_engine_packages(), "problems": import_problems(), "python": sys.executable}


try:  # only the Dask runner uses the plugin; the checks above work without Dask
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover
    _WorkerPlugin = object


class EnginePackagesPlugin(_WorkerPlugin):
    """Registered with the scheduler before a stage's parts: on every worker, those there now and those that
    join later (a worker the nanny restarts), `prefer_engine_packages` runs before any task is unpickled."""

    name = "ram-engine-packages"

    def setup(self, worker=None):
        prefer_engine_packages()
