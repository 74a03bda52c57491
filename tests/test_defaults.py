"""One source for every default (issue 18): each command-line option takes its default from its config field.

For every option of ``uvtrain fit | infer | eval`` and ``uvprep build | demo | upgrade | show | check |
texture-basis``, read from the click command typer builds:

- an option that sets a config field is listed in ``FIELDS`` with that field: its click default must be ``None``
  (the dataclass fills it) and ``--help`` must show the field's default;
- an option with no field is listed in ``CLI_ONLY`` with its default, required options as ``REQUIRED``;
- an option in neither table fails the test (a new option needs its field named), and so does a listed option the
  command no longer has.

Then each command runs with only its required options, its final call replaced by a recorder: the configs it builds
equal the dataclasses' defaults. And once with every mapped option given a value other than its default: each value
must land in the field the table names (a flag wired to the wrong field fails). ``uvprep build``'s own defaults are
read from the stage configs (``BUILD_SOURCES``); :func:`preprocess.buildcli.make_config` must pass them on.
"""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from common.config import CropConfig, FitConfig
from common.options import field_default, shown
from common.store import StoreLayout
from preprocess import buildcli, demo, report, upgrade
from preprocess.cli import app as uvprep
from preprocess.config import (
    BlendConfig,
    BuildArgs,
    BuildConfig,
    DemoConfig,
    MaskedPCAConfig,
    ShowConfig,
    StageConfig,
    UpgradeOptions,
    UVGTConfig,
)
from preprocess.config import RunOptions as BuildRunOptions
from preprocess.sources import SyntheticSource
from train import console
from train.cli import app as uvtrain
from train.config import (
    DiscriminatorConfig,
    EvalConfig,
    ExportConfig,
    GeneratorConfig,
    InferConfig,
    LossWeights,
    OptimConfig,
    RunOptions,
    SamplerConfig,
    TrainConfig,
)

REQUIRED = ...
"""A required option (no default)."""

_TRAIN = {"sampler_steps": "sampler_steps", "sampler_finetune_steps": "sampler_finetune_steps",
          "generator_steps": "generator_steps", "batch_size": "batch_size", "image_size": "image_size",
          "sampler_image_size": "sampler_image_size", "workers": "workers", "seed": "seed",
          "rotate_share": "rotate_share", "max_yaw": "max_yaw", "identity": "identity"}
_RUN = ("phase", "device", "overwrite", "log_every", "checkpoint_every", "preview_every", "amp", "render_on", "compile",
        "progress", "tensorboard", "dist_timeout", "val_store", "val_every", "val_samples", "val_metric",
        "val_identity", "init_sampler")
_WEIGHTS = {"w_face": "face", "w_uv": "uv", "w_sym": "sym", "w_tv": "tv", "w_id": "id", "w_adv": "adv",
            "w_ctr": "ctr", "w_side": "side", "w_grid": "grid", "r1_gamma": "r1_gamma", "w_vis": "vis",
            "w_uv_unseen": "uv_unseen"}

