"""ram_model.data_stream: join, sharding across ranks/workers, order, resume, bad shards."""
from __future__ import annotations

import io
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch

from ram_model.data_stream import DataStreamError, ImageTransform, ShardStream, make_loader
from tests.test_train_helpers import NUM_TAGS, sources, write_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 3 shards x 9 labelled samples + 1 unlabelled member each
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=3, per_shard=9,
                        unlabelled_per_shard=1)


def _stream(shard_list, fs=None, **kw):
    kw.setdefault("image_size", 8)
    return ShardStream(sources(shard_list, fs), NUM_TAGS, caption_column="caption", **kw)


def _keys(stream, workers=0):
    return [k for b in make_loader(stream, workers) for k in b["key"]]


def test_join_labels_and_exactly_once_single(shards):
    shard_list, truth = shards
    s = _stream(shard_list, batch_size=4, drop_last=False, seed=3)
    seen = {}
    for b in make_loader(s, 0):
        for k, tgt, cap, img in zip(b["key"], b["tag_targets"], b["caption"], b["image"]):
            assert k not in seen
            seen[k] = 1
            tags, caption = truth[k]
            expected = torch.zeros(NUM_TAGS)
            expected[tags] = 1
            assert torch.equal(tgt, expected), k
            assert cap == caption
            assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert set(seen) == set(truth)          # unlabelled members are skipped, nothing lost
    assert s.num_samples() == 27 and s.unlabelled_seen == 3


def test_each_sample_once_across_ranks_and_workers(shards):
    shard_list, truth = shards
    per_rank = []
    for rank in range(2):
        s = _stream(shard_list, rank=rank, world_size=2, batch_size=3, seed=5)
        keys = _keys(s, workers=2)
        assert len(keys) == s.samples_per_rank() == 12     # 27 // 6 * 3: last global batch dropped
        per_rank.append(keys)
    all_keys = per_rank[0] + per_rank[1]
    assert max(Counter(all_keys).values()) == 1
    assert set(all_keys) <= set(truth) and len(all_keys) == 24
    # the two ranks interleave into the same global sequence a single process sees
    single = _keys(_stream(shard_list, batch_size=6, seed=5))
    merged = [k for i in range(0, 12, 3) for k in per_rank[0][i:i + 3] + per_rank[1][i:i + 3]]
    assert merged == single


def test_order_deterministic_per_epoch_and_independent_of_workers(shards):
    shard_list, _ = shards
    s = _stream(shard_list, batch_size=2, drop_last=False, seed=7)
    e0 = _keys(s, 0)
    assert _keys(s, 2) == e0 == _keys(_stream(shard_list, batch_size=2, drop_last=False, seed=7), 0)
    s.set_epoch(1)
    e1 = _keys(s, 0)
    assert e1 != e0 and sorted(e1) == sorted(e0)
    assert _keys(_stream(shard_list, batch_size=2, drop_last=False, seed=8), 0) != e0
    # no shuffle: tar order, shard order as given
    plain = _keys(_stream(shard_list, batch_size=2, drop_last=False, shuffle=False), 0)
    assert plain == sorted(plain)


def test_skip_resumes_mid_epoch(shards):
    shard_list, _ = shards
    full = _keys(_stream(shard_list, batch_size=2, drop_last=False, seed=1), 0)
    s = _stream(shard_list, batch_size=2, drop_last=False, seed=1)
    s.skip(10)
    assert _keys(s, 2) == full[10:]
    s.set_epoch(0)                     # set_epoch resets the position
    assert _keys(s, 0) == full


def test_augmentation_reproducible(shards):
    shard_list, _ = shards
    def images(workers, start=0):
        s = ShardStream(sources(shard_list), NUM_TAGS, ImageTransform(8, train=True), batch_size=3, seed=2)
        s.set_start(start)
        return torch.cat([b["image"] for b in make_loader(s, workers)])
    a = images(0)
    assert torch.equal(a, images(2))
    assert torch.equal(a[6:], images(0, start=6))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    images(0)
    assert torch.equal(torch.rand(1), before)   # the global RNG is untouched by per-sample seeding


def test_labels_as_tables_and_parquet_agree(tmp_path):
    a, _ = write_shards(tmp_path / "a", n_shards=2, per_shard=5, labels_as="table")
    b, _ = write_shards(tmp_path / "b", n_shards=2, per_shard=5, labels_as="parquet")
    ka = _keys(_stream(a, batch_size=1, seed=4), 0)
    kb = _keys(_stream(b, batch_size=1, seed=4), 0)
    assert ka == kb and len(ka) == 10


