"""Hostile input for ``uvprep build`` (issue 12, items 5 and 6): memory bombs, endless reads and bad files become
per-sample failures with their own reason, or a one-line error before any store exists; never a hang, a crash
of the whole build or an OOM kill."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from common.store import Reason
from preprocess.build import build_store, config_record
from preprocess.buildcli import make_config, run_build
from preprocess.config import BuildArgs
from preprocess.sources import FolderSource, decode_image, read_regular_file

pytestmark = pytest.mark.timeout(60)  # a read that hangs fails the test instead of the suite


def _jpeg(size: int = 96) -> bytes:
    img = np.full((size, size, 3), 150, np.uint8)
    cv2.circle(img, (size // 2, size // 2), size // 3, (90, 120, 200), -1)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (its one IDAT holds almost nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND",
                                                                                                          b"")


def _reasons(folder: Path, **src) -> dict[str, Reason | None]:
    source = FolderSource(images=str(folder), **src)
    man = source.manifest()
    return {man[i].path: s.failure for i, s in enumerate(source.load_many(range(len(man)), man))}


def test_huge_image_headers_are_rejected_before_decoding():
    data = _png_header_only(30000, 30000)  # 900 MP, 2.7 GB decoded: the probe decoded it to black and kept it
    assert len(data) < 200
    assert decode_image(data)[1] == Reason.TOO_LARGE
    assert decode_image(_png_header_only(3000, 3000), max_pixels=1_000_000)[1] == Reason.TOO_LARGE
    img, why = decode_image(_jpeg(), max_pixels=96 * 96)
    assert why is None and img.shape == (96, 96, 3)


def test_special_files_links_and_names_fail_per_sample(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "ok.jpg").write_bytes(_jpeg())
    os.mkfifo(d / "fifo.jpg")                       # reading it would block forever
    (d / "zero.jpg").symlink_to("/dev/zero")        # reading it would never end
    (d / "dangling.jpg").symlink_to(d / "nowhere.jpg")
    (d / "loop.jpg").symlink_to(d / "loop.jpg")     # ELOOP
    bad = os.fsdecode(b"caf\xe9.jpg")               # Latin-1 name: not valid UTF-8
    (d / bad).write_bytes(_jpeg())
    (d / "big.jpg").write_bytes(_jpeg() + b"\0" * 4096)
    r = _reasons(d, max_bytes=4000)
    assert r["ok.jpg"] is None
    assert r["fifo.jpg"] == r["zero.jpg"] == r["dangling.jpg"] == r["loop.jpg"] == Reason.NOT_A_FILE
    assert r["caf\ufffd.jpg"] == Reason.BAD_NAME
    assert r["big.jpg"] == Reason.TOO_LARGE
    assert read_regular_file(d / "big.jpg", 10_000)[1] is None


def _patch_zip(data: bytes, flag: int | None = None, method: int | None = None) -> bytes:
    """Set the general-purpose flags / compression method of every member (local and central headers)."""
    b = bytearray(data)
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = b.find(sig)
        while i >= 0:
            if flag is not None:
                b[i + off:i + off + 2] = struct.pack("<H", flag)
            if method is not None:
                b[i + off + 2:i + off + 4] = struct.pack("<H", method)
            i = b.find(sig, i + 4)
    return bytes(b)


def test_zip_bombs_encrypted_and_deflate64_members_fail_per_sample(tmp_path):
    def make(name: str, members: dict[str, bytes], **patch) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for k, v in members.items():
                zf.writestr(k, v)
        if patch:
            path.write_bytes(_patch_zip(path.read_bytes(), **patch))
        return path

    bomb = make("bomb.zip", {"a.jpg": _jpeg(), "b.jpg": b"\0" * (8 << 20)})  # 8 MiB of zeros: ~8 kB compressed
    assert bomb.stat().st_size < 100_000
    r = _reasons(bomb, max_bytes=1 << 20)
    assert r == {"a.jpg": None, "b.jpg": Reason.TOO_LARGE}
    assert set(_reasons(make("enc.zip", {"a.jpg": _jpeg()}, flag=1)).values()) == {Reason.UNSUPPORTED_ARCHIVE}
    assert set(_reasons(make("d64.zip", {"a.jpg": _jpeg()}, method=9)).values()) == {Reason.UNSUPPORTED_ARCHIVE}


def test_a_build_over_bad_files_finishes_and_records_each(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for k in range(2):
        (d / f"ok{k}.jpg").write_bytes(_jpeg(128))
    os.mkfifo(d / "fifo.jpg")
    (d / "loop.jpg").symlink_to(d / "loop.jpg")
    (d / os.fsdecode(b"\xff.jpg")).write_bytes(_jpeg())
    (d / "huge.png").write_bytes(_png_header_only(26000, 26000))
    cfg, run = make_config(BuildArgs(out=tmp_path / "s.zarr", src="folder", images=d, fitter="given",
                                     face_model="procedural", image_size=64, uv_size=32, chunk=8,
                                     texture_model="model"))
    summary = build_store(cfg, dataclasses.replace(run, workers=0, progress=False))
    assert summary.complete
    assert dict(summary.failed) == {"not_a_file": 2, "bad_name": 1, "too_large": 1, "bad_annotation": 2}
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert "\ufffd.jpg" in [str(p) for p in g["manifest_path"][...]]  # the name is kept, readable


def test_a_non_zip_named_zip_is_one_line_before_any_store(tmp_path, capsys):
    fake = tmp_path / "photos.zip"
    fake.write_bytes(b"this is not a zip archive")
    code = run_build(BuildArgs(out=tmp_path / "s.zarr", src="folder", images=fake, workers=0))
    err = capsys.readouterr()
    assert code == 2 and "not a readable zip file" in err.out + err.err
    assert len((err.out + err.err).strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


def test_read_limits_are_not_part_of_the_recorded_config(tmp_path):
    """An older store (no limits in its config) resumes with any limits; they only decide what fails."""
    a = make_config(BuildArgs(out=tmp_path / "s.zarr", src="folder", images=tmp_path))[0]
    b = make_config(BuildArgs(out=tmp_path / "s.zarr", src="folder", images=tmp_path, max_bytes=10,
                              max_pixels=10))[0]
    assert config_record(a) == config_record(b)
    assert "max_bytes" not in config_record(a)["source"]


@pytest.mark.parametrize("command", ["info", "check", "show"])
def test_inspection_commands_on_non_stores_are_one_line(tmp_path, command):
    from typer.testing import CliRunner

    from preprocess.cli import app

    (tmp_path / "folder").mkdir()
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1  # a Zarr group uvprep did not write
    for target in (tmp_path / "missing.zarr", tmp_path / "folder", tmp_path / "other.zarr"):
        res = CliRunner().invoke(app, [command, str(target)])
        assert res.exit_code == 2, (target, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in res.output, res.output


def test_check_says_a_half_built_store_is_incomplete(train_store, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from preprocess.cli import app

    half = tmp_path / "half.zarr"
    shutil.copytree(train_store, half)
    zarr.open_group(str(half), mode="r+")["chunk_done"][-1] = 0  # the last chunk never got its completion record
    res = CliRunner().invoke(app, ["check", str(half)])
    assert res.exit_code == 1 and "INCOMPLETE" in res.output and "5 of 6 chunks" in res.output, res.output
    res = CliRunner().invoke(app, ["check", train_store])
    assert res.exit_code == 0 and "OK (6 of 6 chunks built)" in res.output, res.output


@pytest.mark.parametrize("flags,message", [({"frontal_yaw": float("nan")}, "--frontal-yaw nan"),
                                           ({"fitter": "foo"}, "--fitter 'foo'"),
                                           ({"blend_mode": "mix"}, "--blend-mode 'mix'"),
                                           ({"texture_model": "nowhere.npz"}, "--texture-model"),
                                           ({"erosion": -1.0}, "--erosion -1.0")])
def test_every_option_is_checked_before_a_store_exists(tmp_path, capsys, flags, message):
    code = run_build(BuildArgs(out=tmp_path / "s.zarr", count=2, workers=0, **flags))
    out = capsys.readouterr()
    assert code == 2 and message in out.out + out.err
    assert not (tmp_path / "s.zarr").exists()


def test_a_local_cluster_build_leaves_port_8787_alone(tmp_path):
    """The probe found Dask's dashboard on 127.0.0.1:8787 although it is off: hold the port ourselves and build."""
    import socket

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))
    except OSError:
        pytest.skip("port 8787 is taken on this machine")
    holder.listen(1)
    import warnings

    cfg, run = make_config(BuildArgs(out=tmp_path / "s.zarr", count=4, image_size=64, uv_size=32, chunk=2,
                                     pca_samples=4, n_tex=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Port 8787 is already in use" would be raised here
        summary = build_store(cfg, dataclasses.replace(run, workers=1, progress=False))
    holder.close()
    assert summary.complete and summary.ok == 4


def _start_build(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "preprocess.cli", "build", "--out", str(out), "--count", "48", "--image-size", "64",
           "--uv-size", "32", "--chunk", "2", "--pca-samples", "8", "--n-tex", "2", "--workers", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])


def _wait_building(out: Path, proc, timeout: float = 90.0) -> None:
    """Until the store exists completely and its first chunk is written (the cluster is building)."""
    import time

    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        try:
            g = zarr.open_group(str(out), mode="r")
            if "schema_version" in g.attrs and g["chunk_done"][...].any():
                return
        except (FileNotFoundError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    pytest.fail(f"the build did not start building within {timeout} s (exit {proc.poll()})")


@pytest.mark.slow  # two real builds with a local Dask cluster: ~30 s each
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_is_one_line_releases_the_lock_and_resumes(tmp_path, sig, code):
    import signal

    from common.store import LOCK_NAME

    out = tmp_path / "s.zarr"
    proc = _start_build(out)
    _wait_building(out, proc)
    if sig == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group, workers included
    else:
        os.kill(proc.pid, signal.SIGTERM)   # a scheduler's kill: the main process only
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert len([ln for ln in err.splitlines() if ln.strip() and "━" not in ln]) <= 3, err[-2000:]
    assert not (out / LOCK_NAME).exists()
    proc = _start_build(out)  # the rerun resumes and finishes
    proc.communicate(timeout=120)
    assert proc.returncode == 0


def test_an_empty_lock_file_from_a_killed_build_is_taken_over(tmp_path):
    from common.store import LOCK_NAME, UNREADABLE_LOCK_AGE, acquire_build_lock

    out = tmp_path / "s.zarr"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_bytes(b"")  # killed between creating the file and writing who holds it
    old = time_now() - UNREADABLE_LOCK_AGE - 1
    os.utime(lock, (old, old))
    with acquire_build_lock(out) as held:
        assert held.info["pid"] == os.getpid()
    assert not lock.exists()


def time_now() -> float:
    import time

    return time.time()


def test_a_store_killed_while_being_created_is_recreated_by_a_rerun(tmp_path):
    from typer.testing import CliRunner

    from common.store import CREATING
    from preprocess.cli import app

    out = tmp_path / "s.zarr"
    g = zarr.open_group(str(out), mode="w")  # what a build killed during creation leaves: the marker, some arrays
    g.attrs.put({CREATING: {"pid": 1}})
    g.create_array("image", shape=(4, 8, 8, 3), dtype="uint8")
    for command in ("check", "info"):
        res = CliRunner().invoke(app, [command, str(out)])
        assert "creation was interrupted" in res.output and "Traceback" not in res.output, res.output
    cfg, run = make_config(BuildArgs(out=out, count=4, image_size=64, uv_size=32, chunk=4, pca_samples=4, n_tex=2))
    summary = build_store(cfg, dataclasses.replace(run, workers=0, progress=False))  # no --overwrite needed
    assert summary.complete and summary.ok == 4


def test_overwrite_refuses_a_zarr_group_uvprep_did_not_create(tmp_path):
    out = tmp_path / "theirs.zarr"
    g = zarr.open_group(str(out), mode="w")
    g.attrs["project"] = "someone else's data"
    g.create_array("precious", shape=(3,), dtype="int32")[:] = [1, 2, 3]
    code = run_build(BuildArgs(out=out, count=4, image_size=64, uv_size=32, chunk=4, pca_samples=4, n_tex=2,
                               workers=0, overwrite=True))
    assert code == 2
    assert list(zarr.open_group(str(out), mode="r")["precious"][...]) == [1, 2, 3]


def test_duplicate_zip_member_names_are_recorded(tmp_path):
    import warnings

    path = tmp_path / "dup.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name it writes
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a.jpg", _jpeg())
            zf.writestr("a.jpg", _jpeg(100))
    r = _reasons(path)
    assert r == {"a.jpg": None, "a.jpg#duplicate-2": Reason.DUPLICATE_NAME}


def test_an_unreachable_scheduler_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = run_build(BuildArgs(out=tmp_path / "s.zarr", count=2, image_size=64, uv_size=32, chunk=2, pca_samples=2,
                               n_tex=1, scheduler=f"tcp://127.0.0.1:{port}"))
    out = capsys.readouterr()
    assert code == 2 and "cannot reach the Dask scheduler" in out.out + out.err


# ------------------------------------------------------------------- damaged stores, fenced writers (items 1-3)
@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "s.zarr"
    cfg, run = make_config(BuildArgs(out=out, count=8, image_size=64, uv_size=32, chunk=4, pca_samples=8, n_tex=2))
    assert build_store(cfg, dataclasses.replace(run, workers=0, progress=False)).complete
    return out


def _rebuild(out: Path, verify: bool = False):
    cfg, run = make_config(BuildArgs(out=out, count=8, image_size=64, uv_size=32, chunk=4, pca_samples=8, n_tex=2))
    return build_store(cfg, dataclasses.replace(run, workers=0, progress=False, verify=verify))


def _same_data(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ("uv_bl", "uv_gt", "status", "image", "params"):
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_chunks_are_found_and_rebuilt_with_verify(clean_store, tmp_path, damage):
    import shutil

    from typer.testing import CliRunner

    from common.store import verify_chunks
    from preprocess.cli import app

    out = tmp_path / "s.zarr"
    shutil.copytree(clean_store, out)
    f = out / "uv_bl" / "c" / "1" / "0" / "0" / "0"
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    else:
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    assert set(verify_chunks(out)) == {1}
    res = CliRunner().invoke(app, ["check", str(out), "--deep"])
    assert res.exit_code == 1 and "chunk 1" in res.output, res.output
    summary = _rebuild(out)  # a plain rerun trusts the completion records (cheap) ...
    assert summary.done_chunks == 0
    summary = _rebuild(out, verify=True)  # ... --verify re-reads them and rebuilds the damaged one
    assert summary.done_chunks == 1 and any("chunk 1" in e for e in summary.errors)
    assert verify_chunks(out) == {}
    _same_data(out, clean_store)


def test_a_resume_repairs_missing_arrays_and_lost_status(clean_store, tmp_path):
    import shutil

    out = tmp_path / "s.zarr"
    shutil.copytree(clean_store, out)
    (out / "status" / "c" / "0").unlink()  # chunk 0 marked done but its status reads PENDING
    summary = _rebuild(out)
    assert summary.done_chunks == 1 and summary.complete
    _same_data(out, clean_store)
    shutil.rmtree(out / "uv_bl")  # an --overwrite killed mid-delete: a whole array gone
    summary = _rebuild(out)
    assert summary.done_chunks == 2 and summary.complete
    _same_data(out, clean_store)


def test_a_write_from_an_older_generation_is_refused(clean_store, tmp_path):
    import shutil

    from common.store import StaleWriter, start_generation, write_chunk

    out = tmp_path / "s.zarr"
    shutil.copytree(clean_store, out)
    old = start_generation(out)
    start_generation(out)  # a newer build took the store over
    before = zarr.open_group(str(out), mode="r")["uv_bl"][0:4].copy()
    g = zarr.open_group(str(out), mode="r")
    arrays = {k: g[k][0:4] for k in ("status", "reason", "params", "pose", "tex_coeff")}
    arrays["uv_bl"] = np.zeros_like(before)
    with pytest.raises(StaleWriter, match="newer build"):
        write_chunk(out, 0, arrays, generation=old)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["uv_bl"][0:4], before)  # nothing written


# ----------------------------------------------------------------------- under a memory limit (item 5)
_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 2 GiB of address space for this process
from preprocess.sources import FolderSource
s = FolderSource(images=sys.argv[1])
m = s.manifest()
print(",".join(x.failure.short if x.failure else "ok" for x in s.load_many(range(len(m)), m)))
"""


def _load_under_limit(images: Path) -> list[str]:
    res = subprocess.run([sys.executable, "-c", _LIMITED, str(images)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().split(",")


def test_a_huge_png_is_rejected_within_two_gib(tmp_path):
    """30000 x 30000 RGB decodes to 2.5 GiB: over the limit if it were decoded, rejected from its header."""
    d = tmp_path / "p"
    d.mkdir()
    (d / "huge.png").write_bytes(_png_header_only(30000, 30000))
    (d / "ok.jpg").write_bytes(_jpeg())
    assert _load_under_limit(d) == ["too_large", "ok"]


@pytest.mark.slow  # writing the 4 GiB member takes ~10-40 s
@pytest.mark.timeout(600)
def test_a_zip_bomb_is_rejected_within_two_gib(tmp_path):
    """A 19 MB zip holding one 4 GiB member: the probe was OOM-killed (exit 137); now it fails with too_large."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("huge.jpg", "w", force_zip64=True) as f:
            block = b"\0" * (16 << 20)
            for _ in range(256):
                f.write(block)
        zf.writestr("ok.jpg", _jpeg())
    assert bomb.stat().st_size < 40 << 20
    assert _load_under_limit(bomb) == ["too_large", "ok"]


def test_a_write_fenced_after_its_data_went_out_marks_its_chunk_pending(clean_store, tmp_path, monkeypatch):
    """A newer build takes the store over between a write's first and second generation check: its data is in
    the chunk already, so the chunk must not stay marked done (a plain rerun redoes it)."""
    import shutil

    import common.store.chunks as store  # write_chunk calls _check_generation there

    out = tmp_path / "s.zarr"
    shutil.copytree(clean_store, out)
    old = store.start_generation(out)
    check = store._check_generation

    def takeover_after_first_check(*args):
        check(*args)
        monkeypatch.setattr(store, "_check_generation", check)
        store.start_generation(out)  # the newer build starts while this write is under way

    monkeypatch.setattr(store, "_check_generation", takeover_after_first_check)
    g = zarr.open_group(str(out), mode="r")
    arrays = {k: g[k][0:4] for k in ("status", "reason", "params", "pose", "tex_coeff")}
    with pytest.raises(store.StaleWriter, match="marked pending"):
        store.write_chunk(out, 0, arrays, generation=old)
    assert zarr.open_group(str(out), mode="r")["chunk_done"][...].tolist() == [0, 1]
    summary = _rebuild(out)
    assert summary.done_chunks == 1 and summary.complete
    _same_data(out, clean_store)


def test_a_build_rewrites_a_chunk_changed_after_it_wrote_it(clean_store, tmp_path, monkeypatch):
    """The build re-reads what it wrote at the end: a late write of an earlier build's task is found and redone."""
    import shutil

    import preprocess.build as build
    from common.store import verify_chunks

    out = tmp_path / "s.zarr"
    shutil.copytree(clean_store, out)
    zarr.open_group(str(out), mode="r+")["chunk_done"][1] = 0  # this run writes chunk 1
    recheck = build._recheck_written

    def late_write(*args, **kwargs):  # ... and a task of an earlier build writes into it afterwards
        zarr.open_group(str(out), mode="r+")["uv_bl"][4:8] = 0
        return recheck(*args, **kwargs)

    monkeypatch.setattr(build, "_recheck_written", late_write)
    summary = _rebuild(out)
    assert summary.complete and any(e.startswith("chunk 1:") and "rewritten" in e for e in summary.errors)
    assert verify_chunks(out) == {}
    _same_data(out, clean_store)
