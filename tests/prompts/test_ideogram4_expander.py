"""The `ideogram4` expander on the tiny random-weight pipeline: constrained decoding yields valid captions."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from ditq.errors import ConfigError
from ditq.prompts import EXPANDERS, ExpanderError, PromptRecord, caption_json_schema, validate_caption

RECORD = PromptRecord(id="poster-x", category="poster", prompt='a jazz poster that says "BLUE NOTE"')
# With these bounds the longest possible output is about 900 bytes (every key, 16 + 2 x 5 colours, every string at
# 8 characters of up to 4 bytes), and a token is at least one byte, so decoding always finishes within 1200 tokens.
# The short system message keeps the 20-way batched prefill cheap (diffusers' own message is ~5k tiny tokens).
BOUNDS = {
    "max_string_length": 8,
    "max_elements": 2,
    "max_new_tokens": 1200,
    "system_message": "Write the caption.",
}


@pytest.fixture(scope="module")
def expander(tiny_pipeline):
    return EXPANDERS.get("ideogram4")(pipeline=tiny_pipeline, **BOUNDS)


@pytest.mark.slow
def test_ideogram4_twenty_random_weight_samples_are_all_valid(expander, cpu_inference_settings):
    start = time.perf_counter()
    captions = expander.sample(RECORD, 20)
    elapsed = time.perf_counter() - start
    schema = jsonschema.Draft202012Validator(caption_json_schema())
    assert len(captions) == 20
    for text in captions:
        assert validate_caption(text, level="lint") == [], text
        assert not list(schema.iter_errors(json.loads(text)))  # the exported schema agrees
        assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    kinds = {e["type"] for t in captions for e in json.loads(t)["compositional_deconstruction"]["elements"]}
    styles = {tuple(json.loads(t).get("style_description", {})) for t in captions}
    assert len(set(captions)) > 1 and kinds <= {"obj", "text"} and len(styles) > 1, (kinds, styles)
    print(f"20 constrained samples in {elapsed:.1f} s")


def test_ideogram4_token_budget_too_small_is_a_clear_error(tiny_pipeline, cpu_inference_settings):
    short = EXPANDERS.get("ideogram4")(pipeline=tiny_pipeline, **{**BOUNDS, "max_new_tokens": 6})
    with pytest.raises(ExpanderError, match=r"poster-x.*no valid caption in 2 attempt\(s\) of 6 new tokens"):
        short.expand(RECORD)


def test_ideogram4_needs_a_prompt_enhancer_head(tiny_pipeline):
    class NoHead:
        text_encoder, tokenizer, prompt_enhancer_head = (
            tiny_pipeline.text_encoder,
            tiny_pipeline.tokenizer,
            None,
        )

    with pytest.raises(ConfigError, match="prompt_enhancer_head"):
        EXPANDERS.get("ideogram4")(pipeline=NoHead())
    with pytest.raises(ConfigError, match="needs a pipeline or a model"):
        EXPANDERS.get("ideogram4")()
