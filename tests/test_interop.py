"""Interop: real img2dataset outputs in (every output format), every common reader out, whole versions only.

The img2dataset outputs under tests/data/img2dataset/ were made by the real img2dataset 1.47 downloading
generated images from a loopback HTTP server (tests/data/img2dataset/make_fixture.py says how; it cannot
run here because img2dataset pins webdataset<0.3). The readers are the real DuckDB, Polars, pandas/pyarrow,
Hugging Face `datasets` and `webdataset`, each used the way its documentation shows, on the version folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import Store
from tasks.engine.config import IngestConfig
from tasks.stages.ingest import SourceError, sniff_format
from tests.fixtures import ingest

I2D = Path(__file__).parent / "data" / "img2dataset"
SERVED = json.loads((I2D / "served.json").read_text())
FORMATS = ("webdataset", "parquet", "files")
URL_NAME = {"0000000": "cat.jpg", "0000001": "dog.png", "0000002": "bird.webp", "0000003": "dot.png",
            "0000004": "camera.jpg", "0000005": "big.jpg", "0000006": "page.jpg", "0000007": "gone.jpg"}


@pytest.fixture(scope="module")
def i2d(tmp_path_factory) -> Path:
    """A private copy of the fixture (tests rename and add folders)."""
    root = tmp_path_factory.mktemp("i2d")
    shutil.copytree(I2D, root / "out", ignore=shutil.ignore_patterns("*.py", "served.json"))
    return root / "out"


@pytest.fixture(scope="module")
def incremental(i2d, tmp_path_factory):
    """An images version made incrementally: the first ingest read one img2dataset run, the second reads
    all four outputs (three formats of one run, and a second run), so it shares the first one's part."""
    store = Store(str(tmp_path_factory.mktemp("interop") / "store"))
    first = ingest(store, IngestConfig(), source=str(i2d / "resized" / "webdataset"))
    second = ingest(store, IngestConfig(), source=[str(i2d / "resized" / "{webdataset,parquet,files}"),
                                                   str(i2d / "original" / "webdataset")])
    assert (second.parts_reused, second.parts_written) == (1, 3)
    return store, first.version, second.version


def _folder(store: Store, version) -> str:
    return store.abs(version.ref)


# --------------------------------------------------------------------------- 1. whole versions, every reader
def test_the_incremental_version_folder_holds_every_part(incremental):
    store, first, v = incremental
    assert v.manifest["rows_out"] == 20 and first.manifest["rows_out"] == 5
    folder = Path(_folder(store, v))
    assert sorted(p.name for p in (folder / "parts").iterdir()) == sorted(f"{p.name}.parquet" for p in v.parts)
    assert sorted(p.name for p in (folder / "shards").iterdir()) == sorted(f"{p.name}.tar" for p in v.parts)
    # the shared part is the first version's file, linked: no second copy of its bytes
    shared = next(p for p in v.parts if p.name == first.parts[0].name)
    table = next(f for f in shared.files if f["kind"] == "table")
    assert os.stat(store.abs(table["path"])).st_ino == os.stat(store.abs(first.files("table")[0]["path"])).st_ino
    assert v.verify() == []


