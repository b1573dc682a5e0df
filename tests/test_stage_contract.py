"""The Stage contract (tasks/engine/runner.py): a new stage is declared in about twenty lines, and the runner gives
it what every stage has: one commit, a rerun that does nothing, resume after a failure, reuse of the
parts whose input did not change. The stage below is the example of docs/architecture.md and README."""
from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage import Store
from tasks.engine.config import IngestConfig, Section
from tasks.engine.runner import Stage, StageError, parts_of, run

# ---- the example: captions per key, flagged when fewer than `count.min_captions`
SCHEMA = pa.schema([("key", pa.string()), ("n_captions", pa.int32()), ("few", pa.bool_())])


class CountSection(Section):            # the section's pydantic model; the loop passes it as it is
    min_captions: int = 1


def split(run):                          # one part per images part, with the digest of what it reads
    return parts_of(run.inputs["images"], salt=run.salt)


def process(run, writer, task):          # one part, wherever the executor runs it
    images, part = run.inputs["images"], task.payload["part"]
    table = images.read_file(next(f["path"] for f in part.files if f["kind"] == "table"), columns=["key", "captions"])
    n = pc.list_value_length(table["captions"]).cast(pa.int32())
    out = pa.table({"key": table["key"], "n_captions": n, "few": pc.less(n, run.cfg.min_captions)}, schema=SCHEMA)
    return writer.write_part(task.name, table=out, rows_in=table.num_rows, source_digest=task.source_digest,
                             metrics={"few": pc.sum(out["few"].cast(pa.int32())).as_py() or 0})


COUNT = Stage(name="count", output="caption_counts", inputs=("images",), section="count", version="count-1",
              split=split, process=process, schema=SCHEMA)
# ---- end of the example


@pytest.fixture
def images(tmp_path):
    from tests.fixtures import ingest
    from tests.fixtures import image_bytes, write_folder_source

    def make(n: int):
        src = write_folder_source(tmp_path / "src", {f"i{i}.jpg": (image_bytes(color=(i * 20, 9, 9)),
                                                                       [f"a cat {i}"] * (1 + i % 2)) for i in range(n)})
        return ingest(store, IngestConfig(part_size=1), source=str(src)).version

    store = Store(str(tmp_path / "store"))
    return store, make


def test_a_declared_stage_commits_and_a_rerun_reuses(images):
    store, make = images
    v = make(6)
    first = run(COUNT, store, {"count": CountSection(min_captions=2)}, {"images": v})
    assert first.status == "written" and first.parts_written == 6
    table = first.version.read_table()
    assert table.num_rows == first.version.manifest["rows_in"] == v.manifest["rows_out"]
    assert first.version.parents == [v.ref] and first.version.manifest["code_version"].startswith("count-1+")
    assert first.version.manifest["metrics"]["few"] == sum(1 for n in table["n_captions"].to_pylist() if n < 2)
    again = run(COUNT, store, {"count": CountSection(min_captions=2)}, {"images": v})
    assert again.status == "reused" and again.version.id == first.version.id
    other = run(COUNT, store, {"count": CountSection(min_captions=1)}, {"images": v})
    assert other.status == "written" and other.version.id != first.version.id  # the section is its identity


def test_a_declared_stage_resumes_after_a_failure_and_reuses_unchanged_parts(images):
    store, make = images
    v = make(6)
    calls = []

    def fails_on_second_part(run_, writer, task):
        calls.append(task.name)
        if len(calls) == 2:
            raise ValueError("a bad row")
        return process(run_, writer, task)

    flaky = dataclasses.replace(COUNT, process=fails_on_second_part)
    flaky_process = flaky.process
    with pytest.raises(StageError, match="a bad row"):
        run(flaky, store, {"count": CountSection()}, {"images": v})
    assert store.versions("caption_counts") == []       # nothing committed
    resumed = run(COUNT, store, {"count": CountSection()}, {"images": v})
    assert (resumed.parts_resumed, resumed.parts_written) == (1, 5)
    assert flaky_process.__module__ == COUNT.module      # same code version: the finished part was kept

    grown = make(9)                                       # a new images version: six parts as before, three new
    incremental = run(COUNT, store, {"count": CountSection()}, {"images": grown})
    assert (incremental.parts_reused, incremental.parts_written) == (6, 3)
    assert incremental.version.read_table().num_rows == 9


def test_the_runner_names_a_missing_input_or_section(images):
    store, make = images
    with pytest.raises(ValueError, match=r"input\(s\) \['images'\] not given"):
        run(COUNT, store, {"count": CountSection()}, {})
    with pytest.raises(ValueError, match="config section 'count' is missing"):
        run(COUNT, store, {"other": CountSection()}, {"images": make(3)})


def test_the_version_a_run_answers_with_is_latest(images):
    """A run that finds its version committed moves `latest` to it: a later step started with `--from` reads what
    this run answered, not a version committed in between (data added, then taken away again)."""
    store, make = images
    v = make(3)
    first = run(COUNT, store, {"count": CountSection()}, {"images": v})
    other = run(COUNT, store, {"count": CountSection(min_captions=2)}, {"images": v})
    assert store.open("caption_counts", "latest").id == other.version.id
    again = run(COUNT, store, {"count": CountSection()}, {"images": v})
    assert again.status == "reused" and store.open("caption_counts", "latest").id == first.version.id
