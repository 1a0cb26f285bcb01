"""The stage-2 training reader (training/reader.py) on a real courier_train Delta table built by stage 1:
real Petastorm reads, real JPEG decoding. Conservation over ranks and epochs, determinism and resume,
decoded pixels against item_images, pinned Delta versions."""
from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, write_config

from etl.config import load_config

D0 = "2026-11-20"


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    """One simulated date built by stage 1 (4 shuffle partitions: several files), pinned at its version."""
    from etl.build import build_date
    from etl.spark import session_conf
    from sim import simulate
    from etl.tables import TableStore

    tmp = tmp_path_factory.mktemp("reader")
    cfg = load_config(write_config(tmp, {"samples": {"image_px": 32}}))
    simulate(cfg.raw_root, cfg.images_root, cfg.truth_root, preset="tiny", seed=5, days=1, progress=None)
    store = TableStore(spark, cfg)
    # Several files and row groups are the point of these tests: keep AQE from coalescing this tiny
    # date's 4 shuffle partitions into one file.
    with session_conf(spark, "spark.sql.adaptive.coalescePartitions.enabled", "false"):
        report = build_date(spark, cfg, store, D0, "run-reader")
    version = report.versions["courier_train"]
    files = store.files("courier_train", version)
    rows = {r["sample_id"]: r.asDict() for r in store.read("courier_train", version=version).collect()}
    return {"cfg": cfg, "store": store, "version": version, "urls": ["file://" + f.uri for f in files],
            "files": files, "rows": rows, "tmp": tmp}


def epoch_ids(urls, world_size, batch_size, epoch, seed=11, **kw):
    from training.reader import iterate_batches

    per_rank = []
    for rank in range(world_size):
        per_rank.append([[*b.sample_ids] for b in iterate_batches(
            urls, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, epoch=epoch, **kw)])
    return per_rank


def assert_conserved(per_rank, expected_ids, urls, world_size, batch_size):
    from training.reader import batches_per_rank, rows_per_rank

    seen = Counter(s for batches in per_rank for b in batches for s in b)
    assert set(seen) == set(expected_ids) and set(seen.values()) == {1}, "a row missing or read twice"
    assert [sum(map(len, batches)) for batches in per_rank] == rows_per_rank(urls, world_size)
    assert [len(batches) for batches in per_rank] == batches_per_rank(urls, world_size, batch_size)
    for batches in per_rank:
        assert all(len(b) == batch_size for b in batches[:-1]) and (not batches or 0 < len(batches[-1]) <= batch_size)


# ---- conservation --------------------------------------------------------------------------------
def test_count_rows_from_footers_matches_the_delta_version(table):
    from training.reader import count_rows, row_groups

    n = len(table["rows"])
    assert n > 20
    assert count_rows(table["urls"]) == n == sum(f.num_records for f in table["files"])
    assert len(table["files"]) > 1 and len(row_groups(table["urls"])) >= len(table["files"])


def test_every_row_once_per_epoch_over_two_ranks(table):
    urls, n = table["urls"], len(table["rows"])
    sizes = [b for b in (5, 7, 6, 9, 11) if n % b][:2]  # batch sizes that do not divide the row count
    for batch_size in sizes:
        orders = []
        for epoch in (0, 1):
            per_rank = epoch_ids(urls, 2, batch_size, epoch, shuffle_rows=8)
            assert_conserved(per_rank, table["rows"], urls, 2, batch_size)
            orders.append(per_rank)
        assert orders[0] != orders[1]


def test_more_ranks_than_row_groups(table):
    from training.reader import row_groups

    urls = table["urls"]
    world = len(row_groups(urls)) + 3  # some row groups are split between ranks
    per_rank = epoch_ids(urls, world, 3, epoch=0)
    assert_conserved(per_rank, table["rows"], urls, world, 3)
    # far more ranks than rows: some ranks get nothing, none gets a row twice
    world = len(table["rows"]) + 5
    per_rank = epoch_ids(urls, world, 2, epoch=1, prefetch=0)
    assert_conserved(per_rank, table["rows"], urls, world, 2)
    assert sorted(len(b) for b in per_rank)[:5] == [0] * 5


