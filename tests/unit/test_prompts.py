"""draftopd.prompts: JSONL formats, limits, bad lines, MT-Bench, rendering through tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from draftopd.prompts import Prompt, default_prompts_path, load_prompts, render_prompt

TINY_VOCAB = {"<unk>": 0, "<s>": 1, "hello": 2, "world": 3, "[user]": 4, "[assistant]": 5}
TINY_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_tokenizer(*, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer that prepends <s> (id 1) to plain text."""
    backend = Tokenizer(models.WordLevel(TINY_VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def test_loads_all_three_formats(tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Once upon a time"},
            {"question_id": 81, "turns": ["First turn", "Second turn"]},
            "",
            {"id": "chat-1", "messages": chat},
        ],
    )
    prompts = load_prompts(path, limit=None)
    assert prompts == [
        Prompt(id="1", messages=None, text="Once upon a time", source="prompt"),
        Prompt(
            id="81", messages=[{"role": "user", "content": "First turn"}], text=None, source="turns"
        ),
        Prompt(id="chat-1", messages=chat, text=None, source="messages"),
    ]
    assert prompts[0].chat_messages == [{"role": "user", "content": "Once upon a time"}]
    assert prompts[1].plain_text == "First turn"
    assert prompts[2].plain_text == "Be brief.\n\nHi"


def test_limit_stops_early(tmp_path: Path) -> None:
    rows: list[Any] = [{"prompt": f"p{i}"} for i in range(5)]
    rows.append("{not json")  # past the limit: never parsed
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert [p.text for p in load_prompts(path, limit=3)] == ["p0", "p1", "p2"]
    with pytest.raises(ValueError, match="line 6: invalid JSON"):
        load_prompts(path, limit=None)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_prompts(path, limit=0)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        ({"text": "x"}, r"line 2: expected exactly one of .*got \['text'\]"),
        ({"prompt": "x", "turns": ["y"]}, r"line 2: expected exactly one of .*'prompt', 'turns'"),
        ({"prompt": 3}, r"line 2: 'prompt' must be a non-empty string"),
        ({"turns": []}, r"line 2: 'turns' must be a non-empty list of strings"),
        ({"turns": [""]}, r"line 2: the first of 'turns' is empty"),
        ({"messages": "hi"}, r"line 2: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\] has role 'bot'"),
        ({"messages": [{"role": "user", "content": 1}]}, r"'content' must be a string, got int"),
        ({"prompt": "x", "category": 3}, r"line 2: 'category' must be a non-empty string"),
        ({"prompt": "x", "category": ""}, r"line 2: 'category' must be a non-empty string"),
    ],
)
def test_bad_line_names_line_and_problem(tmp_path: Path, bad_line: Any, message: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, bad_line])
    with pytest.raises(ValueError, match=message) as info:
        load_prompts(path, limit=None)
    assert str(info.value).startswith(str(path))


def test_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prompts file not found"):
        load_prompts(tmp_path / "absent.jsonl", limit=None)
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts(write_jsonl(tmp_path / "empty.jsonl", [""]), limit=None)


def test_render_plain_text_without_chat_template() -> None:
    tokenizer = tiny_tokenizer()
    prompt = Prompt(id="1", messages=None, text="hello world", source="prompt")
    assert render_prompt(tokenizer, prompt) == [1, 2, 3]
    turns = Prompt(id="2", messages=[{"role": "user", "content": "world"}], text=None, source="t")
    assert render_prompt(tokenizer, turns) == [1, 3]
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompt(tokenizer, prompt, chat=True)


def test_render_applies_chat_template_with_generation_prompt() -> None:
    tokenizer = tiny_tokenizer(chat_template=TINY_TEMPLATE)
    prompt = Prompt(id="1", messages=None, text="hello world", source="prompt")
    # "[user] hello world [assistant]": no extra <s>, since the template owns special tokens.
    assert render_prompt(tokenizer, prompt) == [4, 2, 3, 5]
    assert render_prompt(tokenizer, prompt, chat=False) == [1, 2, 3]


def test_mtbench_first_ten_load_and_render(smollm2_tokenizer: Any) -> None:
    path = default_prompts_path()
    assert path.name == "question.jsonl"
    assert path.parts[-4:-1] == ("llm_judge", "data", "mt_bench")
    prompts = load_prompts(None, limit=10)
    assert [p.id for p in prompts] == [str(i) for i in range(81, 91)]
    assert all(p.source == "turns" and p.messages and len(p.messages) == 1 for p in prompts)
    assert {p.category for p in prompts} == {"writing"}  # questions 81-90
    assert load_prompts(None, limit=80)[-1].category == "humanities"
    first = prompts[0].messages
    assert first is not None
    assert first[0]["content"].startswith("Compose an engaging travel blog post about")

    ids = render_prompt(smollm2_tokenizer, prompts[0])
    text = smollm2_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nCompose an engaging travel blog post" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert ids.count(smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    plain = render_prompt(smollm2_tokenizer, prompts[0], chat=False)
    assert smollm2_tokenizer.decode(plain) == first[0]["content"]
    assert all(len(render_prompt(smollm2_tokenizer, p)) > 20 for p in prompts)


def test_prompt_ids_are_used_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"id": "t1", "prompt_ids": [5, 9, 2]}) + "\n")
    (prompt,) = load_prompts(path)
    assert prompt.source == "prompt_ids" and prompt.token_ids == (5, 9, 2)
    assert render_prompt(None, prompt) == [5, 9, 2]  # no tokenizer, no template: already rendered
    for bad in ([], [1, -2], ["a"], [True]):
        path.write_text(json.dumps({"prompt_ids": bad}) + "\n")
        with pytest.raises(ValueError, match="prompt_ids"):
            load_prompts(path)
