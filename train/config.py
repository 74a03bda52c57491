"""Configuration of a training run: what decides the result (:class:`TrainConfig`, stored in the run directory and
compared on every rerun) and how this invocation runs (:class:`RunOptions`, free to change between reruns)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.losses import LossWeights
from train.models import DiscriminatorConfig, GeneratorConfig, SamplerConfig

PHASES = ("sampler", "generator", "all")


@dataclass(frozen=True)
class OptimConfig:
    """Adam, as Section 4.1: learning rate 1e-4, betas (0.5, 0.999)."""

    lr_sampler: float = 1e-4
    """Learning rate of the UV sampler."""
    lr_generator: float = 1e-4
    """Learning rate of the UV generator."""
    lr_discriminator: float = 1e-4
    """Learning rate of the three discriminators."""
    beta1: float = 0.5
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's weights (written to ``RUN/config.json``; a rerun must match it)."""

    store: str
    """The store (path or URL) written by ``uvprep build``."""
    sampler_steps: int = 30_000
    """UV sampler pre-training steps (Section 4.1: about 30k), fine-tuning included."""
    sampler_finetune_steps: int | None = None
    """The last steps of the sampler phase run at ``image_size`` with the UV at the store's size; None: 20%."""
    generator_steps: int = 100_000
    """UV generator steps with the sampler frozen (Section 4.1: 100k)."""
    batch_size: int = 6
    """Batch per rank (Section 4.1: 6)."""
    image_size: int = 256
    """Input side of the generator phase and of the sampler's fine-tuning (Section 4.1: 256)."""
    sampler_image_size: int = 128
    """Input side of the sampler's first stage (Section 4.1: 128 input, 152 UV)."""
    workers: int = 2
    """DataLoader worker processes per rank (they also rasterise); part of the data order."""
    seed: int = 0
    """Seed of weights and data order."""
    shuffle_window: int = 4
    """Chunks shuffled together by the data stream."""
    rotate_share: float = 0.25
    """Share of each generator batch replaced by rotate-and-render inputs (Section 4.1)."""
    max_yaw: float = 60.0
    """|yaw| bound in degrees of I1's random pose and of the rotate-and-render poses."""
    identity: str = "dlib"
    """Identity network F of Eq. 13 (:func:`common.identity.load_identity`): ``dlib`` (needs the ``identity``
    extra), ``dlib:PATH``, ``lightcnn:PATH`` (the paper's LightCNN-29 v2 checkpoint), a TorchScript/export file, or
    ``none``."""
    weights: LossWeights = field(default_factory=LossWeights)
    """The lambdas of Eq. 5 and Eq. 14."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser settings."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """UV sampler architecture (``grid_size`` is S, Section 3.1: 152)."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """UV generator architecture."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """Architecture of each of the three discriminators."""

    def __post_init__(self) -> None:
        if self.sampler_steps < 0 or self.generator_steps < 0 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("TrainConfig: steps and workers must be >= 0 and batch_size >= 1")
        if self.finetune_steps > self.sampler_steps:
            raise ValueError(f"TrainConfig: sampler_finetune_steps {self.finetune_steps} > sampler_steps "
                             f"{self.sampler_steps}")

    @property
    def finetune_steps(self) -> int:
        if self.sampler_finetune_steps is None:
            return self.sampler_steps // 5
        return int(self.sampler_finetune_steps)

    @property
    def total_steps(self) -> int:
        return self.sampler_steps + self.generator_steps

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        sub = {"weights": LossWeights, "optim": OptimConfig, "sampler": SamplerConfig,
               "generator": GeneratorConfig, "discriminator": DiscriminatorConfig}
        kw = {}
        for k, v in d.items():
            if k in sub:
                typ = sub[k]
                names = {f.name: f for f in dataclasses.fields(typ)}
                v = typ(**{a: tuple(b) if isinstance(b, list) else b for a, b in v.items() if a in names})
            kw[k] = v
        return cls(**kw)


@dataclass(frozen=True)
class RunOptions:
    """How this invocation runs; never changes the weights (except float rounding across devices)."""

    run_dir: Path
    """Where config, checkpoints, logs and previews go."""
    phase: str = "all"
    """``sampler`` (stop after the sampler), ``generator`` (needs the sampler done) or ``all``."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``."""
    overwrite: bool = False
    """Delete the run directory's state and start again."""
    log_every: int = 50
    """Steps between metrics lines and TensorBoard scalars."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (one is also written at the end and at each phase's end)."""
    preview_every: int | None = None
    """Steps between PNG/TensorBoard image previews; None: every checkpoint."""
    amp: str = "auto"
    """``auto`` (bf16 on CUDA, off on CPU), ``bf16``, ``fp16`` (with a grad scaler) or ``none``."""
    render_on: str = "auto"
    """Where faces are rasterised: ``loader`` (CPU workers), ``device`` (the training device) or ``auto``
    (the device on CUDA, the loader on CPU). The same renders either way (up to float rounding)."""
    compile: bool = False
    """``torch.compile`` the networks."""
    progress: bool = True
    """Show a progress line."""
    tensorboard: bool = True
    """Write TensorBoard event files to ``RUN/tb`` (needs the tensorboard package)."""
    dist_timeout: float = 600.0
    """Under torchrun: seconds a collective waits for the other ranks before this rank fails. It bounds a rank lost
    without a closed connection (a frozen process, a node gone from the network), where torch's default waits 30 min
    (gloo); a rank that dies on a reachable host fails the others at once anyway."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase: expected one of {', '.join(PHASES)}, found {self.phase!r}")
        if self.render_on not in ("auto", "loader", "device"):
            raise ValueError(f"render_on: expected auto, loader or device, found {self.render_on!r}")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"amp: expected auto, bf16, fp16 or none, found {self.amp!r}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("log_every and checkpoint_every must be >= 1")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout: expected seconds > 0, found {self.dist_timeout}")
