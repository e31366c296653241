"""The `openai` expander: captions from any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, Ollama,
hosted APIs) over plain HTTP with the standard library.

One `expand` call:

    request(system + user)  --transport error / 429 / 5xx / unreadable body-->  retry with backoff (bounded)
        |
    reply text --validate--> valid: return canonical JSON
        |                    invalid (or cut off): send the problems back as a repair turn (bounded), then fail

The request asks for structured output (`response_format` of type `json_schema` with `caption_json_schema()`);
a server that rejects that field with HTTP 400 is asked again once without it. The API key is read from an
environment variable at construction, sent only in the `Authorization` header, and never logged or put in errors.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from ditq.errors import ConfigError
from ditq.prompts.expanders import EXPANDERS, ExpanderError
from ditq.prompts.records import PromptRecord
from ditq.prompts.schema import canonical_json, caption_json_schema
from ditq.prompts.spec import caption_instructions, repair_message, user_message
from ditq.prompts.validate import parse_caption, reply_problems

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _Retryable(Exception):
    """A failure worth another attempt (network, timeout, overload, a reply that is not a chat completion)."""


class _Rejected(Exception):
    """The server refused the request (4xx other than the retryable ones); retrying would not help."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def strip_fences(text: str) -> str:
    """The JSON inside a reply that wrapped it in a markdown code fence anyway."""
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else text[3:]
        if text.rstrip().endswith("```"):
            text = text.rstrip()[:-3]
    return text.strip()


@EXPANDERS.register("openai")
class OpenAIChatExpander:
    """Captions from an OpenAI-compatible `/chat/completions` endpoint, validated and repaired.

    `base_url` ends before `/chat/completions` (e.g. `http://127.0.0.1:8000/v1`). `timeout` bounds each HTTP
    request in seconds; `retries` is the number of extra attempts after a transport failure, waiting
    `backoff * 2**attempt` seconds (at most `max_backoff`); `repairs` is how many times an invalid reply is sent
    back with the validator's findings.
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "default",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        repairs: int = 2,
        temperature: float = 0.2,
        max_tokens: int = 2048,
        structured_output: bool = True,
        width: int = 1024,
        height: int = 1024,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0 or retries < 0 or repairs < 0 or backoff < 0:
            raise ConfigError("timeout must be > 0 and retries, repairs, backoff >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env, "")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.repairs = repairs
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.structured_output = structured_output
        self.width, self.height = width, height
        self._sleep = sleep
        self._system = caption_instructions()

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatExpander(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.structured_output:
            schema = {k: v for k, v in caption_json_schema().items() if k != "$schema"}
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "ideogram4_caption", "schema": schema, "strict": False},
            }
        return body

    def _post_once(self, body: dict[str, Any]) -> tuple[str, str | None]:
        """One HTTP request; returns (reply text, finish_reason) or raises `_Retryable` / `_Rejected`."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            text = self._redact(exc.read(2000).decode("utf-8", "replace"))
            if exc.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {exc.code}: {text[:200]}") from None
            raise _Rejected(exc.code, text[:500]) from None
        except TimeoutError as exc:
            raise _Retryable(f"no reply within {self.timeout:g} s ({exc})") from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"cannot reach {self.url}: {self._redact(str(reason))}") from None
        try:
            reply = json.loads(raw)
            choice = reply["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("message content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            snippet = self._redact(raw[:120].decode("utf-8", "replace"))
            raise _Retryable(f"reply is not a chat completion ({exc}): {snippet!r}") from None
        return content, choice.get("finish_reason")

    def _post(self, messages: list[dict[str, str]], record_id: str) -> tuple[str, str | None]:
        """`_post_once` with bounded retries and exponential backoff."""
        body = self._body(messages)
        attempt, last = 0, ""
        while attempt <= self.retries:
            try:
                return self._post_once(body)
            except _Retryable as exc:
                last = str(exc)
                attempt += 1
                if attempt <= self.retries:
                    wait = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                    log.warning(
                        "prompt %s: attempt %d/%d failed (%s); retrying in %.1f s",
                        record_id,
                        attempt,
                        self.retries + 1,
                        last,
                        wait,
                    )
                    self._sleep(wait)
            except _Rejected as exc:
                if exc.status == 400 and "response_format" in body and "response_format" in exc.body:
                    log.warning(
                        "%s rejects structured output; asking again without response_format", self.url
                    )
                    body = {k: v for k, v in body.items() if k != "response_format"}
                    self.structured_output = False
                    continue  # does not count as an attempt: the request changed
                raise ExpanderError(f"prompt {record_id!r}: {self.url} refused the request: {exc}") from None
        raise ExpanderError(
            f"prompt {record_id!r}: {self.url} failed {self.retries + 1} time(s); last error: {last}"
        )

    def expand(self, record: PromptRecord) -> str:
        """A validated canonical caption for `record`, or `ExpanderError` after the retries and repair turns."""
        messages = [
            {"role": "system", "content": self._system},
            {"role": "user", "content": user_message(record, self.width, self.height)},
        ]
        findings: list[str] = []
        for turn in range(self.repairs + 1):
            content, finish_reason = self._post(messages, record.id)
            text = strip_fences(content)
            problems = reply_problems(text)
            if not problems:
                if turn:
                    log.info("prompt %s: valid after %d repair turn(s)", record.id, turn)
                return canonical_json(parse_caption(text))
            findings = [str(p) for p in problems]
            if finish_reason == "length":
                findings.insert(
                    0, "$: truncated: the reply was cut off by the token limit; write shorter descriptions"
                )
            log.warning(
                "prompt %s: invalid caption (%d problem(s), first: %s)", record.id, len(findings), findings[0]
            )
            messages += [
                {"role": "assistant", "content": content},
                {"role": "user", "content": repair_message(findings)},
            ]
        shown = "; ".join(findings[:3])
        raise ExpanderError(
            f"prompt {record.id!r}: no valid caption after {self.repairs} repair turn(s); last problems: {shown}"
        )
