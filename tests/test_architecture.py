"""The layering promises, read from the source (no imports run): stages import no other stage, and the
lower packages import nothing above them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tasks.engine.identity import imported_names
from tasks.stages import LOOP

ROOT = Path(__file__).resolve().parents[1]
STAGE_MODULES = sorted({f"tasks.stages.{m}" for _, m, _ in LOOP} | {"tasks.stages.ablation", "tasks.stages.import_model"})


def imported_modules(path: Path, module: str) -> set[str]:
    """Absolute names of every module `path` imports, and of every name taken from one (a submodule or not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {m for base, names in imported_names(tree, module, path.name == "__init__.py")
            for m in (base, *(f"{base}.{n}" for n in names))}


def module_path(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_no_stage_imports_another_stage(stage):
    others = set(STAGE_MODULES) - {stage}
    bad = sorted(m for m in imported_modules(module_path(stage), stage)
                 if m in others)
    assert not bad, f"{stage} imports the stage(s) {bad}: move what they share into a module of its own"


@pytest.mark.parametrize("package,forbidden", [("storage", ("tasks", "flows", "ram_model", "prefect")),
                                               ("ram_model", ("tasks", "flows", "storage", "prefect"))])
def test_lower_packages_import_nothing_above_them(package, forbidden):
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        bad = sorted(m for m in imported_modules(path, module) if m.split(".")[0] in forbidden)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_checks_see_a_violation(tmp_path):
    # the walker resolves relative and function-level imports, so a hidden stage import is caught
    src = tmp_path / "clean.py"
    src.write_text("def f():\n    from .generate import x\n")
    assert "tasks.stages.generate" in imported_modules(src, "tasks.stages.clean")


def test_one_config_model_per_section():
    # the YAML's sections are the models the code runs with: a field added there reaches its use, no copy
    from ram_model.detector import DetectorConfig
    from ram_model.embedder import EmbedderConfig
    from tasks.engine.config import CleanSection, EngineConfig, GroundSection

    cfg = EngineConfig.model_validate({"clean": {"outlier_fraction": 0.25, "embedder": {"pool": "mean"}},
                                       "ground": {"detector": {"box_threshold": 0.5}}})
    assert type(cfg.clean) is CleanSection and type(cfg.ground) is GroundSection
    assert type(cfg.clean.embedder) is EmbedderConfig and type(cfg.ground.detector) is DetectorConfig
    assert cfg.clean.outlier_fraction == 0.25 and cfg.ground.detector.box_threshold == 0.5
    import tasks.stages.clean
    import tasks.stages.ground
    for module in (tasks.stages.clean, tasks.stages.ground):
        twins = [n for n in vars(module) if n.endswith("Config") and n not in ("DetectorConfig", "EmbedderConfig")]
        assert not twins, f"{module.__name__} defines config twins {twins}"


# ---------------------------------------------------------------- storage/ is the only code that knows file layouts

# Modules that read or write files in formats of their own, and the formats they may use. None of them
# touches the store: each reads or writes data from outside it.
LAYOUT_EXCEPTIONS = {
    # source ingestion: hostile WebDataset / img2dataset tars and Parquet, streamed with size limits
    "tasks/stages/ingest.py": {"tarfile", "fsspec", "pyarrow.parquet"},
    # the demo world writes a *source* in img2dataset's layout (tars + Parquet), for ingest to read
    "tasks/demo/world.py": {"tarfile", "pyarrow.parquet"},
    # the demo's detector trainer reads the demo world's source tars through storage's iter_tar
    "flows/demo.py": {"fsspec"},
}
FORMAT_MODULES = ("tarfile", "fsspec", "pyarrow.parquet", "webdataset", "s3fs", "zipfile")
# the store's filesystem and the writer's private file placement: storage's business
STORE_INTERNALS = ("fs", "placement", "_placement", "abs", "root")
# folder and file names of the store's layout (storage/store.py's docstring)
LAYOUT_NAMES = ("_manifest.json", "_progress", "_claims", "_parts", "_rejects/", "_leases", "_tmp", "_refs",
                "parts/", "shards/")


def layout_violations(path: Path, module: str, allowed_formats: set[str] = frozenset()) -> list[str]:
    """What in `path` knows a file layout: format modules imported, the store's filesystem or placement
    reached into, or a store folder name written out."""
    bad = []
    for name in sorted(imported_modules(path, module)):
        top = next((f for f in FORMAT_MODULES if name == f or name.startswith(f + ".")), None)
        if top and top not in allowed_formats:
            bad.append(f"imports {name}")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in STORE_INTERNALS and isinstance(node.value, ast.Name) \
                and node.value.id in ("store", "w", "writer", "images", "version", "v") or (
                isinstance(node, ast.Attribute) and node.attr in STORE_INTERNALS and isinstance(node.value, ast.Attribute)
                and node.value.attr == "store"):
            bad.append(f"line {node.lineno}: .{node.attr} of the store or a writer")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            hit = [n for n in LAYOUT_NAMES if n in node.value and not node.value.startswith(("#", "\n"))]
            if hit and len(node.value) < 200:   # a docstring may describe the layout; code must not build it
                bad.append(f"line {node.lineno}: store layout name(s) {hit} in {node.value!r}")
    return bad


def test_storage_is_the_only_code_that_knows_file_layouts():
    found = {}
    for package in ("tasks", "ram_model", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            bad = layout_violations(path, module, LAYOUT_EXCEPTIONS.get(rel, set()))
            if bad:
                found[rel] = bad
    assert not found, ("file layouts outside storage/ (read and write through storage: Store, Version, "
                       f"VersionWriter, storage.shards):\n" + "\n".join(f"{p}: {b}" for p, b in found.items()))
    # the training stream takes samples from the caller's sources: it opens no file by name itself
    tree = ast.parse((ROOT / "ram_model" / "data_stream.py").read_text(encoding="utf-8"))
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                and n.func.id == "open"]


def test_the_layout_check_sees_a_violation(tmp_path):
    src = tmp_path / "stage.py"
    src.write_text("import pyarrow.parquet as pq\n"
                   "def f(store, w, part):\n"
                   "    w.placement.put_bytes(f'{w.prefix}/_progress/{part}/x', b'')\n"
                   "    return store.fs.open(store.abs('images/1/parts/p.parquet'))\n")
    bad = " ".join(layout_violations(src, "tasks.stage_x"))
    assert "pyarrow.parquet" in bad and ".placement" in bad and ".fs" in bad and ".abs" in bad
    assert "_progress" in bad and "parts/" in bad
    assert layout_violations(src, "tasks.stage_x", {"pyarrow.parquet"}) != []   # the rest is still caught


# ---------------------------------------------------------------- every Parquet read decodes on the calling thread

THREADED_PARQUET_READS = ("read_table", "read_pandas", "ParquetDataset", "iter_batches", "read", "read_row_group",
                          "read_row_groups")


def threaded_parquet_reads(path: Path) -> list[str]:
    """Reads of Parquet that let pyarrow's pool threads release Python-owned buffers after the call (the process
    then aborts at exit: storage/parquet.py): `pq.read_table(...)` and friends, or `.read()`/`.iter_batches()`
    on a `pq.ParquetFile(...)`, directly or through a name bound to one."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def parquet_file(node) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "ParquetFile"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "pq")

    bound = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and parquet_file(n.value)
             for t in n.targets if isinstance(t, ast.Name)}
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in THREADED_PARQUET_READS):
            continue
        receiver = node.func.value
        if (isinstance(receiver, ast.Name) and (receiver.id == "pq" or receiver.id in bound)) or parquet_file(receiver):
            bad.append(f"line {node.lineno}: .{node.func.attr}()")
    return bad


def test_every_parquet_read_goes_through_storage_parquet():
    found = {}   # benchmarks/ are left out: their baselines call pyarrow as a user would, on paths
    for package in ("storage", "tasks", "ram_model", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "storage" / "parquet.py":
                continue
            bad = threaded_parquet_reads(path)
            if bad:
                found[str(path.relative_to(ROOT))] = bad
    assert not found, ("Parquet read outside storage.parquet (use read_parquet / iter_parquet_batches: pyarrow's "
                       "threaded readers can abort the process at exit):\n" + "\n".join(f"{p}: {b}" for p, b in found.items()))


def test_the_parquet_read_check_sees_a_violation(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import pyarrow.parquet as pq\n"
                   "def f(fh, path):\n"
                   "    pf = pq.ParquetFile(fh)\n"
                   "    n = pf.metadata.num_rows\n"          # metadata only: no decoding, allowed
                   "    return pq.read_table(path), pf.iter_batches(), pq.ParquetFile(path).read()\n")
    assert threaded_parquet_reads(src) == ["line 5: .read_table()", "line 5: .iter_batches()", "line 5: .read()"]
