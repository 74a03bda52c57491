#!/usr/bin/env bash
# The ablation table of issue 19 (section 4): the recipe of scripts/train_synthetic.sh (flags in
# scripts/recipe_flags.sh), one row per part of the method taken out, all on the same held-out faces. Hours on 2 CPU
# cores: the sampler once (~10 min), five generator runs from it (~45 min each), the per-texel head's full run
# (~55 min), and the evaluations.
#
#   bash scripts/ablations.sh OUT [HELDOUT_SEED]
#
#   OUT/train.zarr, OUT/val.zarr, OUT/heldout.zarr   the stores of scripts/train_synthetic.sh (the same commands;
#                           an OUT shared with it reuses them)
#   OUT/sampler/            the recipe's sampler, pre-trained once (--phase sampler)
#   OUT/runs/ROW/           one run per row; all but per_texel start from OUT/sampler (--init-sampler):
#                             full        the whole method
#                             no_ctr_sd   without D_ctr and D_sd (--w-ctr 0 --w-side 0)
#                             no_sym      without symmetry, Eq. 12 (--w-sym 0)
#                             no_id       without identity, Eq. 13 (--identity none)
#                             no_rotate   without rotate-and-render (--rotate-share 0)
#                             per_texel   the paper's per-texel sampler head (--sampler-control-size 0): its own
#                                         sampler, so a full run
#   OUT/eval/ROW.json       uvtrain eval on OUT/heldout.zarr (full: --baselines; per_texel: also its sampler alone)
#   OUT/ablations.md        the table (scripts/ablation_table.py)
#   OUT/time.txt            wall time of each step
#
# Rerunning the same command resumes: the builds and runs pick up where they stopped; evaluations run again.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/ablations.sh OUT [HELDOUT_SEED]}
heldout_seed=${2:-7}
if [ "$heldout_seed" = 0 ] || [ "$heldout_seed" = 1 ]; then
    echo "HELDOUT_SEED must differ from the training (0) and validation (1) seeds" >&2; exit 2
fi
# shellcheck source=scripts/recipe_flags.sh
source scripts/recipe_flags.sh
mkdir -p "$out/runs" "$out/eval"
bin=.venv/bin
[ -x $bin/uvtrain ] || bash scripts/setup.sh
touch "$out/time.txt"
timed() {  # timed NAME COMMAND...: run, append "NAME seconds" to OUT/time.txt
    local name=$1 t0=$SECONDS; shift
    "$@"
    echo "$name $((SECONDS - t0))" | tee -a "$out/time.txt"
}

# (a) The stores, as scripts/train_synthetic.sh builds them (training seed 0, validation seed 1, held-out seed K).
timed build_train $bin/uvprep build --src synthetic --count 4096 --seed 0 --out "$out/train.zarr" \
    "${recipe_store[@]}" --pca-samples 256 --workers 2
timed build_val $bin/uvprep build --src synthetic --count 48 --seed 1 --out "$out/val.zarr" "${recipe_store[@]}" \
    --chunk 16 --pca-samples 48 --workers 1
timed build_heldout $bin/uvprep build --src synthetic --count 48 --seed "$heldout_seed" --out "$out/heldout.zarr" \
    "${recipe_store[@]}" --chunk 16 --pca-samples 48 --workers 1

fit() {  # fit RUN_DIR FLAGS...: the recipe's uvtrain fit into RUN_DIR, validated on OUT/val.zarr
    local run=$1; shift
    $bin/uvtrain fit --store "$out/train.zarr" --run-dir "$run" "${recipe_fit[@]}" \
        --val-store "$out/val.zarr" "${recipe_watch[@]}" "$@"
}

# (b) The recipe's sampler, once.
timed sampler fit "$out/sampler" --phase sampler

# (c) One generator per row from it; the per-texel head trains its own sampler.
declare -A rows=(
    [full]=""
    [no_ctr_sd]="--w-ctr 0 --w-side 0"
    [no_sym]="--w-sym 0"
    [no_id]="--identity none"
    [no_rotate]="--rotate-share 0"
)
order=(full no_ctr_sd no_sym no_id no_rotate)
for row in "${order[@]}"; do
    read -r -a flags <<< "${rows[$row]}"
    timed "fit_$row" fit "$out/runs/$row" --init-sampler "$out/sampler" "${flags[@]}"
done
timed fit_per_texel fit "$out/runs/per_texel" --sampler-control-size 0

# (d) Each row on the held-out faces: the full method with the baselines, the per-texel head with its sampler alone.
evaluate() {  # evaluate ROW FLAGS...
    local row=$1; shift
    timed "eval_$row" $bin/uvtrain eval --store "$out/heldout.zarr" --checkpoint "$out/runs/$row" --no-progress \
        --out "$out/eval/$row.json" "$@"
}
evaluate full --baselines
for row in no_ctr_sd no_sym no_id no_rotate; do
    evaluate "$row"
done
evaluate per_texel --method generator --method sampler

# (e) The table.
$bin/python scripts/ablation_table.py "$out" > "$out/ablations.md"
cat "$out/ablations.md"
echo "total $(awk '{s += $2} END {print s}' "$out/time.txt")" | tee -a "$out/time.txt"
