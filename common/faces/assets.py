"""The 3DDFA_V2 asset folder: where each file sits, in one place.

The folder mirrors github.com/cleardusk/3DDFA_V2 (``weights/``, ``configs/``, ``FaceBoxes/weights/``; see
``shared/assets/3ddfa_v2/MANIFEST.md``). ``uvprep build``, ``uvtrain infer``, the face-model loaders, the
benchmarks and the tests take every path from :class:`TDDFAAssets` instead of rebuilding the layout. No torch here:
the command lines import it before anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

TDDFA_URL = "https://github.com/cleardusk/3DDFA_V2 (weights/ and configs/)"


@dataclass(frozen=True)
class TDDFAAssets:
    """Paths of the 3DDFA_V2 files under ``root``, whether or not they exist (see :meth:`require`)."""

    root: Path
    """The folder itself."""
    mb1: Path
    """weights/mb1_120x120.pth: the MobileNet regressor (width 1.0, 3DDFA_V2's default)."""
    mb05: Path
    """weights/mb05_120x120.pth: the MobileNet x0.5 regressor (same 62 outputs)."""
    param_stats: Path
    """configs/param_mean_std_62d_120x120.pkl: mean and std of the 62 parameters (``out * std + mean``)."""
    detector: Path
    """FaceBoxes/weights/FaceBoxesProd.pth: the FaceBoxes face detector."""
    bfm_uv: Path
    """configs/BFM_UV.mat: (53215, 2) UV of the trimmed BFM."""
    indices: Path
    """configs/indices.npy: (38365,) noneck vertex ids into the 53,215."""
    triangles: Path
    """configs/tri.pkl: (3, 76073) triangles of the noneck mesh."""
    bfm: Path
    """configs/bfm_noneck_v3.pkl: the noneck BFM with its bases (not public; academic use only)."""

    LAYOUT: ClassVar[MappingProxyType] = MappingProxyType({
        "mb1": "weights/mb1_120x120.pth", "mb05": "weights/mb05_120x120.pth",
        "param_stats": "configs/param_mean_std_62d_120x120.pkl", "detector": "FaceBoxes/weights/FaceBoxesProd.pth",
        "bfm_uv": "configs/BFM_UV.mat", "indices": "configs/indices.npy", "triangles": "configs/tri.pkl",
        "bfm": "configs/bfm_noneck_v3.pkl"})
    """Field -> path relative to the folder (a class attribute, not a field)."""

    @classmethod
    def from_dir(cls, root: str | Path, *, require: tuple[str, ...] = ()) -> TDDFAAssets:
        """The layout under ``root``; ``require``: field names (or ``"regressor"``) that must exist, else
        FileNotFoundError naming each missing file."""
        root = Path(root)
        return cls(root=root, **{k: root / rel for k, rel in cls.LAYOUT.items()}).require(*require)

    @property
    def regressor(self) -> Path | None:
        """The regressor weights to use: mb1 when present, else mb05, else None."""
        return next((p for p in (self.mb1, self.mb05) if p.is_file()), None)

    def require(self, *names: str) -> TDDFAAssets:
        """Self, after checking that the named files exist (``"regressor"``: mb1 or mb05)."""
        known = {f.name for f in fields(self)} - {"root"} | {"regressor"}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"TDDFAAssets.require: unknown file names {unknown}; expected some of {sorted(known)}")
        missing = [f"{self.LAYOUT['mb1']} or {self.LAYOUT['mb05']}" if n == "regressor" else self.LAYOUT[n]
                   for n in names if (self.regressor is None if n == "regressor" else not getattr(self, n).is_file())]
        if missing:
            raise FileNotFoundError(f"3DDFA_V2 asset folder {self.root}: missing {', '.join(missing)}; download "
                                    f"{'them' if len(missing) > 1 else 'it'} from {TDDFA_URL} into that folder, "
                                    f"keeping the repository's layout")
        return self