def test_missing_shard_is_named(shards, tmp_path):
    shard_list, _ = shards
    bad = list(shard_list) + [(str(tmp_path / "gone.tar"), shard_list[0][1])]
    with pytest.raises(DataStreamError, match="gone.tar.*does not exist"):
        _keys(_stream(bad, batch_size=2, shuffle=False), 0)


def test_truncated_shard_is_named(shards, tmp_path):
    shard_list, _ = shards
    src = shard_list[1][0]
    cut = tmp_path / "cut.tar"
    data = open(src, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataStreamError, match="cut.tar.*truncated"):
        _keys(_stream([shard_list[0], (str(cut), shard_list[1][1])], batch_size=2), 0)


def test_garbage_shard_is_named(shards, tmp_path):
    shard_list, _ = shards
    junk = tmp_path / "junk.tar"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataStreamError, match="junk.tar"):
        _keys(_stream([(str(junk), shard_list[0][1])], batch_size=2), 0)


def test_corrupt_image_is_named(tmp_path):
    import tarfile
    shard_list, _ = write_shards(tmp_path / "src", n_shards=1, per_shard=3)
    src, labels = shard_list[0]
    bad = tmp_path / "badimg.tar"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith("000001.png"):
                data = data[:20] + b"\0" * (len(data) - 20)   # same size, broken pixels
            tout.addfile(m, io.BytesIO(data))
    with pytest.raises(DataStreamError, match=r"badimg.tar.*000001"):
        _keys(_stream([(str(bad), labels)], batch_size=1, shuffle=False), 0)


def test_label_without_image_is_an_error(shards):
    shard_list, _ = shards
    # pair shard 0's tar with shard 1's labels: none of those keys are in the tar
    with pytest.raises(DataStreamError, match="no image member"):
        _keys(_stream([(shard_list[0][0], shard_list[1][1])], batch_size=2), 0)


def test_tag_id_out_of_range(tmp_path):
    shard_list, truth = write_shards(tmp_path, n_shards=1, per_shard=2, labels_as="table")
    tar, table = shard_list[0]
    table = table.set_column(1, "tag_ids", pa.array([[0], [NUM_TAGS]], pa.list_(pa.int32())))
    with pytest.raises(DataStreamError, match="outside"):
        _keys(_stream([(tar, table)], batch_size=1, shuffle=False), 0)


def test_config_errors(shards):
    shard_list, _ = shards
    with pytest.raises(ValueError, match="drop_last"):
        _stream(shard_list, world_size=2, rank=0, drop_last=False)
    with pytest.raises(ValueError, match="rank"):
        _stream(shard_list, world_size=2, rank=2)
    with pytest.raises(ValueError, match="transform"):
        ShardStream(sources(shard_list), NUM_TAGS)
    with pytest.raises(ValueError, match="shard source"):
        ShardStream(shard_list, NUM_TAGS, image_size=8)   # bare (url, labels) pairs: the model opens no files


@pytest.fixture(scope="module")
def s3_shards(tmp_path_factory):
    """The shards uploaded to a moto S3 server on loopback; yields (s3 shard list, options, local)."""
    import logging
    import socket

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        local, _ = write_shards(tmp_path_factory.mktemp("s3src"), n_shards=2, per_shard=5)
        endpoint = f"http://127.0.0.1:{port}"
        opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": endpoint}}
        import boto3
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="train-stream")
        fs = fsspec.filesystem("s3", **opts)
        remote = []
        for tar, labels in local:
            rt, rl = (f"s3://train-stream/{p.rsplit('/', 1)[1]}" for p in (tar, labels))
            fs.put(tar, rt)
            fs.put(labels, rl)
            remote.append((rt, rl))
        yield remote, opts, local
    finally:
        server.stop()


@pytest.mark.s3
def test_stream_from_s3(s3_shards):
    remote, opts, local = s3_shards
    from_s3 = _stream(remote, batch_size=2, seed=9, drop_last=False, fs=fsspec.filesystem("s3", **opts))
    got = [(k, t) for b in make_loader(from_s3, 2) for k, t in zip(b["key"], b["tag_targets"])]
    ref = [(k, t) for b in make_loader(_stream(local, batch_size=2, seed=9, drop_last=False), 0)
           for k, t in zip(b["key"], b["tag_targets"])]
    assert [k for k, _ in got] == [k for k, _ in ref] and len(got) == 10
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref))
    missing = [(remote[0][0].replace("shard-0000", "shard-9999"), remote[0][1])]
    with pytest.raises(DataStreamError, match="shard-9999.tar.*does not exist"):
        _keys(_stream(missing, batch_size=1, fs=fsspec.filesystem("s3", **opts)), 0)
