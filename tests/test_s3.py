"""Stores on object storage: ``uvprep build`` / ``check`` / ``info``, the reader, ``uvtrain fit`` and ``uvtrain eval``
on an ``s3://`` store served by a local S3-compatible server (moto in server mode on 127.0.0.1).

One tiny store (8 samples of 64 px, 32² UV maps, chunks of 4) is built into the bucket once per module and compared
array by array with the same build on local disk. The credentials are fakes set in the environment, as a user sets
real ones; the secret key must not appear in any output, store attribute or run file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

pytest.importorskip("s3fs", reason="needs s3fs (pip install -e '.[s3]')")
pytest.importorskip("moto.server", reason="needs moto's server mode (pip install 'moto[server]', in the dev extra)")

from common.store import (  # noqa: E402
    LOCK_NAME,
    StoreLocked,
    StoreReader,
    acquire_build_lock,
    completed_chunks,
    mark_pending,
    read_build_lock,
)
from preprocess.build import build_store  # noqa: E402
from preprocess.buildcli import make_config
from preprocess.config import BuildArgs

SECRET = "s3-test-secret-9f2c61d0e4"
KEY_ID = "AKIATESTUVTEX"
BUCKET = "uvtex-test"
FLAGS = {"count": 8, "image_size": 64, "uv_size": 32, "chunk": 4, "pca_samples": 8, "n_tex": 4, "frontal_yaw": 25.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* environment points at it (fake credentials, no
    ~/.aws files). Yields the endpoint URL."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start on {endpoint}: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        empty = tmp_path_factory.mktemp("aws") / "none"
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint,
                         "AWS_ENDPOINT_URL_S3": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                         "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}.items():
                mp.setenv(k, v)
            for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
                mp.delenv(k, raising=False)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir(BUCKET)
            yield endpoint
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def _build(out, **kw):
    cfg, run = make_config(BuildArgs(out=out, **{**FLAGS, **kw}))
    return build_store(cfg, dataclasses.replace(run, workers=0, progress=False))


def _arrays(location: str) -> dict[str, bytes]:
    """Every array of a store (root and groups) as raw bytes; the generation part of chunk_record left out."""
    out = {}

    def visit(group, prefix):
        for name, a in group.arrays():
            v = a[...]
            if name == "chunk_record":
                v = v[:, :32]
            out[prefix + name] = "\0".join(map(str, v)).encode() if v.dtype.kind in "OTU" else v.tobytes()
        for name, g in group.groups():
            visit(g, f"{prefix}{name}/")

    visit(zarr.open_group(location, mode="r"), "")
    return out


def _all_attrs(location: str) -> str:
    parts = []

    def visit(group):
        parts.append(json.dumps(dict(group.attrs), default=str))
        for _, a in group.arrays():
            parts.append(json.dumps(dict(a.attrs), default=str))
        for _, g in group.groups():
            visit(g)

    visit(zarr.open_group(location, mode="r"))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "ref.zarr"
    assert _build(out).ok == FLAGS["count"]
    return out


@pytest.fixture(scope="module")
def s3_store(s3, local_store):
    """The same build into the bucket, through the CLI (as a user runs it); yields (url, CLI output)."""
    from preprocess.cli import app

    url = f"s3://{BUCKET}/store.zarr"
    flags = [x for k, v in FLAGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    res = CliRunner().invoke(app, ["build", "--out", url, "--workers", "0", *flags])
    assert res.exit_code == 0, res.output
    return url, res.output


# ----------------------------------------------------------------------------------------------- build
def test_s3_build_equals_local_build(s3_store, local_store):
    url, _ = s3_store
    a, b = _arrays(url), _arrays(str(local_store))
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert read_build_lock(url) is None  # released at the end
    reader = StoreReader(url)
    assert reader.validate() == [] and completed_chunks(url).all()
    local = StoreReader(local_store)
    idx = [5, 0, 7, 5]
    got, want = reader.batch(idx), local.batch(idx)
    assert all(np.array_equal(got[k], want[k], equal_nan=True) for k in want)
    assert reader.face_model().fingerprint() == reader.attrs["face_model_hash"]


def test_s3_resume_redoes_only_unfinished_chunks(s3_store, local_store):
    url, _ = s3_store
    mark_pending(url, [1])  # as if the build had stopped before chunk 1 was complete
    summary = _build(url)
    assert (summary.skipped_chunks, summary.done_chunks, summary.complete) == (1, 1, True)
    assert _arrays(url) == _arrays(str(local_store))
    again = _build(url)
    assert (again.skipped_chunks, again.done_chunks) == (2, 0)


def test_check_and_info_read_the_s3_store(s3_store):
    from preprocess.cli import app

    url, build_output = s3_store
    runner = CliRunner()
    check = runner.invoke(app, ["check", url])
    assert check.exit_code == 0 and "OK (2 of 2 chunks built)" in check.output, check.output
    info = runner.invoke(app, ["info", url])
    assert info.exit_code == 0 and url in info.output, info.output
    missing = runner.invoke(app, ["check", f"s3://{BUCKET}/nothing.zarr"])
    assert missing.exit_code == 2 and "is not a uvprep store" in missing.output
    for text in (build_output, check.output, info.output, missing.output, _all_attrs(url)):
        assert SECRET not in text


def test_upgrade_takes_the_s3_store(s3_store):
    """``uvprep upgrade URL`` (it checked for a local ``zarr.json`` and refused every URL as 'no store')."""
    import fsspec

    from common.store import SCHEMA_VERSION
    from preprocess.cli import app

    url, _ = s3_store
    runner = CliRunner()
    res = runner.invoke(app, ["upgrade", url])
    assert res.exit_code == 0, res.output
    assert f"schema version {SCHEMA_VERSION}" in res.output and "already at schema version" in res.output
    fs, root = fsspec.core.url_to_fs(url)
    assert not fs.exists(f"{root}/{LOCK_NAME}")  # the upgrade's lock is released
    missing = runner.invoke(app, ["upgrade", f"s3://{BUCKET}/nothing.zarr"])
    assert missing.exit_code == 2 and "no store at" in missing.output, missing.output
    assert SECRET not in res.output + missing.output


# ------------------------------------------------------------------------------------------------ lock
def test_s3_lock_is_exclusive_and_stale_locks_are_taken_over(s3):
    import s3fs

    fs = s3fs.S3FileSystem()
    with fs.open(f"{BUCKET}/probe", "xb") as f:  # the server honours If-None-Match: * (the lock relies on it)
        f.write(b"1")
    with pytest.raises(FileExistsError), fs.open(f"{BUCKET}/probe", "xb") as f:
        f.write(b"2")
    assert fs.cat_file(f"{BUCKET}/probe") == b"1"

    url = f"s3://{BUCKET}/locked.zarr"
    lock = acquire_build_lock(url, owner="build A")
    assert lock.path == f"{url}/{LOCK_NAME}" and read_build_lock(url)["owner"] == "build A"
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()}.*delete {lock.path}"):
        acquire_build_lock(url, owner="build B")
    lock.release()
    assert read_build_lock(url) is None

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00",
             "token": "old"}
    fs.pipe_file(f"{BUCKET}/locked.zarr/{LOCK_NAME}", json.dumps(stale).encode())
    with acquire_build_lock(url, owner="build C"):
        assert read_build_lock(url)["owner"] == "build C"
    fs.pipe_file(f"{BUCKET}/locked.zarr/{LOCK_NAME}", json.dumps({**stale, "host": "elsewhere-7"}).encode())
    with pytest.raises(StoreLocked, match="elsewhere-7"):
        acquire_build_lock(url)


def test_refusals_say_what_to_do_and_never_echo_credentials(s3, tmp_path):
    from preprocess.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["build", "--out", f"s3://{KEY_ID}:{SECRET}@{BUCKET}/x.zarr", "--count", "4"])
    assert res.exit_code == 2 and "credentials in the URL are not accepted" in res.output
    assert SECRET not in res.output
    res = runner.invoke(app, ["build", "--out", "memory://nolock.zarr", "--count", "4", "--workers", "0"])
    assert res.exit_code == 2 and "--no-lock" in res.output, res.output


@pytest.mark.slow
def test_no_lock_builds_where_there_is_no_exclusive_create(local_store):
    out = "memory://uvtex-nolock/store.zarr"  # fsspec's in-process file system: no lock the build trusts
    cfg, run = make_config(BuildArgs(out=out, lock=False, **FLAGS))
    assert build_store(cfg, dataclasses.replace(run, workers=0, progress=False)).complete
    assert _arrays(out) == _arrays(str(local_store))


# ----------------------------------------------------------------------------------------- train, eval
def test_fit_and_eval_from_the_s3_store(s3_store, tmp_path):
    from tests.test_train import opts, tiny
    from train.cli import app
    from train.loop import fit

    url, _ = s3_store
    run_dir = tmp_path / "run"
    res = fit(tiny(url, sampler_steps=2, sampler_finetune_steps=0, generator_steps=2), opts(run_dir))
    assert res["step"] == 4 and all(np.isfinite(r["loss"]) for r in res["rows"])
    info = json.loads((run_dir / "inference" / "info.json").read_text())
    assert info["store"] == url

    out = tmp_path / "metrics.json"
    ev = CliRunner().invoke(app, ["eval", "--store", url, "--checkpoint", str(run_dir), "--method", "generator",
                                  "--method", "bl", "--identity", "none", "--limit", "4", "--out", str(out),
                                  "--no-progress"])
    assert ev.exit_code == 0, ev.output
    metrics = json.loads(out.read_text())
    assert metrics["samples"] == 4
    texts = [ev.output, out.read_text()] + [p.read_text(errors="replace") for p in run_dir.rglob("*.json*")]
    assert not [t for t in texts if SECRET in t or KEY_ID in t]