def test_duckdb_reads_the_whole_version(incremental):
    duckdb = pytest.importorskip("duckdb")
    store, _, v = incremental
    folder = _folder(store, v)
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/parts/*.parquet')").fetchall() == [(20,)]
    assert (duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/_rejects/*.parquet')").fetchall()[0][0]
            == v.manifest["rows_rejected"] == 12)


def test_polars_reads_the_whole_version(incremental):
    pl = pytest.importorskip("polars")
    store, _, v = incremental
    folder = _folder(store, v)
    assert pl.scan_parquet(f"{folder}/parts/*.parquet").select(pl.len()).collect().item() == 20
    assert pl.read_parquet(f"{folder}/parts/").height == 20


def test_pyarrow_and_pandas_read_the_whole_version_folder(incremental):
    import pyarrow.dataset as ds

    pd = pytest.importorskip("pandas")
    store, _, v = incremental
    folder = _folder(store, v)
    assert ds.dataset(f"{folder}/parts", format="parquet").count_rows() == 20
    assert pq.read_table(f"{folder}/parts").num_rows == 20
    assert len(pd.read_parquet(f"{folder}/parts")) == 20


def test_hugging_face_reads_the_table_and_every_shard(incremental, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    store, _, v = incremental
    folder = _folder(store, v)
    cache = str(tmp_path / "hf")
    table = datasets.load_dataset("parquet", data_dir=f"{folder}/parts", split="train", cache_dir=cache)
    assert table.num_rows == 20
    shards = datasets.load_dataset("webdataset", data_dir=f"{folder}/shards", split="train", cache_dir=cache)
    assert shards.num_rows == 20
    captions = {r["key"]: r["captions"][0] for r in v.read_table().to_pylist()}
    for row in shards:
        assert row["jpg"] is not None and row["jpg"].size[0] > 0          # every image, decoded
        assert row["txt"] == captions[row["__key__"]]                     # the first caption
        assert row["json"]["url"].endswith(URL_NAME[row["__key__"].split("_", 1)[1]])


def test_webdataset_reads_every_shard_as_jpg_txt_pairs(incremental):
    wds = pytest.importorskip("webdataset")
    store, _, v = incremental
    folder = _folder(store, v)
    shards = sorted(str(p) for p in Path(folder, "shards").glob("*.tar"))
    pairs = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).to_tuple("jpg", "txt"))
    assert len(pairs) == 20
    for image, text in pairs:
        assert sniff_format(image) == "JPEG" and text.decode()   # the extension tells the truth


def test_keep_stores_each_format_under_its_own_honest_extension(i2d, tmp_path):
    v = ingest(Store(str(tmp_path)), IngestConfig(image_format="keep"), source=str(i2d / "original" / "webdataset")).version
    seen = {}
    for sample in v.iter_samples():
        ext = next(e for e in ("jpg", "png", "webp") if e in sample)
        seen[ext] = sniff_format(sample[ext])
    assert seen == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}   # img2dataset named them all .jpg


# --------------------------------------------------------------------------- 3. every img2dataset output format
def _by_source_key(rows: list[dict]) -> dict[str, dict]:
    return {r["key"].split("_", 1)[1]: r for r in rows}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_img2dataset_format_ingests_with_its_metadata(i2d, tmp_path, fmt):
    src = i2d / "resized" / fmt
    v = ingest(Store(str(tmp_path)), IngestConfig(), source=str(src)).version
    assert v.manifest["sources"] == [{"source": os.path.realpath(src), "format": fmt}]
    rows = _by_source_key(v.read_table().to_pylist())
    meta = {r["key"]: r for r in pq.read_table(src / "00000.parquet", columns=["key", "url", "sha256"]).to_pylist()}
    assert sorted(rows) == ["0000000", "0000001", "0000002", "0000004", "0000005"]
    for key, row in rows.items():
        served = SERVED[URL_NAME[key]]
        assert row["url"] == meta[key]["url"] and row["url"].endswith(URL_NAME[key])
        assert (row["original_width"], row["original_height"]) == tuple(served["size"])
        assert (row["width"], row["height"]) == (64, 64)       # as img2dataset resized it
        assert row["source_sha256"] == meta[key]["sha256"] and row["status"] == "success"
        assert json.loads(row["extra"]) == {"license": served["license"]}
        assert row["captions"] == [served["caption"]]
    assert "RAM-Fixture-Camera" in json.loads(rows["0000004"]["exif"])["Image Make"]
    # failed downloads and the resized 1x1 image are rejects, with img2dataset's own message
    rejects = _by_source_key(v.rejects().to_pylist())
    assert rejects["0000007"]["reason"] == "img2dataset-failed-to-download"
    assert "404" in rejects["0000007"]["detail"] and rejects["0000007"]["field"] == "url"
    assert rejects["0000006"]["reason"] == "img2dataset-failed-to-resize"
    assert rejects["0000003"]["reason"] == "too-small" and "1x1 (original size" in rejects["0000003"]["detail"]
    assert v.manifest["rows_in"] == 8 == v.manifest["rows_out"] + v.manifest["rows_rejected"]
    # the shard's json carries the same metadata; its .txt the first caption
    sample = next(iter(v.iter_samples()))
    described = json.loads(sample["json"])
    row = rows[sample["__key__"].split("_", 1)[1]]
    assert described["url"] == row["url"] and described["extra"] == row["extra"]
    assert sample["txt"].decode() == row["captions"][0]
    assert hashlib.sha256(sample["jpg"]).hexdigest() == row["sha256"]


def test_the_three_formats_give_the_same_samples(i2d, tmp_path):
    def content(fmt):
        v = ingest(Store(str(tmp_path / fmt)), IngestConfig(), source=str(i2d / "resized" / fmt)).version
        return {k: (r["captions"], r["url"], r["original_width"], r["extra"])
                for k, r in _by_source_key(v.read_table().to_pylist()).items()}

    assert content("webdataset") == content("parquet") == content("files")


def test_img2dataset_parquet_without_an_image_column_is_a_clear_error(i2d, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"key": ["0000000"], "url": ["http://x/y.jpg"], "caption": ["a cat"]}),
                   bad / "00000.parquet")
    with pytest.raises(Exception, match=r"no image column .*columns are \['key', 'url', 'caption'\]"):
        ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(bad))


# --------------------------------------------------------------------------- 4. several sources in one ingest
def test_two_img2dataset_runs_combine_by_brace_pattern(i2d, tmp_path):
    store = Store(str(tmp_path / "store"))
    v = ingest(store, IngestConfig(), source=str(i2d / "{resized,original}" / "webdataset")).version
    names = [p.name for p in v.parts]
    assert len(names) == 2 and len(set(names)) == 2 and all(n.endswith("-00000") for n in names)
    keys = v.read_table().column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 10      # img2dataset numbered both runs 0000000..: still distinct


def test_a_source_is_known_by_its_content_not_its_spelling(i2d, tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    cfg = IngestConfig()
    a, b = i2d / "resized" / "webdataset", i2d / "original" / "webdataset"
    first = ingest(store, cfg, source=str(i2d / "{resized,original}" / "webdataset"))
    assert first.status == "written"
    monkeypatch.chdir(i2d)
    for spelling in ([str(a), str(b)], [f"file://{b}", f"file://{a}"], ["resized/webdataset/*.tar",
                                                                       "original/webdataset"],
                     str(i2d / "*" / "webdataset")):
        again = ingest(store, cfg, source=spelling)
        assert (again.status, again.version.id) == ("reused", first.version.id), spelling


def test_changed_content_under_the_same_name_is_a_new_part(i2d, tmp_path):
    src = tmp_path / "run"
    shutil.copytree(i2d / "resized" / "webdataset", src)
    store = Store(str(tmp_path / "store"))
    first = ingest(store, IngestConfig(), source=str(src))
    stats = json.loads((src / "00000_stats.json").read_text())
    (src / "00000_stats.json").write_text(json.dumps(dict(stats, note="re-run")))   # same size class, new bytes
    second = ingest(store, IngestConfig(), source=str(src))
    assert second.version.id != first.version.id and second.parts_written == 1


def test_a_missing_source_in_a_list_is_named(i2d, tmp_path):
    with pytest.raises(SourceError, match="nope.*does not exist"):
        ingest(Store(str(tmp_path)), IngestConfig(), source=[str(i2d / "resized" / "webdataset"),
                                                              str(tmp_path / "nope")])
    with pytest.raises(SourceError, match="matches nothing"):
        ingest(Store(str(tmp_path)), IngestConfig(), source=str(tmp_path / "*.tar"))


def test_image_format_config_is_checked_before_the_run():
    with pytest.raises(Exception, match="image_format"):
        IngestConfig(image_format="gif")


def test_png_is_reencoded_to_the_version_format_and_counted(i2d, tmp_path):
    v = ingest(Store(str(tmp_path)), IngestConfig(), source=str(i2d / "original" / "webdataset")).version
    assert set(v.read_table().column("format").to_pylist()) == {"jpeg"}
    assert v.manifest["metrics"]["converted"]["reencoded-jpeg"] == 2      # the png and the webp
    img = Image.open(io.BytesIO(next(s for s in v.iter_samples() if s["__key__"].endswith("0000001"))["jpg"]))
    assert img.format == "JPEG" and img.size == (80, 80)


def test_cli_ingests_several_sources(i2d, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    store = tmp_path / "store"
    out = CliRunner().invoke(app, ["--store", str(store), "--engine", "local", "ingest",
                                   str(i2d / "resized" / "webdataset"), str(i2d / "resized" / "files")])
    assert out.exit_code == 0, out.output
    v = Store(str(store)).open("images")
    assert len(v.parts) == 2 and v.manifest["rows_out"] == 10
    assert [s["format"] for s in v.manifest["sources"]] == ["files", "webdataset"]


# --------------------------------------------------------------------------- 5. img2dataset under the ingest limits
def test_img2dataset_keys_are_unique_across_its_shards(i2d, tmp_path):
    """Two shards of one img2dataset folder that repeat keys (a re-run written into the same folder): the
    cross-part key claims cover every format, so the second shard's samples are rejected naming the first."""
    for fmt in FORMATS:
        src = tmp_path / fmt
        shutil.copytree(i2d / "resized" / fmt, src)
        for name in os.listdir(src):
            if name.startswith("00000"):
                target = src / name.replace("00000", "00001", 1)
                (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, target)
        v = ingest(Store(str(tmp_path / f"store-{fmt}")), IngestConfig(), source=str(src)).version
        keys = v.read_table().column("key").to_pylist()
        assert len(keys) == len(set(keys)) == 5, fmt
        dups = [r for r in v.rejects().to_pylist() if r["reason"] == "duplicate-key"]
        # `source` names the run (its content tag), then the shard: <tag>/00001.tar:<key>
        assert len(dups) == 8 and all("00000" in d["detail"] and d["source"].split("/", 1)[1].startswith("00001")
                                      for d in dups), fmt
        assert v.manifest["rows_in"] == v.manifest["rows_out"] + v.manifest["rows_rejected"] == 16, fmt


@pytest.mark.parametrize("fmt", ("parquet", "files"))
def test_an_oversized_img2dataset_image_costs_its_sample(i2d, tmp_path, fmt):
    """The byte limits hold for img2dataset's parquet cells and files as for tar members."""
    v = ingest(Store(str(tmp_path)), IngestConfig(max_image_bytes=2048), source=str(i2d / "resized" / fmt)).version
    rows = _by_source_key(v.read_table().to_pylist())
    rejects = _by_source_key(v.rejects().to_pylist())
    big = {k for k, r in rejects.items() if r["reason"] == "member-too-large"}
    assert big and not big & set(rows) and all("max_image_bytes" in rejects[k]["detail"] for k in big)
    assert len(rows) + len(big) == 5 and v.manifest["rows_in"] == 8


def test_hostile_metadata_fields_cost_nothing(tmp_path):
    """Sizes that are no int32, a URL that is an object: the metadata columns get null or JSON, the sample
    is used, and the part is not lost."""
    import tarfile

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "JPEG")
    meta = {"caption": "a red square", "url": {"not": "a string"}, "original_width": 2**40,
            "original_height": -5, "status": ["success"]}
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        for name, data in (("k.jpg", buf.getvalue()), ("k.json", json.dumps(meta).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    v = ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(src)).version
    [row] = v.read_table().to_pylist()
    assert row["captions"] == ["a red square"] and row["url"] == '{"not": "a string"}'
    assert row["original_width"] is None and row["original_height"] is None and row["status"] == '["success"]'
