"""The `ideogram4` expander: Ideogram 4's own prompt enhancer, decoding constrained by ditq's caption schema.

The enhancer is diffusers' graft of the `prompt_enhancer_head` onto the head-less Qwen3-VL `text_encoder`
(`build_prompt_enhancer`), prompted with diffusers' own caption system message, as `Ideogram4Pipeline` does. The
difference is the constraint: instead of diffusers' small pydantic model, outlines decodes against
`generation_json_schema()` - the full caption format (style block with photo / art-style variants, palettes) with
its key orders - so every finished output passes `validate_caption` at both levels by construction.
`max_string_length` and `max_elements` bound the output so that it finishes within `max_new_tokens`, even for
random weights; an output cut off by the token budget is the only way to fail, and it is retried with another
seed.

torch, transformers, diffusers and outlines are imported only when an expander is built.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

from ditq.errors import ConfigError
from ditq.prompts.expanders import EXPANDERS, ExpanderError
from ditq.prompts.records import PromptRecord
from ditq.prompts.schema import canonical_json, generation_json_schema
from ditq.prompts.validate import parse_caption, reply_problems

log = logging.getLogger(__name__)


def _load_components(model: str, device: str, dtype_name: str) -> tuple[Any, Any, Any]:
    """(text_encoder, tokenizer, prompt_enhancer_head) from a pipeline folder, hub id in the cache, or `tiny`;
    only these three components are loaded."""
    import torch
    from transformers import AutoTokenizer

    from ditq.models.loading import load_text_encoder, resolve_source

    dtype = getattr(torch, dtype_name)
    folder = resolve_source(model)
    head_dir = folder / "prompt_enhancer_head"
    if not head_dir.is_dir():
        raise ConfigError(f"{folder}: no prompt_enhancer_head/ component; the ideogram4 expander needs it")
    from diffusers.pipelines.ideogram4.prompt_enhancer import Ideogram4PromptEnhancerHead

    text_encoder, _ = load_text_encoder(folder / "text_encoder", dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    head = Ideogram4PromptEnhancerHead.from_pretrained(head_dir, torch_dtype=dtype).to(device).eval()
    return text_encoder, tokenizer, head


def _record_seed(seed: int, record_id: str, attempt: int) -> int:
    digest = hashlib.sha256(f"{seed}:{record_id}:{attempt}".encode()).hexdigest()
    return int(digest[:15], 16)


@EXPANDERS.register("ideogram4")
class Ideogram4Expander:
    """Captions from Ideogram 4's prompt enhancer with schema-constrained decoding.

    Give either `pipeline` (an `Ideogram4Pipeline` with a `prompt_enhancer_head`) or `model` (a pipeline folder,
    a cached hub id, or `tiny`). Sampling is seeded per record id, so reruns give the same captions.
    """

    name = "ideogram4"

    def __init__(
        self,
        *,
        pipeline: Any = None,
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "bfloat16",
        max_new_tokens: int = 1024,
        temperature: float = 1.0,
        seed: int = 0,
        attempts: int = 2,
        width: int = 1024,
        height: int = 1024,
        system_message: str | None = None,
        max_string_length: int | None = None,
        max_elements: int | None = None,
        style: bool = True,
        palettes: bool = True,
    ) -> None:
        from diffusers.pipelines.ideogram4 import prompt_enhancer as official

        if pipeline is not None:
            text_encoder, tokenizer, head = (
                pipeline.text_encoder,
                pipeline.tokenizer,
                pipeline.prompt_enhancer_head,
            )
            if head is None:
                raise ConfigError(
                    "the pipeline has no prompt_enhancer_head; load it to use the ideogram4 expander"
                )
        elif model:
            text_encoder, tokenizer, head = _load_components(model, device, dtype)
        else:
            raise ConfigError("the ideogram4 expander needs a pipeline or a model (folder, hub id or 'tiny')")
        if max_new_tokens < 1 or attempts < 1:
            raise ConfigError("max_new_tokens and attempts must be >= 1")
        self.tokenizer = tokenizer
        self.enhancer = official.build_prompt_enhancer(text_encoder, head)
        self.system_message = (
            system_message if system_message is not None else official.CAPTION_SYSTEM_MESSAGE
        )
        self.user_template = official.CAPTION_USER_TEMPLATE
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.attempts = attempts
        divisor = math.gcd(width, height) or 1
        self.aspect_ratio = f"{width // divisor}:{height // divisor}"
        self.schema = generation_json_schema(
            max_string_length=max_string_length, max_elements=max_elements, style=style, palettes=palettes
        )
        self.processor = self._logits_processor()

    def _logits_processor(self):
        try:
            import outlines
            from outlines.types import JsonSchema
        except ImportError as exc:  # pragma: no cover - outlines is a declared dependency
            raise ConfigError(
                f"the ideogram4 expander needs outlines ({exc}); pip install outlines"
            ) from None
        outlines_model = outlines.from_transformers(self.enhancer, self.tokenizer)
        # No whitespace between tokens: the output is already the minified canonical form.
        return outlines.Generator(
            outlines_model, JsonSchema(self.schema, whitespace_pattern="")
        ).logits_processor

    def _inputs(self, prompt: str):
        messages = [
            {"role": "system", "content": self.system_message},
            {
                "role": "user",
                "content": self.user_template.format(aspect_ratio=self.aspect_ratio, original_prompt=prompt),
            },
        ]
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True
        ).to(self.enhancer.device)

    def generate(self, prompt: str, n: int = 1, seed: int = 0) -> list[str]:
        """`n` raw outputs for one prompt, sampled in one batch under the schema constraint (seeded)."""
        import torch

        inputs = self._inputs(prompt)
        self.processor.reset()
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.temperature > 0,
            "use_cache": True,
            "num_return_sequences": n,
            "logits_processor": [self.processor],
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if self.temperature > 0:
            kwargs["temperature"] = self.temperature
        on_cuda = getattr(self.enhancer.device, "type", "cpu") == "cuda"
        with torch.random.fork_rng(devices=[self.enhancer.device] if on_cuda else []), torch.inference_mode():
            torch.manual_seed(seed)
            generated = self.enhancer.generate(**inputs, **kwargs)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def sample(self, record: PromptRecord, n: int) -> list[str]:
        """`n` captions for one record in one batch; each validated and canonical (`ExpanderError` if any was cut
        off by the token budget)."""
        outputs = self.generate(record.prompt, n=n, seed=_record_seed(self.seed, record.id, 0))
        captions = []
        for i, text in enumerate(outputs):
            problems = reply_problems(text)
            if problems:
                raise ExpanderError(
                    f"prompt {record.id!r}: sample {i} is not a valid caption after {self.max_new_tokens} new tokens "
                    f"({problems[0]}); raise max_new_tokens or bound max_string_length / max_elements"
                )
            captions.append(canonical_json(parse_caption(text)))
        return captions

    def expand(self, record: PromptRecord) -> str:
        """One validated canonical caption; an output cut off by the token budget is retried with a new seed."""
        last = ""
        for attempt in range(self.attempts):
            (text,) = self.generate(record.prompt, n=1, seed=_record_seed(self.seed, record.id, attempt))
            problems = reply_problems(text)
            if not problems:
                return canonical_json(parse_caption(text))
            last = str(problems[0])
            log.warning("prompt %s: attempt %d gave no valid caption (%s)", record.id, attempt + 1, last)
        raise ExpanderError(
            f"prompt {record.id!r}: no valid caption in {self.attempts} attempt(s) of {self.max_new_tokens} new tokens "
            f"(last: {last}); raise max_new_tokens or bound max_string_length / max_elements"
        )
