"""CLIP score, PickScore and HPSv2 through their real code paths on tiny random-weight models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ditq.errors import CheckpointError
from ditq.metrics import ScoreItem
from ditq.metrics.openclip import clip_model_from_openclip, convert_openclip_state_dict
from ditq.metrics.preference import ClipScore, HPSv2, PickScore

PROMPTS = ["a red bicycle leaning on a wall", "SALE 50% poster", "a red bicycle leaning on a wall"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    # 32x32 is the processor's crop size; 48x40 exercises resize + centre crop.
    return [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(32, 32, 3), (48, 40, 3), (32, 32, 3)]]


def _pixel_values(image: np.ndarray) -> torch.Tensor:
    """CLIP preprocessing by hand: short side to 32 (bicubic), centre crop 32, OpenAI mean / std."""
    pil = Image.fromarray(image)
    w, h = pil.size
    scale = 32 / min(w, h)
    pil = pil.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = pil.size
    left, top = (w - 32) // 2, (h - 32) // 2
    x = np.asarray(pil.crop((left, top, left + 32, top + 32)), dtype=np.float64) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    return torch.from_numpy(((x - mean) / std).transpose(2, 0, 1)).float()


def _clip_logits(folder, images, prompts) -> np.ndarray:
    """CLIPModel.forward's logits_per_image (logit_scale.exp() * cos) for each (image, prompt) pair."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tokens = CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    pixels = torch.stack([_pixel_values(a) for a in images])
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels
        )
    return out.logits_per_image.diagonal().double().numpy(), float(model.logit_scale.detach().exp())


def _items(images):
    return [ScoreItem(image=a, prompt=p) for a, p in zip(images, PROMPTS, strict=True)]


def test_clip_score_matches_clip_forward(tiny_clip_folder, images):
    metric = ClipScore(model=tiny_clip_folder)
    assert metric.status().available
    logits, scale = _clip_logits(tiny_clip_folder, images, PROMPTS)
    expected = 100.0 * np.maximum(logits / scale, 0.0)
    got = metric.score(_items(images))
    assert got == pytest.approx(expected, abs=1e-4)
    assert got[0] != got[2]  # same prompt, different image


def test_clip_score_clamps_negative_cosine(tiny_clip_folder, images):
    metric = ClipScore(model=tiny_clip_folder)
    metric.load("cpu")
    assert list(metric.formula(np.array([-0.3, 0.25]))) == [0.0, 25.0]


def test_pickscore_matches_clip_forward(tiny_clip_folder, tiny_processor, images):
    metric = PickScore(model=tiny_clip_folder, processor=tiny_processor)
    assert metric.status().available
    logits, _ = _clip_logits(tiny_clip_folder, images, PROMPTS)
    assert metric.score(_items(images)) == pytest.approx(logits, rel=1e-4, abs=1e-4)


def test_batching_does_not_change_scores(tiny_clip_folder, tiny_processor, images):
    metric = PickScore(model=tiny_clip_folder, processor=tiny_processor)
    together = metric.score(_items(images))
    metric.unload()
    one_by_one = [metric.score([item])[0] for item in _items(images)]
    assert together == pytest.approx(one_by_one, rel=1e-5)


def test_long_prompts_are_truncated_to_the_context(tiny_clip_folder, images):
    metric = ClipScore(model=tiny_clip_folder)
    [value] = metric.score([ScoreItem(image=images[0], prompt="word " * 200)])
    assert np.isfinite(value)


def test_preference_unavailable_names_what_is_missing(tmp_path, tiny_processor):
    status = ClipScore(model=tmp_path / "no-such-model").status()
    assert not status.available
    assert status.reason == f"{tmp_path / 'no-such-model'} lacks config.json, model weights, " + (
        "preprocessor_config.json, tokenizer"
    )
    status = PickScore(model="ditq-test/absent-model", processor=tiny_processor).status()
    assert not status.available and "ditq-test/absent-model" in status.reason
    status = HPSv2(model=tmp_path / "HPS_v2.1_compressed.pt", processor=tiny_processor).status()
    assert not status.available and "HPS_v2.1_compressed.pt" in status.reason
    with pytest.raises(CheckpointError):
        ClipScore(model=tmp_path / "no-such-model").load("cpu")


# -- HPSv2: an open_clip-format checkpoint of a tiny ViT, converted, against an open_clip-style forward.

TEXT_WIDTH, VISION_WIDTH, EMBED, HEADS, LAYERS, PATCH, CONTEXT, VOCAB = 32, 40, 24, 2, 2, 8, 77, 514


