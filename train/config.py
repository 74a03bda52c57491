"""Configuration of the trainer's commands, as frozen dataclasses: what decides a training run's result
(:class:`TrainConfig` with its network, loss and optimiser parts, stored in the run directory and compared on every
rerun), how an invocation runs (:class:`RunOptions`, free to change between reruns), and ``uvtrain infer`` /
``uvtrain eval`` (:class:`InferConfig`, :class:`EvalConfig`).

Standard library only, so that ``uvtrain --help`` reads every default without importing torch; the modules that
implement a config import it from here (``train.models``, ``train.losses``, ``train.infer``, ``train.evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import MAX_BYTES, MAX_PIXELS

PHASES = ("sampler", "generator", "all")
"""``RunOptions.phase``'s choices."""
VAL_METRICS = ("l1", "l1_face", "ssim", "seen_mae", "unseen_mae", "all_mae", "id_recon", "id_front")
"""``RunOptions.val_metric``'s choices: the held-out columns of ``uvtrain eval`` (``*_mae``: completion MAE x 255 on
seen / unseen / all face texels, stores with ``uv_true``)."""
HIGHER_IS_BETTER = ("ssim", "id_recon", "id_front")
"""The metrics of :data:`VAL_METRICS` where higher is better."""
EXIT_PREEMPTED = 124
"""Exit code of ``uvtrain fit`` stopped by SIGUSR1 / SIGTERM: after writing its checkpoint, or during start-up before
any step; rerun the same command to resume (``pipelines/slurm/train.sbatch`` requeues the job)."""


# --------------------------------------------------------------------------------------------------------- networks
BASE_CHANNELS = 64
"""Full-size width of every network's first stage (``uvtrain fit --channels``: one flag sets all three)."""


@dataclass(frozen=True)
class SamplerConfig:
    """UV attention sampler: residual feature extractor + fully connected sampler head."""

    grid_size: int = 152
    """Side S of the predicted sampling grid S_att (the paper's 152; resized to other UV sizes in forward)."""
    channels: int = BASE_CHANNELS
    """Width of the first feature-extractor stage; doubles at every halving up to ``max_channels``."""
    max_channels: int = 512
    """Widest feature-extractor stage."""
    n_down: int = 5
    """Residual blocks, each halving H and W (avg-pool); input sides must be >= 2**n_down."""
    feature_dim: int = 512
    """Length of the image feature (the paper's 512-d feature)."""
    pool_size: int = 4
    """The last feature map is average-pooled to ``pool_size``² cells (any input size) and flattened before the
    projection to ``feature_dim``. 1 is global average pooling, which throws away where things are in the image:
    measured at init on 6 synthetic faces, its features varied by 1.5e-4 (std over the batch) against a mean of
    0.01, and the grid could not learn the pose."""
    head_hidden: int = 1024
    """Width of the sampler head's hidden fully connected layers."""
    head_layers: int = 2
    """Hidden Linear + ReLU layers of the head before its output layer (0: the feature maps straight to the grid)."""
    template_weight_scale: float = 1e-2
    """``set_template`` multiplies the output layer's weights by this, so the first grids stay near the template."""
    control_size: int | None = 19
    """The head predicts offsets from the template on a ``control_size``² grid of control points, bilinearly
    upsampled to S (a smooth sampling map by construction). None: the head outputs all 2 S² coordinates, as the
    paper's text. With per-texel outputs every coordinate follows its own noisy colour gradient and the grid
    scrambles into face-coloured noise within tens of steps on the synthetic world; a control point pools the
    gradients of the ~64 texels around it."""


