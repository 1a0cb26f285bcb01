"""etl/pyworker.py: a zipimporter re-reads its archive only when the archive changed, and Spark's Python
workers that run this project's code carry that (CPython 3.10/3.11 re-read every archive on every task)."""
from __future__ import annotations

import importlib
import sys
import zipfile
import zipimport

import pytest

from etl import pyworker


def _zip(path, modules: dict) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, source in modules.items():
            z.writestr(f"{name}.py", source)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ invalidates zipimport caches lazily itself")
def test_zipimporter_rereads_its_archive_only_when_the_archive_changed(tmp_path):
    assert getattr(zipimport.zipimporter, pyworker._PATCHED)  # importing etl applied it
    assert pyworker.skip_unchanged_archive_rereads() is False  # idempotent: not wrapped twice
    archive = tmp_path / "pkgs.zip"
    _zip(archive, {"courier_zip_a": "X = 1\n"})
    importer = zipimport.zipimporter(str(archive))
    importer.invalidate_caches()  # first call: reads it, records the archive's stamp
    files = importer._files

    importer.invalidate_caches()
    importlib.invalidate_caches()
    assert importer._files is files  # unchanged archive: its directory is not read again

    _zip(archive, {"courier_zip_a": "X = 1\n", "courier_zip_b": "Y = 2\n"})  # rewritten, bigger
    assert importer.find_spec("courier_zip_b") is None  # stale until invalidated, as without the patch
    importer.invalidate_caches()
    assert importer._files is not files
    spec = importer.find_spec("courier_zip_b")
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.Y == 2

    archive.unlink()  # gone: the eager re-read's own behaviour (an empty directory), no error
    importer.invalidate_caches()
    assert importer.find_spec("courier_zip_a") is None


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ invalidates zipimport caches lazily itself")
def test_spark_python_workers_running_project_code_skip_unchanged_rereads(spark):
    def probe(rows):
        import zipimport

        import etl.pyworker as P

        importlib.invalidate_caches()  # what PySpark's worker does before every task (this one: at most
        # one re-read per archive, to record what it read: the worker's own call came before the patch)
        zips = [f for f in sys.path_importer_cache.values() if isinstance(f, zipimport.zipimporter)]
        before = [z._files for z in zips]
        importlib.invalidate_caches()  # the next task's
        yield (bool(getattr(zipimport.zipimporter, P._PATCHED, False)), len(zips),
               sum(z._files is b for z, b in zip(zips, before)))

    got = spark.sparkContext.parallelize(range(4), 4).mapPartitions(probe).collect()
    assert len(got) == 4
    for patched, zips, kept in got:
        assert patched
        assert zips >= 1  # pyspark.zip / py4j are zip imports in the workers
        assert kept == zips  # none re-read
