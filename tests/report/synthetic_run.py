"""Hand-made run folders with known effects, in the layout of docs/DESIGN.md ("Run folders").

Shared by the report tests (imported by name: this folder is on sys.path under pytest's default import mode).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ditq.report import StatsSettings

# name: (format, bytes on disk per transformer, resident bytes per transformer, quality shift, lpips level)
VARIANTS = {
    "fp8": ("fp8", 9_583_465_712, 9_601_000_000, 0.0, 0.0),
    "int8": ("int8", 9_583_465_712, 9_590_000_000, -0.001, 0.04),
    "q8_0": ("gguf", 9_230_000_000, 9_250_000_000, -0.002, 0.03),
    "nf4": ("nf4", 5_220_000_000, 5_300_000_000, -0.03, 0.21),
    "q4_k": ("gguf", 5_010_000_000, 5_050_000_000, -0.012, 0.15),
}
CATEGORIES = ("signage", "poster", "product")
PICKSCORE_REASON = (
    "needs `hf download yuvalkirstain/PickScore_v1` and `hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K` "
    "(or $DITQ_PICKSCORE_MODEL, $DITQ_PICKSCORE_PROCESSOR)"
)
FAST = StatsSettings(n_resamples=400, seed=5)
# Seconds per denoising step of each variant (after the warm-up); the first step of an image and the warm-up
# image of each variant are slower, and must not count.
STEP_SECONDS = {"fp8": 0.50, "int8": 0.45, "q8_0": 0.60, "nf4": 0.90, "q4_k": 0.80}
HOST = {"cpu": "AMD EPYC 7B13 64-Core Processor", "cpu_flags": "avx2,avx512f,avx512_vnni", "gpu": "NVIDIA H100 80GB HBM3",
        "threads": 2, "torch": "2.13.0+cu128", "load_avg": [0.42, 0.3, 0.25], "world_size": 1}  # fmt: skip

METRICS = {
    "hpsv2": {"available": True, "reason": None, "higher_is_better": True, "reference": None,
              "family": "preference", "model": "HPSv2.1"},
    "pickscore": {"available": False, "reason": PICKSCORE_REASON, "higher_is_better": True, "reference": None,
                  "family": "preference", "model": "PickScore_v1"},
    "clip_score": {"available": True, "reason": None, "higher_is_better": True, "reference": None,
                   "family": "preference", "model": "ViT-L-14"},
    "lpips": {"available": True, "reason": None, "higher_is_better": False, "reference": "fp8",
              "family": "fidelity", "model": "alex"},
    "psnr": {"available": True, "reason": None, "higher_is_better": True, "reference": "fp8",
             "family": "fidelity", "model": None},
    "ssim": {"available": True, "reason": None, "higher_is_better": True, "reference": "fp8",
             "family": "fidelity", "model": None},
    "ocr_exact": {"available": True, "reason": None, "higher_is_better": True, "reference": None,
                        "family": "text", "model": "rapidocr 3.10.0"},
    "ocr_ned": {"available": True, "reason": None, "higher_is_better": False, "reference": None,
                          "family": "text", "model": "rapidocr 3.10.0"},
    "blocked": {"available": True, "reason": None, "higher_is_better": False, "reference": None,
                "family": "check", "model": "uniform grey + PP-OCR", "flagged": 3},
}  # fmt: skip
METRICS["hpsv2"]["weights"] = [{"file": "HPS_v2.1_compressed.pt", "path": "/models/hps/HPS_v2.1_compressed.pt",
                                "bytes": 3_944_021_875, "mtime_ns": 0, "sha256": "5d" * 32}]  # fmt: skip
# (variant, caption mode, prompt index, seed) of the images the blocked check flags; their quality scores are
# set to the worst value, so a report that failed to leave them out would show it.
BLOCKED = {("nf4", "raw", 3, 0), ("nf4", "raw", 7, 0), ("q4_k", "raw", 5, 1)}


def peak_bytes(variant: str, k: int) -> int:
    """A CUDA peak of image k: both transformers, 4.4 GB of activations and the VAE, a little more per prompt."""
    return 2 * VARIANTS[variant][2] + 4_400_000_000 + 1_000_000 * (k % 5)


def _image(color: tuple[int, int, int], k: int) -> Image.Image:
    y, x = np.mgrid[0:48, 0:48]
    base = np.array(color, dtype=np.float64)
    wave = 40 * np.sin((x + 3 * k) / 6.0)[..., None] + 30 * np.cos(y / 7.0)[..., None]
    return Image.fromarray(np.clip(base + wave, 0, 255).astype(np.uint8))


def write_run(
    root: Path,
    *,
    variants: tuple[str, ...] = tuple(VARIANTS),
    modes: tuple[str, ...] = ("json", "raw"),
    n_prompts: int = 12,
    seeds: tuple[int, ...] = (0, 1),
    reference: str = "fp8",
    scores: bool = True,
    images: bool = True,
    step_times: bool = True,
    host: bool = True,
    tiny: bool = False,
) -> Path:
    """A run folder: effects are fixed per variant and mode, prompts vary a lot, seeds a little."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prompt_ids = [f"p{i:02d}" for i in range(n_prompts)]
    category = {pid: CATEGORIES[i % len(CATEGORIES)] for i, pid in enumerate(prompt_ids)}
    run = {
        "suite": "synthetic-v1",
        "prompt_ids": prompt_ids,
        "seeds": list(seeds),
        "caption_modes": list(modes),
        "settings": {"height": 1024, "width": 1024, "steps": 20, "guidance_schedule": [[18, 7.0], [2, 3.0]],
                     "mu": 0.0, "std": 1.75, "max_sequence_length": 1024},
        "variants": {v: {"model": f"out/{v}", "format": VARIANTS[v][0],
                         "bytes_on_disk": {"transformer": VARIANTS[v][1], "unconditional_transformer": VARIANTS[v][1]},
                         "resident_bytes": {"transformer": VARIANTS[v][2], "unconditional_transformer": VARIANTS[v][2]}}
                     for v in variants},
        "reference_variant": reference,
        "ditq_version": "0.1.0",
        "device": "cuda:0", "dtype": "bfloat16",
    }  # fmt: skip
    if host:
        run["host"] = HOST
    if tiny:
        run["tiny"] = True
    timing_rng = np.random.default_rng(1)  # apart from the scores' generator, so scores do not depend on it
    (root / "run.json").write_text(json.dumps(run, indent=1))
    with (root / "prompts.jsonl").open("w") as fh:
        for pid in prompt_ids:
            text = f"OPEN {pid.upper()}"
            record = {"id": pid, "category": category[pid], "prompt": f"A shop sign that reads '{text}'",
                      "caption": {"high_level_description": "a sign"}, "texts": [text]}  # fmt: skip
            fh.write(json.dumps(record) + "\n")
    # As `ditq eval` writes it: entries under "metrics", sorted by name, plus bookkeeping fields.
    metrics = {"version": 1, "ditq_version": "0.1.0", "reference_variant": reference,
               "metrics": dict(sorted(METRICS.items())), "missing_images": []}  # fmt: skip
    (root / "metrics.json").write_text(json.dumps(metrics, indent=1))
    manifest, rows = [], []
    prompt_level = {pid: rng.normal(0.0, 1.0) for pid in prompt_ids}
    for v in variants:
        shift, lpips_level = VARIANTS[v][3], VARIANTS[v][4]
        for mode in modes:
            raw = mode == "raw"
            for k, pid in enumerate(prompt_ids):
                for seed in seeds:
                    rel = f"images/{v}/{mode}/{pid}_s{seed}.png"
                    if images:
                        (root / rel).parent.mkdir(parents=True, exist_ok=True)
                        color = (60 + 40 * list(VARIANTS).index(v), 90 + 20 * k % 120, 160 - 60 * raw)
                        _image(color, k + seed).save(root / rel)
                    record = {"variant": v, "prompt_id": pid, "seed": seed, "caption_mode": mode,
                              "category": category[pid], "path": rel, "sha256": "0" * 64,
                              "wall_s": 12.5 + VARIANTS[v][3], "peak_mem_bytes": peak_bytes(v, k),
                              "peak_mem_kind": "cuda_allocated", "offload": "none",
                              "device": "cuda:0"}  # fmt: skip
                    if step_times:
                        warm = mode == modes[0] and k == 0 and seed == seeds[0]
                        steps = (
                            STEP_SECONDS[v] * (1 + 0.05 * timing_rng.standard_normal(20)) * (5 if warm else 1)
                        )
                        steps[0] *= 3
                        record.update(step_s=[round(float(t), 5) for t in steps], warmup=warm)
                    manifest.append(record)
                    noise = rng.normal(0, 0.002)
                    hps = 0.27 + 0.01 * prompt_level[pid] + shift - 0.01 * raw + noise
                    clip = 0.31 + 0.02 * prompt_level[pid] + 0.5 * shift + rng.normal(0, 0.003)
                    p_match = min(max(0.7 + 8 * shift - 0.25 * raw, 0.0), 1.0)
                    match = float(rng.random() < p_match)
                    ned = 0.0 if match else float(rng.uniform(0.1, 0.8))
                    values = {"hpsv2": hps, "clip_score": clip, "ocr_exact": match, "ocr_ned": ned}
                    if v != reference:
                        lp = max(lpips_level + 0.02 * rng.normal(), 0.001)
                        values["lpips"] = lp
                        identical = v == "int8" and k == 0 and seed == 0  # PSNR of identical images: inf
                        values["psnr"] = float("inf") if identical else 40 - 60 * lp
                        values["ssim"] = 1 - 2 * lp
                    blocked = (v, mode, k, seed) in BLOCKED
                    if blocked:
                        values.update(hpsv2=0.0, clip_score=0.0, ocr_exact=0.0, ocr_ned=1.0)
                        if v != reference:
                            values.update(lpips=1.0, psnr=5.0, ssim=0.0)
                    values["blocked"] = 1.0 if blocked else 0.0
                    for metric, value in values.items():
                        rows.append([v, pid, seed, mode, category[pid], metric, repr(value)])
    with (root / "manifest.jsonl").open("w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in manifest)
    with (root / "scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "prompt_id", "seed", "caption_mode", "category", "metric", "value"])
        if scores:
            writer.writerows(rows)
    return root
