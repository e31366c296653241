"""LPIPS (Zhang et al. 2018), AlexNet-lin v0.1, written in plain torch.

    d(x0, x1) = sum over layers l of mean over (h, w) of  sum over c of  w_l[c] * (f0[c,h,w] - f1[c,h,w])^2
    f = feature / (||feature||_2 over channels + 1e-10)       features: the five AlexNet ReLU outputs

Inputs are scaled to [-1, 1], then shifted and scaled per channel (shift -0.030, -0.088, -0.188; scale 0.458,
0.448, 0.450), as the reference implementation does. No resizing: the distance is over the full image.

Weights come from two files and nothing is downloaded:
- the AlexNet backbone in torchvision's layout (`features.{0,3,6,8,10}.{weight,bias}`), from `backbone=` or
  `$DITQ_LPIPS_ALEXNET`, else the torch hub cache (`<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth`);
- the five 1x1 "lin" layers (`lin{i}.model.1.weight`, [1, C, 1, 1]) from `lin=` or `$DITQ_LPIPS_LIN`, else
  the `weights/v0.1/alex.pth` shipped inside an installed `lpips` package (found without importing it).
Without either file the metric is unavailable, with a one-line reason naming the file or variable to set.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ditq.errors import CheckpointError
from ditq.metrics.base import METRICS, Metric, MetricStatus, ScoreItem, check_pair

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
# Channels of the five tapped ReLU outputs.
ALEX_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class AlexNetFeatures(nn.Module):
    """torchvision's AlexNet `features` (same indices, so its checkpoint keys load as they are).

    forward: float [B, 3, H, W] -> the five ReLU outputs [B, C_l, H_l, W_l], C_l = ALEX_CHANNELS.
    """

    # Index in `features` of the ReLU after which each tapped output is taken.
    TAPS = (1, 4, 7, 9, 11)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.TAPS:
                taps.append(x)
        return taps


class LpipsAlex(nn.Module):
    """LPIPS distance with AlexNet features and learned per-channel weights.

    forward: x0, x1 float [B, 3, H, W] in [-1, 1] -> distance float [B].
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = AlexNetFeatures()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.lins = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in ALEX_CHANNELS])

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        f0 = self.net((x0 - self.shift) / self.scale)
        f1 = self.net((x1 - self.shift) / self.scale)
        total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for a, b, weight in zip(f0, f1, self.lins, strict=True):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + ((a - b).pow(2) * weight).sum(dim=1).mean(dim=(1, 2))
        return total

    def load_weights(self, backbone: dict[str, torch.Tensor], lins: dict[str, torch.Tensor]) -> None:
        """backbone: torchvision AlexNet state dict (classifier keys ignored); lins: lpips v0.1 alex.pth."""
        features = {k: v for k, v in backbone.items() if k.startswith("features.")}
        try:
            self.net.load_state_dict(features, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"AlexNet backbone does not match torchvision's layout: {exc}") from None
        for i, param in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"
            if key not in lins:
                raise CheckpointError(f"LPIPS lin weights lack {key!r}; keys: {sorted(lins)[:8]}")
            if tuple(lins[key].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"LPIPS {key} has shape {tuple(lins[key].shape)}, expected {tuple(param.shape)}"
                )
            param.data.copy_(lins[key].float())


def default_backbone_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def installed_lpips_lin_path() -> Path | None:
    """`weights/v0.1/alex.pth` inside an installed lpips package, located without importing it."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / "v0.1" / "alex.pth"
        if path.is_file():
            return path
    return None


def _home(path: Path) -> str:
    """`path` with the home folder written as ~ (reasons stay one short line)."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def missing_reason(
    no_backbone: bool, no_lin: bool, backbones: list[Path], explicit: tuple[str | None, str | None]
) -> str | None:
    """One line naming the file or variable that makes LPIPS available; None when both files are found.

    The lin layers (6 KB) ship inside the `lpips` wheel; `pip install --no-deps lpips` installs them without
    torchvision (which `lpips` requires and which does not import beside every torch build). ditq never
    imports the package, it only reads the file.
    """
    parts = []
    if no_backbone:
        given = explicit[0]
        parts.append(
            f"AlexNet weights {given}: no such file"
            if given
            else f"needs {_home(backbones[0])} (or $DITQ_LPIPS_ALEXNET)"
        )
    if no_lin:
        given = explicit[1]
        parts.append(
            f"lin weights {given}: no such file"
            if given
            else "needs `pip install --no-deps lpips` (or $DITQ_LPIPS_LIN=weights/v0.1/alex.pth)"
        )
    if len(parts) == 2 and all(p.startswith("needs ") for p in parts):
        return parts[0] + " and " + parts[1].removeprefix("needs ")
    return "; ".join(parts) or None


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


