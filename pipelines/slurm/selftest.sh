#!/usr/bin/env bash
# A real single-node SLURM on this machine, and the project's SLURM paths run through it:
#   1. `uvprep build --cluster slurm` as a batch job (its Dask workers are SLURM jobs it submits itself),
#   2. pipelines/slurm/build.sbatch (scheduler and workers inside one allocation),
#   3. pipelines/slurm/train.sbatch (srun + torchrun, 2 CPU trainers over gloo), preempted once with SIGUSR1 to the
#      batch shell: the trainers checkpoint, the job requeues itself and the requeued job finishes the run.
# Then checks exit codes and states (scontrol, output files), the stores (`uvprep check`, the two builds have
# identical arrays) and the run (checkpoint at the last step, every metrics row once), prints PASS/FAIL per check.
#
#   sudo bash pipelines/slurm/selftest.sh                  # installs slurm-wlm + munge with apt-get when missing
#   bash pipelines/slurm/selftest.sh --no-install --workdir /tmp/st --keep
#
# Needs root (slurmd runs jobs as their user; here everything runs as root: SlurmUser=root) on Debian/Ubuntu. It
# touches nothing in /etc: munged, slurmctld and slurmd run from a private folder (config, key, sockets, state,
# logs; SLURM_CONF points there) on free loopback ports, and are stopped on exit, with every job cancelled first.
# The apt install is the only system change (the packages' files, users munge and slurm, /etc/munge/munge.key; a
# temporary /usr/sbin/policy-rc.d keeps apt from starting the packages' system-wide services). Output: the work
# folder (default: a new /tmp/uvtex-slurm-selftest.*, removed after a PASS unless --keep; kept after a FAIL, and a
# --workdir is always kept). Exit 0 only when every check passed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${VENV:-$REPO/.venv}
WORKDIR=
INSTALL=1
KEEP=0
PREEMPT=1
JOB_TIMEOUT=600       # seconds per batch job
TRAIN_STEPS=40        # sampler steps of the training job (enough to be signalled after its first metrics row)

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options:
  --workdir DIR     work folder (created; kept afterwards). Default: mktemp -d /tmp/uvtex-slurm-selftest.XXXXXX
  --venv DIR        the project's virtual environment the jobs use (default: \$VENV or $REPO/.venv)
  --no-install      do not apt-get install slurm-wlm / munge (fail when they are missing)
  --no-preempt      skip the SIGUSR1 / requeue / resume check of the training job
  --keep            keep the default work folder after a PASS
  --job-timeout S   seconds to wait for each batch job (default $JOB_TIMEOUT)
  --train-steps N   sampler steps of the training job (default $TRAIN_STEPS)
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --workdir) WORKDIR=$2; shift 2 ;;
        --venv) VENV=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --no-preempt) PREEMPT=0; shift ;;
        --keep) KEEP=1; shift ;;
        --job-timeout) JOB_TIMEOUT=$2; shift 2 ;;
        --train-steps) TRAIN_STEPS=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "selftest.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

T0=$SECONDS
log() { printf '[selftest %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[selftest %4ds] ERROR: %s\n' "$((SECONDS - T0))" "$*" >&2; exit 2; }

# ---- prerequisites -------------------------------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] \
    || die "needs root (slurmd starts jobs as their user, munged and slurmd run as root here); rerun with sudo"
[[ -x $VENV/bin/python && -x $VENV/bin/uvprep && -x $VENV/bin/torchrun ]] \
    || die "no project environment at $VENV (bin/python, bin/uvprep, bin/torchrun): run scripts/setup.sh" \
           "or pass --venv DIR"
"$VENV/bin/python" -c "import dask_jobqueue" 2>/dev/null \
    || die "dask-jobqueue is not installed in $VENV: $VENV/bin/pip install -e '$REPO[cluster]'"
[[ $TRAIN_STEPS =~ ^[0-9]+$ && $TRAIN_STEPS -ge 4 ]] || die "--train-steps $TRAIN_STEPS: expected a whole number >= 4"

