"""Stage 1 against real-world input (real Spark, real Delta): files of every kind in a date folder,
strict parsing and semantic reasons, image limits, empty/missing input, order between dates, cheap
reruns, and verify-before-publish with a deliberately broken transform."""
from __future__ import annotations

import base64
import bz2
import gzip
import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import click, pv, write_catalog, write_config, write_jsonl
from s3_server import s3_server  # noqa: F401 - the fixture

D0, D1, D2 = "2026-11-19", "2026-11-20", "2026-11-21"
ITEMS = [f"i{k}" for k in range(1, 9)]
BAD_BYTES = b'{"event_id": "y9", "event_type": "pv", "user_id": "u\xff\xfe"}'
# D1's faults, one per reason, each line on its own (reason -> line).
FAULTS = {
    "trailing_content": json.dumps(pv("y1", "2026-11-20T11:00:00Z", "u5", "q1", ["i1"]))
    + json.dumps(click("y1b", "2026-11-20T11:00:01Z", "u5", "q1", "i1")),
    "wrong_type:user_id": json.dumps(pv("y2", "2026-11-20T11:00:00Z", 5, "q2", ["i1"])),
    "wrong_type:items": json.dumps(pv("y3", "2026-11-20T11:00:00Z", "u5", "q3", "i1")),
    "bad_event_type": json.dumps({"event_id": "y4", "event_type": "view", "ts": "2026-11-20T11:00:00Z",
                                  "user_id": "u5", "pv_id": "q4"}),
    "blank_line": "",
}
OUTSIDE = [pv("t1", "1970-01-01T00:00:00Z", "u6", "r1", ["i1"]), pv("t2", "2999-01-01T00:00:00Z", "u6", "r2", ["i1"]),
           pv("t3", "2026-11-21T02:00:00Z", "u6", "r3", ["i1"])]


def write_d1(cfg) -> None:
    base = Path(cfg.raw_root) / "search_log" / f"dt={D1}"
    main = [
        pv("b1", "2026-11-20T08:00:00Z", "u1", "p1", ["i2", "i3", "i2", "i4"]),  # i2 listed twice
        click("b2", "2026-11-20T08:00:10Z", "u1", "p1", "i2"),
        click("b3", "2026-11-20T07:59:00Z", "u1", "p1", "i3"),  # before its PV
        # the same event_id with different content: both copies are conflicting
        click("b4", "2026-11-20T08:00:20Z", "u1", "p1", "i4"),
        click("b4", "2026-11-20T08:00:21Z", "u1", "p1", "i4"),
        # the same pv_id on two PV events with different items: both conflicting (their click: orphan)
        pv("b5", "2026-11-20T09:00:00Z", "u2", "p5", ["i1", "i2"]),
        pv("b6", "2026-11-20T09:00:00Z", "u2", "p5", ["i1", "i3"]),
        click("b7", "2026-11-20T09:00:05Z", "u2", "p5", "i1"),
        *OUTSIDE,
        *FAULTS.values(),
    ]
    write_jsonl(base / "part-00000.jsonl", main)
    with (base / "part-00000.jsonl").open("ab") as fh:
        fh.write(BAD_BYTES + b"\n")
    more = [pv("c1", "2026-11-20T10:00:00Z", "u1", "p6", ["i1", "i5"]),
            click("c2", "2026-11-20T10:00:05Z", "u1", "p6", "i5")]
    (base / "part-00001.jsonl.gz").write_bytes(gzip.compress(("\n".join(map(json.dumps, more)) + "\n").encode()))
    last = [pv("c3", "2026-11-20T12:00:00Z", "u1", "p7", ["i6", "i1"]), click("c4", "2026-11-20T12:00:09Z", "u1", "p7", "i6")]
    (base / "part-00002.json.bz2").write_bytes(bz2.compress("\n".join(map(json.dumps, last)).encode()))  # no final \n
    (base / "_SUCCESS").write_text("")
    (base / ".part-00000.jsonl.tmp").write_bytes(b"partial")


def write_inputs(cfg) -> None:
    images = Path(cfg.images_root)
    extra = [
        json.dumps({"item_id": "i9", "category": "dress", "title": "huge", "price": 1.0, "image_uri": "i9.png"}),
        json.dumps({"item_id": "i10", "category": "dress", "title": "out", "price": 1.0, "image_uri": "../i1.png"}),
        json.dumps({"item_id": "i1", "category": "dress", "title": "again", "price": 2.0, "image_uri": "i1.png"}),
        json.dumps({"item_id": "i11", "category": "dress", "title": "t", "price": "cheap", "image_uri": "i1.png"}),
    ]
    write_catalog(cfg, D0, ITEMS, extra_lines=extra)
    from test_stage1_parsing import _png_header_only

    (images / "i9.png").write_bytes(_png_header_only(20000, 20000))
    write_jsonl(Path(cfg.raw_root) / "search_log" / f"dt={D0}" / "part-00000.jsonl",
                [pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2", "i3"]),
                 click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1"),
                 click("a2", "2026-11-19T10:00:06Z", "u1", "p0", "i3"),
                 pv("a3", "2026-11-19T11:00:00Z", "u1", "p00", ["i1"]),
                 click("a4", "2026-11-19T11:00:05Z", "u1", "p00", "i1")])  # i1 clicked again, later
    write_d1(cfg)


