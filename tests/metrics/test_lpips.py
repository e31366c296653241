"""LPIPS in torch against an independent float64 numpy computation of the same formula."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ditq.metrics import ScoreItem
from ditq.metrics.lpips import ALEX_CHANNELS, LPIPS, LPIPS_SCALE, LPIPS_SHIFT, installed_lpips_lin_path

# (out channels, in channels, kernel, stride, padding) of torchvision AlexNet's conv layers.
CONVS = {
    0: (64, 3, 11, 4, 2),
    3: (192, 64, 5, 1, 2),
    6: (384, 192, 3, 1, 1),
    8: (256, 384, 3, 1, 1),
    10: (256, 256, 3, 1, 1),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random AlexNet backbone (torchvision keys, plus a classifier to ignore) and lin layers, saved to files."""
    gen = torch.Generator().manual_seed(7)
    backbone = {}
    for index, (out_c, in_c, k, _, _) in CONVS.items():
        backbone[f"features.{index}.weight"] = (
            torch.randn(out_c, in_c, k, k, generator=gen) / (in_c * k * k) ** 0.5
        )
        backbone[f"features.{index}.bias"] = 0.1 * torch.randn(out_c, generator=gen)
    backbone["classifier.1.weight"] = torch.randn(4, 9, generator=gen)
    lins = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(ALEX_CHANNELS)
    }
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(backbone, folder / "alexnet.pth")
    torch.save(lins, folder / "alex.pth")
    return folder, backbone, lins


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """x [C, H, W], w [O, C, k, k] -> [O, H', W'] by explicit patches (im2col), float64."""
    c, h, wd = x.shape
    k = w.shape[-1]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    cols = np.empty((c * k * k, oh * ow))
    for i in range(oh):
        for j in range(ow):
            cols[:, i * ow + j] = x[:, i * stride : i * stride + k, j * stride : j * stride + k].ravel()
    return (w.reshape(w.shape[0], -1) @ cols + b[:, None]).reshape(-1, oh, ow)


def _maxpool(x: np.ndarray) -> np.ndarray:
    c, h, w = x.shape
    oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    out = np.empty((c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = x[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
    return out


def _reference_lpips(a: np.ndarray, b: np.ndarray, backbone, lins) -> float:
    """LPIPS alex-lin in float64 numpy from the paper's formula."""

    def features(img: np.ndarray) -> list[np.ndarray]:
        x = img.astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0
        x = (x - np.array(LPIPS_SHIFT)[:, None, None]) / np.array(LPIPS_SCALE)[:, None, None]
        taps = []
        for index, (_, _, _, stride, pad) in CONVS.items():
            w = backbone[f"features.{index}.weight"].double().numpy()
            bias = backbone[f"features.{index}.bias"].double().numpy()
            x = np.maximum(_conv(x, w, bias, stride, pad), 0.0)
            taps.append(x)
            if index in (0, 3):
                x = _maxpool(x)
        return taps

    total = 0.0
    for layer, (fa, fb) in enumerate(zip(features(a), features(b), strict=True)):
        fa = fa / (np.sqrt((fa**2).sum(axis=0, keepdims=True)) + 1e-10)
        fb = fb / (np.sqrt((fb**2).sum(axis=0, keepdims=True)) + 1e-10)
        w = lins[f"lin{layer}.model.1.weight"].double().numpy().reshape(-1, 1, 1)
        total += float((w * (fa - fb) ** 2).sum(axis=0).mean())
    return total


def test_lpips_matches_float64_numpy_reference(weights, rng):
    folder, backbone, lins = weights
    metric = LPIPS(backbone=folder / "alexnet.pth", lin=folder / "alex.pth")
    assert metric.status().available
    a = rng.integers(0, 256, size=(64, 72, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, size=a.shape), 0, 255).astype(np.uint8)
    c = rng.integers(0, 256, size=(64, 72, 3), dtype=np.uint8)
    got = metric.score([ScoreItem(image=a, reference=b), ScoreItem(image=a, reference=c)])
    expected = [_reference_lpips(a, b, backbone, lins), _reference_lpips(a, c, backbone, lins)]
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected[0] < expected[1]  # more different images are further apart


def test_lpips_identical_is_zero_and_symmetric(weights, rng):
    folder, _, _ = weights
    metric = LPIPS(backbone=folder / "alexnet.pth", lin=folder / "alex.pth")
    a = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    d_ab, d_ba, d_aa = metric.score(
        [ScoreItem(image=a, reference=b), ScoreItem(image=b, reference=a), ScoreItem(image=a, reference=a)]
    )
    assert d_aa == 0.0
    assert d_ab == pytest.approx(d_ba, rel=1e-6)
    assert d_ab > 0


def test_lpips_mixed_sizes_in_one_batch(weights, rng):
    folder, backbone, lins = weights
    metric = LPIPS(backbone=folder / "alexnet.pth", lin=folder / "alex.pth")
    small = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    large = rng.integers(0, 256, size=(48, 56, 3), dtype=np.uint8)
    got = metric.score(
        [ScoreItem(image=small, reference=small[::-1]), ScoreItem(image=large, reference=large[::-1])]
    )
    assert got == pytest.approx(
        [
            _reference_lpips(small, small[::-1], backbone, lins),
            _reference_lpips(large, large[::-1], backbone, lins),
        ],
        rel=1e-4,
    )


def test_lpips_unavailable_without_weights(tmp_path, weights):
    folder, _, _ = weights
    metric = LPIPS(backbone=tmp_path / "absent-alexnet.pth", lin=folder / "alex.pth")
    status = metric.status()
    assert not status.available
    assert status.reason == f"AlexNet weights {tmp_path / 'absent-alexnet.pth'}: no such file"
    status = LPIPS(backbone=folder / "alexnet.pth", lin=tmp_path / "absent-lin.pth").status()
    assert (
        not status.available and status.reason == f"lin weights {tmp_path / 'absent-lin.pth'}: no such file"
    )


def test_lpips_default_reason_names_the_file_and_the_variables(tmp_path, monkeypatch):
    """Nothing found anywhere: one line with the torch hub path, the pip command and both variables."""
    import importlib.util

    for name in ("DITQ_LPIPS_ALEXNET", "DITQ_LPIPS_LIN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "lpips" else real_find_spec(n, *a)
    )
    reason = LPIPS().status().reason
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert reason == (
        f"needs {hub_file} (or $DITQ_LPIPS_ALEXNET) and `pip install --no-deps lpips` "
        "(or $DITQ_LPIPS_LIN=weights/v0.1/alex.pth)"
    )


def test_lpips_paths_from_environment(monkeypatch, weights):
    folder, _, _ = weights
    monkeypatch.setenv("DITQ_LPIPS_ALEXNET", str(folder / "alexnet.pth"))
    monkeypatch.setenv("DITQ_LPIPS_LIN", str(folder / "alex.pth"))
    assert LPIPS().status().available
    monkeypatch.setenv("DITQ_LPIPS_LIN", str(folder / "nope.pth"))
    assert LPIPS().status().reason == f"lin weights $DITQ_LPIPS_LIN={folder / 'nope.pth'}: no such file"


def test_lpips_finds_installed_package_weights_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('lpips must not be imported')\n")
    (package / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert installed_lpips_lin_path() == package / "weights" / "v0.1" / "alex.pth"
    assert "lpips" not in sys.modules
