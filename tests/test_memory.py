"""Peak memory of ``uvprep build`` (issue 12, item 5): a chunk decodes its photos one at a time, keeps only each
one's working crop, and so holds its output plus ONE full-size photo, not every photo of the chunk at once.

``benchmarks/bench_memory.py`` measures the same with the old behaviour (the chunk decoded whole first) in the
same run and prints the ratio.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest

from common.config import FitConfig
from common.store import OK, Reason
from common.texbasis import UVTextureBasis
from preprocess.build import LazyInputs
from preprocess.config import OcclusionConfig, StageConfig, UVGTConfig
from preprocess.sources import FolderSource
from preprocess.stages import StageContext, run_stages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_memory import measure, write_photos  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Watched:
    """A source that records, each time it has decoded a photo, how many photos it decoded before are still alive."""

    def __init__(self, source):
        self.source = source
        self.refs: list[weakref.ref] = []
        self.alive_at_decode: list[int] = []

    def iter_many(self, indices, manifest):
        for sample in self.source.iter_many(indices, manifest):
            self.alive_at_decode.append(sum(r() is not None for r in self.refs))
            if sample.image is not None:
                self.refs.append(weakref.ref(sample.image))
            yield sample
            del sample


def test_a_lazy_chunk_holds_one_decoded_photo_at_a_time_and_gives_the_eager_arrays(tmp_path):
    folder = write_photos(tmp_path, 5, {"photos": (400, 320)}, face_size=64, n_faces=1)["photos"]
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    src = FolderSource(images=str(folder), params=str(folder / "params.npz"))
    man = src.manifest()
    cfg = StageConfig(fit=FitConfig(image_size=64), uvgt=UVGTConfig(uv_size=32), occlusion=OcclusionConfig())
    ctx = StageContext.build(cfg)
    ctx.basis = UVTextureBasis.from_face_model(ctx.model, 32)

    eager, eager_errors = run_stages(src.load_many(range(len(man)), man), ctx)
    watched = _Watched(src)
    inputs = LazyInputs(watched, range(len(man)), man)
    lazy, lazy_errors = run_stages(inputs, ctx)

    # before the fix the chunk decoded every photo first: [0, 1, 2, 3, 4, 5] photos alive at each decode
    assert watched.alive_at_decode == [0] * 6
    assert len(watched.refs) == 5 and all(r() is None for r in watched.refs)  # none outlives the chunk
    assert [s.key for s in inputs.records] == [e.path for e in man]  # keys, failures and truth stay, photos go
    assert all(s.image is None for s in inputs.records) and inputs.records[-1].failure == Reason.TRUNCATED
    assert (lazy["status"][:5] == OK).all() and lazy["reason"][5] == Reason.TRUNCATED
    assert sorted(lazy) == sorted(eager) and lazy_errors == eager_errors
    for name in eager:
        assert lazy[name].tobytes() == eager[name].tobytes(), name


def test_a_chunk_of_20_megapixel_photos_peaks_at_one_decoded_photo(tmp_path):  # ~12 s on 2 cores
    photos = write_photos(tmp_path, 8, {"small": (500, 400), "big": (5000, 4000)})
    one_photo_mb = 5000 * 4000 * 3 / 2**20  # 57 MiB decoded
    r = measure(photos["small"], photos["big"], tmp_path / "run", "one-at-a-time", texture_model="pca")
    assert r["ok"] == [8, 8], r  # every photo decoded, fitted and unwrapped (pre-pass and chunk)
    # peak RSS over a warm-up build of the same photos at 500 x 400 (this test's settings: chunk of 8, working size
    # 64, UV 32, PCA pre-pass over the same 8 photos): +451 MiB (7.9 photos; 1023 MiB peak) when a chunk and a
    # pre-pass batch decoded all of their photos first, +71 MiB (1.2 photos; 621 MiB peak) one at a time
    assert r["delta_mb"] < 3 * one_photo_mb, r
