"""PubMed/MEDLINE XML as NCBI ships it: each PubmedArticle or PubmedBookArticle becomes one record of its
title and abstract (scripts kept as `10^6`, `CO_2`), streamed with bounded memory; deletions and the PMIDs of a
file are fingerprinted for the update index (data/pubmed.py).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import xxhash

from mellama_train.data.files import (
    DataFileError,
    Record,
    Skip,
    UnreadableFile,
    _as_text,
    _open_binary,
    _Reading,
)

# Element paths, from the record's root, of the text a PubMed record trains on. Journal articles keep their
# title and abstract under MedlineCitation/Article; book chapters and books (PubmedBookArticle, NCBI Bookshelf
# records in the same files) keep theirs under BookDocument, where a chapter has an ArticleTitle and a whole
# book only its Book/BookTitle.
_TITLE_PATHS = {
    ("PubmedArticle", "MedlineCitation", "Article", "ArticleTitle"): "title",
    ("PubmedBookArticle", "BookDocument", "ArticleTitle"): "title",
    ("PubmedBookArticle", "BookDocument", "Book", "BookTitle"): "book_title",
}
_ABSTRACT_PATHS = frozenset(
    {
        ("PubmedArticle", "MedlineCitation", "Article", "Abstract", "AbstractText"),
        ("PubmedBookArticle", "BookDocument", "Abstract", "AbstractText"),
    }
)
_PMID_PATHS = frozenset(
    {("PubmedArticle", "MedlineCitation", "PMID"), ("PubmedBookArticle", "BookDocument", "PMID")}
)
PUBMED_ROOTS = frozenset({"PubmedArticle", "PubmedBookArticle"})
NOT_AVAILABLE = "[Not Available]."
"""The ArticleTitle NLM gives a citation that has no title: a placeholder, never trained as text."""

# Superscripts and subscripts are written TeX-style, the form every LLM tokenizer's training text already
# uses for them in plain text: `10<sup>6</sup> CFU` -> `10^6 CFU`, `CO<sub>2</sub>` -> `CO_2`, `Na<sup>+</sup>`
# -> `Na^+`. A script that is not one token-like run, or that runs into a following letter or digit, is
# braced so it cannot be misread: `<sup>14</sup>C` -> `^{14}C`, `10<sup>-3</sup> M` keeps `^-3`,
# `x<sup>a b</sup>` -> `^{a b}`, `x<sup>2</sup><sup>3</sup>` -> `x^{2}^3` (braces inside become parentheses). Dropping the markup (the old behaviour) made `10<sup>6</sup>` read "106".
# The markers are C0 control characters, which XML 1.0 cannot carry (expat rejects them, even as character
# references), so no text of the file can be mistaken for one.
_SCRIPT_MARKS = {"sup": ("\x01", "\x02"), "sub": ("\x03", "\x04")}
_SCRIPT = re.compile(r"([\x01\x03])([^\x01-\x04]*)[\x02\x04](?=(.?))", re.S)
_PLAIN_SCRIPT = re.compile(r"[+\-\u2212\u00b1]?[0-9A-Za-z]+[+\-\u2212]?|[+\-\u2212*\u2032\u2020\u2021#]")


def _script(match: re.Match[str]) -> str:
    mark = "^" if match[1] == "\x01" else "_"
    body = " ".join(match[2].split())
    if not body:
        return " " if match[2] else ""  # `a<sup> </sup>b` keeps its space
    after = match[3]
    if _PLAIN_SCRIPT.fullmatch(body) and not after.isalnum() and not (after and after in "\x01\x03^_"):
        return mark + body
    return f"{mark}{{{body.replace('{', '(').replace('}', ')')}}}"  # `x^2^3` would be ambiguous: `x^{2}^3`


def render_scripts(text: str) -> str:
    """Replace the reader's superscript/subscript markers by `^x` / `_x` (or `^{...}` / `_{...}`)."""
    while True:  # innermost first: a script inside a script (rare) is rendered inside its braces
        rendered = _SCRIPT.sub(_script, text)
        if rendered == text:
            return re.sub(r"[\x01-\x04]", "", rendered)  # an unbalanced marker (cut by the size limit)
        text = rendered


MAX_XML_DEPTH = 1000
"""Elements a PubMed XML file may nest (a PubMed article nests about 10, a few dozen with MathML): expat and
the reader keep one entry per open element, so a file of nested tags would otherwise grow memory without
bound (200 MB of them took 3.9 GB). Deeper nesting makes the rest of the file an unreadable remainder: a
counted skip, located by article and byte offset."""


class _TooDeep(Exception):
    """Raised through expat when an element opens past MAX_XML_DEPTH."""


MAX_PMID_DIGITS = 12
"""A PMID is a positive integer (8 digits today); a longer run of digits is not one."""