def test_files_with_several_row_groups(table, tmp_path):
    """The same rows rewritten as Parquet files of 3-row row groups: each slice comes from the right
    row group (petastorm reads exactly one), contents unchanged, every row once."""
    import pyarrow.parquet as pq

    from training.reader import iterate_batches, row_groups

    urls = []
    for k, f in enumerate(table["files"]):
        path = tmp_path / f"part-{k}.parquet"
        pq.write_table(pq.read_table(f.uri), path, row_group_size=3)
        urls.append(str(path))  # plain paths are accepted too
    groups = row_groups(urls)
    assert len(groups) > 2 * len(urls) and {g.file_row_groups for g in groups} != {1}
    for world in (2, 5):
        assert_conserved(epoch_ids(urls, world, 4, epoch=0, shuffle_rows=5), table["rows"], urls, world, 4)

    def by_id(batches):
        out = {}
        for b in batches:
            for i, s in enumerate(b.sample_ids):
                out[s] = (b.pv_labels[i], b.pv_mask[i], b.pv_images[i], b.click_mask[i], b.click_images[i])
        return out

    a = by_id(iterate_batches(urls, batch_size=8, rank=0, world_size=1, seed=1, epoch=0))
    b = by_id(iterate_batches(table["urls"], batch_size=8, rank=0, world_size=1, seed=2, epoch=3))
    assert a.keys() == b.keys()
    for s in a:
        assert all(torch.equal(x, y) for x, y in zip(a[s], b[s])), s


# ---- determinism and resume ------------------------------------------------------------------------
def test_same_arguments_same_batches_whatever_the_threads(table):
    from training.reader import iterate_batches

    urls = table["urls"]
    kw = dict(batch_size=6, rank=1, world_size=2, seed=4, epoch=2, shuffle_rows=10)
    a = list(iterate_batches(urls, decode_threads=3, prefetch=3, **kw))
    b = list(iterate_batches(list(reversed(urls)), decode_threads=1, prefetch=0, **kw))  # file order irrelevant
    assert [x.sample_ids for x in a] == [x.sample_ids for x in b]
    for x, y in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(x.model_inputs(), y.model_inputs()))
    flat = [s for x in a for s in x.sample_ids]
    other_epoch = [s for x in iterate_batches(urls, **{**kw, "epoch": 3}) for s in x.sample_ids]
    other_seed = [s for x in iterate_batches(urls, **{**kw, "seed": 5}) for s in x.sample_ids]
    assert flat != other_epoch and flat != other_seed


def test_skip_batches_gives_the_tail_without_reading_or_decoding_the_head(table, monkeypatch):
    import training.jpeg as jpeg
    import training.reader as R

    urls = table["urls"]
    kw = dict(batch_size=4, rank=0, world_size=1, seed=9, epoch=1, shuffle_rows=6)
    full = list(R.iterate_batches(urls, **kw))
    plan = R.plan_epoch(urls, rank=0, world_size=1, seed=9, epoch=1, shuffle_rows=6)
    assert len(plan.windows) > 2
    reads, decodes = [], []
    read_slice, decode_one = R._read_slice, jpeg.decode_one
    monkeypatch.setattr(R, "_read_slice", lambda s: reads.append(s) or read_slice(s))
    monkeypatch.setattr(jpeg, "decode_one", lambda d, px, scratch=None: decodes.append(1) or decode_one(d, px, scratch))
    for k in (0, 1, 3, len(full) - 1, len(full), len(full) + 2):
        reads.clear(), decodes.clear()
        tail = list(R.iterate_batches(urls, skip_batches=k, prefetch=0, **kw))
        assert [b.sample_ids for b in tail] == [b.sample_ids for b in full[k:]]
        assert [b.index for b in tail] == list(range(k, len(full)))
        for x, y in zip(tail, full[k:]):
            assert all(torch.equal(p, q) for p, q in zip(x.model_inputs(), y.model_inputs()))
        assert len(decodes) == sum(b.num_images for b in tail)  # skipped rows are never decoded
        skipped_windows = 0
        pos = 0
        for w in plan.windows:
            n = sum(s.num_rows for s in w)
            skipped_windows += pos + n <= k * 4
            pos += n
        assert len(reads) == sum(len(w) for w in plan.windows[skipped_windows:])  # nor read


