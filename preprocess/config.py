"""Configuration of ``uvprep``, as frozen dataclasses: the stage settings that decide a store's content
(:class:`StageConfig` and its parts, recorded in the store), the build (:class:`BuildConfig`, :class:`RunOptions`),
the ``uvprep build`` command line as typed (:class:`BuildArgs`), and ``uvprep demo`` / ``show`` / ``upgrade``
(:class:`DemoConfig`, :class:`ShowConfig`, :class:`UpgradeOptions`).

Standard library only (and the light :mod:`common.config`), so that ``uvprep --help`` reads every default without
importing numpy, torch, OpenCV, SciPy, Zarr or Dask; the modules that implement a config import it from here
(``preprocess.unwrap``, ``texture``, ``shading``, ``blend``, ``occlusion``, ``stages``, ``build``, ``demo``,
``report``, ``upgrade``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import STORE_CHUNK, CropConfig, FitConfig
from common.options import field_default

if TYPE_CHECKING:
    from pipelines.dask_slurm import SlurmConfig


# -------------------------------------------------------------------------------------------- the synthetic source
# (the photo sources' read limits, MAX_BYTES and MAX_PIXELS, are common.config's: uvtrain infer shares them)
SYNTHETIC_SEED = 0
"""Default world seed of the synthetic source (``preprocess.sources.SyntheticSource.seed``, ``uvprep build --seed``)."""


# ----------------------------------------------------------------------------------- stages (recorded in the store)
@dataclass(frozen=True)
class UVGTConfig:
    """How the photo is unwrapped into UV_gt (:func:`preprocess.unwrap.uv_gt_from_images`)."""

    uv_size: int = 256
    """U, the UV map side in texels."""
    erosion_frac: float = 0.03
    """Erosion radius as a fraction of the face size (sqrt of the projected face-mask area)."""
    erosion_px: int | None = None
    """Absolute erosion radius in pixels; overrides ``erosion_frac`` when set."""
    max_view_angle_deg: float | None = 80.0
    """Drop texels whose surface normal is more than this from the view direction; None = no cut."""
    depth_tol: float | None = None
    """Z-buffer tolerance in depth units; None = 1% of the mesh's depth extent."""
    exclude_regions: tuple[str, ...] = ("mouth",)
    """Named UV regions never taken from photos (the mouth interior)."""


@dataclass(frozen=True)
class MaskedPCAConfig:
    """The texture basis learned from incomplete UV_gt maps (:func:`preprocess.texture.learn_masked_pca`)."""

    n_components: int = 40
    """K, the number of basis vectors kept."""
    iterations: int = 15
    """EM iterations (fill missing with the current model, refit)."""
    symmetric: bool = True
    """Also use each map's mirror image (column flip or ``mirror_index``) as an extra sample."""
    fit_size: int | None = 64
    """Learn at this UV resolution (area-downsampled) and upsample the basis; None = full size."""
    min_observed: float = 0.02
    """Texels observed in fewer than this fraction of the maps (the rim, seen only at grazing angles) are not
    learned: the mean and components there are extended smoothly from the learned texels instead."""
    seed: int = 0
    """Seed of the randomised SVD."""


LIGHT_MODELS = ("directional", "sh9", "sh4")
"""``ShadingConfig.model``'s choices."""


@dataclass(frozen=True)
class ShadingConfig:
    """How the lighting is estimated from UV_gt and the normals."""

    model: str = "directional"
    """One of ``LIGHT_MODELS``: ``directional`` (ambient + one clamped Lambertian light), ``sh9``, ``sh4``."""
    huber: float = 2.0
    """Huber threshold in robust standard deviations (1.4826 x median absolute residual)."""
    irls_iters: int = 6
    """Reweighting rounds of the SH fits."""
    sh_ridge: float = 0.003
    """Ridge weight on the second-order SH coefficients (relative to the number of texels)."""
    max_fit_texels: int = 2000
    """The fit uses at most this many observed texels (an even stride over them): enough for <= 9 unknowns."""
    min_shading: float = 0.1
    """Shading is floored at this fraction of its median over the observed texels (keeps ratios finite)."""
    min_gain: float = 0.2
    """The fitted lighting is used only when it lowers the robust (median absolute) residual of a constant shading
    by this fraction; otherwise the shading is constant (the plain mirror): a light fitted to albedo variation
    that happens to correlate with the normals would otherwise darken or brighten the unseen half."""
    min_texels: int = 50
    """Fewer observed texels than this: no lighting is estimated (constant shading, i.e. the plain mirror)."""

    def __post_init__(self) -> None:
        if self.model not in LIGHT_MODELS:
            raise ValueError(f"ShadingConfig.model must be one of {LIGHT_MODELS}, got {self.model!r}")
        if not 0 < self.min_shading < 1:
            raise ValueError(f"ShadingConfig.min_shading must be in (0, 1), got {self.min_shading}")