def pmid_number(text: str) -> int:
    """A PMID element's text as its number, or 0 (no PMID) for anything but ASCII digits (at most 12)."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= MAX_PMID_DIGITS else 0


class PmidDigest:
    """An order-dependent digest of a file's citation PMIDs (0 for a citation without one): the reader's
    parse and the update index's scan (data/pubmed.py) must agree on it."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh64()
        self.count = 0

    def add(self, pmid: int) -> None:
        self._hash.update(pmid.to_bytes(8, "little"))
        self.count += 1

    @property
    def value(self) -> int:
        return self._hash.intdigest()


@dataclass
class PubmedRecord:
    """What the reader keeps of one PubmedArticle or PubmedBookArticle."""

    pmid: int | None
    """The record's own PMID (not the PMIDs it cites); None when missing or not a number."""
    title: str
    """ArticleTitle (a book: its BookTitle when the record has no chapter title), possibly NOT_AVAILABLE."""
    abstract: str
    """AbstractText sections, one per line, "LABEL: text" when labelled; "" when there is no abstract."""
    too_large: bool
    """Title and abstract passed the size limit: neither was kept."""
    book: bool
    """A PubmedBookArticle (an NCBI Bookshelf chapter or book)."""

    @property
    def text(self) -> str:
        """Title, a blank line, the abstract; NLM's "[Not Available]." title placeholder is left out."""
        title = "" if self.title == NOT_AVAILABLE else self.title
        return "\n\n".join(part for part in (title, self.abstract) if part)


class _PubmedArticles:
    """An expat target that keeps, of each PubmedArticle and PubmedBookArticle, only its PMID, title and
    abstract (PubmedRecord); inline markup such as <i> and MathML contributes its text, <sup>/<sub> are
    marked for render_scripts. Unlike ElementTree's tree builder it never holds a record's other elements,
    and it stops keeping text once a record's text passes the size limit.

    Each finished record is (PubmedRecord, a hash of its title and abstract text): one feed of the parser can
    finish several records, so the reader digests each one only as it hands it out. DeleteCitation blocks
    (update files) are not records: their PMIDs are collected in `deleted` (data/pubmed.py applies them)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.done: list[tuple[PubmedRecord, bytes]] = []
        self.deleted: list[int] = []
        self._tags: list[str] = []
        self._root: int | None = None  # index in _tags of the open record's root element
        self._in: str | None = None  # "title", "book_title", "part" or "pmid" while inside one
        self._new_article()

    def _path(self) -> tuple[str, ...]:
        """The open elements from the record's root (outside a record: the last two, for DeleteCitation)."""
        return tuple(self._tags[self._root :]) if self._root is not None else tuple(self._tags[-2:])

    def _new_article(self) -> None:
        self._texts: dict[str, list[str]] = {"title": [], "book_title": [], "part": [], "pmid": []}
        self._sections: list[str] = []
        self._label: str | None = None
        self._pmid: str | None = None
        self._size, self._too_large = 0, False
        self._seen: set[str] = set()
        self._hash = xxhash.xxh3_128()

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if len(self._tags) >= MAX_XML_DEPTH:
            raise _TooDeep
        self._tags.append(tag)
        if self._root is None and tag in PUBMED_ROOTS:
            self._root = len(self._tags) - 1
            self._new_article()
            return
        path = self._path()
        if self._in is not None:
            if tag in _SCRIPT_MARKS and self._in != "pmid":
                self.data(_SCRIPT_MARKS[tag][0], mark=True)
        elif (kind := _TITLE_PATHS.get(path)) and kind not in self._seen:
            self._in = kind
        elif path in _ABSTRACT_PATHS:
            self._in, self._texts["part"], self._label = "part", [], attrib.get("Label")
        elif path in _PMID_PATHS or path == ("DeleteCitation", "PMID"):
            self._in, self._texts["pmid"] = "pmid", []

    def data(self, text: str, mark: bool = False) -> None:
        if self._in is None:
            return
        if self._in == "pmid":
            if sum(map(len, self._texts["pmid"])) < 64:  # a PMID is at most 8 digits: never hold more
                self._texts["pmid"].append(text)
            return
        if not mark:
            self._hash.update(text.encode("utf-8", "surrogatepass"))
            self._size += len(text)
        if self._size > self.limit:  # too large: hash what passes, hold none of it
            self._too_large, self._sections = True, []
            self._texts.update(title=[], book_title=[], part=[])
        elif not self._too_large:
            self._texts[self._in].append(text)

    def end(self, tag: str) -> None:
        path = self._path()
        if self._in is not None and tag in _SCRIPT_MARKS and path not in _ABSTRACT_PATHS:
            if self._in != "pmid":
                self.data(_SCRIPT_MARKS[tag][1], mark=True)
        elif self._in in ("title", "book_title") and _TITLE_PATHS.get(path) == self._in:
            self._seen.add(self._in)
            self._in = None
        elif self._in == "part" and path in _ABSTRACT_PATHS:
            body = render_scripts("".join(self._texts["part"])).strip()
            if body and not self._too_large:
                self._sections.append(f"{self._label}: {body}" if self._label else body)
            self._in, self._texts["part"] = None, []
        elif self._in == "pmid":
            value = "".join(self._texts["pmid"]).strip()
            if path == ("DeleteCitation", "PMID"):
                if value.isdigit():
                    self.deleted.append(int(value))
            elif self._pmid is None:
                self._pmid = value
            self._in = None
        elif self._root == len(self._tags) - 1:
            self.done.append((self._record(tag), self._hash.digest()))
            self._root = None
        self._tags.pop()

    def _record(self, root: str) -> PubmedRecord:
        title = render_scripts("".join(self._texts["title"])).strip()
        if not title and root == "PubmedBookArticle":
            title = render_scripts("".join(self._texts["book_title"])).strip()
        pmid = pmid_number(self._pmid or "") or None
        abstract = "" if self._too_large else "\n".join(self._sections)
        return PubmedRecord(
            pmid, "" if self._too_large else title, abstract, self._too_large, root != "PubmedArticle"
        )

    def close(self) -> None:
        pass


