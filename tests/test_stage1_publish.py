"""The tables of a date are published as a unit: a build_samples process SIGKILLed between two table
commits leaves every reader on the last published set, and the next run undoes the orphan commits
before it publishes. Real subprocess, real Spark and Delta."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, click, pv, write_catalog, write_config, write_log

D0, D1 = "2026-11-19", "2026-11-20"


def test_killed_between_commits_readers_see_the_published_set_and_the_next_run_recovers(spark, tmp_path):
    from etl.build import build_date
    from etl.config import load_config
    from etl.catalog import STAGE1 as STAGE1_TABLES
    from etl.publish import PublishLog
    from etl.tables import TableError, TableStore

    conf = write_config(tmp_path, {"samples": {"neg_rate": 1.0, "image_px": 16}})
    cfg = load_config(conf)
    write_catalog(cfg, D0, [f"i{k}" for k in range(1, 6)])
    write_log(cfg, D0, [pv("a_", "2026-11-19T09:00:00Z", "u1", "pa", ["i4"]),
                        click("a_c", "2026-11-19T09:00:05Z", "u1", "pa", "i4"),
                        pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2"]),
                        click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1")])
    write_log(cfg, D1, [pv("b0", "2026-11-20T10:00:00Z", "u1", "p1", ["i2", "i3"]),
                        click("b1", "2026-11-20T10:00:05Z", "u1", "p1", "i3")])
    store = TableStore(spark, cfg)
    build_date(spark, cfg, store, D0, "run-d0")
    published = {t: store.version(t) for t in STAGE1_TABLES}

    marker = tmp_path / "paused"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "COURIER_PAUSE_AFTER_COMMIT": f"3:{marker}"}
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen([sys.executable, "jobs/build_samples.py", "--conf", str(conf), "--date", D1],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job never reached its third commit"
            time.sleep(1)
        os.killpg(job.pid, signal.SIGKILL)  # the job's own process group: its driver and its JVM
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        log.close()

    # Three tables got a D1 commit, three did not; readers still see D0's published set only.
    latest = {t: store.latest_version(t) for t in STAGE1_TABLES}
    assert [t for t in STAGE1_TABLES if latest[t] > published[t]] == ["quarantine", "items", "item_images"]
    assert {t: store.version(t) for t in STAGE1_TABLES} == published
    for t in STAGE1_TABLES:
        assert store.read(t).where(f"dt = '{D1}'").count() == 0, t
    assert (Path(cfg.tables_root) / "_publish" / "_lock").exists()  # held by the dead run
    # asked for by number (train.table_version...), a version the dead run committed is refused
    with pytest.raises(TableError, match=f"version {latest['items']} of 'items' was never published"):
        store.read("items", version=latest["items"])
    assert store.files("items", published["items"]) == store.files("items")

    report = build_date(spark, cfg, store, D1, "run-d1")
    assert report.status == "built" and "recovered an unfinished publish" in report.note
    assert {t: store.version(t) for t in STAGE1_TABLES} == {t: store.latest_version(t) for t in STAGE1_TABLES}
    assert store.read("items").where(f"dt = '{D1}'").count() == 0  # D1's catalog is D0's: no new items
    assert [r["pv_id"] for r in store.read("pv_samples").where(f"dt = '{D1}'").collect()] == ["p1"]
    assert store.read("pv_samples").where(f"dt = '{D0}'").count() == 1  # untouched
    manifests = PublishLog(cfg.tables_root).latest()
    assert sorted(manifests["dates"]) == [D0, D1] and manifests["tables"] == {
        t: store.latest_version(t) for t in STAGE1_TABLES}
    assert not (Path(cfg.tables_root) / "_publish" / "_lock").exists()
    with pytest.raises(TableError, match="was never published"):  # still not: recovery undid it
        store.files("items", latest["items"])
    assert store.read("items", version=published["items"]).count() == 5  # an earlier published one reads


class _Killed(BaseException):
    """Stands for a SIGKILL between two commits: nothing of the run's own error handling runs."""


