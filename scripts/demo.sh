#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default (the procedural face model and the
# synthetic face world): a preview of the world, a small training store, a preview grid of that store, and a
# short CPU training run (small networks, a few dozen steps per phase: a smoke run, not a trained model).
#   out/demo/preview.png        image | true UV | visible UV, per synthetic face
#   out/demo/store.zarr         the store `uvtrain` reads (uvprep info out/demo/store.zarr)
#   out/demo/store_preview.png  image | overlays (mesh, landmarks, mask) | UV_gt | UV_bl | source map | centre crop | side crop | face region | true UV
#   out/demo/run/               uvtrain fit's run directory: config.json, checkpoint.pt, metrics.jsonl, tb/,
#                               previews/*.png (input | UV_spl | UV_gt/UV_pred | UV_bl | I0 | I1 | I^m | crops)
#   out/demo/metrics.json       uvtrain eval of that run and the baselines on the store (Table 1 + completion)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/uvprep demo --out out/demo --count 6
.venv/bin/uvprep build --out out/demo/store.zarr --src synthetic --count 64 --image-size 128 --uv-size 128 \
    --chunk 16 --pca-samples 64 --n-tex 16 "$@"
.venv/bin/uvprep check out/demo/store.zarr
.venv/bin/uvprep show out/demo/store.zarr --index 0,1,2,3,4,5,6,7 --out out/demo/store_preview.png
.venv/bin/uvtrain fit --store out/demo/store.zarr --run-dir out/demo/run --sampler-steps 40 --generator-steps 20 \
    --batch-size 4 --image-size 128 --sampler-grid 64 --channels 16 --workers 1 --log-every 10 --checkpoint-every 20
ls out/demo/run/previews
.venv/bin/uvtrain eval --store out/demo/store.zarr --checkpoint out/demo/run --baselines --limit 16 \
    --out out/demo/metrics.json