def _openclip_state_dict(
    seed: int = 0,
    *,
    text_width: int = TEXT_WIDTH,
    vision_width: int = VISION_WIDTH,
    embed: int = EMBED,
    text_layers: int = LAYERS,
    vision_layers: int = LAYERS,
    patch: int = PATCH,
    image: int = 32,
    vocab: int = VOCAB,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """An open_clip ViT state dict (open_clip's key names and shapes), random half-precision values."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return scale * torch.randn(shape, generator=gen)

    def blocks(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {
                p + "ln_1.weight": 1 + r(width),
                p + "ln_1.bias": r(width),
                p + "attn.in_proj_weight": r(3 * width, width),
                p + "attn.in_proj_bias": r(3 * width),
                p + "attn.out_proj.weight": r(width, width),
                p + "attn.out_proj.bias": r(width),
                p + "ln_2.weight": 1 + r(width),
                p + "ln_2.bias": r(width),
                p + "mlp.c_fc.weight": r(4 * width, width),
                p + "mlp.c_fc.bias": r(4 * width),
                p + "mlp.c_proj.weight": r(width, 4 * width),
                p + "mlp.c_proj.bias": r(width),
            }
        return out

    grid = image // patch
    state = {
        "token_embedding.weight": r(vocab, text_width),
        "positional_embedding": r(CONTEXT, text_width),
        "ln_final.weight": 1 + r(text_width),
        "ln_final.bias": r(text_width),
        "text_projection": r(text_width, embed),
        "logit_scale": r() + 4.6,
        "visual.conv1.weight": r(vision_width, 3, patch, patch),
        "visual.class_embedding": r(vision_width),
        "visual.positional_embedding": r(1 + grid * grid, vision_width),
        "visual.ln_pre.weight": 1 + r(vision_width),
        "visual.ln_pre.bias": r(vision_width),
        "visual.ln_post.weight": 1 + r(vision_width),
        "visual.ln_post.bias": r(vision_width),
        "visual.proj": r(vision_width, embed),
    }
    state |= blocks("", text_width, text_layers)
    state |= blocks("visual.", vision_width, vision_layers)
    return {k: v.half() for k, v in state.items()}  # the released checkpoint is half precision


def _openclip_forward(state, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ViT + text tower written out: returns normalized image and text features, float64."""
    s = {k: v.double() for k, v in state.items()}

    def block(x, p, mask):
        width = x.shape[-1]
        h = F.layer_norm(x, (width,), s[p + "ln_1.weight"], s[p + "ln_1.bias"], 1e-5)
        q, k, v = (h @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        b, n, _ = q.shape

        def heads(t):
            return t.reshape(b, n, HEADS, width // HEADS).transpose(1, 2)

        att = heads(q) @ heads(k).transpose(-1, -2) / (width // HEADS) ** 0.5
        if mask is not None:
            att = att + mask
        o = (att.softmax(-1) @ heads(v)).transpose(1, 2).reshape(b, n, width)
        x = x + o @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), s[p + "ln_2.weight"], s[p + "ln_2.bias"], 1e-5)
        h = F.gelu(h @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"])
        return x + h @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]

    x = F.conv2d(pixels.double(), s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (VISION_WIDTH,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], 1e-5)
    for i in range(LAYERS):
        x = block(x, f"visual.transformer.resblocks.{i}.", None)
    pooled = F.layer_norm(
        x[:, 0], (VISION_WIDTH,), s["visual.ln_post.weight"], s["visual.ln_post.bias"], 1e-5
    )
    image = pooled @ s["visual.proj"]

    t = s["token_embedding.weight"][tokens] + s["positional_embedding"]
    causal = torch.full((CONTEXT, CONTEXT), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(LAYERS):
        t = block(t, f"transformer.resblocks.{i}.", causal)
    t = F.layer_norm(t, (TEXT_WIDTH,), s["ln_final.weight"], s["ln_final.bias"], 1e-5)
    text = t[torch.arange(t.shape[0]), tokens.argmax(dim=-1)] @ s["text_projection"]  # pool at end-of-text
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def _openclip_tokens(tokenizer, prompts) -> torch.Tensor:
    """open_clip's layout: start, BPE ids, end, zero padding to the full context."""
    out = torch.zeros(len(prompts), CONTEXT, dtype=torch.long)
    for i, ids in enumerate(tokenizer(prompts, truncation=True, max_length=CONTEXT)["input_ids"]):
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def test_openclip_conversion_splits_in_proj():
    state = _openclip_state_dict()
    converted = convert_openclip_state_dict(state)
    qkv = state["transformer.resblocks.1.attn.in_proj_weight"].float()
    prefix = "text_model.encoder.layers.1.self_attn."
    torch.testing.assert_close(converted[prefix + "q_proj.weight"], qkv[:TEXT_WIDTH])
    torch.testing.assert_close(converted[prefix + "k_proj.weight"], qkv[TEXT_WIDTH : 2 * TEXT_WIDTH])
    torch.testing.assert_close(converted[prefix + "v_proj.weight"], qkv[2 * TEXT_WIDTH :])
    torch.testing.assert_close(converted["visual_projection.weight"], state["visual.proj"].float().T)


def test_openclip_conversion_fills_a_vit_h_14_clip_model():
    """At ViT-H-14's real shapes (on the meta device): the inferred config and a complete key mapping."""
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    from ditq.metrics.openclip import clip_config_from_openclip

    state = _openclip_state_dict(
        text_width=1024, vision_width=1280, embed=1024, text_layers=24, vision_layers=32, patch=14, image=224,
        vocab=49408, device="meta",
    )  # fmt: skip
    config = clip_config_from_openclip(state)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.num_attention_heads) == (
        1024, 24, 4096, 16,
    )  # fmt: skip
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size, vision.patch_size) == (
        1280, 32, 5120, 14,
    )  # fmt: skip
    assert (vision.image_size, config.projection_dim, text.vocab_size, text.eos_token_id) == (
        224,
        1024,
        49408,
        49407,
    )
    assert text.hidden_act == vision.hidden_act == "gelu"
    with no_init_weights(), torch.device("meta"):
        model = CLIPModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    converted = {k: tuple(v.shape) for k, v in convert_openclip_state_dict(state).items()}
    assert converted == expected


def test_openclip_conversion_rejects_foreign_keys():
    state = _openclip_state_dict()
    with pytest.raises(CheckpointError, match="unexpected keys"):
        convert_openclip_state_dict(state | {"visual.head.weight": torch.zeros(2)})
    broken = dict(state)
    del broken["ln_final.bias"]
    with pytest.raises(CheckpointError, match="final_layer_norm.bias"):
        clip_model_from_openclip(
            broken, text_heads=HEADS, vision_heads=HEADS, bos_token_id=512, eos_token_id=513
        )


def test_hpsv2_matches_openclip_style_forward(tmp_path, tiny_processor, images):
    from transformers import CLIPTokenizer

    state = _openclip_state_dict()
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)
    metric = HPSv2(model=checkpoint, processor=tiny_processor, text_heads=HEADS, vision_heads=HEADS)
    assert metric.status().available
    got = metric.score(_items(images))

    tokens = _openclip_tokens(CLIPTokenizer.from_pretrained(tiny_processor), PROMPTS)
    pixels = torch.stack([_pixel_values(a) for a in images])
    image_features, text_features = _openclip_forward(state, pixels, tokens)
    expected = 100.0 * (image_features * text_features).sum(-1).numpy()
    assert got == pytest.approx(expected, abs=2e-3)


