"""The `openai` expander against a scripted local chat server: good, bad, cut-off, slow, down."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from ditq.prompts import EXPANDERS, ExpanderError, PromptRecord, validate_caption
from ditq.prompts.expand import expand_to_file
from ditq.prompts.records import read_prompt_records

from .chat_server import ChatServer, Reply, caption

KEY = "sk-test-9f8e7d6c5b4a"
VALID = (
    '{"high_level_description":"A neon sign reading \\"Café Noir\\" on a brick wall, a photograph.",'
    '"style_description":{"aesthetics":"moody","lighting":"neon glow","photo":"35mm","medium":"photograph"},'
    '"compositional_deconstruction":{"background":"A dark brick wall.","elements":['
    '{"type":"obj","bbox":[200,100,700,900],"desc":"A neon sign box."},'
    '{"type":"text","bbox":[300,150,600,850],"text":"Café Noir","desc":"Pink neon script."}]}}'
)
# Valid JSON, broken caption: lowercase colour, desc before type, empty elements of a second kind.
INVALID = (
    '{"style_description":{"aesthetics":"a","lighting":"b","photo":"c","medium":"d","color_palette":["#ff00aa"]},'
    '"compositional_deconstruction":{"background":"x","elements":[{"desc":"d","type":"obj","bbox":[5,5,1,1]}]}}'
)
RECORD = PromptRecord(id="sign-1", category="signage", prompt='neon sign "Café Noir"', texts=("Café Noir",))


def expander(server: ChatServer, monkeypatch, **options):
    monkeypatch.setenv("DITQ_TEST_CHAT_KEY", KEY)
    defaults = {
        "base_url": server.base_url,
        "model": "tiny-chat",
        "api_key_env": "DITQ_TEST_CHAT_KEY",
        "timeout": 2.0,
    }
    defaults.update(options)
    waits: list[float] = []
    built = EXPANDERS.get("openai")(sleep=waits.append, **defaults)
    return built, waits


def test_openai_valid_reply_is_returned_canonical_with_structured_request(monkeypatch):
    with ChatServer([caption(VALID)]) as server:
        exp, waits = expander(server, monkeypatch)
        text = exp.expand(RECORD)
    assert validate_caption(text, level="lint") == [] and text == json.dumps(
        json.loads(VALID), separators=(",", ":"), ensure_ascii=False
    )
    assert "Café Noir" in text  # non-ASCII kept
    (request,) = server.requests
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "tiny-chat"
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["compositional_deconstruction"]
    system, user = body["messages"]
    assert system["role"] == "system" and "color_palette" in system["content"]
    assert '"Café Noir"' in user["content"] and waits == []


def test_openai_invalid_reply_is_repaired_with_validator_findings(monkeypatch):
    with ChatServer([caption(INVALID), caption(VALID)]) as server:
        exp, _ = expander(server, monkeypatch)
        assert validate_caption(exp.expand(RECORD), level="lint") == []
    assert len(server.requests) == 2
    repair_turn = server.requests[1].body["messages"]
    assert [m["role"] for m in repair_turn] == ["system", "user", "assistant", "user"]
    assert repair_turn[2]["content"] == INVALID
    assert "$.style_description.color_palette[0]: bad-color" in repair_turn[3]["content"]
    assert "$.compositional_deconstruction.elements[0].bbox: bad-bbox" in repair_turn[3]["content"]


def test_openai_truncated_reply_is_repaired(monkeypatch):
    with ChatServer([Reply("truncated", content=VALID), caption(VALID)]) as server:
        exp, _ = expander(server, monkeypatch)
        assert validate_caption(exp.expand(RECORD), level="lint") == []
    assert "cut off" in server.requests[1].body["messages"][-1]["content"]
    assert "invalid-json" in server.requests[1].body["messages"][-1]["content"]


def test_openai_transport_failures_are_retried_with_backoff(monkeypatch):
    script = [
        Reply("slow", content=VALID, sleep=1.5),
        Reply("garbage"),
        Reply("status", status=503),
        caption(VALID),
    ]
    with ChatServer(script) as server:
        exp, waits = expander(server, monkeypatch, timeout=0.3, retries=3, backoff=0.5)
        assert validate_caption(exp.expand(RECORD), level="lint") == []
    assert len(server.requests) == 4
    assert waits == [0.5, 1.0, 2.0]


def test_openai_server_that_stays_bad_gives_clear_error(monkeypatch):
    with ChatServer([caption(INVALID)]) as server:
        exp, _ = expander(server, monkeypatch, repairs=2)
        with pytest.raises(
            ExpanderError, match=r"sign-1.*no valid caption after 2 repair turn\(s\).*bad-color"
        ):
            exp.expand(RECORD)
    assert len(server.requests) == 3
    with ChatServer([Reply("status", status=500)]) as server:
        exp, waits = expander(server, monkeypatch, retries=2, backoff=0.1)
        with pytest.raises(ExpanderError, match=r"failed 3 time\(s\); last error: HTTP 500"):
            exp.expand(RECORD)
    assert len(server.requests) == 3 and waits == [0.1, 0.2]


def test_openai_refused_request_is_not_retried(monkeypatch):
    with ChatServer([Reply("status", status=401)]) as server:
        exp, waits = expander(server, monkeypatch, retries=3)
        with pytest.raises(ExpanderError, match="refused the request: HTTP 401"):
            exp.expand(RECORD)
    assert len(server.requests) == 1 and waits == []


def test_openai_falls_back_when_structured_output_is_unsupported(monkeypatch):
    with ChatServer([Reply("reject_format", content=VALID)]) as server:
        exp, _ = expander(server, monkeypatch, retries=0)
        assert validate_caption(exp.expand(RECORD), level="lint") == []
    assert "response_format" in server.requests[0].body and "response_format" not in server.requests[1].body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openai_endpoint_down_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DITQ_TEST_CHAT_KEY", KEY)
    exp = EXPANDERS.get("openai")(
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        api_key_env="DITQ_TEST_CHAT_KEY",
        retries=1,
        sleep=lambda s: None,
    )
    with pytest.raises(ExpanderError, match=r"failed 2 time\(s\); last error: cannot reach"):
        exp.expand(RECORD)


def test_openai_api_key_never_logged(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    messages = []
    script = [Reply("garbage"), caption(INVALID), caption(VALID)]
    with ChatServer(script) as server:
        exp, _ = expander(server, monkeypatch, retries=1)
        exp.expand(RECORD)
        assert KEY not in repr(exp)
    with ChatServer([Reply("status", status=403)]) as server:
        exp, _ = expander(server, monkeypatch)
        with pytest.raises(ExpanderError) as info:
            exp.expand(RECORD)
        messages.append(str(info.value))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "attempt 1/2 failed" in logged and "invalid caption" in logged  # the run did log
    assert KEY not in logged and all(KEY not in m for m in messages)


def test_openai_failure_mid_file_keeps_written_lines_and_resumes(monkeypatch, tmp_path):
    records = [PromptRecord(id=f"p-{i}", category="signage", prompt=f'sign "{i}"') for i in range(3)]
    out = tmp_path / "captions.jsonl"
    script = [caption(VALID), caption(VALID), Reply("status", status=503)]
    with ChatServer(script) as server:
        exp, _ = expander(server, monkeypatch, retries=1)
        with pytest.raises(ExpanderError, match=r"2 caption\(s\) written by this run are kept"):
            expand_to_file(records, exp, out)
    assert [r.id for r in read_prompt_records(out)] == ["p-0", "p-1"]
    with ChatServer([caption(VALID)]) as server:
        exp, _ = expander(server, monkeypatch)
        summary = expand_to_file(records, exp, out)
    assert summary.written == ["p-2"] and summary.skipped == ["p-0", "p-1"] and len(server.requests) == 1
    assert [r.id for r in read_prompt_records(out)] == ["p-0", "p-1", "p-2"]
