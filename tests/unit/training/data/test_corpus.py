"""training.data.corpus: size, categories, provenance, determinism, MT-Bench hygiene, I/O."""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from draftopd.prompts import Prompt, default_prompts_path, load_prompts
from draftopd.training.data import corpus as corpus_module
from draftopd.training.data.corpus import (
    CATEGORIES,
    MIN_CONTAINED_CHARS,
    STREAMS,
    BenchmarkFilter,
    CorpusPrompt,
    SeedData,
    Stream,
    build_corpus,
    fill_template,
    interleave_prompts,
    load_seed_data,
    load_training_prompts,
    normalise,
    write_corpus_jsonl,
)
from draftopd.training.data.seed_data.make_api_docs import snapshot_api_docs

# The default build (min_prompts=3000) gives each category at least these many prompts.
MIN_PER_CATEGORY = {
    "coding": 800,
    "writing": 250,
    "roleplay": 250,
    "reasoning": 250,
    "math": 300,
    "extraction": 250,
    "stem": 300,
    "humanities": 300,
}
# Distinctive MT-Bench topics that the seed lists were written to avoid (seed_data/README.md).
MTBENCH_TOPICS = [
    "hawaii", "smartphone", "elon musk", "sheldon", "tony stark", "socrates", "opium war",
    "antitrust", "base rate", "photosynthesis", "central dogma", "superposition", "exothermic",
    "endothermic", "supervised", "fibonacci", "longest common subsequence", "boyer-moore",
    "median of two sorted", "two dice", "does not belong", "bio-energy", "marketplace",
]  # fmt: skip
USER_HI = {"role": "user", "content": "Hi"}
CONTROL = "Write a haiku about a teapot that has finally learned to whistle in tune."


@pytest.fixture(scope="module")
def corpus() -> list[CorpusPrompt]:
    return build_corpus(seed=0)


@pytest.fixture(scope="module")
def mtbench_turns() -> list[str]:
    """Both turns of all 80 MT-Bench questions, read independently of the module under test."""
    lines = default_prompts_path().read_text(encoding="utf-8").splitlines()
    turns = [turn for line in lines if line.strip() for turn in json.loads(line)["turns"]]
    assert len(turns) == 160
    return turns


# -- size, categories, provenance, determinism ----------------------------------------------------


def test_at_least_3000_distinct_prompts(corpus: list[CorpusPrompt]) -> None:
    assert len(corpus) >= 3000
    assert len({normalise(p.text) for p in corpus}) == len(corpus)
    assert len({p.id for p in corpus}) == len(corpus)
    assert all(p.text.strip() for p in corpus)


def test_every_category_has_its_minimum(corpus: list[CorpusPrompt]) -> None:
    counts = Counter(p.category for p in corpus)
    assert set(counts) == set(CATEGORIES)
    for category, minimum in MIN_PER_CATEGORY.items():
        assert counts[category] >= minimum, (category, counts[category])


def test_shares_sum_to_the_whole_and_larger_corpora_build() -> None:
    assert sum(s.permille for s in STREAMS) == 1000
    assert {s.category for s in STREAMS} == set(CATEGORIES)
    bigger = build_corpus(seed=0, min_prompts=6000)
    assert len({normalise(p.text) for p in bigger}) >= 6000


def test_every_prompt_has_provenance(corpus: list[CorpusPrompt]) -> None:
    for prompt in corpus:
        provenance = prompt.provenance
        assert isinstance(provenance["source"], str) and provenance["source"]
        assert provenance["category"] == prompt.category
        assert provenance["seed"] == 0
        assert isinstance(provenance["template_id"], str)
        assert isinstance(provenance["slots"], dict)
        if provenance["source"].startswith("template:"):
            assert provenance["source"] == f"template:{prompt.category}"
            assert provenance["template_id"].startswith(prompt.category)
        else:
            assert provenance["module"] and provenance["name"], provenance
        json.dumps(provenance)  # JSON-serialisable for write_corpus_jsonl