FIELDS: dict[str, dict[str, list[tuple[type, str, str]]]] = {
    # command -> option -> [(config class, field, where the command's recorded call holds it)]
    "uvtrain fit": {
        **{o: [(TrainConfig, f, f"cfg.{f}")] for o, f in _TRAIN.items()},
        **{o: [(RunOptions, o, f"run.{o}")] for o in _RUN},
        **{o: [(LossWeights, f, f"cfg.weights.{f}")] for o, f in _WEIGHTS.items()},
        **{o: [(OptimConfig, o, f"cfg.optim.{o}")] for o in ("lr_sampler", "lr_generator", "lr_discriminator")},
        "sampler_grid": [(SamplerConfig, "grid_size", "cfg.sampler.grid_size")],
        "sampler_n_down": [(SamplerConfig, "n_down", "cfg.sampler.n_down")],
        "sampler_pool": [(SamplerConfig, "pool_size", "cfg.sampler.pool_size")],
        "sampler_control_size": [(SamplerConfig, "control_size", "cfg.sampler.control_size")],
        "generator_residual": [(GeneratorConfig, "residual", "cfg.generator.residual")],
        "generator_mirror_input": [(GeneratorConfig, "mirror_input", "cfg.generator.mirror_input")],
        "generator_grid_input": [(GeneratorConfig, "grid_input", "cfg.generator.grid_input")],
        "generator_visibility_gate": [(GeneratorConfig, "visibility_gate", "cfg.generator.visibility_gate")],
        "channels": [(SamplerConfig, "channels", "cfg.sampler.channels"),
                     (GeneratorConfig, "channels", "cfg.generator.channels"),
                     (DiscriminatorConfig, "channels", "cfg.discriminator.channels")],
    },
    "uvtrain infer": {o: [(InferConfig, o, f"cfg.{o}")] for o in (
        "device", "batch_size", "framing", "fitter", "params", "bfm_v2_dir", "tddfa_weights", "param_stats",
        "detector_weights", "views", "view_size", "max_bytes", "max_pixels", "progress")},
    "uvtrain eval": {**{o: [(EvalConfig, o, f"cfg.{o}")] for o in (
        "checkpoint", "identity", "batch_size", "device", "limit", "progress")},
                     "method": [(EvalConfig, "methods", "cfg.methods")]},
    "uvtrain export": {o: [(ExportConfig, o, f"cfg.{o}")] for o in ("which", "overwrite")},
    "uvprep build": {f.name: [(BuildArgs, f.name, f"args.{f.name}")] for f in dataclasses.fields(BuildArgs)
                     if f.name != "out"},
    "uvprep demo": {o: [(DemoConfig, o, f"cfg.{o}")] for o in ("count", "seed", "image_size", "uv_size",
                                                               "occluder_prob")},
    "uvprep upgrade": {o: [(UpgradeOptions, o, f"opts.{o}")] for o in ("bfm_v1_dir", "bfm_v2_dir", "threads",
                                                                       "scheduler")},
    "uvprep show": {"overlay": [(ShowConfig, "overlays", "cfg.overlays")],
                    "height": [(ShowConfig, "height", "cfg.height")]},
}

CLI_ONLY: dict[str, dict[str, object]] = {
    # command -> option -> its default, for options that set no config field
    "uvtrain fit": {"store": REQUIRED, "run_dir": REQUIRED},
    "uvtrain infer": {"checkpoint": REQUIRED, "images": REQUIRED, "out": REQUIRED},
    "uvtrain eval": {"store": REQUIRED, "out": REQUIRED, "baselines": False},
    "uvtrain export": {"run": REQUIRED, "out": REQUIRED},
    "uvtrain plot": {"run": REQUIRED, "out": None},
    "uvprep build": {"out": REQUIRED},
    "uvprep demo": {"out": Path("out/demo")},
    "uvprep upgrade": {"store": REQUIRED, "workers": None},  # None: the CPU count // --threads
    "uvprep show": {"store": REQUIRED, "index": "0,1,2,3", "out": Path("grid.png")},
    "uvprep check": {"store": REQUIRED, "deep": False},
    "uvprep texture-basis": {"out": REQUIRED, "bfm2009": None, "deep3d": None, "deep3d_front_idx": None,
                             "bfm_v1_dir": REQUIRED, "bfm_v2_dir": REQUIRED,
                             "uv_size": field_default(BuildArgs, "uv_size"), "n_tex": None},
}

BUILD_SOURCES: dict[str, tuple[type, str, str]] = {
    # BuildArgs field -> the stage-config field its default is read from, and where make_config puts it
    "seed": (SyntheticSource, "seed", "cfg.source.seed"),
    "image_size": (FitConfig, "image_size", "cfg.stages.fit.image_size"),
    "uv_size": (UVGTConfig, "uv_size", "cfg.stages.uvgt.uv_size"),
    "chunk": (BuildConfig, "chunk", "cfg.chunk"),
    "erosion": (UVGTConfig, "erosion_frac", "cfg.stages.uvgt.erosion_frac"),
    "texture_model": (StageConfig, "texture_model", "cfg.stages.texture_model"),
    "n_tex": (MaskedPCAConfig, "n_components", "cfg.stages.pca.n_components"),
    "pca_samples": (StageConfig, "pca_samples", "cfg.stages.pca_samples"),
    "ridge_lambda": (StageConfig, "ridge_lambda", "cfg.stages.ridge_lambda"),
    "blend_mode": (BlendConfig, "mode", "cfg.stages.blend.mode"),
    "frontal_yaw": (CropConfig, "frontal_yaw_max", "cfg.stages.crops.frontal_yaw_max"),
    "profile_yaw": (CropConfig, "profile_yaw_min", "cfg.stages.crops.profile_yaw_min"),
    "threads": (BuildRunOptions, "threads", "run.threads"),
    "overwrite": (BuildRunOptions, "overwrite", "run.overwrite"),
    "verify": (BuildRunOptions, "verify", "run.verify"),
    "lock": (BuildRunOptions, "lock", "run.lock"),
}

