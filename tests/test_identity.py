"""What a version is: the identity the runner computes from what each stage declares (tasks/engine/identity.py).

The matrix: an edit to a stage's module, to model code it runs, to the store, to the CLI, to another stage or to
a docstring changes exactly the code versions of the stages that run that code, and no others. Infrastructure
(storage, the engine, the flows and CLI) is in no stage's identity; the bytes the store writes are, through
`storage.FORMAT_VERSION` (tests/test_format.py guards them)."""
from __future__ import annotations

from contextlib import contextmanager

import pytest

from storage import Store
from tasks.engine import identity as cv
from tasks.engine.config import IngestConfig
from tasks.stages import LOOP, stage
from tests.fixtures import image_bytes, ingest, write_folder_source

MODULES = sorted({module for _, module, _ in LOOP} | {"ablation", "import_model"})


def code_versions() -> dict[str, str]:
    cv.code_digest.cache_clear()
    return {m: stage(m).code_version() for m in MODULES}


@contextmanager
def source_edited(monkeypatch, modules: tuple[str, ...], edit):
    """Within: the sources of `modules` read as `edit(source)` (what an upgrade of that code looks like)."""
    original, targets = cv.read_source, {cv.module_file(m) for m in modules}
    monkeypatch.setattr(cv, "read_source", lambda p: edit(original(p)) if p in targets else original(p))
    cv.code_digest.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        cv.code_digest.cache_clear()


def edited(monkeypatch, module: str, edit) -> dict[str, str]:
    """Every stage's code version with `module`'s source edited by `edit(source)`."""
    with source_edited(monkeypatch, (module,), edit):
        return code_versions()


def add_code(source: str) -> str:
    return source + "\nEDITED = 1\n"


@pytest.mark.parametrize("module,edit,changed", [
    ("tasks.stages.clean", add_code, {"clean"}),                          # the stage's own module
    ("ram_model.detector", add_code, {"ground"}),                         # model code only ground runs
    ("ram_model.embedder", add_code, {"embed"}),
    ("ram_model.trainer", add_code, {"train", "ablation"}),               # the ablation runs the train stage
    ("tasks.stages.train", add_code, {"train", "ablation"}),
    ("tasks.stages.parse", add_code, {"parse"}),                          # another stage: only itself
    ("tasks.parser.graph", add_code, {"parse", "generate"}),              # generate parses its captions
    ("storage.store", add_code, set()),                                   # the store: infrastructure
    ("storage.shards", add_code, set()),
    ("flows.cli", add_code, set()),                                       # the CLI
    ("tasks.engine.runner", add_code, set()),                             # the runner, config, progress
    ("tasks.engine.config", add_code, set()),
    ("tasks.stages.clean", lambda s: s.replace('"""Clean stage:', '"""Clean, the stage:', 1), set()),  # a docstring
    ("ram_model.ram", lambda s: "# a comment\n" + s, set()),             # a comment
])
def test_an_edit_changes_exactly_the_versions_that_run_it(monkeypatch, module, edit, changed):
    before = code_versions()
    after = edited(monkeypatch, module, edit)
    assert {m for m in MODULES if after[m] != before[m]} == changed
    assert all(after[m].split("+")[0] == before[m].split("+")[0] for m in MODULES)   # labels stay


def test_model_code_every_tagger_runs_is_in_their_identity(monkeypatch):
    before = code_versions()
    after = edited(monkeypatch, "ram_model.ram", add_code)
    # the stages that load or train RAM; the ones that only read text, boxes or embeddings do not run it
    assert {m for m in MODULES if after[m] != before[m]} >= {"generate", "embed", "train", "evaluate", "ablation",
                                                             "import_model"}
    assert {m for m in MODULES if after[m] != before[m]}.isdisjoint({"ingest", "parse", "ground", "cluster"})


