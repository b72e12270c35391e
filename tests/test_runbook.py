"""Every alert says what to try: each kind has a title, a hint, and a runbook section in
docs/detectors.md that its runbook_url finds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradwatch.collector.detectors.runbook import (
    DETECTORS_DOC_URL,
    RUNBOOKS,
    hint,
    runbook,
    runbook_url,
)
from gradwatch.protocol import ALERT_KINDS

ROOT = Path(__file__).resolve().parent.parent
DETECTORS_DOC = ROOT / "docs" / "detectors.md"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation other than - and _
    dropped, spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def doc_sections(path: Path) -> dict[str, str]:
    """A Markdown file's sections by their GitHub anchor: the text up to the next heading.
    Fenced code is left out, so a shell comment is never taken for a heading."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    parts = re.split(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)
    anchors = [github_anchor(heading) for heading in parts[1::2]]
    duplicated = {a for a in anchors if anchors.count(a) > 1}
    assert not duplicated, f"{path.name}: GitHub would suffix these anchors: {duplicated}"
    return dict(zip(anchors, parts[2::2]))


def test_every_kind_has_a_runbook() -> None:
    assert set(RUNBOOKS) == set(ALERT_KINDS)


@pytest.mark.parametrize("kind", ALERT_KINDS)
def test_hint_is_short_terminal_text_and_the_url_finds_its_docs_section(kind: str) -> None:
    book = runbook(kind)
    assert book.title and "\n" not in book.title
    assert hint(kind) == book.hint
    # One to three sentences of plain text: it is printed under the alert in terminals.
    assert "\n" not in book.hint and book.hint.endswith(".") and len(book.hint) <= 300
    assert 1 <= len(re.findall(r"[.?!](?:\s|$)", book.hint)) <= 3, book.hint
    url = runbook_url(kind)
    assert url.startswith(DETECTORS_DOC_URL + "#")
    section = doc_sections(DETECTORS_DOC).get(url.split("#", 1)[1])
    assert section is not None, f"docs/detectors.md has no heading for {url}"
    for part in ("**Means.**", "**Evidence.**", "**Likely causes.**", "**Try first, in order.**\n1. "):
        assert part in section, f"{kind}'s runbook lacks {part!r}"


@pytest.mark.parametrize("lookup", [hint, runbook_url])
def test_an_unknown_kind_is_a_clear_error(lookup) -> None:
    with pytest.raises(ValueError, match=r"^unknown alert kind 'exploding'; known kinds: nonfinite, "):
        lookup("exploding")