def test_batches_grouped_by_query_hold_one_query_and_every_row_once(table):
    """train.batch_grouping=query: in-batch negatives from one query (the simulated category), every row
    still read exactly once per epoch over the ranks, and a resume yields the same tail."""
    from training.reader import group_cuts, iterate_batches, rows_per_rank

    urls, rows = table["urls"], table["rows"]
    queries = {sid: r["query"] for sid, r in rows.items()}
    assert len(set(queries.values())) > 2  # several categories, or there is nothing to group
    kw = dict(batch_size=5, world_size=2, seed=3, epoch=1, shuffle_rows=12, group_by="query")
    per_rank = [list(iterate_batches(urls, rank=r, prefetch=0, **kw)) for r in range(2)]
    seen = Counter(s for batches in per_rank for b in batches for s in b.sample_ids)
    assert set(seen) == set(rows) and set(seen.values()) == {1}
    assert [sum(len(b) for b in batches) for batches in per_rank] == rows_per_rank(urls, 2)
    for batches in per_rank:
        assert all({queries[s] for s in b.sample_ids} == set(b.queries) and len(set(b.queries)) == 1 for b in batches)
        assert all(1 <= len(b) <= 5 for b in batches) and [b.index for b in batches] == list(range(len(batches)))
    ungrouped = [b for r in range(2) for b in iterate_batches(urls, rank=r, prefetch=0, **{**kw, "group_by": None})]
    assert any(len(set(b.queries)) > 1 for b in ungrouped)  # without grouping, batches mix queries

    full = per_rank[1]
    for k in (1, len(full) // 2, len(full) - 1, len(full) + 1):
        tail = list(iterate_batches(urls, rank=1, prefetch=0, skip_batches=k, **kw))
        assert [b.sample_ids for b in tail] == [b.sample_ids for b in full[k:]]
        for x, y in zip(tail, full[k:]):
            assert all(torch.equal(p, q) for p, q in zip(x.model_inputs(), y.model_inputs()))

    # The cut itself: per group, full batches then one short one; every index once.
    groups = np.array(["a"] * 7 + ["b"] * 3 + [None] * 2, dtype=object)
    cuts = group_cuts(groups, np.random.default_rng(0).permutation(12), 3, np.random.default_rng(1))
    assert sorted(np.concatenate(cuts).tolist()) == list(range(12))
    assert sorted(len(c) for c in cuts) == [1, 2, 3, 3, 3] and all(len({groups[i] for i in c}) == 1 for c in cuts)
    with pytest.raises(ValueError, match="group_by"):
        next(iterate_batches(urls, rank=0, **{**kw, "group_by": "user_id"}))


# ---- decoding ------------------------------------------------------------------------------------
def test_tensors_equal_decoded_item_images(table):
    from etl.images import decode_jpeg
    from training.reader import iterate_batches

    store, rows = table["store"], table["rows"]
    images = {r["item_id"]: bytes(r["image"]) for r in store.read("item_images").collect()}
    n_real = n_pad = 0
    for batch in iterate_batches(table["urls"], batch_size=16, rank=0, world_size=1, seed=0, epoch=0):
        assert batch.pv_images.dtype == torch.uint8 and batch.pv_images.shape[1:] == (5, 3, 32, 32)
        assert batch.click_images.shape[1:] == (5, 3, 32, 32) and batch.pv_labels.dtype == torch.int64
        for i, sid in enumerate(batch.sample_ids):
            row = rows[sid]
            for kind, items in (("pv", row["pv_items"]), ("click", row["click_history"])):
                mask = getattr(batch, f"{kind}_mask")[i]
                imgs = getattr(batch, f"{kind}_images")[i]
                assert mask.tolist() == [bool(m) for m in row[f"{kind}_mask"]]
                for j, item in enumerate(items):
                    if mask[j]:
                        want = decode_jpeg(images[item]).transpose(2, 0, 1)
                        assert np.array_equal(imgs[j].numpy(), want), (sid, kind, j)
                        n_real += 1
                    else:
                        assert not imgs[j].any()
                        n_pad += 1
            want_labels = [lab * m for lab, m in zip(row["pv_labels"], row["pv_mask"])]
            assert batch.pv_labels[i].tolist() == want_labels
    assert n_real > 100 and n_pad > 0


def test_resize_to_image_px(table):
    from training.reader import CourierBatch, iterate_batches

    b = next(iterate_batches(table["urls"], batch_size=8, rank=0, world_size=1, seed=0, epoch=0, image_px=16))
    assert b.pv_images.shape == (8, 5, 3, 16, 16) and b.click_images.shape == (8, 5, 3, 16, 16)
    assert not b.pv_images[~b.pv_mask].any() and b.pv_images[b.pv_mask].float().mean() > 1
    e = CourierBatch.empty(8, 5, 5, 16)
    assert e.pv_images.shape == b.pv_images.shape and not e.pv_mask.any() and len(e) == 0


# ---- decode workers and the GPU decoder -------------------------------------------------------------
def _same_batches(a, b, atol=0, mean_tol=None):
    """The same ids, order, labels and masks; pixels equal, or within atol levels each, or (mean_tol)
    within mean_tol levels on average with padding slots exactly zero."""
    assert [x.sample_ids for x in a] == [y.sample_ids for y in b] and [x.index for x in a] == [y.index for y in b]
    for x, y in zip(a, b):
        for p, q in zip(x.model_inputs(), y.model_inputs()):
            assert p.shape == q.shape and p.dtype == q.dtype
            p, q = p.cpu(), q.cpu()
            if p.dtype == torch.uint8 and mean_tol is not None:
                assert (p.float() - q.float()).abs().mean() < mean_tol
            elif p.dtype == torch.uint8 and atol:
                assert (p.int() - q.int()).abs().max() <= atol
            else:
                assert torch.equal(p, q)
        if mean_tol is not None:  # padding stays zero
            assert not y.pv_images[~y.pv_mask.to(y.pv_images.device)].any()
            assert not y.click_images[~y.click_mask.to(y.click_images.device)].any()
    return True


@pytest.fixture
def pools(monkeypatch):
    """Every decode worker pool the reader starts in the test, to look at its processes afterwards."""
    import training.reader as R

    started = []
    init = R._WorkerPool.__init__

    def record(self, *a, **kw):
        started.append(self)
        init(self, *a, **kw)

    monkeypatch.setattr(R._WorkerPool, "__init__", record)
    return started


def _gone(pool) -> bool:
    """Every worker process of the pool has exited and been reaped (no zombie left either)."""
    return all(w.proc.poll() is not None and not Path(f"/proc/{w.pid}").exists() for w in pool.workers) \
        and not any(w.sender.is_alive() or w.receiver.is_alive() for w in pool.workers)


def test_decode_workers_give_the_same_batches_as_in_process(table, pools):
    from training.reader import iterate_batches

    urls = table["urls"]
    kw = dict(batch_size=6, rank=1, world_size=2, seed=4, epoch=2, shuffle_rows=10)
    ref = list(iterate_batches(urls, decode_workers=0, decode_threads=1, prefetch=0, **kw))
    assert len(ref) > 3
    _same_batches(ref, list(iterate_batches(urls, decode_workers=2, prefetch=2, **kw)))
    _same_batches(ref, list(iterate_batches(urls, decode_workers=1, prefetch=0, **kw)))
    _same_batches(ref[2:], list(iterate_batches(urls, decode_workers=3, skip_batches=2, **kw)))  # resume
    # resized on the way (PIL's draft + bilinear resize, in the workers)
    kw16 = dict(kw, image_px=16)
    _same_batches(list(iterate_batches(urls, decode_workers=0, **kw16)),
                  list(iterate_batches(urls, decode_workers=2, **kw16)))
    # Grouped by query, a short batch (a query's last in its window) may come before a full one: the
    # workers' slots hold a whole batch_size.
    kwq = dict(kw, group_by="query")
    grouped = list(iterate_batches(urls, decode_workers=0, prefetch=0, **kwq))
    sizes = [len(b) for b in grouped]
    assert any(a < b for a, b in zip(sizes, sizes[1:]))  # the case that needs it
    _same_batches(grouped, list(iterate_batches(urls, decode_workers=1, **kwq)))
    assert [len(p.workers) for p in pools] == [2, 1, 3, 2, 1] and all(_gone(p) for p in pools)


def test_decoding_happens_in_the_worker_processes(table, pools, monkeypatch):
    import os

    import training.jpeg as jpeg
    from training.reader import iterate_batches

    def not_here(*a, **kw):
        raise AssertionError("decoded in the training process")

    monkeypatch.setattr(jpeg, "decode_one", not_here)  # the workers are other interpreters: unaffected
    batches = list(iterate_batches(table["urls"], batch_size=8, rank=0, world_size=1, seed=0, epoch=0,
                                   decode_workers=2))
    assert sum(b.num_images for b in batches) > 100 and all(b.pv_images[b.pv_mask].float().mean() > 1 for b in batches)
    (pool,) = pools
    assert len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
    assert sum(w.decoded for w in pool.workers) == len(batches) and all(w.decoded > 0 for w in pool.workers)
    assert _gone(pool)  # the epoch ended: the workers with it


def test_decode_workers_end_on_errors_and_early_stops(table, pools, tmp_path):
    import contextlib
    import gc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.reader import iterate_batches

    kw = dict(batch_size=4, rank=0, world_size=1, seed=0, epoch=0, decode_workers=2)
    # an exception in the training loop, the iterator closed by its `with`
    with pytest.raises(KeyError):
        with contextlib.closing(iterate_batches(table["urls"], **kw)) as it:
            for k, _ in enumerate(it):
                if k == 2:
                    raise KeyError("boom")
    assert _gone(pools[-1])
    # an iterator dropped after one batch, never closed
    it = iterate_batches(table["urls"], **kw)
    next(it)
    del it
    gc.collect()
    assert _gone(pools[-1])
    # an image that does not decode, in a worker: its error reaches the caller, the workers end
    t = pq.read_table(table["files"][0].uri)
    images = t.column("pv_images").to_pylist()
    masks = t.column("pv_mask").to_pylist()
    i = next(r for r, m in enumerate(masks) if m[0])
    images[i][0] = b"not a jpeg"
    t = t.set_column(t.schema.get_field_index("pv_images"), "pv_images", pa.array(images, t.column("pv_images").type))
    pq.write_table(t, tmp_path / "bad.parquet")
    sample = t.column("sample_id")[i].as_py()
    bad = f"sample {sample!r}: pv_images\\[[0-9]+, 0\\] cannot be decoded: .*cannot identify image"
    with pytest.raises(ValueError, match=bad) as err:
        list(iterate_batches([str(tmp_path / "bad.parquet")], **{**kw, "batch_size": 64}))
    assert "JPEG decode worker pid" in "".join(getattr(err.value.__cause__, "__notes__", []))
    assert len(pools) == 3 and all(_gone(p) for p in pools)
    # the same error from the training process's threads and from torchvision's batched decoder
    for where in ({"decode_workers": 0, "decode_threads": 2}, {"decode_device": "cpu"}):
        with pytest.raises(ValueError, match=bad):
            list(iterate_batches([str(tmp_path / "bad.parquet")], **{**kw, "batch_size": 64, **where}))


def test_a_decode_worker_that_dies_fails_the_epoch_without_hanging(table, pools):
    import os
    import signal

    from training.reader import iterate_batches

    it = iterate_batches(table["urls"], batch_size=2, rank=0, world_size=1, seed=0, epoch=0, decode_workers=2,
                         prefetch=0)
    next(it)
    os.kill(pools[0].workers[0].pid, signal.SIGKILL)  # an OOM kill, say
    with pytest.raises(RuntimeError, match="JPEG decode worker pid .* exited"):
        for _ in it:
            pass
    assert _gone(pools[0])


def test_decode_settings_and_their_validation(tmp_path):
    from etl.config import ConfigError, load_config
    from training.reader import resolve_decode_workers, resolve_gpu_decode

    assert load_config(write_config(tmp_path, {})).train.decode_workers == "auto"
    for key, bad in (("decode_workers", -1), ("decode_workers", "many"), ("decode_workers", True),
                     ("decode_threads", 0), ("gpu_decode", "yes"), ("gpu_decode", 1)):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            load_config(write_config(tmp_path, {"train": {key: bad}}))
    ok = load_config(write_config(tmp_path, {"train": {"decode_workers": 3, "gpu_decode": False}})).train
    assert ok.decode_workers == 3 and ok.gpu_decode is False
    # auto: this process's share of the cores minus the step's; none left: decode in process
    assert resolve_decode_workers("auto", device_type="cpu", step_threads=2, cores=16, processes=2) == 6
    assert resolve_decode_workers("auto", device_type="cuda", cores=96, processes=8) == 11
    assert resolve_decode_workers("auto", device_type="cpu", step_threads=2, cores=2, processes=1) == 0
    assert resolve_decode_workers("auto", device_type="cpu", step_threads=1, cores=2, processes=2) == 0
    assert resolve_decode_workers(0) == 0 and resolve_decode_workers(4) == 4
    with pytest.raises(ValueError, match="decode_workers"):
        resolve_decode_workers(-2)
    assert resolve_gpu_decode("auto", "cpu") is False and resolve_gpu_decode(False, "cpu") is False
    with pytest.raises(RuntimeError, match="gpu_decode is true"):
        resolve_gpu_decode(True, "cpu")


def test_tensor_decoder_places_every_image(table):
    """decode_device: torchvision.io.decode_jpeg, batched, the GPU path's code; run on the CPU here
    (libjpeg-turbo: PIL's pixels, within a level or two) and on CUDA where there is one."""
    from training.reader import iterate_batches

    kw = dict(batch_size=7, rank=0, world_size=2, seed=3, epoch=1, image_px=32)
    ref = list(iterate_batches(table["urls"], **kw))
    got = list(iterate_batches(table["urls"], decode_device="cpu", **kw))
    assert _same_batches(ref, got, atol=2) and got[0].pv_images.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the nvjpeg decode runs only on a GPU "
                                                          "(bench/gpu_check.sh measures it there)")
