"""The embedded-default demo: render synthetic faces on the procedural model and write a preview grid."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.progress import Progress

from preprocess.config import DemoConfig


def run_demo(cfg: DemoConfig) -> Path:
    """Generate ``cfg.count`` faces, write ``preview.png`` (image | true UV | visible UV) and ``config.json``.

    Returns the preview path.
    """
    from common.imageio import write_png
    from common.procedural import build_procedural_model
    from common.synthetic import SyntheticConfig, generate, layout_raster, preview_grid

    model = build_procedural_model()
    scfg = SyntheticConfig(image_size=cfg.image_size, uv_size=cfg.uv_size, seed=cfg.seed,
                           occluder_prob=cfg.occluder_prob)
    raster = layout_raster(model, cfg.uv_size)  # the UV layout's rasterisation, shared by every face
    faces = []
    with Progress(transient=True) as progress:
        task = progress.add_task("rendering synthetic faces", total=cfg.count)
        for i in range(cfg.count):
            faces.append(generate(i, scfg, model, raster))
            progress.advance(task)
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / "preview.png"
    write_png(path, preview_grid(faces))
    record = {"demo": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "synthetic": asdict(scfg), "face_model": {"name": model.name, "hash": model.fingerprint()}}
    (cfg.out / "config.json").write_text(json.dumps(record, indent=2, default=str))
    return path