@pytest.fixture(scope="module")
def messy(spark, tmp_path_factory):
    from etl.build import build_date
    from etl.config import load_config
    from etl.tables import TableStore

    tmp = tmp_path_factory.mktemp("messy")
    cfg = load_config(write_config(tmp, {"samples": {"neg_rate": 1.0, "image_px": 16}}))
    write_inputs(cfg)
    store = TableStore(spark, cfg)
    reports = {d: build_date(spark, cfg, store, d, "run-1") for d in (D0, D1)}
    return cfg, store, reports


def test_every_file_is_read_or_reported(messy):
    _, _, reports = messy
    f = reports[D1].counts["files"]["search_log"]
    assert f["files"] == 3 and sorted(f["ignored"]) == [".part-00000.jsonl.tmp", "_SUCCESS"]
    assert f["lines"] == 8 + len(OUTSIDE) + len(FAULTS) + 1 + 2 + 2  # gzip and bzip2 lines included
    assert reports[D1].counts["raw_lines"] == reports[D1].counts["raw_rows"] == f["lines"]


def test_hidden_names_are_ignored_whatever_the_ignore_patterns_say():
    """Spark's file sources never read a file whose name starts with '_' or '.', even named one by one:
    classified as read, its lines would be counted and no row would come from them."""
    from etl.inputs import classify

    for patterns in ([], ["*.tmp"], ["_SUCCESS"]):
        assert classify("_part.jsonl", patterns) == classify(".part.jsonl.gz", patterns) == "ignored"
        assert classify("part.jsonl", patterns) == "read" and classify("part.txt", patterns) == "unsupported"
    assert classify("part.jsonl.tmp", ["*.tmp"]) == "ignored"