def test_gpu_decode_matches_the_cpu_decode(table):
    from training.reader import gpu_decode_supported, iterate_batches

    assert gpu_decode_supported("cuda:0"), "torchvision.io.decode_jpeg cannot decode on this GPU"
    kw = dict(batch_size=7, rank=0, world_size=1, seed=3, epoch=1)
    ref = list(iterate_batches(table["urls"], **kw))
    got = list(iterate_batches(table["urls"], decode_device="cuda:0", **kw))
    assert got[0].pv_images.device.type == "cuda" and got[0].pv_mask.device.type == "cpu"
    # nvjpeg's IDCT and chroma upsampling differ from libjpeg-turbo's: close on average, not equal
    # (torchvision's own tests compare the two the same way)
    assert _same_batches(ref, got, mean_tol=2.0)


# ---- Delta versions ------------------------------------------------------------------------------
def test_pinned_old_version_reads_the_old_files(table):
    import json

    from deltalake import DeltaTable
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    from training.reader import count_rows

    store, old = table["store"], table["version"]
    # Rerun the date with different content (a third of the samples): one new version replaces the
    # partition. Spark reads every column as nullable; re-apply the table's schema (non-null fields).
    schema = StructType.fromJson(json.loads(DeltaTable(store.path("courier_train"), version=old).schema().to_json()))
    schema = StructType([f for f in schema.fields if f.name != "dt"])
    subset = store.read("courier_train", version=old).where(F.abs(F.hash("sample_id")) % 3 == 0).drop("dt")
    df = store.spark.createDataFrame(subset.rdd, schema)
    new = store.replace_partition(df, "courier_train", {"dt": D0}, "test", "rerun")
    assert new == old + 1
    old_urls = ["file://" + f.uri for f in store.files("courier_train", old)]
    new_urls = ["file://" + f.uri for f in store.files("courier_train", new)]
    assert sorted(old_urls) == sorted(table["urls"]) and not set(old_urls) & set(new_urls)
    new_ids = {r["sample_id"] for r in store.read("courier_train").collect()}
    assert 0 < len(new_ids) < len(table["rows"])
    assert_conserved(epoch_ids(old_urls, 2, 5, 0), table["rows"], old_urls, 2, 5)
    assert_conserved(epoch_ids(new_urls, 2, 5, 0), new_ids, new_urls, 2, 5)
    assert count_rows(old_urls) == len(table["rows"]) and count_rows(new_urls) == len(new_ids)