@dataclass(frozen=True)
class GeneratorConfig:
    """UV inpainting U-Net."""

    channels: int = BASE_CHANNELS
    """Width at full resolution; doubles at every halving up to ``max_channels``."""
    max_channels: int = 512
    """Widest level."""
    n_down: int | None = None
    """Stride-2 halvings; None: as many as keep U divisible with a bottleneck >= ``min_bottleneck`` (auto_n_down)."""
    n_res: int = 4
    """Residual blocks at the bottleneck."""
    min_bottleneck: int = 8
    """Smallest bottleneck side the automatic ``n_down`` allows."""
    mirror_input: bool = False
    """Also feed the generator UV_spl and its mask mirrored across the face (the texel mirror of Eq. 12), so filling
    a hidden texel from its visible twin is a local operation rather than one across the whole map
    (docs/experiments.md)."""
    residual: bool = False
    """Predict UV_pred as a correction of UV_spl (in logit space, the last layer zero-initialised so training starts
    from UV_pred = UV_spl) instead of from scratch (docs/experiments.md)."""
    grid_input: bool = False
    """Also feed the generator the sampler's sampling grid (where in the photo each texel was read: 2 channels), from
    which the pose, and so which texels the photo can see, can be read (docs/experiments.md)."""
    visibility_gate: bool = False
    """With ``residual``: UV_pred = v * (corrected UV_spl) + (1 - v) * (a fill predicted from scratch), where v is a
    predicted map of the texels the photo saw, trained against the store's ``uv_gt_mask`` (LossWeights.vis). UV_spl
    copies whatever the photo shows where its texel is hidden (the far cheek, hair, background); the gate lets the
    generator drop those instead of correcting them (docs/experiments.md)."""

    def __post_init__(self) -> None:
        if self.visibility_gate and not self.residual:
            raise ValueError("visibility_gate blends a correction of UV_spl with a fresh fill; it needs residual=True "
                             "(--generator-residual)")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN discriminator (used as D_ctr, D_sd and D_face)."""

    channels: int = BASE_CHANNELS
    """Width of the first layer; doubles per halving up to 8x."""
    n_layers: int = 3
    """Stride-2 4x4 convolutions; inputs need sides >= 2**(n_layers + 1)."""
    in_channels: int = 3
    """Input channels (3: RGB in [0, 1])."""


# ------------------------------------------------------------------------------------------------ losses, optimiser
@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator's loss terms (Eq. 14) and of the discriminators' R1 penalty."""

    face: float = 10.0
    """Face reconstruction L1 ||I^R - I^m||_1 (Eq. 11)."""
    uv: float = 1.0
    """UV reconstruction L1 ||UV_pred - UV_bl||_1 (Eq. 11)."""
    uv_unseen: float = 1.0
    """Factor on the UV term at the texels UV_gt did not observe (hidden, occluded; not in the paper: 1 is Eq. 11),
    where UV_pred learns from UV_bl alone (docs/experiments.md)."""
    sym: float = 1.0
    """lambda_2, symmetry loss (Eq. 12)."""
    tv: float = 0.1
    """lambda_4, total variation of UV_pred (Eq. 7)."""
    id: float = 0.1
    """lambda_3, identity loss (Eq. 13)."""
    adv: float = 0.01
    """lambda_1, adversarial loss (Eq. 10), summed over D_ctr, D_sd and D_face (0: no discriminator is trained)."""
    ctr: float = 1.0
    """Extra factor on D_ctr's adversarial term (on top of ``adv``; 0: D_ctr is not trained at all)."""
    side: float = 0.5
    """Extra factor on D_sd's adversarial term (on top of ``adv``): it sees two crops per map (0: D_sd is not trained
    at all)."""
    vis: float = 1.0
    """Visibility-gate term :func:`train.losses.visibility_loss` (not in the paper; used only with
    GeneratorConfig.visibility_gate)."""
    grid: float = 1.0
    """Auxiliary sampler term :func:`train.losses.grid_loss` (not in the paper; 0 turns it off)."""
    r1_gamma: float = 0.0
    """R1 penalty weight gamma of the discriminators (gamma / 2 * r1_penalty); 0: off."""


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

    def __post_init__(self) -> None:
        for name in ("lr_sampler", "lr_generator", "lr_discriminator"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):  # inf trains to NaN weights in one step
                raise ValueError(f"--{name.replace('_', '-')} {v}: expected a finite learning rate >= 0")


