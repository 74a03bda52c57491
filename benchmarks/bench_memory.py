"""Benchmark: peak memory of a ``uvprep build`` chunk of 20-megapixel photos (issue 12, item 5).

A chunk used to decode all of its photos before fitting any of them, so its peak held every full-size photo of
the chunk at once (8 x 60 MB for 8 photos of 5000 x 4000); it now decodes one photo, crops it to the working size
and drops it before decoding the next (:class:`preprocess.build.LazyInputs`). Measured on the same inputs, each
run in a fresh subprocess (``ru_maxrss`` only grows):

* candidate (``one-at-a-time``): the build as it is;
* baseline (``all-at-once``): the same build with every chunk (and pre-pass batch) decoded whole before the fit,
  as ``_load_inputs`` did before.

Each child first builds a warm-up store from small copies of the same photos (imports, face model, layout caches,
the allocator's pools), reads its peak RSS, then builds the store of the big photos and reads it again: the
increment is what the big photos cost. The photos are a smooth gradient with a synthetic face pasted in (a face
detector finds nothing in them), fitted with the ``given`` fitter from a parameter file, so every photo is decoded,
fitted, cropped and unwrapped. Prints min / median of the increment per mode and the ratio.

    python benchmarks/bench_memory.py [--n 8] [--width 5000] [--height 4000] [--repeats 2] [--texture-model pca]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ("one-at-a-time", "all-at-once")


def write_photos(root: Path, n: int, sizes: dict[str, tuple[int, int]], face_size: int = 128,
                 n_faces: int = 2) -> dict[str, Path]:
    """For each ``name: (width, height)``, n JPEGs ``root/name/NN.jpg``: a gradient with one of ``n_faces`` synthetic
    faces (rendered at ``face_size``², scaled to half the height) pasted at a different place in each, and
    ``root/name/params.npz`` (``keys``, ``params`` (n, 62) in each photo's frame, for ``--params``). Returns the
    folders."""
    from common.faces.fit import reframe_params
    from common.procedural import build_procedural_model
    from common.synthetic import SyntheticConfig, generate_batch

    faces = generate_batch(list(range(min(n, n_faces))), SyntheticConfig(image_size=face_size, uv_size=32),
                           build_procedural_model())
    rng = np.random.default_rng(0)
    out = {}
    for name, (width, height) in sizes.items():
        folder = out[name] = root / name
        folder.mkdir(parents=True, exist_ok=True)
        side = height // 2
        f = side / face_size
        x = np.linspace(40, 210, width, dtype=np.float32)[None, :]
        y = np.linspace(60, 190, height, dtype=np.float32)[:, None]
        img = np.empty((height, width, 3), np.uint8)
        keys, params = [], []
        for k in range(n):
            face = faces[k % len(faces)]
            img[..., 0], img[..., 1], img[..., 2] = x, y, (x + y) / 2
            ox, oy = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            img[oy:oy + side, ox:ox + side] = cv2.resize(face.image, (side, side), interpolation=cv2.INTER_LINEAR)
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            keys.append(f"{k:02d}.jpg")
            (folder / keys[-1]).write_bytes(buf.tobytes())
            # photo pixel = f x face pixel + (ox, oy): the face image is the photo's square of side height / f at
            # origin -(ox, oy) / f, so its parameters go to the photo's frame by reframing to that square
            params.append(reframe_params(face.params, face_size, np.array([-ox / f, -oy / f]), height / f, height)[0])
        np.savez(folder / "params.npz", keys=np.asarray(keys), params=np.stack(params))
    return out


def _config(images: Path, out: Path, image_size: int, uv_size: int, texture_model: str, chunk: int):
    import dataclasses

    from preprocess.buildcli import make_config
    from preprocess.config import BuildArgs

    cfg, run = make_config(BuildArgs(out=out, src="folder", images=images, params=images / "params.npz",
                                     fitter="given", face_model="procedural", image_size=image_size,
                                     uv_size=uv_size, chunk=chunk, texture_model=texture_model, n_tex=4,
                                     pca_samples=chunk))
    return cfg, dataclasses.replace(run, workers=0, progress=False)


def _all_at_once() -> None:
    """Make every chunk and pre-pass batch decode all of its photos before the fit (the build before the fix)."""
    import preprocess.build as build

    def decode_first(self):
        samples = self.source.load_many(self.indices, self.manifest)
        self.records = [s.without_image() for s in samples]
        yield from samples

    if hasattr(build, "LazyInputs"):
        build.LazyInputs.__iter__ = decode_first


def _child(a) -> None:
    """One measurement: warm-up build, peak RSS, big-photo build, peak RSS; prints a JSON line (MiB)."""
    from preprocess.build import build_store

    if a.mode == "all-at-once":
        _all_at_once()
    kw = {"image_size": a.image_size, "uv_size": a.uv_size, "texture_model": a.texture_model, "chunk": a.chunk}
    warm = build_store(*_config(Path(a.small), Path(a.out) / "warm.zarr", **kw))
    warm_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    big = build_store(*_config(Path(a.big), Path(a.out) / "big.zarr", **kw))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"warm_mb": warm_kib / 1024, "peak_mb": peak_kib / 1024, "delta_mb": (peak_kib - warm_kib) / 1024,
                      "ok": [warm.ok, big.ok], "failed": [dict(warm.failed), dict(big.failed)]}))


def measure(small: Path, big: Path, out: Path, mode: str, image_size: int = 64, uv_size: int = 32,
            texture_model: str = "model", chunk: int = 8) -> dict:
    """Run one child (``mode`` in :data:`MODES`) over the photo folders of :func:`write_photos`; returns its
    JSON: ``warm_mb`` (peak RSS after the warm-up build), ``peak_mb`` (after the big build), ``delta_mb``, and the
    ok / failed counts of both builds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--small", str(small),
           "--big", str(big), "--out", str(out), "--image-size", str(image_size), "--uv-size", str(uv_size),
           "--texture-model", texture_model, "--chunk", str(chunk)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"memory child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="photos = one chunk")
    p.add_argument("--width", type=int, default=5000)
    p.add_argument("--height", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--uv-size", type=int, default=64)
    p.add_argument("--texture-model", default="pca", help="pca also runs the pre-pass over the same photos")
    p.add_argument("--chunk", type=int, default=None, help="samples per chunk (default: --n)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, default=MODES[0], help=argparse.SUPPRESS)
    p.add_argument("--small", help=argparse.SUPPRESS)
    p.add_argument("--big", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a)
        return
    chunk = a.chunk or a.n
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = write_photos(tmp, a.n, {"small": (500, 400), "big": (a.width, a.height)})
        decoded_mb = a.width * a.height * 3 / 2**20
        res: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(a.repeats):
            for m in MODES:
                res[m].append(measure(photos["small"], photos["big"], tmp / f"{m}-{r}", m, a.image_size, a.uv_size,
                                      a.texture_model, chunk))
    print(f"{a.n} photos of {a.width} x {a.height} ({a.width * a.height / 1e6:.0f} MP, {decoded_mb:.0f} MiB decoded "
          f"each), chunk {chunk}, working size {a.image_size}, UV {a.uv_size}, texture {a.texture_model}; "
          f"fitted: {res[MODES[0]][0]['ok'][1]} / {a.n}")
    print(f"{'mode':<16}{'peak RSS MiB (min / median)':>30}{'over warm-up MiB (min / median)':>34}"
          f"{'/ one photo':>13}")
    for m in MODES:
        peak = [x["peak_mb"] for x in res[m]]
        delta = [x["delta_mb"] for x in res[m]]
        print(f"{m:<16}{min(peak):>14.0f} / {statistics.median(peak):<13.0f}{min(delta):>17.0f} / "
              f"{statistics.median(delta):<14.0f}{statistics.median(delta) / decoded_mb:>11.1f}x")
    d = {m: statistics.median([x["delta_mb"] for x in res[m]]) for m in MODES}
    print(f"ratio one-at-a-time / all-at-once, increment over warm-up: {d[MODES[0]] / max(d[MODES[1]], 1e-9):.2f}")


if __name__ == "__main__":
    main()
