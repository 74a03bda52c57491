#!/usr/bin/env bash
# The GPU check of issue 19, for the first machine with a GPU: `pytest -m gpu` (renderer, identity network, trainer
# steps under bf16 and fp16, --compile, a one-process NCCL DDP step) and benchmarks/bench_train.py --device cuda at
# the paper's sizes (store and generator input 256², sampler 128², batch 6), with nvidia-smi and the torch / CUDA
# versions, written to one JSON: $1 (default gpu_check.json; relative paths go under $OUT when it is set).
# At most 8 minutes on one GPU after set-up (time limits per step: 15 + 30 + 240 + 210 s). A step that fails is
# recorded in the JSON and the others still run; the script exits 0 once the JSON is written. Without CUDA it
# records so, runs the (skipped) gpu tests and leaves the benchmark out.
#
#   bash scripts/gpu_check.sh                 # ./gpu_check.json
#   bash scripts/gpu_check.sh /tmp/g.json
#
# No .venv yet: on a machine whose python3 already has a CUDA torch, .venv is made with --system-site-packages and
# the project installed without the [cpu] extra (which would pin the CPU wheel); elsewhere scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-gpu_check.json}
if [ -n "${OUT:-}" ] && [[ $name != /* ]]; then out="$OUT/$name"; else out=$name; fi
mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PY=${PYTHON:-python3}
step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, its output in $work/NAME.log, rc and seconds recorded
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  timeout "$limit" "$@" >"$work/$name.log" 2>&1 || rc=$?
  echo "$rc $((SECONDS - t0))" >"$work/$name.rc"
}

# ---- environment
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    step setup 900 bash -c "rm -rf .venv.tmp && '$PY' -m venv --system-site-packages .venv.tmp \
      && .venv.tmp/bin/python -m pip install -q -e '.[identity,dev]' && mv .venv.tmp .venv"
  else
    step setup 900 bash scripts/setup.sh
  fi
fi
V=.venv/bin/python
[ -x "$V" ] || V=$PY  # setup failed (recorded): try the system python
cuda=$("$V" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# ---- the machine
step nvidia_smi 15 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
step versions 30 "$V" -c "import json, platform, torch; print(json.dumps({'python': platform.python_version(),
  'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),
  'cuda_available': torch.cuda.is_available(), 'devices': [torch.cuda.get_device_name(i)
  for i in range(torch.cuda.device_count())], 'nccl': '.'.join(map(str, torch.cuda.nccl.version()))
  if torch.cuda.is_available() else None}))"

# ---- the gpu-marked tests, then the trainer benchmark at the paper's sizes
step pytest_gpu 240 "$V" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$work/gpu.xml"
if [ "$cuda" = 1 ]; then
  step bench_train 210 "$V" benchmarks/bench_train.py --device cuda --size 256 --train-size 256 --count 48 \
    --workers 0,8 --json "$work/bench.json"
fi

# ---- one JSON
"$V" - "$work" "$out" "$cuda" <<'EOF'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, cuda = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"


def step(name, keep=4000):
    rc = work / f"{name}.rc"
    if not rc.exists():
        return None
    code, seconds = map(int, rc.read_text().split())
    log = (work / f"{name}.log").read_text(errors="replace")
    res = {"ok": code == 0, "rc": code, "seconds": seconds, "timed_out": code == 124}
    if code:
        res["log_tail"] = log[-keep:]
    return res, log


def junit(path):
    if not path.exists():
        return None
    counts, cases = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}, []
    for case in ET.parse(path).iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        kind = {"failure": "failed"}.get(kind, kind)
        counts[kind] += 1
        entry = {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": kind,
                 "seconds": float(case.get("time", 0))}
        detail = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if detail is not None:
            entry["message"] = (detail.get("message") or "")[:500]
        cases.append(entry)
    return {**counts, "tests": cases}


report = {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cuda": cuda, "steps": {}}
if not cuda:
    report["note"] = "no CUDA on this machine: the gpu tests skip and the benchmark was not run"
for name in ("setup", "nvidia_smi", "versions", "pytest_gpu", "bench_train"):
    got = step(name)
    if got is None:
        continue
    res, log = got
    if name == "nvidia_smi" and res["ok"]:
        res["gpus"] = [dict(zip(("name", "driver", "memory", "compute_cap"), (f.strip() for f in ln.split(","))))
                       for ln in log.splitlines() if ln.strip()]
    if name == "versions" and res["ok"]:
        res.update(json.loads(log.strip().splitlines()[-1]))
    if name == "pytest_gpu":
        res["junit"] = junit(work / "gpu.xml")
        res["ok"] = res["rc"] in (0, 5) and bool(res["junit"]) and not (res["junit"]["failed"] or res["junit"]["error"])
    if name == "bench_train" and (work / "bench.json").exists():
        res["result"] = json.loads((work / "bench.json").read_text())
    report["steps"][name] = res
out.write_text(json.dumps(report, indent=2) + "\n")
t = report["steps"].get("pytest_gpu", {}).get("junit") or {}
print(f"wrote {out}: cuda {cuda}; gpu tests passed {t.get('passed')}, failed {t.get('failed')}, error "
      f"{t.get('error')}, skipped {t.get('skipped')}; steps failed: "
      f"{[k for k, v in report['steps'].items() if not v['ok']] or 'none'}")
EOF