# ------------------------------------------------------------------------------------------------------------ a run
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
    def current_json(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A stored config (``config.json``, a checkpoint's) as this version writes it: a field added since takes
        its default, which keeps the behaviour the run was trained with, so adding a field does not make every
        older run "another config". Unreadable input is returned as it is (the comparison then names it)."""
        try:
            return cls.from_json(d).to_json()
        except (TypeError, ValueError, AttributeError):
            return d

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
    val_store: str | None = None
    """A held-out store (same face model and UV size as the training store) validated during training: ``uvtrain
    eval``'s metrics of the networks being trained, as ``val`` rows of ``metrics.jsonl``, and ``best.pt``. None:
    no validation."""
    val_every: int = 500
    """Steps between validations (there is also one at the end of each stage)."""
    val_samples: int = 48
    """Usable samples of ``val_store`` validated, evenly spaced over the store, the same ones every time (0: all)."""
    val_metric: str = "l1"
    """The held-out metric that picks ``best.pt`` (:data:`VAL_METRICS`; :data:`HIGHER_IS_BETTER` for ssim and the
    identity columns, lower for the rest)."""
    val_identity: str = "none"
    """Identity network of the held-out ID Recon / Front columns (as ``uvtrain eval --identity``); none: skipped."""
    init_sampler: Path | None = None
    """A new run starts from another run's sampler at the end of its phase (its ``sampler.pt``, or the run directory
    holding it) and goes straight to the generator phase, at step ``sampler_steps``; the sampler-relevant config must
    match. Ignored, with a note, when the run directory already has a checkpoint (a rerun resumes). None: train the
    sampler."""

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
        if self.val_every < 1 or self.val_samples < 0:
            raise ValueError(f"--val-every >= 1 and --val-samples >= 0 expected, found {self.val_every}, "
                             f"{self.val_samples}")
        if self.val_metric not in VAL_METRICS:
            raise ValueError(f"--val-metric {self.val_metric!r}: expected one of {' | '.join(VAL_METRICS)}")
        if self.val_metric.startswith("id_") and self.val_identity == "none":
            raise ValueError(f"--val-metric {self.val_metric} needs an identity network: pass --val-identity dlib "
                             f"(or lightcnn:PATH)")


# ---------------------------------------------------------------------------------------------------- uvtrain infer
FRAMINGS = ("detect", "aligned", "none")
FITTERS = ("auto", "tddfa", "given", "none")
"""``InferConfig.framing`` and ``InferConfig.fitter``'s choices."""


@dataclass(frozen=True)
class InferConfig:
    checkpoint: Path
    """A ``uvtrain fit`` run directory (its last checkpoint), or its ``checkpoint.pt`` or ``best.pt``, or a
    ``uvtrain export`` folder."""
    images: Path
    """A photo, or a folder of photos (not recursive)."""
    out: Path
    """Output folder (created)."""
    device: str = "cpu"
    """Torch device of the networks and the fitter."""
    batch_size: int = 8
    """Photos per network batch."""
    framing: str = "detect"
    """detect | aligned (FFHQ / CelebA-HQ portraits) | none (the photo is the frame)."""
    fitter: str = "auto"
    """auto (given with --params, else tddfa when its weights are known, else none) | tddfa | given | none."""
    params: Path | None = None
    """Known 62 parameters per photo for the ``given`` fitter (``.npz``: keys, params; or ``.csv``)."""
    bfm_v2_dir: Path | None = None
    """3DDFA_V2 checkout: its weights, parameter statistics and FaceBoxes weights."""
    tddfa_weights: Path | None = None
    """mb1_120x120.pth / mb05_120x120.pth (overrides --bfm-v2-dir and the training store's)."""
    param_stats: Path | None = None
    """param_mean_std_62d_120x120.pkl (same)."""
    detector_weights: Path | None = None
    """FaceBoxesProd.pth (same); without it, OpenCV's Haar cascade frames faces."""
    views: tuple[float, ...] = (-60.0, -30.0, 0.0, 30.0, 60.0)
    """Yaw angles (degrees) of NAME_views.png."""
    view_size: int = 256
    """Side of each rendered view."""
    max_bytes: int = MAX_BYTES
    """Photos larger than this (bytes) fail with ``too_large``, unread (``uvprep build``'s limit)."""
    max_pixels: int = MAX_PIXELS
    """Photos whose header says more pixels than this fail with ``too_large``, undecoded (``uvprep build``'s limit)."""
    progress: bool = True
    """Show a progress bar and the summary."""

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise ValueError(f"--framing {self.framing!r}: expected one of {' | '.join(FRAMINGS)}")
        if self.fitter not in FITTERS:
            raise ValueError(f"--fitter {self.fitter!r}: expected one of {' | '.join(FITTERS)}")
        if self.fitter == "given" and self.params is None:
            raise ValueError("--fitter given needs --params FILE (.npz with keys/params, or .csv key,p0..p61)")
        if self.batch_size < 1 or self.view_size < 16:
            raise ValueError(f"--batch-size >= 1 and --view-size >= 16 expected, found {self.batch_size}, "
                             f"{self.view_size}")
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"--max-bytes and --max-pixels >= 1 expected, found {self.max_bytes}, {self.max_pixels}")
        if any(not -90.0 <= y <= 90.0 for y in self.views):
            raise ValueError(f"--views: yaw angles in [-90, 90] expected, found {list(self.views)}")