def pubmed_records(path: str, opts: _Reading, deleted: list[int] | None = None) -> Iterator[PubmedRecord]:
    """Each PubmedArticle and PubmedBookArticle of a baseline/update file, streaming; each is digested just
    before it is handed out. `deleted`, when given, receives the PMIDs of the file's DeleteCitation blocks."""
    target = _PubmedArticles(opts.max_record_bytes)
    # expat does not fetch external DTDs or entities, so the DOCTYPE pointing at dtd.nlm.nih.gov is never
    # resolved: no network access and no XXE.
    parser = ET.XMLParser(target=target)
    with _open_binary(path, opts.tap) as stream:
        fed, handed_out = 0, 0  # XML bytes given to the parser; articles handed out
        while True:
            chunk = stream.read(64 * 1024)
            failure: Exception | None = None
            try:
                if chunk:
                    parser.feed(chunk)
                else:
                    parser.close()
            except (ET.ParseError, _TooDeep) as err:
                failure = err
            # Articles that ended before a failure in this chunk are whole: hand them out first.
            for record, article_hash in target.done:
                opts.digest.add(article_hash)
                handed_out += 1
                yield record
            target.done.clear()
            if deleted is not None:
                deleted += target.deleted
            target.deleted.clear()
            if isinstance(failure, ET.ParseError):
                line, column = failure.position
                raise UnreadableFile(
                    f"{path}: malformed XML at line {line}, column {column}; the file may be truncated, "
                    "re-download it",
                    f"malformed XML at line {line}, column {column}",
                ) from failure
            if failure is not None:  # (the C parser does not say the line: the bytes and article locate it)
                where = f"in article {handed_out + 1}, XML bytes {fed}-{fed + len(chunk)}"
                raise UnreadableFile(
                    f"{path}: XML nested deeper than {MAX_XML_DEPTH} elements ({where}); is it a PubMed"
                    " baseline/update file? fix or re-download it",
                    f"XML nested deeper than {MAX_XML_DEPTH} elements, {where}",
                ) from None
            fed += len(chunk)
            if not chunk:
                return


def _read_pubmed(
    path: str, field: str | None, keep: Callable[[int], bool], start: int, opts: _Reading
) -> Iterator[Record]:
    index = opts.pubmed
    seen: Counter[int] = Counter()  # occurrences so far of the PMIDs the index skips
    pmids, deleted = PmidDigest(), []
    records = pubmed_records(path, opts, deleted)
    position = -1
    while True:
        try:
            record = next(records, None)
        except UnreadableFile as err:
            # The scan counted the citations past the damage: they are lost, and (when they were later
            # versions) so are the earlier versions they replace. Say how many, so they count as bad data.
            lost = index.citations - pmids.count if index is not None else 0
            raise UnreadableFile(str(err), err.cause, max(lost, 0)) from err
        if record is None:
            break
        position += 1
        pmid = record.pmid or 0
        pmids.add(pmid)
        replaced = None
        if index is not None and pmid in index.skip:
            seen[pmid] += 1
            reason, first = index.skip[pmid]
            replaced = reason if seen[pmid] <= first else None
        if not keep(position):
            continue
        where = f"{path}:article {position + 1}"
        if replaced:
            yield position, Skip(replaced, where)
        elif record.too_large:
            yield position, Skip("too_large", where)
        elif opts.require_abstract and not record.abstract:
            yield position, Skip("no_abstract", where)
        elif not record.text and record.title == NOT_AVAILABLE:
            yield position, Skip("not_available", where)
        else:
            yield position, _as_text(record.text, where)
    if index is None:
        return
    deletions = PmidDigest()
    for pmid in deleted:
        deletions.add(pmid)
    parsed = (pmids.count, pmids.value, deletions.count, deletions.value)
    if parsed != (index.citations, index.digest, index.deletions, index.deletions_digest):
        raise DataFileError(
            f"{path}: its citations or deletions ({pmids.count} and {deletions.count}) differ, in number or in"
            f" PMIDs, from the update index's scan at start-up ({index.citations} and {index.deletions}): the"
            " file changed during the run, or it writes PMIDs in a way the scan reads otherwise; restore or"
            " re-download it, then resume"
        )
