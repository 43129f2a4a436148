"""The README and docs/ stay navigable: every relative link resolves, the README is one screen.

- Every markdown link or image ``[text](target)`` in README.md and docs/**/*.md whose target is
  relative (not http(s)://, mailto:) names an existing file or directory, relative to the markdown
  file. A ``#anchor`` into a markdown file (or into the same file) must match a heading's
  GitHub-style slug.
- README.md has at most 150 lines and opens with one code block holding exactly ``make up`` and
  ``make test``.
- The section headings that code docstrings cite ("docs/design.md §3", "docs/draft_opd.md, "The
  loop"")
  exist in docs/design.md and docs/draft_opd.md.

Standard library and pytest only: no markdown parser.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 150

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)]*)\)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped, spaces
    to hyphens (letters, digits, ``_`` and ``-`` are kept)."""
    text = LINK.sub(lambda m: m.group("text"), heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading slug of a markdown file, with GitHub's -1, -2 ... suffixes for repeats."""
    seen: dict[str, int] = {}
    slugs: set[str] = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def links(path: Path) -> list[str]:
    """Link targets in a file's prose (code blocks and inline code excluded)."""
    targets = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group("target").strip()
            if target.startswith("<") and ">" in target:  # [text](<path with spaces>)
                target = target[1 : target.index(">")]
            else:
                target = target.split(maxsplit=1)[0] if target else target  # drop a "title"
            targets.append(target)
    return targets


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if not target:
            problems.append("empty link target")
            continue
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{target}: no such file {resolved}")
            continue
        is_markdown = resolved.suffix == ".md" and resolved.is_file()
        if anchor and is_markdown and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(Path(p).relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_docs_exist() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert {"design.md", "draft_opd.md", "benchmarks.md"} <= names


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("1. The four services and the data flow", "1-the-four-services-and-the-data-flow"),
        ("Block drafters (planned)", "block-drafters-planned"),
        ("`draftopd up`", "draftopd-up"),
        ("Settings, `draftopd up` and Docker Compose", "settings-draftopd-up-and-docker-compose"),
        ("Replay and loss", "replay-and-loss"),
        ("A [link](x.md) in a heading", "a-link-in-a-heading"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# Here it is\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#here-it-is) [web](https://example.com) [self](#title)\n"
        "# Title\n[missing](gone.md) [bad anchor](there.md#nowhere)\n"
        "```\n[in code](also-gone.md)\n```\n`[inline](gone-too.md)`\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert problems[0].startswith("gone.md") and problems[1].startswith("there.md#nowhere")


def test_readme_fits_one_screen() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_starts_with_the_two_setup_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if FENCE.match(line)), None)
    assert start is not None, "README.md has no code block"
    before = [line for line in lines[:start] if line.strip()]
    assert all(line.startswith("# ") for line in before), f"text before the commands: {before}"
    end = next(i for i in range(start + 1, len(lines)) if FENCE.match(lines[i]))
    commands = [line.split("#", 1)[0].strip() for line in lines[start + 1 : end]]
    assert [c for c in commands if c] == ["make up", "make test"]


def _headings(path: Path) -> list[str]:
    return [m.group(2) for line in _prose_lines(path.read_text(encoding="utf-8"))
            if (m := HEADING.match(line))]  # fmt: skip


def test_design_keeps_the_cited_section_numbers() -> None:
    numbered = [h for h in _headings(DOCS / "design.md") if re.match(r"\d+\. ", h)]
    assert [h.split(".", 1)[0] for h in numbered] == [str(n) for n in range(1, 8)], numbered


@pytest.mark.parametrize(
    "title",
    ["Notation", "The loop", "Replay and loss", "SFT bootstrap", "Block drafters",
     "Correctness checks"],
)  # fmt: skip
def test_draft_opd_keeps_the_cited_section_titles(title: str) -> None:
    assert any(h.startswith(title) for h in _headings(DOCS / "draft_opd.md")), title