# ----------------------------------------------------------------------------------------------------- uvtrain eval
METHODS = ("bfm", "bl", "sampler", "generator")
"""What ``uvtrain eval`` can evaluate: the store's own textures (``bfm``, ``bl``) or a trained run's."""
NEEDS_CHECKPOINT = ("sampler", "generator")
"""The methods that need ``--checkpoint``."""


@dataclass(frozen=True)
class EvalConfig:
    store: str
    """Store to evaluate on (any ``uvprep build`` store; ``--src aflw2000`` for the paper's protocol)."""
    out: Path
    """metrics.json to write."""
    checkpoint: Path | None = None
    """A ``uvtrain fit`` run directory (or its checkpoint.pt / best.pt) or a ``uvtrain export`` folder; needed by
    ``sampler`` and ``generator``."""
    methods: tuple[str, ...] = ("generator",)
    """Subset of bfm | bl | sampler | generator, evaluated on the same samples."""
    identity: str = "dlib"
    """Identity network of the Recon / Front columns (``none`` skips them)."""
    batch_size: int = 8
    """Samples per batch."""
    device: str = "cpu"
    """Torch device (``cpu``, ``cuda`` or ``cuda:N``)."""
    limit: int = 0
    """Evaluate only the first N usable samples (0: all)."""
    progress: bool = True
    """Show a progress bar and the tables."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"--method {bad or '(none)'}: expected some of {' | '.join(METHODS)}")
        if self.checkpoint is None and any(m in NEEDS_CHECKPOINT for m in self.methods):
            raise ValueError(f"methods {[m for m in self.methods if m in NEEDS_CHECKPOINT]} need --checkpoint; "
                             f"without one evaluate --method bfm or bl")
        if self.batch_size < 1 or self.limit < 0:
            raise ValueError(f"--batch-size >= 1 and --limit >= 0 expected, found {self.batch_size}, {self.limit}")


# --------------------------------------------------------------------------------------------------- uvtrain export
WHICH = ("auto", "last", "best")
"""``ExportConfig.which``'s choices."""


@dataclass(frozen=True)
class ExportConfig:
    run_dir: Path
    """The ``uvtrain fit`` run directory to export."""
    out: Path
    """The export directory (created; an existing export there is replaced only with ``overwrite``)."""
    which: str = "auto"
    """Which weights: ``last`` (``checkpoint.pt``), ``best`` (``best.pt``, the best held-out validation) or ``auto``
    (``best.pt`` where the run has one, else ``checkpoint.pt``)."""
    overwrite: bool = False
    """Replace a non-empty ``out``."""

    def __post_init__(self) -> None:
        if self.which not in WHICH:
            raise ValueError(f"--which {self.which!r}: expected one of {' | '.join(WHICH)}")