def test_unreadable_files_fail_the_date_listing_them(spark, messy):
    from etl.build import InputError, build_date

    cfg, store, _ = messy
    bad = Path(cfg.raw_root) / "search_log" / "dt=2026-11-25"
    bad.mkdir(parents=True)
    (bad / "part-00000.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (bad / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"\['notes.txt', 'part-00000.jsonl.zst'\].*zstd -d"):
        build_date(spark, cfg, store, "2026-11-25", "run-x")
    # Two that Hadoop's local file system would skip unseen or fail on half-way: a link to a file that is
    # gone (left out of its listing) and a name with a colon (its checksum file's name cannot hold one).
    (bad / "notes.txt").unlink()
    (bad / "part-00000.jsonl.zst").unlink()
    (bad / "events-00:00.jsonl").write_text(json.dumps({"event_id": "a"}) + "\n")
    (bad / "gone.jsonl").symlink_to(bad / "nowhere.jsonl")
    (bad / "_SUCCESS").write_text("")
    with pytest.raises(InputError, match=r"2 file\(s\) the job cannot read: \['events-00:00.jsonl', 'gone.jsonl'\]; "
                                         r"rename 'events-00:00.jsonl'.*'gone.jsonl' cannot be opened"):
        build_date(spark, cfg, store, "2026-11-25", "run-x")
    shutil.rmtree(bad)


def test_a_damaged_compressed_file_fails_the_date_naming_it(spark, messy):
    """A truncated .gz or a .bz2 that is not bzip2 is an InputError naming each file (exit 1), read by the
    executors from local files or through Spark's binaryFile source alike; nothing is committed."""
    from etl.build import InputError, build_date
    from etl.inputs import discover, scan_files

    cfg, store, _ = messy
    versions = {t: store.version(t) for t in ("pv_samples", "quarantine")}
    bad = Path(cfg.raw_root) / "search_log" / "dt=2026-11-25"
    bad.mkdir(parents=True)
    whole = gzip.compress(b"".join(json.dumps({"event_id": f"z{i}"}).encode() + b"\n" for i in range(2000)))
    (bad / "part-00000.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (bad / "part-00001.jsonl.bz2").write_bytes(b"plain text, not bzip2\n")
    (bad / "part-00002.jsonl").write_text(json.dumps({"event_id": "ok"}) + "\n")
    # what Python's own readers let through: zero padding after the last gzip member (Hadoop's codec then
    # fails half-way through the job), lines appended after a bzip2 stream (both readers drop them)
    (bad / "part-00003.jsonl.gz").write_bytes(gzip.compress(b'{"event_id": "p"}\n') + b"\0" * 64)
    (bad / "part-00004.jsonl.bz2").write_bytes(bz2.compress(b'{"event_id": "q"}\n') + b'{"event_id": "r"}\n')
    # content other than UTF-8 text: every "line" would be quarantined and the date published empty
    (bad / "part-00005.jsonl").write_bytes(whole)
    (bad / "part-00006.jsonl").write_bytes('{"event_id": "u"}\n'.encode("utf-16"))
    try:
        with pytest.raises(InputError, match=r"6 file\(s\) could not be read to the end: .*part-00000.jsonl.gz "
                                             r"\(EOFError: .*\); .*part-00001.jsonl.bz2 \(ValueError: not bzip2"
                                             r".*part-00003.jsonl.gz \(ValueError: the bytes after gzip stream 1"
                                             r".*part-00004.jsonl.bz2 \(ValueError: the bytes after bzip2 stream 1"
                                             r".*part-00005.jsonl \(ValueError: its content is gzip-compressed "
                                             r"\(name it .gz\)\).*part-00006.jsonl \(ValueError: its content is "
                                             r"UTF-16 text"):
            build_date(spark, cfg, store, "2026-11-25", "run-x")
        assert {t: store.version(t) for t in versions} == versions
        files = discover(spark, str(Path(cfg.raw_root) / "search_log"), "2026-11-25", []).read
        with pytest.raises(InputError, match=r"part-00000.jsonl.gz \(EOFError"):
            scan_files(spark, files, stream_local=False)
    finally:
        shutil.rmtree(bad)


def test_a_local_file_changed_behind_hadoop_s_checksum_fails_the_date_naming_the_checksum_file(spark, tmp_path):
    """A local log written through Hadoop has a .<name>.crc beside it, which Hadoop's read checks: a file
    replaced by another tool (same size or not) made the job fail half-way with a ChecksumException.
    The scan now checks the same checksums first: an untouched file passes, a changed one is an
    InputError naming the checksum file to delete."""
    from etl.inputs import InputError, _HadoopChecksummed, _scan_bytes, discover, scan_files
    from etl.spark import hadoop_path

    folder = tmp_path / "raw" / "dt=2026-11-20"
    folder.mkdir(parents=True)
    body = b"".join(json.dumps({"event_id": f"e{k}", "pad": "x" * (k % 37)}).encode() + b"\n" for k in range(300))
    path = folder / "part-0.jsonl"
    jpath, hfs = hadoop_path(spark, str(path))
    out = hfs.create(jpath, True)  # Hadoop's local file system writes .part-0.jsonl.crc beside it
    out.write(bytearray(body))
    out.close()
    assert (folder / ".part-0.jsonl.crc").exists() and len(body) % 512  # a short last chunk
    files = discover(spark, str(tmp_path / "raw"), "2026-11-20", []).read
    assert [f.name for f in files] == ["part-0.jsonl"]
    assert scan_files(spark, files)[files[0].path].lines == 300 == spark.read.text(str(path)).count()
    with open(path, "rb") as f:  # reads of any size, chunks straddling them
        checked = _HadoopChecksummed(f, str(folder / ".part-0.jsonl.crc"))
        assert b"".join(iter(lambda: checked.read(1000), b"")) == body

    changed = {"same size": body.replace(b'"e7"', b'"e8"'), "longer": body + b'{"event_id": "late"}\n',
               "shorter": body[:-512]}
    for what, new in changed.items():
        path.write_bytes(new)  # as a copy by another tool does: the old checksum file stays
        with pytest.raises(Exception, match="Checksum"):  # what the job met half-way before
            spark.read.text(str(path)).count()
        with pytest.raises(InputError, match=r"part-0.jsonl \(ValueError: .*\.part-0\.jsonl\.crc.*if the file's "
                                             r"bytes are right, delete \.part-0\.jsonl\.crc"):
            scan_files(spark, files)
    (folder / ".part-0.jsonl.crc").unlink()
    lines = scan_files(spark, files)[files[0].path].lines
    assert lines == _scan_bytes("x", body[:-512])[1] == spark.read.text(str(path)).count() < 300


def test_strict_parsing_and_semantic_reasons(messy):
    _, store, reports = messy
    q = reports[D1].counts["quarantine"]["search_log"]
    assert q == {**{r: 1 for r in FAULTS}, "bad_encoding": 1, "ts_outside_date": 3, "click_before_pv": 1,
                 "conflicting_duplicate": 4, "orphan_click": 1}
    rows = store.read("quarantine").where(f"dt = '{D1}' and source = 'search_log'").collect()
    by_reason: dict = {}
    for r in rows:
        by_reason.setdefault(r["reason"], []).append(r)
    assert sorted(r["event_id"] for r in by_reason["conflicting_duplicate"]) == ["b4", "b4", "b5", "b6"]
    assert by_reason["click_before_pv"][0]["event_id"] == "b3"
    assert {r["event_id"] for r in by_reason["ts_outside_date"]} == {"t1", "t2", "t3"}
    assert by_reason["wrong_type:user_id"][0]["raw"] == FAULTS["wrong_type:user_id"]
    enc = by_reason["bad_encoding"][0]
    assert base64.b64decode(enc["raw_b64"]) == BAD_BYTES and "\ufffd" in enc["raw"]
    assert all(r["raw_b64"] is None for r in rows if r["reason"] != "bad_encoding")
    # The quarantine stays readable by a non-Spark Delta reader (valid UTF-8 everywhere).
    import pyarrow.fs as pafs
    from deltalake import DeltaTable

    path = str(Path(store.root) / "quarantine")
    ds = DeltaTable(path).to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(path, pafs.LocalFileSystem()))
    assert "\ufffd" in "".join(ds.to_table(columns=["raw"]).column("raw").to_pylist())


def test_item_listed_twice_keeps_its_first_position(messy):
    _, store, reports = messy
    assert reports[D1].counts["repeated_on_page"] == 1
    p1 = [(r["item_id"], r["position"], r["label"]) for r in
          store.read("ctr_log").where("pv_id = 'p1'").orderBy("position").collect()]
    assert p1 == [("i2", 0, 1), ("i3", 1, 0), ("i4", 3, 0)]  # b3 (before the PV) and b4 (conflicting) label nothing


def test_click_history_ts_is_the_latest_click_of_a_repeated_item(messy):
    _, store, _ = messy
    p1 = store.read("pv_samples").where("pv_id = 'p1'").collect()[0]
    assert p1["click_history"] == ["i1", "i3"]
    assert [t.isoformat() for t in p1["click_history_ts"]] == ["2026-11-19T11:00:05", "2026-11-19T10:00:06"]


def test_catalog_and_image_reasons(messy):
    _, store, reports = messy
    c = reports[D0].counts
    assert c["quarantine"]["catalog"] == {"duplicate_item": 1, "wrong_type:price": 1}
    assert c["quarantine"]["image"] == {"image_too_large": 1, "image_path_escapes_root": 1}
    q = {r["event_id"]: r for r in store.read("quarantine").where(f"dt = '{D0}' and source = 'image'").collect()}
    assert "400000000 pixels" in q["i9"]["detail"] and q["i10"]["reason"] == "image_path_escapes_root"
    assert c["items"] == 10 and c["item_images"] == 8


def test_rerun_is_unchanged_then_a_changed_file_rebuilds_that_date_only(spark, messy):
    from etl.build import build_date
    from etl.catalog import STAGE1 as STAGE1_TABLES

    cfg, store, _ = messy
    before = {t: store.version(t) for t in STAGE1_TABLES}
    again = build_date(spark, cfg, store, D1, "run-2")
    assert again.status == "unchanged" and not again.versions
    assert {t: store.version(t) for t in STAGE1_TABLES} == before
    d0_files = sorted(f.uri for f in store.files("pv_samples") if f.partition_values["dt"] == D0)
    with (Path(cfg.raw_root) / "search_log" / f"dt={D1}" / "part-00000.jsonl").open("a") as fh:
        fh.write(json.dumps(pv("z1", "2026-11-20T20:00:00Z", "u1", "p9", ["i1", "i2"])) + "\n")
    rebuilt = build_date(spark, cfg, store, D1, "run-3")
    assert rebuilt.status == "built" and rebuilt.counts["raw_rows"] == again_rows(messy) + 1
    assert {t: store.version(t) for t in STAGE1_TABLES} == {t: v + 1 for t, v in before.items()}
    assert sorted(f.uri for f in store.files("pv_samples") if f.partition_values["dt"] == D0) == d0_files
    assert build_date(spark, cfg, store, D1, "run-4").status == "unchanged"


def again_rows(messy) -> int:
    return messy[2][D1].counts["raw_rows"]


def test_empty_folder_is_refused_unless_allowed(spark, messy):
    from etl.build import InputError, build_date

    cfg, store, _ = messy
    folder = Path(cfg.raw_root) / "search_log" / f"dt={D2}"
    folder.mkdir(parents=True)
    (folder / "_SUCCESS").write_text("")
    (folder / "part-00000.jsonl").write_text("")
    with pytest.raises(InputError, match="holds no lines.*--allow-empty"):
        build_date(spark, cfg, store, D2, "run-e")
    assert store.read("pv_samples").where(f"dt = '{D2}'").count() == 0
    report = build_date(spark, cfg, store, D2, "run-e2", allow_empty=True)
    assert report.status == "built" and report.counts["raw_rows"] == 0 and report.versions
    # Published empty from these inputs: a rerun without --allow-empty (a backfill over it) is unchanged.
    assert build_date(spark, cfg, store, D2, "run-e3").status == "unchanged"
    # ... and one where something else changed (here the config) rebuilds it: its log files are the same.
    import dataclasses

    other = dataclasses.replace(cfg, samples=dataclasses.replace(cfg.samples, l_click=cfg.samples.l_click + 1))
    assert build_date(spark, other, store, D2, "run-e4").status == "built"
    assert build_date(spark, cfg, store, D2, "run-e5").status == "built"  # back to the config of the others
    with pytest.raises(InputError, match="no raw search log for 2026-11-22"):
        build_date(spark, cfg, store, "2026-11-22", "run-m")
    # A catalog date without a search log: both the date and a later one name the way out.
    from etl.build import PublishError

    write_catalog(cfg, "2026-11-22", ["only-in-catalog-22"])
    later = Path(cfg.raw_root) / "search_log" / "dt=2026-11-23"
    later.mkdir(parents=True)
    (later / "part-00000.jsonl").write_text("")
    set_aside = Path(cfg.raw_root) / "catalog" / "dt=2026-11-20.bad"  # no date: ignored, never waited for
    set_aside.mkdir()
    (set_aside / "items.jsonl").write_text("{}\n")
    try:
        with pytest.raises(InputError, match=r"no raw search log for 2026-11-22.*the catalog has this date: "
                                             r"give such a date an empty search log .* --allow-empty"):
            build_date(spark, cfg, store, "2026-11-22", "run-m")
        with pytest.raises(PublishError, match=r"earlier date\(s\) \['2026-11-22'\] have raw input .*"
                                               r"\['2026-11-22'\] have a catalog but no search log: give such"):
            build_date(spark, cfg, store, "2026-11-23", "run-m", allow_empty=True)
        # The set-aside folder is not read, and the date's report says so.
        report = build_date(spark, cfg, store, D2, "run-m2", force=True)
        assert report.counts["ignored_catalog_folders"] == ["dt=2026-11-20.bad"]
        assert "ignored catalog folder(s), not dt=YYYY-MM-DD: ['dt=2026-11-20.bad']" in report.render()
    finally:
        shutil.rmtree(Path(cfg.raw_root) / "catalog" / "dt=2026-11-22")
        (Path(cfg.images_root) / "only-in-catalog-22.png").unlink()
        shutil.rmtree(later)
        shutil.rmtree(set_aside)


def test_an_archived_catalog_folder_of_a_published_date_fails_the_next_build_naming_it(spark, messy):
    """Every build reads every earlier catalog: without D0's, its items were unknown (their events
    quarantined as unknown_item) or new again (a second item_images row, which misplaced images in
    courier_train's shuffle join). Nothing is built until the folder is back."""
    from etl.build import InputError, build_date

    cfg, store, _ = messy
    versions = {t: store.version(t) for t in ("items", "item_images", "quarantine")}
    folder = Path(cfg.raw_root) / "catalog" / f"dt={D0}"
    archived = folder.parent.parent / "archived-catalog"
    folder.rename(archived)
    try:
        with pytest.raises(InputError, match=rf"catalog folder\(s\) of published date\(s\) \['{D0}'\] are gone"):
            build_date(spark, cfg, store, D1, "run-archived", force=True)
    finally:
        archived.rename(folder)
    assert {t: store.version(t) for t in versions} == versions
    assert build_date(spark, cfg, store, D1, "run-restored").status == "unchanged"


def test_a_date_before_its_earlier_dates_fails_naming_them(spark, messy, tmp_path):
    from etl.build import PublishError, build_date
    from etl.config import load_config
    from etl.tables import TableStore

    cfg, _, _ = messy
    other = load_config(write_config(tmp_path, {"samples": {"image_px": 16}, "paths": {
        "raw_root": cfg.raw_root, "images_root": cfg.images_root}}))
    store = TableStore(spark, other)
    with pytest.raises(PublishError, match=r"earlier date\(s\) \['2026-11-19'\].*not published"):
        build_date(spark, other, store, D1, "run-o")
    assert not store.exists("pv_samples")


def test_counts_that_do_not_add_up_commit_nothing_and_name_the_ids(spark, messy, monkeypatch):
    """Mutations: a transform that doubles ctr_log rows, and a parser that loses lines. Both used to
    pass identities computed from the same frames; here the table statistics and the raw line count
    from the files disagree, and nothing is committed."""
    import dataclasses

    from etl import samples as S
    from etl.build import VerifyError, build_date
    from etl.catalog import STAGE1 as STAGE1_TABLES

    cfg, store, _ = messy
    cfg2 = dataclasses.replace(cfg, samples=dataclasses.replace(cfg.samples, sampling_seed=99))  # not `unchanged`
    before = {t: store.latest_version(t) for t in STAGE1_TABLES}
    real_ctr_log, real_parse = S.ctr_log, S.parse_events
    monkeypatch.setattr(S, "ctr_log", lambda labelled: real_ctr_log(labelled).unionByName(
        real_ctr_log(labelled).where("pv_id = 'p6'")))
    with pytest.raises(VerifyError, match=r"(?s)impressions = ctr_log.*first ids repeated in ctr_log: p6/i1"):
        build_date(spark, cfg2, store, D1, "run-v")
    monkeypatch.setattr(S, "ctr_log", real_ctr_log)
    monkeypatch.setattr(S, "parse_events", lambda raw, skew: real_parse(raw, skew).where("event_id != 'c1' or dt != '2026-11-20'"))
    with pytest.raises(VerifyError, match=r"(?s)raw_lines\(files\) = raw_rows.*part-00001.jsonl.gz: 2 lines in the file, 1 parsed"):
        build_date(spark, cfg2, store, D1, "run-w")
    assert {t: store.latest_version(t) for t in STAGE1_TABLES} == before


def test_image_paths_resolve_once_per_folder_and_stay_under_the_root(spark, tmp_path):
    """plan_images resolves each folder once and a plain file name without a symlink under it; the
    result must equal resolving every whole path: a symlink out of the root, `..` and odd names are
    still refused, and a symlink that stays inside reads its target."""
    import os

    from etl.images import IMAGE_ESCAPES_ROOT, IMAGE_MISSING
    from etl.inputs import plan_images

    root, outside = tmp_path / "images", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    for p in (root / "a" / "x.png", root / "a" / "b" / "y.png", root / "top.png", outside / "secret.png"):
        p.write_bytes(b"png")
    os.symlink(outside / "secret.png", root / "a" / "leak.png")  # a file symlink out of the root
    os.symlink(outside, root / "a" / "out")  # a folder symlink out of the root
    os.symlink(root / "a" / "b" / "y.png", root / "a" / "alias.png")  # stays inside: allowed
    os.symlink(root / "a" / "loop2.png", root / "a" / "loop1.png")  # a symlink loop: unreadable, no crash
    os.symlink(root / "a" / "loop1.png", root / "a" / "loop2.png")
    items = [("i1", "a/x.png"), ("i2", "a/b/y.png"), ("i3", "top.png"), ("i4", "a/b/../x.png"),
             ("i5", "a/leak.png"), ("i6", "a/out/secret.png"), ("i7", "../outside/secret.png"),
             ("i8", "a/alias.png"), ("i9", "a/missing.png"), ("i10", "a//b/y.png"), ("i11", "a/.."),
             ("i12", "a/b/.."), ("i13", "a/loop1.png"), ("i14", "a/" + "n" * 300 + ".png")]
    plan = plan_images(spark, items, str(root), 1000)
    read = {i: p.split(":", 1)[1] if p.startswith("file:") else p for i, p in plan.to_read}
    real = {i: os.path.realpath(p) for i, p in read.items()}
    assert real == {"i1": str(root / "a" / "x.png"), "i2": str(root / "a" / "b" / "y.png"),
                    "i3": str(root / "top.png"), "i4": str(root / "a" / "x.png"),
                    "i8": str(root / "a" / "b" / "y.png"), "i10": str(root / "a" / "b" / "y.png")}
    assert {i: r for i, r, _ in plan.rejected} == {
        "i5": IMAGE_ESCAPES_ROOT, "i6": IMAGE_ESCAPES_ROOT, "i7": IMAGE_ESCAPES_ROOT,
        "i9": IMAGE_MISSING, "i11": IMAGE_MISSING, "i12": IMAGE_MISSING, "i13": IMAGE_MISSING,
        "i14": IMAGE_MISSING}


def test_an_image_rewritten_in_place_with_its_size_and_mtime_kept_is_seen_as_changed(spark, tmp_path):
    """The listing is part of the date's fingerprint: an image replaced by other bytes of the same size
    with its old mtime put back (`cp -p`, a restore) must change it, or the rerun says `unchanged`."""
    import os

    from etl.inputs import fingerprint, plan_images

    root = tmp_path / "images"
    root.mkdir()
    image = root / "a.png"
    image.write_bytes(b"old bytes")
    before = plan_images(spark, [("i1", "a.png")], str(root), 1000)
    st = os.stat(image)
    image.write_bytes(b"new bytes")  # the same size
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = plan_images(spark, [("i1", "a.png")], str(root), 1000)
    assert [x[:3] for x in before.listing] == [x[:3] for x in after.listing] == [("a.png", 9, st.st_mtime_ns // 10**6)]
    assert fingerprint({"images": before.listing}) != fingerprint({"images": after.listing})
    again = plan_images(spark, [("i1", "a.png")], str(root), 1000)
    assert fingerprint({"images": again.listing}) == fingerprint({"images": after.listing})  # untouched: same


@pytest.mark.parametrize("unplanned", [0, 30])
def test_image_files_are_read_once_whether_folders_load_whole_or_filtered(spark, tmp_path, unplanned):
    """Spark's binaryFile source (any URI root: s3a://, file://) over nested image folders, names a glob
    could misread, and a folder read whole (planned files are most of it) or through a name filter
    (unplanned files are most of it): every planned file comes back exactly once, with its own bytes."""
    from etl.inputs import plan_images, read_image_files
    from etl.spark import file_open_cost

    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    uris = ["a/x.png", "a/b/x.png", "a/b/y.png", "a/we ird.png", "a/b/{z}.png", "top.png"]
    for u in uris + [f"a/b/other{k}.png" for k in range(unplanned)]:
        (root / u).write_bytes(u.encode())
    items = [(f"i{k}", u) for k, u in enumerate(uris)]
    hidden = ["_h.png", "a/.x.png", "a/_tmp/z.png"]  # names Hadoop's listing skips: never read, so rejected
    for u in hidden:
        (root / u).parent.mkdir(exist_ok=True)
        (root / u).write_bytes(u.encode())
    plan = plan_images(spark, items + [(f"h{k}", u) for k, u in enumerate(hidden)], f"file://{root}", 1000)
    assert len(plan.to_read) == len(uris) and not plan.local
    assert sorted((i, r) for i, r, _ in plan.rejected) == [("h0", "image_missing"), ("h1", "image_missing"),
                                                           ("h2", "image_missing")]
    with file_open_cost(spark, plan.mean_bytes):
        got = [(r["item_id"], bytes(r["content"])) for r in read_image_files(spark, plan).collect()]
    assert sorted(got) == sorted((i, u.encode()) for i, u in items)


def test_local_images_decode_as_the_binary_file_source_reads_them(spark, tmp_path):
    """A local images_root: the executors open the files themselves (image_files gives paths). The
    decoded rows equal those from the bytes Spark's binaryFile source reads (read_image_files), bad
    images included; a file removed after the listing is image_missing, not a failed date."""
    import io

    from PIL import Image

    from etl import samples as S
    from etl.images import IMAGE_CORRUPT, IMAGE_MISSING
    from etl.inputs import image_files, plan_images, read_image_files

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for k, (w, h) in enumerate([(40, 30), (17, 64), (96, 96)]):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (k * 80, 255 - k * 60, 7)).save(buf, format="PNG")
        (root / ("sub" if k else "") / f"i{k}.png").write_bytes(buf.getvalue())
    (root / "bad.png").write_bytes(b"\x89PNG not really")
    (root / "gone.png").write_bytes(b"soon removed")
    items = [("i0", "i0.png"), ("i1", "sub/i1.png"), ("i2", "sub/i2.png"), ("bad", "bad.png"), ("gone", "gone.png")]
    plan = plan_images(spark, items, str(root), 10_000)
    local = image_files(spark, plan)
    assert local.columns == ["item_id", "path"]

    def decoded(files):
        return {r["item_id"]: r.asDict() for r in S.decode_images(files, 24, 90, 10_000).collect()}

    by_spark = decoded(read_image_files(spark, plan))
    assert by_spark["bad"]["reason"] == IMAGE_CORRUPT and by_spark["i1"]["width"] == 24
    assert decoded(local) == by_spark
    (root / "gone.png").unlink()
    assert decoded(local)["gone"]["reason"] == IMAGE_MISSING


def test_input_scan_counts_the_lines_spark_reads_streamed_or_whole(spark, tmp_path):
    """scan_files' line count is the anchor raw_rows is checked against: for every line-end style,
    codec and odd ending it must equal the lines Spark's text source reads, whether the executors
    stream a local file (8 MB chunks: a \\r\\n may straddle two) or Spark's binaryFile source reads it
    whole; sizes and sha256 are the stored bytes'."""
    _scan_every_kind_of_file(spark, tmp_path)


def _scan_every_kind_of_file(spark, tmp_path):
    """The checks above; (bodies by name, the streamed scan, the files)."""
    import hashlib

    from etl.inputs import discover, scan_files

    def text(n: int, ends: list[bytes]) -> bytes:
        return b"".join(b'{"event_id":"e%d"}' % k + ends[k % len(ends)] for k in range(n))

    chunk = 8 << 20
    straddle = b"x" * (chunk - 1) + b"\r\n" + b"tail"  # the \r ends one chunk, the \n starts the next
    bodies = {
        "lf.jsonl": text(50, [b"\n"]), "crlf.jsonl": text(50, [b"\r\n"]), "cr.jsonl": text(50, [b"\r"]),
        "mixed_no_final_end.jsonl": text(49, [b"\n", b"\r\n", b"\r", b"\n\n"]) + b'{"event_id":"last"}',
        "bom_and_blank.jsonl": b"\xef\xbb\xbf" + text(5, [b"\n"]) + b"\n\r\n\r",
        "straddle.jsonl": straddle,
        "two_members.jsonl.gz": gzip.compress(text(30, [b"\r\n"])) + gzip.compress(text(20, [b"\n"])),
        "one.jsonl.bz2": bz2.compress(text(40, [b"\r"])),
        # an "empty" file as Windows tools write UTF-8: the BOM alone, which Hadoop's reader skips: no line
        "bom_only.jsonl": b"\xef\xbb\xbf", "bom_only.jsonl.gz": gzip.compress(b"\xef\xbb\xbf"),
        "bom_newline.jsonl": b"\xef\xbb\xbf\n",
    }
    folder = tmp_path / "raw" / "dt=2026-11-20"
    folder.mkdir(parents=True)
    for name, body in bodies.items():
        (folder / name).write_bytes(body)
    files = discover(spark, str(tmp_path / "raw"), "2026-11-20", []).read
    streamed, whole = scan_files(spark, files), scan_files(spark, files, stream_local=False)
    for name, body in bodies.items():
        spark_lines = spark.read.text(str(folder / name)).count()
        want = (len(body), hashlib.sha256(body).hexdigest(), spark_lines)
        f = next(f for f in files if f.name == name)
        assert (streamed[f.path].size, streamed[f.path].sha256, streamed[f.path].lines) == want, name
        assert (whole[f.path].size, whole[f.path].sha256, whole[f.path].lines) == want, name
    assert spark.read.text(str(folder / "straddle.jsonl")).count() == 2
    return bodies, streamed, files


def test_object_store_files_are_streamed_by_the_executors_with_the_same_scan(spark, tmp_path, s3_server):  # noqa: F811
    """s3a:// log files are opened by the executors through the config's S3 settings and streamed (Spark's
    binaryFile source held each one whole, and refuses one over 2 GB): the same sizes, sha256 and line
    counts as the local files' scan; an object gone since it was listed is named, not skipped."""
    from etl import fs
    from etl.inputs import InputError, RawFile, scan_files

    bodies, local, local_files = _scan_every_kind_of_file(spark, tmp_path)
    base = s3_server.uri(f"raw-{time.time_ns()}/search_log/dt=2026-11-20")
    files = []
    for name, body in bodies.items():
        fs.write_bytes(f"{base}/{name}", body, s3_server.options)
        files.append(RawFile(f"{base}/{name}", name, len(body), 0))
    remote = scan_files(spark, files, storage=s3_server.options)
    for f in files:
        want = local[next(x.path for x in local_files if x.name == f.name)]
        assert (remote[f.path].size, remote[f.path].sha256, remote[f.path].lines) == \
            (want.size, want.sha256, want.lines), f.name
    gone = RawFile(f"{base}/gone.jsonl", "gone.jsonl", 10, 0)
    with pytest.raises(InputError, match="gone.jsonl: listed but could not be read back"):
        scan_files(spark, [files[0], gone], storage=s3_server.options)
    # The store failing the read (here: nothing listens at the endpoint) fails the job; the file is not
    # called damaged.
    import dataclasses
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(Exception) as refused:
        scan_files(spark, files[:1], storage=dataclasses.replace(s3_server.options, endpoint=dead))
    assert not isinstance(refused.value, InputError) and "StorageError" in str(refused.value), refused.value


def test_rows_parsed_per_file_are_counted_under_the_file_s_own_name(spark, tmp_path):
    """The per-file check (lines in the file vs rows parsed) looks files up by name: Spark's
    input_file_name() is a URI, so names with a space, brackets or a percent sign came back encoded and
    every such file was reported as "N lines in the file, 0 parsed"."""
    from pyspark.sql import functions as F

    from etl.build import _dated_lines
    from etl.counts import event_counts
    from etl.inputs import discover

    names = ["a b.jsonl", "x[1].jsonl", "p%20q.jsonl", "c+d.jsonl"]
    folder = tmp_path / "raw" / "dt=2026-11-20"
    folder.mkdir(parents=True)
    for k, name in enumerate(names):
        (folder / name).write_text("".join(json.dumps({"event_id": f"{k}-{i}"}) + "\n" for i in range(k + 1)))
    files = {"2026-11-20": discover(spark, str(tmp_path / "raw"), "2026-11-20", [])}
    events = (_dated_lines(spark, str(tmp_path / "raw"), files)
              .select("file", "dt", F.lit("pv").alias("event_type"), F.lit(None).cast("string").alias("reason"),
                      F.lit(None).cast("boolean").alias("pv_on_other_date")))
    assert event_counts(events, "2026-11-20")["rows_by_file"] == {name: k + 1 for k, name in enumerate(names)}