# ---- contract ------------------------------------------------------------------------------------
def test_bad_arguments(table):
    from training.reader import count_rows, iterate_batches

    with pytest.raises(ValueError, match="more than once"):
        count_rows(table["urls"] + table["urls"][:1])
    with pytest.raises(ValueError, match="rank"):
        next(iterate_batches(table["urls"], batch_size=4, rank=2, world_size=2, seed=0, epoch=0))


def test_import_pulls_no_spark_mlflow_or_petastorm():
    code = ("import sys; import training.reader; "
            "bad = [m for m in ('pyspark', 'mlflow', 'petastorm', 'deltalake') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), check=True, timeout=120)


# ---- object store --------------------------------------------------------------------------------
from s3_server import s3_server  # noqa: E402,F401 - the fixture


def test_object_store_copy_reads_the_same_batches(table, s3_server):  # noqa: F811
    """The version's files copied to an S3 server (moto, a real HTTP endpoint) under s3a:// and s3://
    URIs: the same footers, every row once over two ranks, and batches equal to the local read."""
    from etl import fs
    from training.reader import count_rows, iterate_batches

    fs.configure(s3_server.options)
    try:
        local = table["urls"]
        remote = {}
        for i, url in enumerate(local):
            key = f"reader/courier_train/dt={D0}/part-{i:03d}.parquet"
            fs.write_bytes(s3_server.uri(key), fs.read_bytes(url))
            remote[url] = s3_server.uri(key, scheme="s3a" if i % 2 else "s3")  # both spellings
        urls = [remote[u] for u in local]
        assert count_rows(urls) == count_rows(local) == len(table["rows"])
        assert_conserved(epoch_ids(urls, 2, 3, epoch=0), table["rows"], urls, 2, 3)
        # The order depends on the sorted URLs: compare the set of (ids, pixels) batch by batch of one
        # rank reading everything, keyed by sample id.
        def by_id(us):
            out = {}
            for b in iterate_batches(us, batch_size=5, rank=0, world_size=1, seed=3, epoch=0, image_px=32):
                for i, sid in enumerate(b.sample_ids):
                    out[sid] = (b.pv_images[i], b.pv_labels[i], b.pv_mask[i], b.click_images[i], b.click_mask[i])
            return out
        got, want = by_id(urls), by_id(local)
        assert got.keys() == want.keys()
        assert all(all(torch.equal(x, y) for x, y in zip(got[k], want[k])) for k in want)
    finally:
        fs.configure(None)


def test_jpeg_fast_path_gives_pil_pixels_and_leaves_other_images_to_pil():
    """training.jpeg.decode_one with a scratch array: a YCbCr JPEG of the scratch's size is decoded by
    simplejpeg into the scratch (the stage-1 case), with PIL's exact pixels; every other image takes
    PIL's path, and a broken file fails as it does there."""
    import io

    from PIL import Image

    from etl.images import square_jpeg
    from training import jpeg

    rgb = Image.frombytes("RGB", (40, 30), bytes(np.random.default_rng(5).integers(0, 256, 40 * 30 * 3, dtype=np.uint8)))

    def saved(img, **kw):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", **kw)
        return buf.getvalue()

    fast = {"stage 1 (4:2:0, q90)": square_jpeg(rgb, 24, 90),
            "4:4:4": saved(rgb.resize((24, 24)), quality=95, subsampling=0),
            "4:2:2": saved(rgb.resize((24, 24)), quality=75, subsampling=1),
            "progressive": saved(rgb.resize((24, 24)), quality=85, progressive=True)}
    slow = {"greyscale": saved(rgb.resize((24, 24)).convert("L")),
            "CMYK": saved(rgb.resize((24, 24)).convert("CMYK")),
            "another size (resized)": square_jpeg(rgb, 32, 90),
            "PNG": (lambda b: (rgb.resize((24, 24)).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO())}
    scratch = np.empty((24, 24, 3), dtype=np.uint8)
    for name, data in {**fast, **slow}.items():
        want = jpeg.decode_one(data, 24)  # PIL
        got = jpeg.decode_one(data, 24, scratch)
        assert got.shape == (3, 24, 24) and np.array_equal(got, want), name
        assert np.shares_memory(got, scratch) == (name in fast), name
    truncated = fast["stage 1 (4:2:0, q90)"][:200]
    with pytest.raises(OSError):  # PIL's own error for it, with or without the scratch
        jpeg.decode_one(truncated, 24)
    with pytest.raises(OSError):
        jpeg.decode_one(truncated, 24, scratch)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
@pytest.mark.parametrize("threads,prefetch", [(1, 2), (3, 2), (3, 0)])
def test_reader_threads_yield_to_the_training_thread(table, monkeypatch, threads, prefetch):
    """The prefetch thread and the decode pool's threads run at a raised niceness (BACKGROUND_NICE), so a
    CPU step's threads keep their cores; the training thread itself is never reniced; 0 turns it off."""
    import os
    import threading

    import training.jpeg as jpeg
    from training.reader import BACKGROUND_NICE, iterate_batches

    main_tid = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, main_tid)
    seen = {}
    decode_into = jpeg.decode_into

    def recording(*a, **kw):
        tid = threading.get_native_id()
        seen[tid] = os.getpriority(os.PRIO_PROCESS, tid)
        return decode_into(*a, **kw)

    monkeypatch.setattr(jpeg, "decode_into", recording)
    kw = dict(batch_size=8, rank=0, world_size=1, seed=0, epoch=0, decode_threads=threads, prefetch=prefetch)
    ref = list(iterate_batches(table["urls"], background_nice=0, **kw))
    assert set(seen.values()) == {base}  # 0: every decoding thread at the training thread's priority
    seen.clear()
    got = list(iterate_batches(table["urls"], **kw))
    _same_batches(ref, got)
    assert os.getpriority(os.PRIO_PROCESS, main_tid) == base
    # the training thread decodes itself only without prefetch (a batch too small to split): not reniced
    assert seen.get(main_tid, base) == base
    background = {tid: nice for tid, nice in seen.items() if tid != main_tid}
    assert background and set(background.values()) == {min(19, base + BACKGROUND_NICE)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
@pytest.mark.parametrize("prefetch", [0, 2])
def test_decode_workers_run_at_the_reader_s_niceness_whichever_thread_starts_them(table, pools, prefetch):
    """A child process inherits the niceness of the thread that starts it: the prefetch thread (raised)
    with prefetch, the training thread without. Either way the workers run at the reader's niceness,
    and at the training thread's with background_nice 0."""
    import os
    import threading

    from training.reader import BACKGROUND_NICE, iterate_batches

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for nice, want in ((BACKGROUND_NICE, min(19, base + BACKGROUND_NICE)), (0, base)):
        batches = iterate_batches(table["urls"], batch_size=8, rank=0, world_size=1, seed=0, epoch=0,
                                  decode_workers=2, prefetch=prefetch, background_nice=nice)
        next(batches)
        pool = pools[-1]
        deadline = time.time() + 20  # each worker sets it as it starts: wait for both to have decoded
        while not all(w.decoded for w in pool.workers) and time.time() < deadline:
            assert next(batches, None) is not None, "the epoch ended before both workers decoded a batch"
        assert len(pool.pids) == 2 and all(w.decoded for w in pool.workers)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pool.pids] == [want, want], nice
        batches.close()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_bench_copy_re_encodes_every_image_at_the_asked_size_and_keeps_the_rows(table, tmp_path):
    """bench/reader_bench.py --copy-to DIR --resize-px N (how its GPU numbers at 224 px were made from the
    96 px preset): the same rows and masks, every real image at N px, padding slots still empty, and the
    reader reads the copy with --parquet's file list."""
    sys.path.insert(0, str(ROOT / "bench"))
    import reader_bench
    from training.reader import iterate_batches

    reader_bench.copy_files(table["urls"], 32, tmp_path, resize_px=48)
    urls, px = reader_bench.copied_files(tmp_path)
    assert px == 48 and len(urls) == len(table["urls"])

    def by_id(urls, image_px):
        out = {}
        for b in iterate_batches(urls, batch_size=8, rank=0, world_size=1, seed=0, epoch=0, image_px=image_px):
            for i, sid in enumerate(b.sample_ids):
                out[sid] = (b.pv_mask[i].clone(), b.click_mask[i].clone(), b.pv_images[i].clone())
        return out

    orig, copy = by_id(table["urls"], 32), by_id(urls, None)  # None: the copy's images must all be 48 px
    assert set(copy) == set(orig) == set(table["rows"])
    for sid, (pv_mask, click_mask, pv_images) in copy.items():
        assert torch.equal(pv_mask, orig[sid][0]) and torch.equal(click_mask, orig[sid][1])
        assert pv_images.shape[-2:] == (48, 48)
        # the copy shows the same picture: scaled back down, it is close to the original's pixels
        small = torch.nn.functional.interpolate(pv_images[pv_mask].float(), size=(32, 32), mode="area")
        # (4.9-8.0 per level here; another row's picture: 28-53)
        assert (small - orig[sid][2][pv_mask].float()).abs().mean() < 12


def test_bench_parquet_rows_chain_epochs_and_read_inside_the_timed_part(table, monkeypatch):
    """bench/reader_bench.py's "Parquet reads only" row: its batches run on into the next epochs (each
    epoch every row once, in that epoch's order), so when an epoch is one shuffle window its read is
    timed too, not only in the first batch that the timing leaves out."""
    import itertools
    import math

    sys.path.insert(0, str(ROOT / "bench"))
    import reader_bench
    import training.reader as R

    reads = []
    read_slice = R._read_slice
    monkeypatch.setattr(R, "_read_slice", lambda s: reads.append(s) or read_slice(s))
    per_epoch = math.ceil(len(table["rows"]) / 8)
    it = reader_bench.raw_epochs(table["urls"], 8)
    first = next(it)
    read_first = len(reads)
    rest = list(itertools.islice(it, 2 * per_epoch - 1))
    batches = [first, *rest]
    ids = [list(b["sample_id"]) for b in batches]  # numpy columns
    for e in range(2):
        epoch = [i for b in ids[e * per_epoch:(e + 1) * per_epoch] for i in b]
        assert sorted(epoch) == sorted(table["rows"])  # every row once per epoch
    assert ids[:per_epoch] != ids[per_epoch:]  # epoch 1 in its own order
    assert len(reads) > read_first  # epoch 1's Parquet reads happen after the untimed first batch
