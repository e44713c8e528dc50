"""Optional per-source text cleaners, off by default and chosen by name in a source's config.

Each cleaner is a plain `str -> str` function; `get_cleaner` composes the configured names in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# `[** ... **]` never spans lines in MIMIC-III, so `[^\n]` stops an unclosed `[**` from eating a whole note.
_MIMIC3_PLACEHOLDER = re.compile(r"\[\*\*[^\n]*?\*\*\]")
_MIMIC4_PLACEHOLDER = re.compile(r"_{3,}")
_HORIZONTAL_SPACE = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){2,}")  # 3+ newlines, allowing blank lines that hold spaces
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 except \t and \n, DEL, C1


def mimic_deid(text: str) -> str:
    """Replace MIMIC de-identification placeholders with one neutral `[deid]` token.

    MIMIC-III writes `[**2150-3-4**]`, `[**Hospital1 18**]`, `[**Last Name (NamePattern1) **]`; MIMIC-IV
    writes `___`. Left in, the model learns (and later generates) the placeholder syntax and the fake
    dates/ids inside it; a single token keeps the "something was redacted here" signal and nothing else.
    """
    return _MIMIC4_PLACEHOLDER.sub("[deid]", _MIMIC3_PLACEHOLDER.sub("[deid]", text))


def collapse_whitespace(text: str) -> str:
    """Collapse runs of spaces/tabs to one space and 3+ newlines to 2, and strip both ends.

    Clinical notes are padded with column-aligning spaces and long blank runs; each space run costs tokens
    that teach the model nothing, while a single blank line still marks a section break.
    """
    return _BLANK_LINES.sub("\n\n", _HORIZONTAL_SPACE.sub(" ", text)).strip()


def strip_control(text: str) -> str:
    """Remove non-printable control characters (C0 except \\n and \\t, DEL, C1), including \\r.

    Extraction from PDFs and legacy systems leaves NULs, form feeds and stray escapes that tokenizers turn
    into rare byte tokens; they carry no meaning and only add noise.
    """
    return _CONTROL.sub("", text)


CLEANERS: dict[str, Callable[[str], str]] = {
    "mimic_deid": mimic_deid,
    "collapse_whitespace": collapse_whitespace,
    "strip_control": strip_control,
}


def get_cleaner(names: list[str]) -> Callable[[str], str]:
    """Compose the named cleaners, applied in the order given; an empty list is the identity."""
    unknown = [name for name in names if name not in CLEANERS]
    if unknown:
        raise ValueError(
            f"unknown cleaner(s) {', '.join(map(repr, unknown))}; known cleaners: {', '.join(sorted(CLEANERS))}"
        )
    steps = [CLEANERS[name] for name in names]

    def clean(text: str) -> str:
        for step in steps:
            text = step(text)
        return text

    return clean
