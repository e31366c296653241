from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from ditq.metrics import METRICS, ScoreItem
from ditq.metrics.text import normalize_text, substring_edit_distance, text_scores


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _brute_force_ned(needle: str, haystack: str) -> float:
    substrings = {
        haystack[i:j] for i, j in itertools.combinations_with_replacement(range(len(haystack) + 1), 2)
    }
    return min(_levenshtein(needle, s) / max(len(needle), len(s)) for s in substrings)


def _render(lines: list[str]) -> np.ndarray:
    height = 40 + 90 * max(len(lines), 1)
    image = Image.new("RGB", (420, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype("DejaVuSans.ttf", 44)
    for i, line in enumerate(lines):
        draw.text((24, 24 + 90 * i), line, fill="black", font=font)
    return np.asarray(image)


def test_normalize_text_rules():
    assert normalize_text("  Café\u00a0NOIR · est. 1998 ") == "cafénoirest1998"
    assert normalize_text("Cafe\u0301") == "café"  # decomposed accent composes (NFKC)
    assert normalize_text("ＳＡＬＥ 50%") == "sale50%"  # full-width forms; % is content and stays
    assert normalize_text("R&D #1 @home: $5 + €3 ©") == "r&d#1@home$5+€3©"
    assert normalize_text("Straße") == "strasse"  # casefold
    assert normalize_text("“Hello,” she said!") == "helloshesaid"  # punctuation and spaces dropped


def test_substring_edit_distance_matches_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(200):
        needle = "".join(rng.choice(list("abcd"), size=rng.integers(1, 6)))
        haystack = "".join(rng.choice(list("abcde"), size=rng.integers(0, 12)))
        assert substring_edit_distance(needle, haystack) == pytest.approx(_brute_force_ned(needle, haystack))


def test_substring_edit_distance_edges():
    assert substring_edit_distance("sale", "bigsalenow") == 0.0
    assert substring_edit_distance("sale", "") == 1.0
    assert substring_edit_distance("", "anything") == 0.0
    assert substring_edit_distance("abcd", "xxabxdxx") == pytest.approx(0.25)  # one substitution


def test_text_scores_mean_over_strings_and_none_without_strings():
    assert text_scores([], ["whatever"]) is None
    assert text_scores(["...", "!!"], ["x"]) is None  # nothing left after normalization
    exact, ned = text_scores(["Open", "Clozed"], ["OPEN daily", "closed"])
    assert exact == 0.5
    assert ned == pytest.approx((0.0 + 1 / 6) / 2)


@pytest.fixture(scope="module")
def ocr_metrics():
    return METRICS.get("ocr_exact"), METRICS.get("ocr_ned")


@pytest.mark.parametrize("text", ["Café Noir", "SALE 50%"])
def test_ocr_reads_rendered_text_exactly(ocr_metrics, text):
    exact, ned = ocr_metrics
    item = ScoreItem(image=_render([text]), texts=(text,))
    assert exact.score([item]) == [1.0]
    assert ned.score([item]) == [0.0]


def test_ocr_two_strings_and_a_wrong_one(ocr_metrics):
    exact, ned = ocr_metrics
    image = _render(["Café Noir", "SALE 50%"])
    assert exact.score([ScoreItem(image=image, texts=("Café Noir", "SALE 50%"))]) == [1.0]
    [partial] = exact.score([ScoreItem(image=image, texts=("Café Noir", "Bakery"))])
    assert partial == 0.5
    [distance] = ned.score([ScoreItem(image=image, texts=("Café Noir", "Bakery"))])
    assert 0.0 < distance <= 0.5


def test_ocr_blank_image_scores_zero_and_distance_one(ocr_metrics):
    exact, ned = ocr_metrics
    item = ScoreItem(image=np.full((128, 256, 3), 255, dtype=np.uint8), texts=("Café Noir", "SALE 50%"))
    assert exact.score([item]) == [0.0]
    assert ned.score([item]) == [1.0]


def test_ocr_prompt_without_strings_has_no_score(ocr_metrics):
    exact, ned = ocr_metrics
    item = ScoreItem(image=np.full((32, 32, 3), 255, dtype=np.uint8), texts=())
    assert exact.score([item]) == [None]
    assert ned.score([item]) == [None]