# Values other than the defaults, for options whose type alone does not give a valid one: option -> (command-line
# text, the field's value). Numbers, flags and paths are generated from the option's type.
OTHER = {
    "phase": ("sampler", "sampler"), "amp": ("bf16", "bf16"), "render_on": ("loader", "loader"),
    "val_metric": ("unseen_mae", "unseen_mae"), "val_identity": ("dlib", "dlib"),
    "which": ("last", "last"),
    "identity": ("none", "none"), "framing": ("aligned", "aligned"), "views": ("-10,20", (-10.0, 20.0)),
    "method": ("bfm", ("bfm",)), "overlay": ("mesh,mask", ("mesh", "mask")), "src": ("ffhq", "ffhq"),
    "face_model": ("bfm-public", "bfm-public"), "refine": ("dlib68", "dlib68"), "texture_model": ("model", "model"),
    "blend_mode": ("paste", "paste"), "fill_mode": ("mirror", "mirror"), "cluster": ("slurm", "slurm"),
    "slurm_job_extra": ("--qos=short", ("--qos=short",)), "slurm_prologue": ("true", ("true",)),
}
FITTER = {"uvtrain infer": "tddfa", "uvprep build": "tddfa"}
NEEDED = {"uvtrain eval": "checkpoint"}
"""An option a command needs although its field has a default (eval's default method needs a checkpoint)."""

RECORDERS = {  # command -> (module, function, names of its arguments as recorded)
    "uvtrain fit": (console, "run_fit", ("cfg", "run")),
    "uvtrain infer": (console, "run_infer", ("cfg",)),
    "uvtrain eval": (console, "run_eval", ("cfg",)),
    "uvtrain export": (console, "run_export", ("cfg",)),
    "uvprep build": (buildcli, "run_build", ("args",)),
    "uvprep demo": (demo, "run_demo", ("cfg",)),
    "uvprep upgrade": (upgrade, "run_upgrade", ("opts",)),
    "uvprep show": (report, "show_samples", ("store", "indices", "out", "cfg")),
}


def _command(name: str):
    prog, sub = name.split()
    return typer.main.get_command(uvtrain if prog == "uvtrain" else uvprep).commands[sub]


def _get(recorded: dict, path: str):
    head, _, rest = path.partition(".")
    return operator.attrgetter(rest)(recorded[head])


@pytest.mark.parametrize("name", sorted(set(FIELDS) | set(CLI_ONLY)))
def test_every_option_defaults_to_its_config_field(name):
    params = {p.name: p for p in _command(name).params}
    fields, cli_only = FIELDS.get(name, {}), CLI_ONLY.get(name, {})
    assert not set(fields) & set(cli_only)
    unmapped = sorted(set(params) - set(fields) - set(cli_only))
    assert not unmapped, (f"{name}: options {unmapped} are in neither FIELDS (the config field they set) nor CLI_ONLY "
                          f"(their own default) of tests/test_defaults.py")
    gone = sorted((set(fields) | set(cli_only)) - set(params))
    assert not gone, f"{name}: tests/test_defaults.py lists options {gone} the command does not have"
    drift = []
    for opt, targets in fields.items():
        p = params[opt]
        values = {field_default(cls, f) for cls, f, _ in targets}
        where = " = ".join(f"{cls.__name__}.{f}" for cls, f, _ in targets)
        if len(values) != 1:
            drift.append(f"{p.opts[0]}: the fields it sets disagree ({where}: {values})")
        elif p.default is not None:
            drift.append(f"{p.opts[0]}: default {p.default!r}; expected None, deferring to {where} = "
                         f"{values.pop()!r}")
        elif p.show_default != shown(value := values.pop()):
            drift.append(f"{p.opts[0]}: --help shows {p.show_default!r}, {where} is {value!r}")
    for opt, want in cli_only.items():
        p = params[opt]
        if want is REQUIRED:
            if not p.required:
                drift.append(f"{p.opts[0]}: listed as required, but has default {p.default!r}")
        elif p.required or p.default != want:
            drift.append(f"{p.opts[0]}: default {p.default!r}, CLI_ONLY lists {want!r}")
    assert not drift, f"{name}: the command line and the config dataclasses disagree:\n" + "\n".join(drift)


