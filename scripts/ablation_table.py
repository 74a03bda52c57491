"""The ablation table of issue 19 (section 4) as markdown, from the `uvtrain eval` JSONs `scripts/ablations.sh` writes.

    python scripts/ablation_table.py OUT > OUT/ablations.md

Reads ``OUT/eval/ROW.json`` for each row of :data:`ROWS` that has one (rows not evaluated yet are left out): the
``generator`` method of each (UV_pred), the baselines (UV_bfm, UV_bl, the sampler alone) from the full method's
``--baselines`` evaluation, and the per-texel head's sampler alone where its evaluation has it. Columns: Table 1's
L1 and SSIM, ID Recon / Front when the evaluation has them (``--identity dlib``), and completion MAE x 255 on seen /
unseen texels, for all yaws and per yaw band (sample counts in the header, from the full method's file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = (
    ("full", "full method"),
    ("no_ctr_sd", "without D_ctr and D_sd"),
    ("no_sym", "without symmetry (Eq. 12)"),
    ("no_id", "without identity (Eq. 13)"),
    ("no_rotate", "without rotate-and-render"),
    ("per_texel", "the paper's per-texel sampler head"),
)
"""(file stem under OUT/eval, row label), in table order; scripts/ablations.sh trains and evaluates the same names."""
BASELINES = (("bfm", "UV_bfm (texture-basis fit, Eq. 8)"), ("bl", "UV_bl (pseudo ground truth, Eq. 9)"),
             ("sampler", "sampler alone + UV_bfm fill"))
BANDS = (("all", "all yaws"), ("|yaw|<30", r"\|yaw\| < 30"), ("30-60", "30–60"), (">60", "> 60"))
"""``completion_mae_255`` keys of ``uvtrain eval`` (train/evaluate.py YAW_BANDS) and their headers."""


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _cells(m: dict, with_id: bool) -> list[str]:
    cells = [_num(m.get("l1"), ".4f"), _num(m.get("ssim"), ".3f")]
    if with_id:
        cells += [_num(m.get("id_recon"), ".3f"), _num(m.get("id_front"), ".3f")]
    comp = m.get("completion_mae_255", {})
    for band, _ in BANDS:
        c = comp.get(band, {})
        cells.append(f"{_num(c.get('seen'), '.1f')} / {_num(c.get('unseen'), '.1f')}")
    return cells


def table(out: Path) -> str:
    found = {stem: json.loads(p.read_text()) for stem, _ in ROWS if (p := out / "eval" / f"{stem}.json").is_file()}
    if not found:
        raise SystemExit(f"{out / 'eval'}: no evaluation JSONs of {', '.join(s for s, _ in ROWS)}; run "
                         f"scripts/ablations.sh {out} first")
    rows: list[tuple[str, dict]] = []
    full = found.get("full", {}).get("methods", {})
    rows += [(label, full[k]) for k, label in BASELINES if k in full]
    for stem, label in ROWS:
        methods = found.get(stem, {}).get("methods", {})
        if "generator" in methods:
            rows.append((f"{label} (UV_pred)" if stem == "full" else label, methods["generator"]))
        if stem == "per_texel" and "sampler" in methods:
            rows.append((f"{label}: sampler alone + UV_bfm fill", methods["sampler"]))
    with_id = any("id_recon" in m for _, m in rows)
    ref = next(iter(found.values()))
    counts = next((m["completion_mae_255"] for m in ref["methods"].values() if "completion_mae_255" in m), {})
    header = ["on held-out synthetic faces", "L1", "SSIM"] + (["ID Recon", "ID Front"] if with_id else [])
    header += [f"seen / unseen, {name} ({counts.get(band, {}).get('samples', '?')})" for band, name in BANDS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([label, *_cells(m, with_id)]) + " |" for label, m in rows]
    steps = {stem: d.get("checkpoint_step") for stem, d in found.items()}
    note = (f"\n{ref.get('samples', '?')} held-out faces; L1 / SSIM: Table 1's re-render of the photo; completion: "
            f"MAE x 255 against the true texture on the texels the photo saw / did not see (`uvtrain eval`). "
            f"Checkpoint steps: {', '.join(f'{k} {v}' for k, v in steps.items())}.")
    return "\n".join(lines) + "\n" + note + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/ablation_table.py OUT  (the folder of scripts/ablations.sh)", file=sys.stderr)
        return 2
    sys.stdout.write(table(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
