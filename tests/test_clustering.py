"""The cluster step (tasks/stages/cluster.py): per-tag K-Means++ over every crop as a version of its own, the same
bytes whatever order the data arrived in, and the `growth` refit policy that reads only new parts."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage import Store
from storage.schemas import EMBEDDINGS
from tasks.engine.config import CleanSection
from tasks.engine.runner import PartTask, run, run_stage
from tasks.stages import cluster

DIM = 16


def embeddings_part(part: str, n: int, tags=(1, 2), seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    centres = {t: np.eye(DIM, dtype=np.float32)[t % DIM] for t in tags}
    rows = {"key": [], "tag_id": [], "crop_key": [], "embedding": [], "baseline_score": []}
    for i in range(n):
        t = tags[i % len(tags)]
        far = i % 9 == 0                              # an outlier every ninth crop
        x = (rng.standard_normal(DIM) if far else centres[t] + 0.05 * rng.standard_normal(DIM)).astype(np.float32)
        rows["key"].append(f"{part}-k{i // 2}")
        rows["tag_id"].append(t)
        rows["crop_key"].append(f"{part}-c{i}")
        rows["embedding"].append(x.tolist())
        rows["baseline_score"].append(None)
    return pa.table(rows).cast(EMBEDDINGS)


def embeddings_version(store: Store, parts: dict[str, pa.Table]):
    """An `embeddings` version with these parts (named), as the embed stage would commit it."""
    writer = store.begin("embeddings", code_version="test", config={}, input_digest=",".join(parts))

    def process(w, task):
        return w.write_part(task.name, table=parts[task.name], rows_in=parts[task.name].num_rows,
                            source_digest=task.source_digest)

    return run_stage(writer, [PartTask(name, name) for name in parts], process).version


def clusters(store: Store, embeddings, **cfg):
    section = CleanSection(min_crops=3, **cfg)
    return run(cluster.STAGE, store, {"clean": section}, {"embeddings": embeddings})


def test_the_clusters_of_an_increment_equal_those_of_the_whole(tmp_path):
    """Default refit (`always`): the same data gives the same clusters version and bytes, in any history."""
    a, b, c = (embeddings_part(p, 60, seed=i) for i, p in enumerate("abc"))
    inc = Store(str(tmp_path / "incremental"))
    first = clusters(inc, embeddings_version(inc, {"a": a, "b": b})).version
    grown = clusters(inc, embeddings_version(inc, {"a": a, "b": b, "c": c})).version
    whole_store = Store(str(tmp_path / "whole"))
    whole = clusters(whole_store, embeddings_version(whole_store, {"a": a, "b": b, "c": c})).version
    assert grown.id == whole.id != first.id
    assert [f["sha256"] for f in grown.files()] == [f["sha256"] for f in whole.files()]
    table = whole.read_table()
    assert table.num_rows == 180 and set(table["part"].to_pylist()) == {"a", "b", "c"}
    assert 0 < sum(table["outlier"].to_pylist()) < 180 * 0.2        # ~10 % of each tag
    centroids = whole.read_file(next(f["path"] for f in whole.parts[0].files if f["kind"] == "centroids"))
    assert sorted(centroids["tag_id"].to_pylist()) == [1, 2] and all(n == 90 for n in centroids["crops_fit"].to_pylist())


def test_growth_refits_only_tags_that_grew_and_reads_only_new_parts(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    a, b = embeddings_part("a", 200, seed=0), embeddings_part("b", 200, seed=1)
    first = clusters(store, embeddings_version(store, {"a": a, "b": b}), refit="growth", refit_growth=0.25).version
    assert first.manifest["metrics"]["tags_fitted"] == 2
    small = embeddings_part("c", 40, seed=2)                         # +10 % for each tag: applied, not fitted
    read = []
    real_read = type(first).read_file

    def counting(version, rel, columns=None):
        read.append((version.stage, rel))
        return real_read(version, rel, columns)

    monkeypatch.setattr(type(first), "read_file", counting)
    grown = embeddings_version(store, {"a": a, "b": b, "c": small})
    second = clusters(store, grown, refit="growth", refit_growth=0.25)
    monkeypatch.undo()
    m = second.version.manifest["metrics"]
    assert m["tags_fitted"] == 0 and m["tags_applied"] == 2 and m["crops_applied"] == 40 and m["crops_kept"] == 400
    assert {rel.split("/")[-1] for stage, rel in read if stage == "embeddings"} == {"c.parquet"}   # only the new part
    assert first.ref in second.version.parents                       # the history it grew from is declared
    rerun = clusters(store, grown, refit="growth", refit_growth=0.25)
    assert rerun.status == "reused" and rerun.version.id == second.version.id   # a rerun is the same version
    old, new = first.read_table(), second.version.read_table()
    kept = {k: o for k, o in zip(old["crop_key"].to_pylist(), old["outlier"].to_pylist())}
    assert all(kept[k] == o for k, o in zip(new["crop_key"].to_pylist(), new["outlier"].to_pylist()) if k in kept)
    # a tag that grows past the fraction is fitted again over all its crops
    big = embeddings_part("d", 300, tags=(1,), seed=3)
    third = clusters(store, embeddings_version(store, {"a": a, "b": b, "c": small, "d": big}), refit="growth",
                     refit_growth=0.25).version.manifest["metrics"]
    assert third["tags_fitted"] == 1 and third["crops_fitted"] == 200 + 20 + 300 and third["tags_applied"] == 0


def test_the_refit_policy_is_part_of_the_identity(tmp_path):
    store = Store(str(tmp_path / "store"))
    emb = embeddings_version(store, {"a": embeddings_part("a", 30)})
    assert clusters(store, emb).version.id != clusters(store, emb, refit="growth").version.id
    assert clusters(store, emb).status == "reused"
