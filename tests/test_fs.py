"""The storage layer (etl/fs.py) against a real S3 server process (moto's standalone server) and a local
folder: the same calls, the same results; atomic whole-file writes; a dead endpoint fails fast, naming it."""
from __future__ import annotations

import time

import pytest
from s3_server import s3_server  # noqa: F401 - the fixture

from etl import fs


@pytest.fixture(params=["local", "s3a", "s3"])
def root(request, tmp_path, s3_server):  # noqa: F811
    """A fresh root folder on each kind of storage, with the S3 options this process uses."""
    if request.param == "local":
        fs.configure(None)
        yield str(tmp_path / "root")
    else:
        fs.configure(s3_server.options)
        yield s3_server.uri(f"root-{request.node.name}-{time.time_ns()}", scheme=request.param)
    fs.configure(None)


def test_write_read_exists_list_remove(root):
    a, b = fs.join(root, "run", "a.json"), fs.join(root, "run", "b.bin")
    assert not fs.exists(a) and fs.list_names(fs.join(root, "run")) == []
    fs.makedirs(fs.join(root, "run"))
    fs.write_text(a, '{"x": 1}')
    data = bytes(range(256)) * 40_000  # ~10 MB: above S3's multipart threshold
    fs.write_bytes(b, data)
    assert fs.exists(a) and fs.read_text(a) == '{"x": 1}'
    assert fs.read_bytes(b) == data
    assert fs.exists(fs.join(root, "run"))  # a folder, or an object prefix
    assert fs.list_names(fs.join(root, "run")) == ["a.json", "b.bin"]  # no temporary files left behind
    fs.write_text(a, "second")  # overwrite replaces the whole file
    assert fs.read_text(a) == "second"
    fs.append_text(a, " third\n")
    fs.append_text(fs.join(root, "run", "new.jsonl"), "line\n")
    assert fs.read_text(a) == "second third\n"
    assert fs.read_text(fs.join(root, "run", "new.jsonl")) == "line\n"
    fs.remove(a)
    assert not fs.exists(a)
    fs.remove(a)  # missing_ok
    with pytest.raises(FileNotFoundError):
        fs.remove(a, missing_ok=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        fs.read_bytes(a)


def test_torch_checkpoint_round_trip_with_weights_only(root):
    import io

    import torch

    from training.train import load_state, save_state

    state = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(7)}
    path = fs.join(root, "ck", "last.pt")
    save_state(state, path)
    got = load_state(path)
    assert torch.equal(got["w"], state["w"]) and int(got["step"]) == 7
    # weights_only=True: a pickled object that is not plain tensors/containers is refused.
    buf = io.BytesIO()
    torch.save({"obj": fs.S3Options()}, buf)
    fs.write_bytes(path, buf.getvalue())
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_state(path)


def test_options_from_spark_conf_and_env():
    env = {"AWS_ENDPOINT_URL": "http://env:1", "AWS_ACCESS_KEY_ID": "envkey", "AWS_SECRET_ACCESS_KEY": "envsecret",
           "AWS_DEFAULT_REGION": "eu-west-1"}
    o = fs.S3Options.from_env(env)
    assert (o.endpoint, o.access_key, o.secret_key, o.region) == ("http://env:1", "envkey", "envsecret", "eu-west-1")
    assert fs.S3Options.from_env({**env, "AWS_ENDPOINT_URL_S3": "http://s3only:2"}).endpoint == "http://s3only:2"
    conf = {"spark.hadoop.fs.s3a.endpoint": "http://conf:3", "spark.hadoop.fs.s3a.access.key": "confkey"}
    o = fs.S3Options.from_spark_conf(conf, env)
    assert (o.endpoint, o.access_key, o.secret_key) == ("http://conf:3", "confkey", "envsecret")
    assert "envsecret" not in repr(o) and "confkey" not in repr(o)
    # An endpoint without a scheme is spoken to as S3A does: HTTPS, unless connection.ssl.enabled is false.
    bare = {"spark.hadoop.fs.s3a.endpoint": "s3.eu-west-1.amazonaws.com"}
    assert fs.S3Options.from_spark_conf(bare, {}).endpoint_scheme == "https"
    plain = {**bare, "spark.hadoop.fs.s3a.connection.ssl.enabled": "false"}
    assert fs.S3Options.from_spark_conf(plain, {}).endpoint_scheme == "http"
    assert fs.S3Options.from_spark_conf(conf, env).endpoint_scheme == "http"  # its own scheme wins
    # delta-rs gets the same settings (it reads only AWS_* from the environment otherwise)
    assert fs.delta_storage_options(fs.S3Options.from_spark_conf(plain, {})) == {
        "AWS_ENDPOINT_URL": "http://s3.eu-west-1.amazonaws.com", "AWS_ALLOW_HTTP": "true"}
    assert fs.delta_storage_options(fs.S3Options.from_spark_conf(conf, env)) == {
        "AWS_ENDPOINT_URL": "http://conf:3", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "confkey", "AWS_SECRET_ACCESS_KEY": "envsecret"}
    assert fs.delta_storage_options(fs.S3Options()) == {}


def test_bad_uris():
    with pytest.raises(fs.StorageError, match="unsupported storage scheme"):
        fs.read_bytes("gs://bucket/x")
    with pytest.raises(fs.StorageError, match="names no bucket"):
        fs.read_bytes("s3a:///x")
    for base in ("/data/root", "s3a://bucket/root"):  # a part never replaces or leaves its base
        assert fs.join(base, "ck", "last.pt") == f"{base}/ck/last.pt"
        for part in ("/etc/passwd", "../up", "a/../../up"):
            with pytest.raises(fs.StorageError, match="is not a path under"):
                fs.join(base, "ck", part)


def test_unreachable_endpoint_fails_fast_and_names_it():
    with socket_closed_port() as port:
        opts = fs.S3Options(endpoint=f"http://127.0.0.1:{port}", access_key="k", secret_key="s")
        t0 = time.perf_counter()
        with pytest.raises(fs.StorageError, match=f"127.0.0.1:{port}"):
            fs.write_text("s3a://nobucket/x.json", "{}", opts)
        assert time.perf_counter() - t0 < 60  # a bound against hanging, not a speed claim


class socket_closed_port:
    """A port nothing listens on (bound, then released)."""

    def __enter__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_upload_tree(root, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    files = {"top.txt": b"1", "a/x.bin": bytes(range(256)), "a/b/y.png": b"\x89PNG" * 1000}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    assert fs.upload_tree(str(src), fs.join(root, "up")) == 3
    for rel, data in files.items():
        assert fs.read_bytes(fs.join(root, "up", *rel.split("/"))) == data
    assert fs.list_names(fs.join(root, "up")) == ["a", "top.txt"]
    fs.remove_tree(fs.join(root, "up", "a"))  # the folder / prefix and everything under it
    assert fs.list_names(fs.join(root, "up")) == ["top.txt"] and not fs.exists(fs.join(root, "up", "a", "b", "y.png"))
    fs.remove_tree(fs.join(root, "up", "a"))  # none left: nothing to do


def test_a_failed_local_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    """A write that fails (a full disk, here the rename) kept its temporary file, a checkpoint's size,
    and a retry added another."""
    import os

    target = tmp_path / "ck" / "last.pt"
    fs.write_bytes(str(target), b"old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs.os, "replace", full_disk)
    for _ in range(2):
        with pytest.raises(OSError, match="No space left"):
            fs.write_bytes(str(target), b"new")
    assert os.listdir(tmp_path / "ck") == ["last.pt"] and target.read_bytes() == b"old"
