#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default; writes out/demo/preview.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/uvprep demo --out out/demo "$@"