def test_sources_cover_stdlib_networkx_and_every_template_category(
    corpus: list[CorpusPrompt],
) -> None:
    sources = Counter(p.provenance["source"].split("/")[0] for p in corpus)
    assert sources["stdlib-doc"] >= 500
    assert sources["package:networkx"] >= 100
    for category in CATEGORIES:
        assert sources[f"template:{category}"] >= 150
    kinds = Counter(p.provenance.get("kind") for p in corpus)
    assert kinds["function"] > 0 and kinds["class"] > 0 and kinds["topic"] > 0
    modules = {p.provenance["module"] for p in corpus if p.provenance["source"] == "stdlib-doc"}
    assert len(modules) >= 100  # modules are interleaved, not taken one after another


def test_every_template_is_used_and_fully_filled(corpus: list[CorpusPrompt]) -> None:
    used = {p.provenance["template_id"] for p in corpus}
    data = load_seed_data()
    for stream in STREAMS:
        for template in data.templates[stream.name]:
            assert template["id"] in used, template["id"]
    for prompt in corpus:
        if prompt.provenance["source"].startswith("template:"):
            assert not re.search(r"\{[a-z_]+(#\d+)?\}|\{(int|pick|expr):", prompt.text), prompt.text


def test_same_seed_same_corpus_other_seed_other_corpus(corpus: list[CorpusPrompt]) -> None:
    again = build_corpus(seed=0)
    assert [p.to_record() for p in again] == [p.to_record() for p in corpus]
    other = build_corpus(seed=1)
    assert Counter(p.category for p in other) == Counter(p.category for p in corpus)
    shared = {p.text for p in other} & {p.text for p in corpus}
    assert len(shared) < len(corpus) // 2


def test_too_many_prompts_or_none_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="min_prompts"):
        build_corpus(min_prompts=0)
    with pytest.raises(ValueError, match="stdlib-doc"):
        build_corpus(min_prompts=1_000_000)  # more than the stdlib snapshot can give


# -- MT-Bench hygiene ------------------------------------------------------------------------------


def test_no_mtbench_turn_in_corpus(corpus: list[CorpusPrompt], mtbench_turns: list[str]) -> None:
    texts = [normalise(p.text) for p in corpus]
    for turn in map(normalise, mtbench_turns):
        for text in texts:
            assert text != turn
            assert not (len(turn) >= MIN_CONTAINED_CHARS and turn in text), turn
            assert not (len(text) >= MIN_CONTAINED_CHARS and text in turn), text


def test_corpus_avoids_mtbench_topics(corpus: list[CorpusPrompt]) -> None:
    for prompt in corpus:
        text = normalise(prompt.text)
        assert not [topic for topic in MTBENCH_TOPICS if topic in text], prompt.text


def _overlapping_variants(turns: list[str]) -> dict[str, tuple[str, str]]:
    """Name -> (text, the filter's expected reason) for MT-Bench text dressed up as a prompt."""
    first, second = turns[0], turns[1]
    long_words = max(turns, key=len).split()
    fragment = " ".join(long_words[3:20])
    assert len(fragment) >= MIN_CONTAINED_CHARS
    window = " ".join(long_words[10:19])  # 9 words: shares an 8-word window
    return {
        "exact first turn": (first, "exact"),
        "exact second turn": (second, "exact"),
        "recased and re-spaced": ("  " + first.upper().replace(" ", " \n\t ") + " ", "exact"),
        "embedded in a longer prompt": (f"Please help with this. {first} Thanks!", "contains"),
        "a fragment of a turn": (fragment, "contained"),
        "a shared 8-word window": (f"My teacher wrote: {window}. What does that mean?", "ngram"),
    }