def test_hpsv2_checkpoint_folder_and_environment(tmp_path, monkeypatch, tiny_processor):
    torch.save({"state_dict": _openclip_state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    monkeypatch.setenv("DITQ_HPSV2_CHECKPOINT", str(tmp_path))
    monkeypatch.setenv("DITQ_HPSV2_PROCESSOR", str(tiny_processor))
    metric = HPSv2(text_heads=HEADS, vision_heads=HEADS)
    assert metric.status().available
    metric.load("cpu")


def _cache_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out files as the Hugging Face hub cache does: models--org--name/{refs/main, snapshots/<rev>/}."""
    revision = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def test_default_sources_load_from_the_hub_cache(
    tmp_path, monkeypatch, tiny_clip_folder, tiny_processor, images
):
    """Hub ids resolve through the local cache only: the default HPSv2 and PickScore sources, laid out there."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for name in (
        "DITQ_HPSV2_CHECKPOINT",
        "DITQ_HPSV2_PROCESSOR",
        "DITQ_PICKSCORE_MODEL",
        "DITQ_PICKSCORE_PROCESSOR",
    ):
        monkeypatch.delenv(name, raising=False)
    # Every default missing: one line with the command that fetches each source and the variables.
    assert HPSv2().status().reason == (
        "needs `hf download xswu/HPSv2 HPS_v2.1_compressed.pt` and `hf download "
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (or $DITQ_HPSV2_CHECKPOINT, $DITQ_HPSV2_PROCESSOR)"
    )
    monkeypatch.delenv("DITQ_CLIP_MODEL", raising=False)
    assert ClipScore().status().reason == (
        "needs `hf download openai/clip-vit-large-patch14` (or $DITQ_CLIP_MODEL)"
    )
    monkeypatch.setenv("DITQ_PICKSCORE_MODEL", str(tmp_path / "pick"))
    assert PickScore().status().reason == (
        f"$DITQ_PICKSCORE_MODEL: {tmp_path / 'pick'} lacks config.json, model weights; needs `hf download "
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (or $DITQ_PICKSCORE_PROCESSOR)"
    )
    monkeypatch.delenv("DITQ_PICKSCORE_MODEL")

    torch.save({"state_dict": _openclip_state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    _cache_repo(cache, "xswu/HPSv2", {"HPS_v2.1_compressed.pt": tmp_path / "HPS_v2.1_compressed.pt"})
    _cache_repo(
        cache,
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        {p.name: p for p in tiny_processor.iterdir() if p.is_file()},
    )
    _cache_repo(
        cache, "yuvalkirstain/PickScore_v1", {p.name: p for p in tiny_clip_folder.iterdir() if p.is_file()}
    )

    hps = HPSv2(text_heads=HEADS, vision_heads=HEADS)
    assert hps.status().available
    assert all(np.isfinite(hps.score(_items(images))))
    pick = PickScore()
    assert pick.status().available
    logits, _ = _clip_logits(tiny_clip_folder, images, PROMPTS)
    assert pick.score(_items(images)) == pytest.approx(logits, rel=1e-4, abs=1e-4)