class LPIPS(Metric):
    """LPIPS AlexNet-lin v0.1 against the reference image; 0 for identical images, lower is better."""

    name = "lpips"
    higher_is_better = False
    family = "fidelity"
    reference = "fp8"

    def __init__(self, backbone: str | Path | None = None, lin: str | Path | None = None) -> None:
        self._backbone = backbone
        self._lin = lin
        self._net: LpipsAlex | None = None
        self._device = "cpu"

    def _paths(self) -> tuple[list[Path], list[Path]]:
        """Candidate files for the backbone and the lin layers, in the order they are tried."""
        backbone = self._backbone or os.environ.get("DITQ_LPIPS_ALEXNET")
        backbones = [Path(backbone).expanduser()] if backbone else [default_backbone_path()]
        lin = self._lin or os.environ.get("DITQ_LPIPS_LIN")
        if lin:
            lins = [Path(lin).expanduser()]
        else:
            found = installed_lpips_lin_path()
            lins = [found] if found else []
        return backbones, lins

    def _resolve(self) -> tuple[Path | None, Path | None, str | None]:
        backbones, lins = self._paths()
        backbone = next((p for p in backbones if p.is_file()), None)
        lin = next((p for p in lins if p.is_file()), None)
        return backbone, lin, missing_reason(backbone is None, lin is None, backbones, self._explicit())

    def _explicit(self) -> tuple[str | None, str | None]:
        """How the backbone and lin paths were given ("$VAR=path", or the path of an argument); None: defaults."""

        def given(arg: str | Path | None, env: str) -> str | None:
            if arg:
                return str(arg)
            return f"${env}={os.environ[env]}" if os.environ.get(env) else None

        return given(self._backbone, "DITQ_LPIPS_ALEXNET"), given(self._lin, "DITQ_LPIPS_LIN")

    def status(self) -> MetricStatus:
        _, _, problem = self._resolve()
        return MetricStatus.missing(problem) if problem else MetricStatus.ok()

    def model(self) -> str | None:
        backbone, lin, _ = self._resolve()
        return (
            f"LPIPS alex-lin v0.1 (backbone {backbone or ALEXNET_FILE}, lin {lin or 'weights/v0.1/alex.pth'})"
        )

    def weight_files(self) -> list[Path]:
        backbone, lin, _ = self._resolve()
        return [p for p in (backbone, lin) if p is not None]

    def load(self, device: str = "cpu") -> None:
        if self._net is not None and self._device == device:
            return
        backbone, lin, problem = self._resolve()
        if problem:
            raise CheckpointError(problem)
        net = LpipsAlex()
        net.load_weights(_load_state_dict(backbone), _load_state_dict(lin))
        self._net = net.eval().requires_grad_(False).to(device)
        self._device = device

    def unload(self) -> None:
        self._net = None

    @torch.inference_mode()
    def distance(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        """images, references: uint8 [B, H, W, 3] -> float64 [B]."""
        if self._net is None:
            self.load(self._device)

        def to_tensor(batch: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._device).permute(0, 3, 1, 2)
            return x.float() / 127.5 - 1.0

        return self._net(to_tensor(images), to_tensor(references)).double().cpu().numpy()

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        pairs = [check_pair(item, self.name) for item in items]
        out: list[float | None] = []
        # Stack runs of same-sized images into one forward.
        start = 0
        while start < len(pairs):
            end = start + 1
            while end < len(pairs) and pairs[end][0].shape == pairs[start][0].shape:
                end += 1
            group = pairs[start:end]
            values = self.distance(np.stack([a for a, _ in group]), np.stack([b for _, b in group]))
            out.extend(float(v) for v in values)
            start = end
        return out


METRICS.add(LPIPS.name, LPIPS())