def _required_args(name: str, tmp_path: Path) -> list[str]:
    args = []
    for p in _command(name).params:
        if p.required:
            value = str(tmp_path / p.name)
            args += [value] if p.param_type_name == "argument" else [p.opts[0], value]
    return args


def _invoke(name: str, args: list[str], monkeypatch) -> dict:
    module, function, names = RECORDERS[name]
    recorded = {}

    def record(*a, **kw):
        recorded.update(zip(names, a, strict=False))
        return Path("recorded.png") if name in ("uvprep demo", "uvprep show") else 0

    monkeypatch.setattr(module, function, record)
    res = CliRunner().invoke(uvtrain if name.startswith("uvtrain") else uvprep, name.split()[1:] + args)
    assert recorded, f"{name} {' '.join(args)} did not reach {function} (exit {res.exit_code}):\n{res.output}"
    return recorded


def _other_value(opt: str, p, default, tmp_path: Path) -> tuple[list[str], object]:
    """(command-line arguments, the field's value) giving ``opt`` a value other than ``default``."""
    if p.is_flag:
        return [p.opts[0] if not default else p.secondary_opts[0]], not default
    if opt in OTHER:
        text, value = OTHER[opt]
        return [p.opts[0], text], value
    kind = p.type_descriptor.annotation  # the parameter's Python type
    if kind is Path:
        return [p.opts[0], str(tmp_path / opt)], tmp_path / opt
    if kind is int:
        value = (default or 0) + 3
    elif kind is float:
        value = default / 2 if default else 0.5
    else:
        assert kind is str, (opt, kind)
        value = f"{opt}-value"
    return [p.opts[0], str(value)], value


@pytest.mark.parametrize("name", sorted(RECORDERS))
def test_an_option_left_out_gives_the_field_default(name, tmp_path, monkeypatch):
    args = _required_args(name, tmp_path)
    if name in NEEDED:
        args += [f"--{NEEDED[name]}", str(tmp_path / NEEDED[name])]
    recorded = _invoke(name, args, monkeypatch)
    for opt, targets in FIELDS[name].items():
        if opt == NEEDED.get(name):
            continue
        for cls, f, where in targets:
            got = _get(recorded, where)
            want = field_default(cls, f)
            if opt.startswith("slurm_") and got in ([], ()):  # typer passes an empty list for a list option
                got = None
            assert got == want, f"{name} without --{opt.replace('_', '-')}: {where} = {got!r}, {cls.__name__}.{f} " \
                                f"= {want!r}"


@pytest.mark.parametrize("name", sorted(RECORDERS))
def test_each_option_sets_its_field(name, tmp_path, monkeypatch):
    params = {p.name: p for p in _command(name).params}
    args, expected = _required_args(name, tmp_path), {}
    for opt, targets in FIELDS[name].items():
        cls, f, _ = targets[0]
        if opt == "fitter":
            a, v = [params[opt].opts[0], FITTER[name]], FITTER[name]
        else:
            a, v = _other_value(opt, params[opt], field_default(cls, f), tmp_path)
        assert v != field_default(cls, f), opt
        args += a
        expected.update({where: v for _, _, where in targets})
    recorded = _invoke(name, args, monkeypatch)
    wrong = {where: (_get(recorded, where), v) for where, v in expected.items()
             if (tuple(g) if isinstance(g := _get(recorded, where), list) else g) != v}
    assert not wrong, f"{name}: options set the wrong fields (field: (found, given)): {wrong}"


def test_build_defaults_come_from_the_stage_configs(tmp_path):
    cfg, run = buildcli.make_config(BuildArgs(out=str(tmp_path / "s.zarr")))
    made = {"cfg": cfg, "run": run}
    for name, (cls, f, where) in BUILD_SOURCES.items():
        want = field_default(cls, f)
        assert field_default(BuildArgs, name) == want, f"BuildArgs.{name} != {cls.__name__}.{f}"
        assert _get(made, where) == want, f"make_config: {where} = {_get(made, where)!r}, {cls.__name__}.{f} = {want!r}"
    assert cfg.chunk == field_default(StoreLayout, "chunk")