def test_a_first_publish_that_died_is_undone_without_touching_the_rerun_s_staged_files(spark, tmp_path,
                                                                                      monkeypatch):
    """In a fresh store the tables a dead first publish created have no published version: recovery
    removes them (log and data files) while the rerun's own files are staged inside their folders."""
    import etl.build
    from etl.build import build_date
    from etl.catalog import STAGE1 as STAGE1_TABLES
    from etl.config import load_config
    from etl.tables import TableStore

    cfg = load_config(write_config(tmp_path, {"samples": {"neg_rate": 1.0, "image_px": 16}}))
    write_catalog(cfg, D0, [f"i{k}" for k in range(1, 4)])
    write_log(cfg, D0, [pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2"]),
                        click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1")])
    store = TableStore(spark, cfg)

    # A SIGTERM (a scheduler's stop: SystemExit 143 in the job) between two commits is undone by the run itself.
    monkeypatch.setattr(etl.build, "pause_hook", lambda n: sys.exit(143) if n == 2 else None)
    with pytest.raises(SystemExit):
        build_date(spark, cfg, store, D0, "run-stopped")
    assert [t for t in STAGE1_TABLES if store.latest_version(t) is not None] == []
    killed, recover = [], etl.build.recover

    def die_after_second_commit(n):
        if n == 2:
            killed.append(n)
            raise _Killed()

    def no_clean_up_after_a_kill(*args):  # a SIGKILL: the run's own undo (which a SIGTERM gets) never runs
        if killed:
            raise _Killed()
        return recover(*args)

    monkeypatch.setattr(etl.build, "pause_hook", die_after_second_commit)
    monkeypatch.setattr(etl.build, "recover", no_clean_up_after_a_kill)
    with pytest.raises(_Killed):
        build_date(spark, cfg, store, D0, "run-dead")
    monkeypatch.undo()
    assert [t for t in STAGE1_TABLES if store.latest_version(t) is not None] == ["quarantine", "items"]
    # (files of versions no reader is given: TableStore.files refuses them)
    dead_files = [f.uri for t in ("quarantine", "items") for f in store._files_of(t, store._open(store.path(t), 0))]

    report = build_date(spark, cfg, store, D0, "run-d0")
    assert report.status == "built" and "removed (created by a run that never published)" in report.note
    for t in STAGE1_TABLES:
        files = store.files(t)
        assert all(os.path.exists(f.uri.removeprefix("file://")) for f in files), t  # nothing committed is missing
        assert store.read(t).count() == report.counts["table_rows"][t], t
    assert store.read("items").count() == 3
    assert not any(os.path.exists(u.removeprefix("file://")) for u in dead_files)  # the dead run's data went too


def test_a_commit_of_another_run_between_this_run_s_commits_stops_the_publish(spark, tmp_path, monkeypatch):
    """Two builds that both hold the object-store lock (it cannot rule that out): a version another run
    committed to a table before this run's commit would be pinned with this run's. The publish stops,
    its commits (and the other one) are undone, readers keep the published set, a rerun publishes."""
    import deltalake

    import etl.build
    from etl.build import PublishError, build_date
    from etl.config import load_config
    from etl.tables import TableStore

    cfg = load_config(write_config(tmp_path, {"samples": {"neg_rate": 1.0, "image_px": 16}}))
    write_catalog(cfg, D0, [f"i{k}" for k in range(1, 4)])
    write_log(cfg, D0, [pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2"]),
                        click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1")])
    write_catalog(cfg, D1, [f"i{k}" for k in range(4, 6)])
    write_log(cfg, D1, [pv("b0", "2026-11-20T10:00:00Z", "u2", "p1", ["i4", "i5"]),
                        click("b1", "2026-11-20T10:00:05Z", "u2", "p1", "i4")])
    store = TableStore(spark, cfg)
    build_date(spark, cfg, store, D0, "run-d0")
    published = {t: store.read(t).count() for t in ("items", "item_images", "pv_samples")}

    def another_run_commits(n):  # after this run's second commit, before its third (item_images)
        if n == 2:
            path = store.path("item_images")
            deltalake.write_deltalake(path, deltalake.DeltaTable(path).to_pyarrow_dataset().schema.empty_table(),
                                      mode="append")

    monkeypatch.setattr(etl.build, "pause_hook", another_run_commits)
    with pytest.raises(PublishError, match="item_images is at v2 after this run's commit, not v1: another run"):
        build_date(spark, cfg, store, D1, "run-d1")
    monkeypatch.undo()
    assert {t: store.read(t).count() for t in published} == published
    # undone, not only unpinned: each table's newest version holds the published rows again
    assert {t: deltalake.DeltaTable(store.path(t)).to_pyarrow_dataset().count_rows() for t in published} == published
    report = build_date(spark, cfg, store, D1, "run-d1-again")
    assert report.status == "built" and store.read("items").count() == published["items"] + 2


def _two_dates(spark, tmp_path):
    """(cfg, store, D0's log lines): a catalog and a log of D0 (one click), a log of D1, nothing built."""
    from etl.config import load_config
    from etl.tables import TableStore

    cfg = load_config(write_config(tmp_path, {"samples": {"neg_rate": 1.0, "image_px": 16}}))
    write_catalog(cfg, D0, [f"i{k}" for k in range(1, 4)])
    d0_log = [pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2"]),
              click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1")]
    write_log(cfg, D0, d0_log)
    write_log(cfg, D1, [pv("b0", "2026-11-20T10:00:00Z", "u1", "p1", ["i2", "i3"]),
                        click("b1", "2026-11-20T10:00:05Z", "u1", "p1", "i3")])
    return cfg, TableStore(spark, cfg), d0_log


def test_a_date_built_while_an_earlier_date_was_published_again_is_not_published(spark, tmp_path, monkeypatch):
    """Date D1 computed from D0's published tables; before D1 publishes, another build publishes D0 again
    (its log changed). D1 would pin rows judged by D0's old verdicts: its publish stops, nothing of it is
    committed, and a rerun builds it from the new D0."""
    import etl.build
    from etl.build import PublishError, build_date
    cfg, store, d0_log = _two_dates(spark, tmp_path)
    build_date(spark, cfg, store, D0, "run-d0")
    versions = {t: store.latest_version(t) for t in ("items", "pv_samples", "ctr_log")}
    real_publish = etl.build._publish

    rebuilds = []

    def d0_published_again_first(*args, **kwargs):
        if args[3].dt == D1:  # D1's publish (D0's own below goes straight through)
            if not rebuilds:  # D0's log changed: a new fingerprint
                write_log(cfg, D0, [*d0_log, click("a2", "2026-11-19T10:00:06Z", "u1", "p0", "i2")])
            # then a --force rebuild: the same fingerprint, other tables (e.g. after a code change)
            rebuilds.append(build_date(spark, cfg, store, D0, f"run-d0-{len(rebuilds)}", force=bool(rebuilds)))
            assert rebuilds[-1].status == "built"
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(etl.build, "_publish", d0_published_again_first)
    for attempt in (1, 2):
        with pytest.raises(PublishError, match=rf"date\(s\) \['{D0}'\] were published by another build while"):
            build_date(spark, cfg, store, D1, f"run-d1-{attempt}")
    monkeypatch.undo()
    assert store.read("pv_samples").where(f"dt = '{D1}'").count() == 0  # nothing of D1 was committed
    assert all(store.latest_version(t) == v + 2 for t, v in versions.items())  # D0's two publishes only
    assert build_date(spark, cfg, store, D1, "run-d1-again").status == "built"
    # the click history of D1's page holds both of D0's clicks now
    history = store.read("pv_samples").where(f"dt = '{D1}'").select("click_history").first()[0]
    assert sorted(history) == ["i1", "i2"]


def test_a_date_published_by_another_build_while_this_one_computed_it_is_not_published_again(spark, tmp_path,
                                                                                          monkeypatch):
    """Two builds of one date (a backfill and the scheduled run): the one that publishes second read older
    files, or the same ones; publishing it would put older input back or commit the date twice. And a
    --force rebuild of an earlier date makes the later one's rerun a build, not `unchanged`."""
    import etl.build
    from etl.build import PublishError, build_date
    cfg, store, d0_log = _two_dates(spark, tmp_path)
    real_publish = etl.build._publish

    def a_later_file_published_first(*args, **kwargs):
        monkeypatch.setattr(etl.build, "_publish", real_publish)
        write_log(cfg, D0, [*d0_log, click("a2", "2026-11-19T10:00:06Z", "u1", "p0", "i2")])
        assert build_date(spark, cfg, store, D0, "run-newer").status == "built"
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(etl.build, "_publish", a_later_file_published_first)
    with pytest.raises(PublishError, match="this date was published by another build while this one was computed"):
        build_date(spark, cfg, store, D0, "run-older")
    labels = [r["label"] for r in store.read("ctr_log").where(f"dt = '{D0}'").collect()]
    assert sorted(labels) == [1, 1]  # the newer files' build stands (both items clicked)
    assert build_date(spark, cfg, store, D0, "run-again").status == "unchanged"
    assert build_date(spark, cfg, store, D1, "run-d1").status == "built"
    assert build_date(spark, cfg, store, D1, "run-d1-again").status == "unchanged"
    assert build_date(spark, cfg, store, D0, "run-forced", force=True).status == "built"
    assert build_date(spark, cfg, store, D1, "run-d1-after-force").status == "built"


def test_a_date_whose_published_input_changed_is_rebuilt_before_the_dates_after_it(spark, tmp_path):
    """A late file in an already published date: the next date would read its rows for click history
    (and judge its clicks as passed) while that date's tables and counts never saw them. It is refused
    naming the date, until that date is rebuilt; a catalog file changed after publishing likewise."""
    from etl.build import build_date
    from etl.config import load_config
    from etl.publish import PublishError
    from etl.tables import TableStore

    cfg = load_config(write_config(tmp_path, {"samples": {"neg_rate": 1.0, "image_px": 16}}))
    store = TableStore(spark, cfg)
    write_catalog(cfg, D0, ["i1", "i2"])
    write_log(cfg, D0, [pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2"]),
                        click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1")])
    write_log(cfg, D1, [pv("b0", "2026-11-20T10:00:00Z", "u1", "p1", ["i1", "i2"]),
                        click("b1", "2026-11-20T10:00:05Z", "u1", "p1", "i2")])
    assert build_date(spark, cfg, store, D0, "run-0").status == "built"
    late = Path(cfg.raw_root) / "search_log" / f"dt={D0}" / "part-00001.jsonl"  # delivered after D0 was built
    late.write_text(json.dumps(click("a2", "2026-11-19T10:00:09Z", "u1", "pX", "i2")) + "\n")
    with pytest.raises(PublishError, match=rf"input of published date\(s\) \['{D0} \(search_log\)'\] changed "
                                           rf".*--date {D0} --end-date {D1}"):
        build_date(spark, cfg, store, D1, "run-1")
    assert not store.exists("pv_samples") or store.read("pv_samples").where(f"dt = '{D1}'").count() == 0
    d0 = build_date(spark, cfg, store, D0, "run-2")  # D0 again, now with the late file (its orphan click counted)
    assert d0.status == "built" and d0.counts["quarantine"]["search_log"] == {"orphan_click": 1}
    assert build_date(spark, cfg, store, D1, "run-3").status == "built"
    # D0's log folder archived away: not read any more, not a change (D1 builds, without its history).
    shutil.rmtree(Path(cfg.raw_root) / "search_log" / f"dt={D0}")
    assert build_date(spark, cfg, store, D1, "run-3b", force=True).status == "built"
    # A catalog file of D0 replaced after publishing: D1 is rebuilt only after D0 again.
    write_catalog(cfg, D0, ["i1", "i2", "i3"])
    with pytest.raises(PublishError, match=rf"\['{D0} \(catalog\)'\] changed"):
        build_date(spark, cfg, store, D1, "run-4", force=True)


def test_a_date_rebuilt_alone_leaves_the_later_published_dates_refused_until_they_are_rebuilt(spark, tmp_path):
    """Item i9 is first listed on D1, which is published; a late catalog file then lists it on D0 too, and D0
    alone is rebuilt. D1's tables still hold i9 as new (an item_images row on both dates: a later date's
    courier_train would find its image twice). The next date is refused naming D1 until D1 is rebuilt, and
    D0's report says which dates it left stale. A rebuild that changes only the log of a date outside a
    later date's history window leaves that later date as it was: it is not refused."""
    from etl.build import build_date
    from etl.config import load_config
    from etl.publish import PublishError
    from etl.tables import TableStore

    D2 = "2026-11-21"
    samples = {"neg_rate": 1.0, "image_px": 16, "history_lookback_days": 1}
    cfg = load_config(write_config(tmp_path, {"samples": samples}))
    store = TableStore(spark, cfg)
    write_catalog(cfg, D0, ["i1", "i2"])
    write_catalog(cfg, D1, ["i9"])
    for d, t, items in ((D0, "2026-11-19", ["i1", "i2"]), (D1, "2026-11-20", ["i1", "i9"]), (D2, "2026-11-21", ["i9"])):
        write_log(cfg, d, [pv(f"e{d}", f"{t}T10:00:00Z", "u1", f"p{d}", items),
                           click(f"c{d}", f"{t}T10:00:05Z", "u1", f"p{d}", items[-1])])
    assert [build_date(spark, cfg, store, d, f"run-{d}").status for d in (D0, D1)] == ["built", "built"]
    write_catalog(cfg, D0, ["i1", "i2", "i9"])  # i9 listed on D0 after all
    d0 = build_date(spark, cfg, store, D0, "run-d0-again")
    assert d0.status == "built" and f"published later date(s) ['{D1}'] read this date" in d0.note

    def dates_of(item):
        return sorted(r["dt"] for r in store.read("item_images").where(f"item_id = '{item}'").collect())

    assert dates_of("i9") == [D0, D1]  # D1 is stale: what the refusal below is for
    with pytest.raises(PublishError, match=rf"published date\(s\) \['{D1}'\] were built before an earlier date "
                                           rf"was published again.*--date {D1} --end-date {D2}"):
        build_date(spark, cfg, store, D2, "run-d2")
    assert not store.read("pv_samples").where(f"dt = '{D2}'").count()
    assert build_date(spark, cfg, store, D1, "run-d1-again").status == "built"  # its fingerprint changed with D0
    assert dates_of("i9") == [D0]
    d2 = build_date(spark, cfg, store, D2, "run-d2-again")
    assert d2.status == "built" and not d2.note
    assert build_date(spark, cfg, store, D1, "run-d1-once-more").status == "unchanged"
    # A late log file of D0 alone: D1 reads D0's clicks (its window), D2 does not (nor a changed catalog).
    late = Path(cfg.raw_root) / "search_log" / f"dt={D0}" / "part-00001.jsonl"
    late.write_text(json.dumps(click("c-late", "2026-11-19T10:00:09Z", "u1", f"p{D0}", "i1")) + "\n")
    d0 = build_date(spark, cfg, store, D0, "run-d0-late")
    assert d0.status == "built" and f"published later date(s) ['{D1}'] read this date" in d0.note, d0.note


def test_a_publish_that_cannot_start_leaves_no_staged_files(spark, tmp_path, monkeypatch):
    """The lock held elsewhere (here: refused at once) fails the date before its first commit: the files
    it staged are removed, not left for a vacuum."""
    import contextlib

    from etl.build import build_date
    from etl.config import load_config
    from etl.publish import PublishError, PublishLog
    from etl.tables import TableStore

    cfg = load_config(write_config(tmp_path, {"samples": {"neg_rate": 1.0, "image_px": 16}}))
    write_catalog(cfg, D0, ["i1", "i2"])
    write_log(cfg, D0, [pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2"]),
                        click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1")])

    @contextlib.contextmanager
    def held(self, run_id, wait_s=300.0):
        raise PublishError(f"{self.dir}/_lock is held by another run")
        yield

    monkeypatch.setattr(PublishLog, "lock", held)
    with pytest.raises(PublishError, match="held by another run"):
        build_date(spark, cfg, TableStore(spark, cfg), D0, "run-d0")
    tables = Path(cfg.tables_root)
    assert [p for p in tables.rglob("*") if p.is_file() and "_publish" not in p.parts] == []


def test_the_publish_lock_has_one_holder_and_ends_with_its_process(tmp_path):
    """A kernel lock on a local tables_root: a second run waits (here: at once an error naming the
    holder); the lock of a SIGKILLed process is free without any takeover step."""
    from etl.publish import PublishError, PublishLog

    plog = PublishLog(str(tmp_path))
    lock_file = tmp_path / "_publish" / "_lock"
    with plog.lock("run-a", wait_s=0):
        assert '"run_id": "run-a"' in lock_file.read_text()
        with pytest.raises(PublishError, match="held by .*run-a.*that run is still running: wait for it"):
            with plog.lock("run-b", wait_s=0):
                pass
    assert not lock_file.exists()
    with plog.lock("run-a", wait_s=0):
        lock_file.unlink()  # removed by hand while held: the hold still ends without an error
    with plog.lock("run-b", wait_s=0):
        pass

    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from etl.publish import PublishLog\n"
            "with PublishLog(sys.argv[2]).lock('run-dead', wait_s=0):\n    print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(PublishError, match="run-dead"):
            with plog.lock("run-c", wait_s=0):
                pass
    finally:
        child.kill()
        child.wait(timeout=30)
    assert '"run_id": "run-dead"' in lock_file.read_text()  # its file stays, its lock does not
    with plog.lock("run-c", wait_s=0):
        assert '"run_id": "run-c"' in lock_file.read_text()


def test_an_object_store_lock_is_taken_over_from_a_dead_run_and_released_only_by_its_own_hold(spark, tmp_path):
    """The create-if-absent lock (object stores; file:// takes the same path): a dead process's lock on this
    host is taken over; a hold releases the lock only if the file is still its own (by a token: run ids
    repeat), never one that another hold put there meanwhile."""
    import json
    import socket

    from etl.publish import PublishLog

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    plog = PublishLog(f"file://{tmp_path}", spark)
    assert plog._create("_lock", json.dumps({"host": socket.gethostname(), "pid": dead.pid, "run_id": "x",
                                             "token": "t-dead"}))
    with plog.lock("x", wait_s=0):
        held = plog._held_by()
        assert held["run_id"] == "x" and held["token"] not in ("t-dead", None)
        plog._delete("_lock")  # another hold of the same run id took it meanwhile (a takeover race)
        assert plog._create("_lock", json.dumps({**held, "token": "t-other"}))
    assert plog._held_by()["token"] == "t-other"  # left to its holder


def test_a_manifest_on_a_hadoop_file_system_appears_whole(spark, tmp_path, monkeypatch):
    """HDFS shows a file while it is written and keeps it half written when the writer dies: a manifest
    there is written under a temporary name and renamed, so a run killed mid-write leaves the last
    manifest the latest (a half one would fail every reader). file:// takes the same Hadoop path; that
    the rename also refuses an existing name holds on HDFS only (Hadoop's local rename replaces it), so
    here an existing name is refused by the check before the write."""
    from etl.publish import PublishLog

    plog = PublishLog(f"file://{tmp_path}", spark)
    first = plog.append({"tables": {"items": 0}, "dates": {}})
    assert plog.latest() == first and first["seq"] == 0
    real = PublishLog._write_hadoop

    def dies_half_way(hfs, jpath, text):
        real(hfs, jpath, text[: len(text) // 2])
        raise RuntimeError("the run died while writing")

    monkeypatch.setattr(PublishLog, "_write_hadoop", staticmethod(dies_half_way))
    with pytest.raises(RuntimeError, match="died while writing"):
        plog.append({"tables": {"items": 1}, "dates": {}})
    monkeypatch.undo()
    assert plog.latest() == first
    assert not [n for n in os.listdir(tmp_path / "_publish") if ".tmp" in n]
    second = plog.append({"tables": {"items": 1}, "dates": {}})
    assert second["seq"] == 1 and plog.latest() == second
    assert not plog._create(f"{1:020d}.json", "{}") and plog.latest() == second  # written once, never replaced
    with plog.lock("run-a", wait_s=0):  # the lock file is created the same way
        assert plog._held_by()["run_id"] == "run-a" and not plog._create("_lock", "{}")
    assert "_lock" not in os.listdir(tmp_path / "_publish")


def test_a_lock_created_between_the_check_and_the_create_is_a_wait_not_a_crash(spark, tmp_path, monkeypatch):
    """On an object store the lock file is written straight (S3A has no rename), and S3A's create refuses
    a name that appeared after this run's check: that is the lock taken by another run (wait), not an
    error. The local file system refuses the same way; here the check is made to miss the file."""
    from etl import publish as P

    plog = P.PublishLog(f"file://{tmp_path}", spark)
    real = P.PublishLog._hfs

    class RacedCheck:  # the other run creates the file right after this run's exists()
        def __init__(self, hfs):
            self.hfs = hfs

        def exists(self, jpath):
            return False

        def __getattr__(self, name):
            return getattr(self.hfs, name)

    def raced(self, path):
        jpath, hfs = real(self, path)
        return jpath, RacedCheck(hfs)

    with plog.lock("run-a", wait_s=0):
        monkeypatch.setattr(P, "is_object_store", lambda path: True)
        monkeypatch.setattr(P.PublishLog, "_hfs", raced)
        assert not plog._create("_lock", "{}")
        monkeypatch.undo()
        assert plog._held_by()["run_id"] == "run-a"  # the holder's file is untouched


def test_a_vacuum_of_a_stage1_table_publishes_its_commits_and_undoes_unpublished_versions(spark, tmp_path):
    """A vacuum commits too (delta-rs logs it): it runs holding the publish lock and publishes the version
    it ends at, so the next build has nothing to "recover". A dead run's unpublished commit is undone
    first (publishing the vacuum's version would publish it too), and its files then go."""
    from etl.build import build_date
    from etl.config import load_config
    from etl.publish import PublishLog, recover
    from etl.tables import TableStore

    cfg = load_config(write_config(tmp_path, {"samples": {"neg_rate": 1.0, "image_px": 16}}))
    write_catalog(cfg, D0, ["i1", "i2", "i3"])
    write_log(cfg, D0, [pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2"]),
                        click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1")])
    store = TableStore(spark, cfg)
    build_date(spark, cfg, store, D0, "run-d0")
    plog = PublishLog(cfg.tables_root, spark)
    items = store.read("items")
    dead = store.stage_partition(items.drop("dt"), "items", {"dt": D1})  # a run that died before its commit
    dead_files = list(Path(dead.folder.split(":", 1)[-1]).rglob("*.parquet"))
    assert dead_files

    listed = store.vacuum("items", retention_hours=0, dry_run=False)
    assert {os.path.basename(p) for p in listed} >= {p.name for p in dead_files}
    assert not any(p.exists() for p in dead_files)
    assert plog.latest()["tables"]["items"] == store.latest_version("items") == store.version("items")
    assert recover(store, plog) == []  # the vacuum's own commits are published: nothing to undo
    assert sorted(r["item_id"] for r in store.read("items").collect()) == ["i1", "i2", "i3"]

    published = store.version("items")
    store.commit_staged(store.stage_partition(items.drop("dt"), "items", {"dt": D1}))  # committed, never published
    unpublished = store._files_of("items", store._open(store.path("items"), published + 1))  # (files refuses it)
    orphan = [f.uri.removeprefix("file://") for f in unpublished if f.partition_values["dt"] == D1]
    assert orphan and store.version("items") == published
    store.vacuum("items", retention_hours=0, dry_run=False)  # undoes the dead commit first, as a build would
    assert plog.latest()["tables"]["items"] == store.latest_version("items") > published + 1
    assert recover(store, plog) == []
    assert store.read("items").where(f"dt = '{D1}'").count() == 0
    assert sorted(r["item_id"] for r in store.read("items").collect()) == ["i1", "i2", "i3"]
    assert not any(os.path.exists(p) for p in orphan)  # the undone commit's files are unreferenced: vacuumed