SLURM_BINS=(munged munge slurmctld slurmd sbatch squeue sinfo scontrol scancel srun)
missing() { local b; for b in "${SLURM_BINS[@]}"; do command -v "$b" >/dev/null || echo "$b"; done; }
if [[ -n $(missing) ]]; then
    [[ $INSTALL -eq 1 ]] \
        || die "not installed: $(missing | xargs) (drop --no-install to apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null \
        || die "not installed: $(missing | xargs), and no apt-get here; install SLURM and munge"
    log "apt-get install slurm-wlm munge"
    policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then  # the packages' postinst would start system-wide daemons; we start our own
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
    fi
    rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
        >/tmp/uvtex-slurm-selftest-apt.log 2>&1 || rc=$?
    [[ $made_policy -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || die "apt-get failed (exit $rc), see /tmp/uvtex-slurm-selftest-apt.log"
    rm -f /tmp/uvtex-slurm-selftest-apt.log
    [[ -z $(missing) ]] || die "still missing after apt-get: $(missing | tr '\n' ' ')"
fi

W= SOCK= PIDS_MUNGED= PIDS_CTLD= PIDS_SLURMD= DAEMONS_UP=0 FAILED=0
cleanup() {
    local rc=$?
    set +e
    if [[ $DAEMONS_UP -eq 1 ]]; then
        local ids
        ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [[ -n ${ids// /} ]]; then
            log "cancelling jobs left in the queue: $ids"
            # shellcheck disable=SC2086
            scancel $ids
            for _ in $(seq 60); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 1; done
        fi
    fi
    for pid in $PIDS_SLURMD $PIDS_CTLD $PIDS_MUNGED; do
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    [[ -n $PIDS_MUNGED$PIDS_CTLD$PIDS_SLURMD ]] && log "stopped slurmd, slurmctld and munged"
    [[ -n $SOCK ]] && rm -rf "$SOCK"
    if [[ -z $W ]]; then
        :
    elif [[ $rc -eq 0 && $FAILED -eq 0 && $KEEP -eq 0 ]]; then
        rm -rf "$W"
    else
        log "kept the work folder $W (logs in log/, job outputs in jobs/)"
    fi
    log "total $((SECONDS - T0)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the private folder --------------------------------------------------------------------------------------
if [[ -n $WORKDIR ]]; then
    mkdir -p "$WORKDIR" && WORKDIR=$(cd "$WORKDIR" && pwd) && KEEP=1
else
    WORKDIR=$(mktemp -d /tmp/uvtex-slurm-selftest.XXXXXX)
fi
W=$WORKDIR
mkdir -p "$W/etc" "$W/munge-key" "$W/state" "$W/log" "$W/run" "$W/jobs/workers" "$W/scratch"
chmod 700 "$W/munge-key"
# the sockets (munged's, slurmd's in its spool) in a short path of their own: a Unix socket path is at most 107
# bytes, and munged wants every folder above its socket searchable by all (a pytest tmp_path is not)
SOCK=$(mktemp -d /tmp/uvtex-slurm.XXXXXX)
chmod 711 "$SOCK"
mkdir -p "$SOCK/munge" "$SOCK/spool"
chmod 711 "$SOCK/munge"
log "work folder $W, project $REPO, environment $VENV"

free_port() {
    "$VENV/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

# ---- munge ---------------------------------------------------------------------------------------------------
MUNGE_SOCKET=$SOCK/munge/munge.socket.2
dd if=/dev/urandom of="$W/munge-key/munge.key" bs=1024 count=1 status=none
chmod 400 "$W/munge-key/munge.key"
munged -F --socket="$MUNGE_SOCKET" --key-file="$W/munge-key/munge.key" --pid-file="$W/run/munged.pid" \
    --log-file="$W/log/munged.log" --seed-file="$W/munge-key/munged.seed" >"$W/log/munged.out" 2>&1 &
PIDS_MUNGED=$!
for _ in $(seq 50); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.1; done
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null \
    || { cat "$W/log/munged.out" >&2; die "munged did not start"; }

# ---- slurm.conf: one node (this machine, as localhost), one partition ----------------------------------------
# slurmd -C prints this machine's NodeName=... CPUs=... RealMemory=... line
HW=$(SLURM_CONF=/dev/null slurmd -C | head -1)
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
[[ -n $CPUS && -n $MEM ]] || die "could not read CPUs / RealMemory from slurmd -C: $HW"
# the cluster build needs 2 CPUs at once (the build job and one worker job); on a 1-CPU machine the node
# declares 2 (config_overrides makes slurmd report the configured values)
NODE_CPUS=$(( CPUS < 2 ? 2 : CPUS ))
CTLD_PORT=$(free_port) SLURMD_PORT=$(free_port)
export SLURM_CONF=$W/etc/slurm.conf
cat >"$SLURM_CONF" <<EOF
# written by pipelines/slurm/selftest.sh: a single-node cluster on localhost, everything run as root
ClusterName=uvtexselftest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$W/state
SlurmdSpoolDir=$SOCK/spool
SlurmctldPidFile=$W/run/slurmctld.pid
SlurmdPidFile=$W/run/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=selftest Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

# ---- slurmctld + slurmd --------------------------------------------------------------------------------------
slurmctld -D -i >"$W/log/slurmctld.out" 2>&1 &
PIDS_CTLD=$!
slurmd -D -N localhost >"$W/log/slurmd.out" 2>&1 &
PIDS_SLURMD=$!
DAEMONS_UP=1
state=
for _ in $(seq 120); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    [[ $state == idle ]] && break
    kill -0 "$PIDS_CTLD" 2>/dev/null || break
    kill -0 "$PIDS_SLURMD" 2>/dev/null || break
    sleep 0.5
done
if [[ $state != idle ]]; then
    tail -n 20 "$W/log/slurmctld.out" "$W/log/slurmctld.log" "$W/log/slurmd.out" "$W/log/slurmd.log" 2>/dev/null >&2
    die "the node is not idle after 60 s (sinfo says '${state:-nothing}'), logs above"
fi
log "SLURM up: $(sinfo -h -o '%P %D %T %c CPUs %m MB') (slurmctld :$CTLD_PORT, slurmd :$SLURMD_PORT, $(slurmctld -V))"

# ---- checks --------------------------------------------------------------------------------------------------
RESULTS=()
check() {  # check NAME CONDITION-STATUS DETAIL
    local name=$1 ok=$2 detail=${3:-}
    if [[ $ok -eq 0 ]]; then RESULTS+=("PASS  $name${detail:+  ($detail)}"); log "PASS $name${detail:+ ($detail)}"
    else RESULTS+=("FAIL  $name${detail:+  ($detail)}"); FAILED=1; log "FAIL $name${detail:+ ($detail)}"; fi
}
job_field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }
wait_job() {  # wait_job ID: until it has left the queue for good; sets JOB_STATE to its final state. Runs in this
    # shell (not in $(...)), so that a signal to this script is handled within a second
    local id=$1 t_end=$((SECONDS + JOB_TIMEOUT))
    while ((SECONDS < t_end)); do
        JOB_STATE=$(job_field "$id" JobState)
        case $JOB_STATE in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) return 0 ;;
        esac
        sleep 1
    done
    JOB_STATE="TIMEOUT_WAITING($(job_field "$id" JobState))"
}
ok() { "$@" >/dev/null 2>&1 && echo 0 || echo 1; }

JOBS=$W/jobs
ENV_SETUP="source $VENV/bin/activate"
# a tiny synthetic store: 8 faces of 64 px, 32² UV maps, 2 chunks of 4
STORE_FLAGS=(--src synthetic --count 8 --image-size 64 --uv-size 32 --chunk 4 --pca-samples 8 --n-tex 4
             --frontal-yaw 25)
export OMP_NUM_THREADS=1  # jobs inherit the environment; 2 trainers on 2 cores

# 1. `uvprep build --cluster slurm` inside a batch job: its one worker job is submitted by dask-jobqueue
cat >"$JOBS/cluster-build.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
$ENV_SETUP
exec uvprep build --out "$W/cluster.zarr" ${STORE_FLAGS[*]} --cluster slurm --threads 1 \\
    --slurm-cores 1 --slurm-memory 2GB --slurm-walltime 00:20:00 --slurm-partition selftest --slurm-max-jobs 1 \\
    --slurm-prologue "$ENV_SETUP" --slurm-log-directory "$JOBS/workers" --slurm-local-directory "$W/scratch"
EOF
log "1/3 sbatch: uvprep build --cluster slurm (the build job submits its worker job)"
JID=$(sbatch --parsable --job-name=selftest-cluster-build --ntasks=1 --cpus-per-task=1 --mem=2G --time=00:20:00 \
    --chdir="$REPO" --output="$JOBS/cluster-build-%j.out" "$JOBS/cluster-build.sh")
wait_job "$JID"; st=$JOB_STATE
ec=$(job_field "$JID" ExitCode)
check "cluster build job $JID" "$([[ $st == COMPLETED && $ec == 0:0 ]] && echo 0 || echo 1)" "$st, exit $ec"
nworkers=$(find "$JOBS/workers" -name 'uvprep-worker-*.out' | wc -l)
worker_ids=$(find "$JOBS/workers" -name 'uvprep-worker-*.out' | sed 's/.*-\([0-9]*\)\.out/\1/' | xargs)
check "its Dask workers ran as SLURM jobs" "$([[ $nworkers -ge 1 ]] && echo 0 || echo 1)" \
    "worker jobs: ${worker_ids:-none}"
for _ in $(seq 30); do [[ -z $(squeue -h -o %i) ]] && break; sleep 1; done
left=$(squeue -h -o '%i %j %T' | tr '\n' ';')
wstates=$(for j in $worker_ids; do echo "$j:$(job_field "$j" JobState)"; done | xargs)
check "the worker jobs are gone when the build ends" "$([[ -z $left ]] && echo 0 || echo 1)" \
    "${left:+still queued: $left; }$wstates"
check "uvprep check cluster.zarr" "$(ok "$VENV/bin/uvprep" check "$W/cluster.zarr")"
grep -h "samples in store" "$JOBS"/cluster-build-*.out >/dev/null 2>&1 || tail -n 30 "$JOBS"/cluster-build-*.out

# 2. pipelines/slurm/build.sbatch: scheduler, srun workers (2 processes) and the build in one allocation
log "2/3 sbatch pipelines/slurm/build.sbatch (1 node, 2 CPUs: 2 worker processes)"
JID=$(ENV_SETUP="$ENV_SETUP" SHARED_DIR="$W/dask-build-sbatch" LOCAL_DIR="$W/scratch" \
    sbatch --parsable --nodes=1 --ntasks-per-node=1 --cpus-per-task=2 --mem=4G --time=00:20:00 --chdir="$REPO" \
    --output="$JOBS/build-sbatch-%j.out" "$REPO/pipelines/slurm/build.sbatch" \
    --out "$W/template.zarr" "${STORE_FLAGS[@]}")
wait_job "$JID"; st=$JOB_STATE
ec=$(job_field "$JID" ExitCode)
check "build.sbatch job $JID" "$([[ $st == COMPLETED && $ec == 0:0 ]] && echo 0 || echo 1)" "$st, exit $ec"
[[ $st == COMPLETED ]] || tail -n 30 "$JOBS"/build-sbatch-*.out
check "build.sbatch: its scheduler folder is removed" "$([[ ! -e $W/dask-build-sbatch ]] && echo 0 || echo 1)"
check "uvprep check template.zarr" "$(ok "$VENV/bin/uvprep" check "$W/template.zarr")"
same=$("$VENV/bin/python" - "$W/cluster.zarr" "$W/template.zarr" <<'EOF' 2>&1 || true
import sys
import numpy as np
import zarr

def arrays(path):
    g = zarr.open_group(path, mode="r")
    out = {}
    for prefix, grp in (("", g), ("texture/", g["texture"])):
        for name, a in grp.arrays():
            v = a[...]
            out[prefix + name] = v[:, :32] if name == "chunk_record" else v  # the data's SHA-256, not the token
    return out

a, b = arrays(sys.argv[1]), arrays(sys.argv[2])
differ = sorted(k for k in set(a) | set(b) if k not in a or k not in b or not np.array_equal(a[k], b[k]))
print(f"{len(a)} arrays, identical" if not differ else f"differ: {differ}")
EOF
)
check "the two SLURM builds have identical arrays" "$([[ $same == *identical ]] && echo 0 || echo 1)" "$same"

# 3. pipelines/slurm/train.sbatch: srun + torchrun, 2 CPU trainers (gloo); SIGUSR1 to the batch shell after the
#    first metrics row -> checkpoint, exit 124, scontrol requeue; the requeued job resumes and finishes
TOTAL=$((TRAIN_STEPS + 4))
RUN=$W/run
TRAIN_FLAGS=(--sampler-steps "$TRAIN_STEPS" --sampler-finetune-steps 0 --generator-steps 4 --batch-size 2
             --image-size 64 --sampler-image-size 48 --sampler-grid 16 --channels 8 --identity none --log-every 1
             --no-tensorboard)
log "3/3 sbatch pipelines/slurm/train.sbatch (1 node x 2 CPU trainers, $TOTAL steps$(
    [[ $PREEMPT -eq 1 ]] && echo ", SIGUSR1 after the first step"))"
JID=$(ENV_SETUP="$ENV_SETUP" STORE="$W/cluster.zarr" RUN_DIR="$RUN" GPUS_PER_NODE=2 DEVICE=cpu WORKERS=0 \
    PORT=$(free_port) sbatch --parsable --nodes=1 --ntasks-per-node=1 --cpus-per-task=2 --gpus-per-node=0 \
    --mem=4G --time=00:20:00 --chdir="$REPO" --output="$JOBS/train-%j.out" "$REPO/pipelines/slurm/train.sbatch" \
    "${TRAIN_FLAGS[@]}")
if [[ $PREEMPT -eq 1 ]]; then
    t_end=$((SECONDS + JOB_TIMEOUT))
    while [[ ! -s $RUN/metrics.jsonl ]] && ((SECONDS < t_end)); do
        [[ $(job_field "$JID" JobState) == @(RUNNING|PENDING|CONFIGURING) ]] || break
        sleep 0.2
    done
    if [[ -s $RUN/metrics.jsonl ]]; then
        scancel --batch --signal=USR1 "$JID"
        log "sent SIGUSR1 to the batch shell of job $JID after step $(wc -l <"$RUN/metrics.jsonl")"
    else
        log "no metrics row before the job left RUNNING ($(job_field "$JID" JobState)); no signal sent"
    fi
    # wait for the requeue: the job leaves the first run (Restarts=1)
    t_end=$((SECONDS + JOB_TIMEOUT))
    while [[ $(job_field "$JID" Restarts) == 0 ]] && ((SECONDS < t_end)); do
        [[ $(job_field "$JID" JobState) == @(COMPLETED|FAILED|CANCELLED|TIMEOUT) ]] && break
        sleep 0.5
    done
    # SLURM keeps a requeued job pending until the first run's credential has expired (Reason=BeginTime;
    # AuthInfo cred_expire, 120 s by default, 10 s here). Forcing it to start earlier (scontrol update
    # StartTime=now) fails it at once: "Killing non-startable batch JobId: Job credential revoked".
    for _ in $(seq 120); do [[ $(job_field "$JID" JobState) == PENDING ]] && break; sleep 0.5; done
    if [[ $(job_field "$JID" JobState) == PENDING ]]; then
        log "job $JID requeued, eligible at $(job_field "$JID" EligibleTime) (reason $(job_field "$JID" Reason))"
    fi
    step_ck=$("$VENV/bin/python" -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['step'])" \
        "$RUN/checkpoint.pt" 2>/dev/null || echo none)
    restarts=$(job_field "$JID" Restarts)
    check "train job preempted: checkpoint written, job requeued" \
        "$([[ $restarts -ge 1 && $step_ck =~ ^[0-9]+$ && $step_ck -lt $TOTAL ]] && echo 0 || echo 1)" \
        "checkpoint at step $step_ck of $TOTAL, restarts ${restarts:-none}"
fi
wait_job "$JID"; st=$JOB_STATE
ec=$(job_field "$JID" ExitCode)
check "train.sbatch job $JID" "$([[ $st == COMPLETED && $ec == 0:0 ]] && echo 0 || echo 1)" \
    "$st, exit $ec, restarts $(job_field "$JID" Restarts)"
[[ $st == COMPLETED ]] || tail -n 40 "$JOBS"/train-*.out
run_ok=$("$VENV/bin/python" - "$RUN" "$TOTAL" <<'EOF' 2>&1 || true
import json, sys
from pathlib import Path
import torch
run, total = Path(sys.argv[1]), int(sys.argv[2])
step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
rows = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
good = step == total and rows == list(range(1, total + 1))
print(("ok: " if good else "bad: ") + f"checkpoint at step {step} of {total}, metrics rows {rows[0]}..{rows[-1]} "
      f"({len(rows)}, {'each once' if rows == sorted(set(rows)) else 'repeated'})")
EOF
)
check "the run ends at its last step with every metrics row once" "$([[ $run_ok == ok:* ]] && echo 0 || echo 1)" \
    "${run_ok#*: }"
if [[ $PREEMPT -eq 1 ]]; then
    logged=1
    grep -q "preempted by SIGUSR1" "$JOBS"/train-*.out && grep -q "requeueing job $JID" "$JOBS"/train-*.out && logged=0
    check "train.sbatch log: the trainers' preemption line and the requeue" "$logged"
fi

# ---- summary -------------------------------------------------------------------------------------------------
echo
echo "SLURM self-test: $(slurmctld -V), ${CPUS} CPUs / ${MEM} MB, $((SECONDS - T0)) s"
printf '  %s\n' "${RESULTS[@]}"
if [[ $FAILED -eq 0 ]]; then echo "PASS"; else echo "FAIL"; exit 1; fi