def test_code_version_follows_the_code_not_its_layout(tmp_path, monkeypatch):
    pkg = tmp_path / "tasks_fake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text('"""doc"""\nfrom . import helper\n\ndef run():\n    return helper.f()\n')
    (pkg / "helper.py").write_text("def f():\n    return 1\n")
    (pkg / "unused.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cv, "CODE_PACKAGES", ("tasks_fake",))

    def version():
        cv.code_digest.cache_clear()
        return cv.code_version("tasks_fake.stage", "fake-1")

    try:
        v1 = version()
        (pkg / "helper.py").write_text("# a comment\ndef f():\n    '''a docstring'''\n    return 1\n")
        assert version() == v1  # comments, docstrings and layout are not code
        (pkg / "unused.py").write_text("X = 2\n")
        assert version() == v1  # a module the stage does not import
        (pkg / "helper.py").write_text("def f():\n    return 2\n")
        assert version() != v1  # a change in a module it imports
    finally:
        cv.code_digest.cache_clear()


def _source(tmp_path):
    return write_folder_source(tmp_path / "src", {f"i{i}.jpg": (image_bytes(color=(i * 20, 9, 9)), f"a cat {i}")
                                                  for i in range(6)})


def test_an_upgrade_of_stage_code_never_hands_back_old_outputs(tmp_path, monkeypatch):
    """An edit to the code an ingest runs makes a new version with every part written again."""
    src, store = _source(tmp_path), Store(str(tmp_path / "store"))
    old = ingest(store, IngestConfig(part_size=3), source=str(src))
    with source_edited(monkeypatch, ("tasks.stages.ingest",), add_code):
        new = ingest(store, IngestConfig(part_size=3), source=str(src))
    assert new.version.id != old.version.id
    assert new.parts_written == len(old.version.parts) and new.parts_reused == 0


def test_an_edit_to_the_store_recomputes_nothing(tmp_path, monkeypatch):
    """The store's code (how bytes are placed, listed, checked) is not what a version is: the same version."""
    src, store = _source(tmp_path), Store(str(tmp_path / "store"))
    old = ingest(store, IngestConfig(part_size=3), source=str(src))
    with source_edited(monkeypatch, ("storage.store", "storage.shards"), add_code):
        again = ingest(store, IngestConfig(part_size=3), source=str(src))
    assert again.status == "reused" and again.version.id == old.version.id


def test_the_store_format_is_in_every_version_id(tmp_path, monkeypatch):
    """A change of written bytes moves storage.FORMAT_VERSION, and every version id with it."""
    import storage.store as store_module

    src, store = _source(tmp_path), Store(str(tmp_path / "store"))
    old = ingest(store, IngestConfig(part_size=3), source=str(src))
    monkeypatch.setattr(store_module, "FORMAT_VERSION", store_module.FORMAT_VERSION + 1)
    new = ingest(store, IngestConfig(part_size=3), source=str(src))
    assert new.version.id != old.version.id and new.parts_reused == 0


def test_inputs_named_by_path_enter_by_content(tmp_path):
    """A file or folder input (a ground truth, a model folder) is identified by its bytes, wherever it lies."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"weights")
    (a / "config.json").write_text("{}")
    b = tmp_path / "elsewhere" / "b"
    b.parent.mkdir()
    a.rename(b)
    moved = cv.content_digest(b)
    c = tmp_path / "c"
    c.mkdir()
    (c / "model.safetensors").write_bytes(b"weights")
    (c / "config.json").write_text("{}")
    assert cv.content_digest(c) == moved
    (c / "config.json").write_text('{"x": 1}')
    assert cv.content_digest(c) != moved
    with pytest.raises(FileNotFoundError, match="nope"):
        cv.content_digest(tmp_path / "nope")


def test_no_stage_function_sets_identity():
    """Identity is declared data: the runner's Stage has no hook that could set it, and every stage's declared
    inputs and reads are data (no callables among its inputs)."""
    from tasks.engine.runner import Stage

    assert "identify" not in Stage.__dataclass_fields__
    for m in MODULES:
        s = stage(m)
        assert all(isinstance(i, (str,)) or type(i).__name__ == "Input" for i in s.inputs), m
        assert all(isinstance(r, str) for r in (*s.reads, *s.files, *s.code, *s.runs)), m