def test_filter_drops_mtbench_questions_injected_into_the_pool(
    monkeypatch: pytest.MonkeyPatch, mtbench_turns: list[str]
) -> None:
    variants = _overlapping_variants(mtbench_turns)
    benchmark = BenchmarkFilter.from_mtbench()
    for name, (text, reason) in variants.items():
        assert benchmark.reason(text) == reason, name
    assert benchmark.reason(CONTROL) is None

    original = corpus_module.iter_candidates
    texts = [text for text, _ in variants.values()] + [CONTROL]

    def with_injected(stream: Stream, *, seed: int, data: SeedData) -> Iterator[CorpusPrompt]:
        candidates = original(stream, seed=seed, data=data)
        if stream.name != "writing":
            return candidates
        provenance = {"source": "test", "category": "writing"}
        injected = [CorpusPrompt(f"x{i}", t, "writing", provenance) for i, t in enumerate(texts)]
        return itertools.chain(injected, candidates)

    monkeypatch.setattr(corpus_module, "iter_candidates", with_injected)
    built = {normalise(p.text) for p in build_corpus(seed=0)}
    assert normalise(CONTROL) in built  # the injection reached the pool
    for name, (text, _) in variants.items():
        assert normalise(text) not in built, name


def test_benchmark_filter_rules() -> None:
    turn = "Describe the migration routes of arctic terns and explain how they navigate."
    benchmark = BenchmarkFilter.from_texts([turn, "Short turn."])
    assert benchmark.reason(turn.lower()) == "exact"
    assert benchmark.reason("short   TURN.") == "exact"
    assert benchmark.reason(f"Question: {turn}") == "contains"
    assert benchmark.reason("the migration routes of arctic terns and explain") == "contained"
    assert benchmark.reason("Short turn. And more.") is None  # contained turn under 40 chars
    assert benchmark.reason("arctic terns") is None  # contained text under 40 chars
    assert benchmark.reason("Tell me the migration routes of arctic terns and explain.") == "ngram"
    assert benchmark.reason("Explain how arctic terns navigate.") is None


# -- template filling ------------------------------------------------------------------------------


def test_fill_template_slots() -> None:
    lexicon = {"city": ["Lima", "Oslo", "Pune"], "greeting": ["Hello from {city}"]}
    rng = random.Random(0)
    for _ in range(20):
        text, slots = fill_template({"text": "{city}|{city}|{city#2}"}, lexicon, rng)
        first, again, other = text.split("|")
        assert first == again == slots["city"] and other == slots["city#2"] and other != first
        numbers = {"a": "int:1:9", "b": "int:1:9"}
        template = {"text": "{a}+{b}={expr:a+b}; {n=int:3:5} {{x}}", "vars": numbers}
        text, slots = fill_template(template, lexicon, rng)
        a, b = int(slots["a"]), int(slots["b"])
        assert text == f"{a}+{b}={a + b}; {slots['n']} {{x}}" and 3 <= int(slots["n"]) <= 5
        text, _ = fill_template({"text": "{greeting}, twice: {city}"}, lexicon, rng)
        assert text.split(", twice: ")[0] == f"Hello from {text.split(', twice: ')[1]}"
    with pytest.raises(ValueError, match="unknown slot"):
        fill_template({"text": "{nowhere}"}, lexicon, rng)
    with pytest.raises(ValueError, match="too few entries"):
        fill_template({"text": "{city} {city#2} {city#3} {city#4}"}, lexicon, rng)


def test_puzzle_numbers_are_consistent(corpus: list[CorpusPrompt]) -> None:
    systems = [p for p in corpus if p.provenance["template_id"] == "math-03"]
    assert systems
    for prompt in systems:
        s = {k: int(v) for k, v in prompt.provenance["slots"].items() if v.lstrip("-").isdigit()}
        assert f"{s['a']}x + {s['b']}y = {s['a'] * s['x0'] + s['b'] * s['y0']}" in prompt.text
        assert f"{s['c']}x - {s['d']}y = {s['c'] * s['x0'] - s['d'] * s['y0']}" in prompt.text


