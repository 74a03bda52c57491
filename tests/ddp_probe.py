"""``uvtrain fit`` under ``torchrun`` with a probe, for ``tests/test_cluster_faults.py``:

    torchrun --nproc-per-node 2 tests/ddp_probe.py fit --store ... (the flags of `uvtrain fit`)

runs the real command line (``train.cli``) in every rank, recording the store indices of each batch a rank trains on
and, at the end, the rank's own sampler and generator weights: ``$UVTEX_PROBE_OUT/rank<RANK>.pt`` =
``{"seen": [[index, ...] per step], "state": {name: tensor}}``. Nothing here is imported by the product.
"""

from __future__ import annotations

import os
import sys

import torch


def main(argv: list[str]) -> int:
    from train import cli, loop

    seen: list[list[int]] = []
    trainers: list[loop.Trainer] = []
    real_init, real_sampler, real_generator = loop.Trainer.__init__, loop.Trainer.sampler_step, \
        loop.Trainer.generator_step

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        trainers.append(self)

    def sampler_step(self, b, stage):
        seen.append(b["index"].tolist())
        return real_sampler(self, b, stage)

    def generator_step(self, b):
        seen.append(b["index"].tolist())
        return real_generator(self, b)

    loop.Trainer.__init__, loop.Trainer.sampler_step, loop.Trainer.generator_step = init, sampler_step, generator_step
    code = cli.app(argv, standalone_mode=False) or 0
    tr = trainers[-1]
    state = {f"s.{k}": v for k, v in tr.sampler.state_dict().items()}
    state.update({f"g.{k}": v for k, v in tr.generator.state_dict().items()})
    torch.save({"seen": seen, "state": state}, os.path.join(os.environ["UVTEX_PROBE_OUT"],
                                                            f"rank{os.environ['RANK']}.pt"))
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