SOLVERS = ("auto", "mgcg", "direct", "amg")
"""``BlendConfig.solver``'s choices."""
BLEND_MODES = ("paste", "fill")
"""``BlendConfig.mode``'s choices."""
FILL_MODES = ("mirror", "relit")
"""``BlendConfig.fill_mode``'s choices."""


@dataclass(frozen=True)
class BlendConfig:
    """How UV_gt is blended into UV_bfm."""

    solver: str = "auto"
    """One of ``SOLVERS``: "mgcg" (geometric-multigrid-preconditioned CG, fastest), "direct" (sparse
    LU, exact reference), "amg" (pyamg Ruge-Stuben + CG), "auto" ("direct" for small systems)."""
    tol: float = 0.1 / 255
    """Iterative solvers stop when the largest texel update of an iteration is below this (8-bit units)."""
    max_iter: int = 100
    """Iteration cap of the iterative solvers; reaching it raises (the system is SPD, so it never should)."""
    direct_below: int = 2048
    """``solver="auto"`` uses the direct solver when Omega has fewer texels than this."""
    symmetric_fill: bool = True
    """Fill missing texels from their observed mirror texel before blending (Fig. 5h)."""
    erode_px: int = 0
    """Erode the UV_gt mask by this many texels first (drops unreliable silhouette texels)."""
    smoothing_steps: int = 2
    """Weighted-Jacobi pre- and post-smoothing steps per multigrid level."""
    coarsest_size: int = 400
    """The multigrid hierarchy stops coarsening below this many unknowns (solved densely)."""

    mode: str = "fill"
    """``paste``: Eq. 9 as in the paper -- UV_gt (after the symmetric fill) is pasted into UV_bfm: the filled texels
    are the unknowns, guided by their own gradients, with UV_bfm as the boundary; observed colours shift by the
    harmonic correction UV_bfm imposes at the boundary. ``fill``: the same equation with the roles swapped -- the
    model texels are the unknowns, guided by UV_bfm's gradients, with the observed/mirrored texels as the boundary:
    photo texels stay exact and the model part is shifted to meet them without seams (see docs/method/blend.md)."""

    fill_mode: str = "relit"
    """Values of the mirrored texels. ``mirror``: the observed mirror texel's colour (Fig. 5h, as the paper).
    ``relit`` (beyond the paper): that colour divided by the shading at the source texel's normal and multiplied
    by the shading at the texel's own normal, the lighting fitted on the observed texels (:mod:`preprocess.shading`;
    needs ``normals``). :meth:`paper_mirror` is today's plain fill (no cuts, no blend of the mirrored half)."""
    mirror_blend: bool = True
    """Blend the mirrored texels by Eq. 9 too ("this step is also based on Equation 9"): they keep the mirror's
    gradients and take their values at the boundary from the observed texels (Dirichlet there, Neumann towards
    the model part)."""
    mirror_min_facing: float | None = 0.5
    """Do not mirror from a source texel seen more obliquely than this cos(view angle) (the ``n_z`` of its
    camera-frame normal; needs ``normals``). None = no cut."""
    nose_strip: float = 0.03
    """Do not mirror nose texels (``nose_mask``) closer than this to the symmetry line (fraction of U): there small
    fit errors double the nose. 0 = no cut."""
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    """Lighting estimate of the relit fill."""
    pad_px: int = 4
    """Texels past the layout's edge filled by extending the texture outwards (texture padding): bilinear reads at
    the mesh's rim then never mix in black, and the stair-stepped layout edge disappears from the UV image.
    0 = black outside, as before."""

    @classmethod
    def paper_mirror(cls, **kw) -> BlendConfig:
        """The plain symmetric fill as the paper and earlier builds: colours copied verbatim, no cuts, no blend."""
        return cls(fill_mode="mirror", mirror_blend=False, mirror_min_facing=None, nose_strip=0.0, **kw)

    def __post_init__(self) -> None:
        if self.mode not in BLEND_MODES:
            raise ValueError(f"BlendConfig.mode must be one of {BLEND_MODES}, got {self.mode!r}")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"BlendConfig.fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")
        if self.nose_strip < 0:
            raise ValueError(f"BlendConfig.nose_strip must be >= 0, got {self.nose_strip}")
        if self.solver not in SOLVERS:
            raise ValueError(f"BlendConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if not self.tol > 0:
            raise ValueError(f"BlendConfig.tol must be > 0, got {self.tol}")
        if self.erode_px < 0:
            raise ValueError(f"BlendConfig.erode_px must be >= 0, got {self.erode_px}")
        if self.pad_px < 0:
            raise ValueError(f"BlendConfig.pad_px must be >= 0, got {self.pad_px}")


@dataclass(frozen=True)
class OcclusionConfig:
    """How occluders are told from skin (distances in units of the skin model's robust spread)."""

    chroma_space: str = "logrgb"
    """``logrgb`` (log R/G, log B/G: unchanged by shading) or ``lab`` (CIE a*, b*); see
    :func:`preprocess.occlusion.colour_features`."""
    chroma_threshold: float = 4.0
    """Mahalanobis distance in the chroma plane beyond which a pixel's colour is not this face's skin."""
    dark_threshold: float = 4.0
    """A pixel darker than the skin's median L* by more than this many robust standard deviations is rejected."""
    bright_threshold: float = 6.0
    """... brighter by more than this many (highlights are skin: looser than ``dark_threshold``)."""
    min_lightness_spread: float = 6.0
    """Floor of the L* spread (L* units, 0..100) so an evenly lit core does not reject every shadow."""
    min_chroma_spread: float = 1.5
    """Floor of the chroma spread along each axis (chroma units of :func:`preprocess.occlusion.colour_features`), for
    a very uniform core."""
    agree_distance: float = 10.0
    """Two skin patches agree when their median colours are this close (chroma units, L* weighted as below)."""
    lightness_weight: float = 0.25
    """Weight of L* in the patch agreement (shading changes lightness across a face far more than chroma)."""
    trim_iterations: int = 3
    """Re-estimations of the skin Gaussian, each on the core pixels within ``chroma_threshold`` of the last."""
    open_frac: float = 0.012
    """Radius of the opening (removes specks) as a fraction of the face size (sqrt of the mask area)."""
    close_frac: float = 0.025
    """Radius of the closing (fills pinholes inside an occluder), same units."""
    min_area_frac: float = 0.004
    """Connected occluder components smaller than this fraction of the eroded mask's area are dropped."""
    protect_margin: float = 0.05
    """Eyes and lips are protected with this margin around their landmark polygons (fraction of the
    outer-eye-corner distance D)."""
    brow_width: float = 0.12
    """Brows are protected as a band of this width along their landmarks (fraction of D)."""
    forehead_range: tuple[float, float] = (0.12, 0.45)
    """The forehead patch spans this far above the brow landmarks (fraction of the outer-eye-corner distance)."""
    min_core_pixels: int = 30
    """With fewer visible skin-patch pixels there is no colour model and nothing is rejected."""


@dataclass(frozen=True)
class StageConfig:
    """Everything that decides the content of a store (recorded in it; a mismatch refuses a resume)."""

    face_model: str = "procedural"
    """``procedural`` (built in) or ``bfm-public`` (3DDFA's public BFM files; needs bfm_v1_dir / bfm_v2_dir)."""
    bfm_v1_dir: Path | None = None
    """3DDFA (v1) asset folder (``train.configs``, ``visualize``, ``derived``) for ``bfm-public``."""
    bfm_v2_dir: Path | None = None
    """3DDFA_V2 asset folder (``configs``) for ``bfm-public``."""
    fit: FitConfig = field(default_factory=FitConfig)
    """Crop/align and shape-fit settings (``fit.image_size`` is the working resolution)."""
    uvgt: UVGTConfig = field(default_factory=UVGTConfig)
    """UV_gt settings (``uvgt.uv_size`` is U)."""
    texture_model: str = "pca"
    """``pca`` (learned from this store's UV_gt), ``model`` (the face model's own basis) or a saved basis .npz."""
    pca: MaskedPCAConfig = field(default_factory=MaskedPCAConfig)
    """Masked-PCA settings for ``texture_model = pca``."""
    pca_samples: int = 1024
    """UV_gt maps (spread evenly over the manifest) the PCA basis is learned from."""
    ridge_lambda: float = 1.0
    """Eq. 8 ridge weight."""
    blend: BlendConfig = field(default_factory=BlendConfig)
    """Eq. 9 blend settings."""
    crops: CropConfig = field(default_factory=CropConfig)
    """Partial-crop thresholds."""
    occlusion: OcclusionConfig | None = None
    """Occluder rejection inside the face mask (:mod:`preprocess.occlusion`); None = off (``uvprep build`` turns
    it on for photo sources: ``--occlusion/--no-occlusion``)."""


# ----------------------------------------------------------------------------------------------------- uvprep build
@dataclass(frozen=True)
class BuildConfig:
    """What goes into a store (recorded in it): the source, the stage settings, the storage layout."""

    source: Any
    """A source from :mod:`preprocess.sources` (a frozen dataclass)."""
    stages: StageConfig = field(default_factory=StageConfig)
    """Stage settings."""
    chunk: int = STORE_CHUNK
    """Samples per chunk and per task (the store schema's default)."""
    compressor: str = "zstd"
    """Store compressor (zstd | blosc-zstd | blosc-lz4 | none)."""


@dataclass(frozen=True)
class RunOptions:
    """How this run executes (not recorded: changing these never invalidates a store)."""

    out: str
    """Store: a local path or an fsspec URL (``s3://bucket/store.zarr``; see :func:`common.store.store_location`)."""
    workers: int = 0
    """Local Dask worker processes; 0 runs every chunk in this process (eager)."""
    threads: int = 1
    """Threads per worker (torch intra-op threads are set to this)."""
    scheduler: str | None = None
    """Address of a running Dask scheduler to join instead of starting a local cluster."""
    slurm: SlurmConfig | None = None
    """Run the workers as SLURM jobs (dask-jobqueue) instead of a local cluster; exclusive with ``scheduler``."""
    overwrite: bool = False
    """Delete and rebuild an existing store built differently."""
    retries: int = 2
    """Dask retries of a failing chunk task before it is reported as failed."""
    progress: bool = True
    """Show a progress bar and the summary table."""
    verify: bool = False
    """Before resuming, re-read every completed chunk and rebuild those that fail their SHA-256 record."""
    lock: bool = True
    """Hold the store's build lock (:func:`common.store.acquire_build_lock`). False only where the store has no
    trusted exclusive create (URL schemes other than s3://) and the user guarantees one build per store."""
    reuse_prepass: bool = True
    """Keep the texture-basis pre-pass's fits and unwraps in the store for the chunks that hold the same photos
    (:mod:`preprocess.geocache`; photo sources): the same store, without fitting those photos twice."""


@dataclass(frozen=True)
class BuildArgs:
    """The command line, as typed (see ``uvprep build --help``). A default that a stage config also has is read from
    that config's field (one source for each default; ``tests/test_defaults.py`` holds the map)."""

    out: Path | str
    """The store: a local path, ``file://PATH`` or an fsspec URL (``s3://bucket/store.zarr``)."""
    src: str = "synthetic"
    images: Path | None = None
    params: Path | None = None
    count: int = 256
    seed: int = SYNTHETIC_SEED
    image_size: int = field_default(FitConfig, "image_size")
    uv_size: int = field_default(UVGTConfig, "uv_size")
    chunk: int = field_default(BuildConfig, "chunk")
    fitter: str | None = None
    face_model: str | None = None
    bfm_v1_dir: Path | None = None
    bfm_v2_dir: Path | None = None
    tddfa_weights: Path | None = None
    detector_weights: Path | None = None
    second_pass: bool = True
    refine: str | None = None
    max_bytes: int | None = None
    max_pixels: int | None = None
    occlusion: bool | None = None
    erosion: float = field_default(UVGTConfig, "erosion_frac")
    texture_model: str = field_default(StageConfig, "texture_model")
    n_tex: int = field_default(MaskedPCAConfig, "n_components")
    pca_samples: int = field_default(StageConfig, "pca_samples")
    ridge_lambda: float = field_default(StageConfig, "ridge_lambda")
    blend_mode: str = field_default(BlendConfig, "mode")
    fill_mode: str = "relit"
    frontal_yaw: float = field_default(CropConfig, "frontal_yaw_max")
    profile_yaw: float = field_default(CropConfig, "profile_yaw_min")
    workers: int | None = None
    threads: int = field_default(RunOptions, "threads")
    scheduler: str | None = None
    cluster: str | None = None
    slurm_cores: int | None = None
    slurm_memory: str | None = None
    slurm_walltime: str | None = None
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_job_extra: tuple[str, ...] | list[str] | None = None
    slurm_prologue: tuple[str, ...] | list[str] | None = None
    slurm_min_jobs: int | None = None
    slurm_max_jobs: int | None = None
    slurm_local_directory: str | None = None
    slurm_log_directory: str | None = None
    overwrite: bool = field_default(RunOptions, "overwrite")
    verify: bool = field_default(RunOptions, "verify")
    lock: bool = field_default(RunOptions, "lock")


# -------------------------------------------------------------------------- uvprep demo, uvprep show, uvprep upgrade
@dataclass(frozen=True)
class DemoConfig:
    """What ``uvprep demo`` renders."""

    out: Path
    """Output folder (created)."""
    count: int = 8
    """Number of synthetic faces."""
    seed: int = 0
    """World seed."""
    image_size: int = 256
    """Image side in pixels."""
    uv_size: int = 256
    """UV map side in texels."""
    occluder_prob: float = 0.3
    """Chance of an occluder per face."""


OVERLAYS = ("mesh", "landmarks", "occlusion", "mask")
"""What ``uvprep show`` can draw over a photo."""


@dataclass(frozen=True)
class ShowConfig:
    """What ``uvprep show`` draws."""

    overlays: tuple[str, ...] = OVERLAYS
    """Drawn over a copy of the photo (a column after it), a subset of :data:`OVERLAYS`; () drops the column."""
    height: int = 192
    """Tile height in pixels: every tile is resized to it, and the overlays are drawn at this resolution."""
    mesh_lines: int = 16
    """The fitted mesh is drawn as a grid of this many iso-u and as many iso-v lines of its UV coordinates."""
    mesh_alpha: float = 0.5
    """Opacity of the wireframe; the occlusion overlay is blended at the same opacity."""

    def __post_init__(self) -> None:
        bad = [o for o in self.overlays if o not in OVERLAYS]
        if bad:
            raise ValueError(f"unknown overlay(s) {bad}; expected a subset of {', '.join(OVERLAYS)} (or all / none)")
        if self.height < 16 or self.mesh_lines < 1 or not 0.0 < self.mesh_alpha <= 1.0:
            raise ValueError(f"expected height >= 16, mesh_lines >= 1 and mesh_alpha in (0, 1], found "
                             f"{self.height}, {self.mesh_lines}, {self.mesh_alpha}")

    @classmethod
    def parse_overlays(cls, text: str) -> tuple[str, ...]:
        """``"mesh,landmarks"`` / ``"all"`` / ``"none"`` -> overlay names (validated by the constructor)."""
        names = tuple(t.strip() for t in text.split(",") if t.strip())
        if names in (("all",), ()):
            return OVERLAYS if names else ()
        return () if names == ("none",) else names


@dataclass(frozen=True)
class UpgradeOptions:
    """What to upgrade and how to run it (nothing here is recorded in the store)."""

    store: str
    """The store: a local path or an fsspec URL (:func:`common.store.store_location`)."""
    bfm_v1_dir: Path | None = None
    """3DDFA (v1) asset folder, replacing the recorded one (``bfm-public`` stores whose assets moved)."""
    bfm_v2_dir: Path | None = None
    """3DDFA_V2 asset folder, replacing the recorded one."""
    workers: int = 0
    """Local Dask workers for the face_region pass; 0 runs it in this process."""
    threads: int = 1
    """Threads per worker."""
    scheduler: str | None = None
    """Address of a running Dask scheduler to join instead."""
    progress: bool = True
    """Show a progress bar."""