# -- I/O -------------------------------------------------------------------------------------------


def test_jsonl_round_trip_through_load_prompts(corpus: list[CorpusPrompt], tmp_path: Path) -> None:
    sample = corpus[:50]
    path = write_corpus_jsonl(sample, tmp_path / "sub" / "corpus.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [set(r) for r in records] == [{"id", "prompt", "category", "provenance"}] * 50
    assert [r["provenance"] for r in records] == [p.provenance for p in sample]
    assert load_prompts(path) == [p.to_prompt() for p in sample]


def test_load_training_prompts_defaults_to_the_built_in_corpus() -> None:
    prompts = load_training_prompts(None, min_prompts=300)
    expected = build_corpus(seed=0, min_prompts=300)
    assert prompts == [p.to_prompt() for p in expected]
    assert all(isinstance(p, Prompt) and p.text for p in prompts)


def test_load_training_prompts_honours_a_user_file(
    tmp_path: Path, mtbench_turns: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"id": "u1", "prompt": "Tell me about tides."},
        {"question_id": 7, "turns": ["Plan a picnic for six.", "Now for twelve."]},
        {"messages": [{"role": "system", "content": "Be brief."}, USER_HI]},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="draftopd.training.data.corpus"):
        prompts = load_training_prompts(str(path))
    assert [p.id for p in prompts] == ["u1", "7", "3"]
    assert [p.plain_text for p in prompts] == [
        "Tell me about tides.",
        "Plan a picnic for six.",
        "Be brief.\n\nHi",
    ]
    assert not caplog.records

    rows.append({"id": "leak", "prompt": mtbench_turns[0]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="draftopd.training.data.corpus"):
        prompts = load_training_prompts(path)
    assert len(prompts) == 4  # a user file is used as given...
    assert "1 of 4 training prompts" in caplog.text and "leak" in caplog.text  # ...with a warning


# -- the API snapshot ------------------------------------------------------------------------------


def test_snapshot_records_signature_and_summary() -> None:
    snapshot = snapshot_api_docs(["textwrap"], networkx=False, topics=False)
    entries = {e["name"]: e for e in snapshot["entries"]}
    dedent = entries["dedent"]
    assert dedent["module"] == "textwrap" and dedent["kind"] == "function"
    assert dedent["signature"] == "(text)"
    assert "whitespace" in dedent["summary"]
    assert entries["TextWrapper"]["kind"] == "class"
    assert snapshot["stdlib_modules"] == ["textwrap"]


def test_shipped_snapshot_is_well_formed() -> None:
    entries = load_seed_data().api_entries
    streams = Counter(e["stream"] for e in entries)
    assert streams["stdlib-doc"] >= 1500 and streams["networkx"] >= 300
    assert streams["stdlib-topic"] >= 70
    for entry in entries:
        assert entry["kind"] in {"function", "class", "topic"}
        assert entry.get("summary") or entry.get("title")
        if entry["stream"] == "networkx":
            assert entry["source"].startswith("package:networkx/networkx/algorithms/")
        else:
            assert entry["source"] == "stdlib-doc"


def test_interleave_prompts_alternates_then_appends_the_rest() -> None:
    own = [Prompt(f"s{i}", None, f"own {i}", "prompt") for i in range(3)]
    corpus = [Prompt(f"c{i}", None, f"corpus {i}", "prompt") for i in range(5)]
    mixed = interleave_prompts(own, corpus)
    assert [p.id for p in mixed] == ["s0", "c0", "s1", "c1", "s2", "c2", "c3", "c4"]
    assert [p.id for p in interleave_prompts(corpus[:2], own)] == ["c0", "s0", "c1", "s1", "s2"]
    assert interleave_prompts([], corpus) == corpus
    with pytest.raises(ValueError, match="share ids"):
        interleave_prompts(own, [Prompt("s1", None, "a clash", "prompt")])
