"""Synthetic corpora laid out exactly as their distributors ship them, with every sidecar file of each download.

    python -m mellama_train.sample_data.downloads OUT     # writes OUT/{pubmed,mimic-iv-note,mimic-cxr,redpajama}

The text is the shipped synthetic sample data (this package's sample_data: no real patient data, nothing
copied), re-laid-out in the directory trees, file formats and columns of the real downloads, so that a recipe
written against these trees reads the real ones unchanged:

- `pubmed/`: NCBI's FTP mirror (ftp.ncbi.nlm.nih.gov/pubmed/): `baseline/pubmed25nNNNN.xml.gz` and
  `updatefiles/`, a `.md5` beside each file and a README.txt in each folder. The XML has the real element
  structure (MedlineCitation, PMID with Version, labelled AbstractText, CommentsCorrections citing other
  PMIDs, PubmedData), superscripts, a PubmedBookArticle, a "[Not Available]." title, title-only citations,
  and an update file that revises three PMIDs and deletes two.
- `mimic-iv-note/`: PhysioNet's mimic-iv-note/2.2 tree: LICENSE.txt, SHA256SUMS.txt, `note/discharge.csv.gz`
  (note_type DS), `note/radiology.csv.gz` (RR reports and AR addenda), and the two `*_detail.csv.gz` tables.
- `mimic-cxr/`: PhysioNet's mimic-cxr/2.0.0 reports: `files/pNN/pSUBJECT/sSTUDY.txt`, with LICENSE.txt,
  SHA256SUMS.txt, cxr-record-list.csv.gz and cxr-study-list.csv.gz at the root.
- `redpajama/`: a RedPajama-Data-1T sample: one jsonl per subset (`arxiv_sample.jsonl`, ...), each record
  `{"text", "meta": {"redpajama_set_name", ...}}`, and the urls.txt it was fetched with.

`write_all` returns what each tree holds, for tests: the data files, and the counts a reader should find.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

from mellama_train.sample_data import SAMPLE_DATA_DIR

PUBMED_PER_FILE = 30
REDPAJAMA_SETS = ("ArXiv", "Book", "C4", "CommonCrawl", "GitHub", "StackExchange", "Wikipedia")


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)  # byte-identical on every run


def _csv_gz(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_gzip(buffer.getvalue().encode()))


def _sample_jsonl(*parts: str) -> Iterator[dict]:
    path = SAMPLE_DATA_DIR.joinpath(*parts)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        yield from (json.loads(line) for line in fh if line.strip())


def _sample_notes() -> list[dict[str, str]]:
    with gzip.open(SAMPLE_DATA_DIR / "mimic" / "discharge.csv.gz", "rt", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# ---- PubMed ------------------------------------------------------------------------------------------------


def _citation(pmid: int, title: str, abstract: list[tuple[str | None, str]], version: int = 1) -> str:
    """One PubmedArticle as NCBI writes it; `title` and abstract parts are XML already (markup allowed)."""
    parts = "".join(
        f'<AbstractText Label="{label}" NlmCategory="{label}">{text}</AbstractText>'
        if label
        else f"<AbstractText>{text}</AbstractText>"
        for label, text in abstract
    )
    abstract_xml = f"\n      <Abstract>{parts}</Abstract>" if abstract else ""
    return f"""  <PubmedArticle>
    <MedlineCitation Status="MEDLINE" Owner="NLM" IndexingMethod="Automated">
      <PMID Version="{version}">{pmid}</PMID>
      <DateCompleted><Year>2024</Year><Month>01</Month><Day>15</Day></DateCompleted>
      <Article PubModel="Print-Electronic">
      <Journal><ISSN IssnType="Electronic">0000-0000</ISSN><Title>Journal of Synthetic Medicine</Title></Journal>
      <ArticleTitle>{title}</ArticleTitle>{abstract_xml}
      <AuthorList CompleteYN="Y"><Author ValidYN="Y"><LastName>Example</LastName><Initials>A</Initials></Author></AuthorList>
      <Language>eng</Language>
      </Article>
      <CommentsCorrectionsList><CommentsCorrections RefType="Cites"><PMID Version="1">{pmid - 1}</PMID></CommentsCorrections></CommentsCorrectionsList>
    </MedlineCitation>
    <PubmedData><PublicationStatus>ppublish</PublicationStatus><ArticleIdList><ArticleId IdType="pubmed">{pmid}</ArticleId></ArticleIdList></PubmedData>
  </PubmedArticle>
"""


def _book(pmid: int, book: str, chapter: str, abstract: str) -> str:
    return f"""  <PubmedBookArticle>
    <BookDocument>
      <PMID Version="1">{pmid}</PMID>
      <Book><Publisher><PublisherName>Synthetic Press</PublisherName></Publisher><BookTitle book="synth">{book}</BookTitle></Book>
      <ArticleTitle book="synth" part="ch1">{chapter}</ArticleTitle>
      <Abstract><AbstractText>{abstract}</AbstractText></Abstract>
    </BookDocument>
    <PubmedBookData><PublicationStatus>ppublish</PublicationStatus></PubmedBookData>
  </PubmedBookArticle>
"""


def _pubmed_file(path: Path, body: str, deleted: list[int] = ()) -> None:
    if deleted:
        pmids = "".join(f'<PMID Version="1">{p}</PMID>' for p in deleted)
        body += f"  <DeleteCitation>{pmids}</DeleteCitation>\n"
    xml = (
        '<?xml version="1.0" ?>\n<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN"'
        ' "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n'
        f"<PubmedArticleSet>\n{body}</PubmedArticleSet>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_gzip(xml.encode()))
    digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    (path.parent / f"{path.name}.md5").write_text(f"MD5({path.name})= {digest}\n")


def _split_abstract(text: str) -> tuple[str, list[tuple[str | None, str]]]:
    title, _, body = text.partition("\n\n")
    parts: list[tuple[str | None, str]] = []
    for line in body.splitlines():
        label, sep, rest = line.partition(": ")
        if sep and label.isupper():
            parts.append((label, escape(rest)))
        elif line.strip():
            parts.append((None, escape(line)))
    return escape(title), parts


def pubmed(root: Path) -> dict:
    """NCBI's baseline + update files. Returns the data files and what reading them must give."""
    docs = list(_sample_jsonl("pubmed", "train", "part-0000.jsonl"))[: 2 * PUBMED_PER_FILE]
    citations = [(int(doc["pmid"]), *_split_abstract(doc["text"])) for doc in docs]
    special = [
        (
            citations[0][0],
            "Colony counts above 10<sup>6</sup> CFU/mL of CO<sub>2</sub>-tolerant strains",
            citations[0][2],
        ),
        (citations[1][0], "[Not Available].", citations[1][2]),  # no title: the abstract alone is trained
        (citations[2][0], citations[2][1], []),  # title only
        (citations[3][0], "[Not Available].", []),  # nothing at all
    ]
    citations[:4] = special
    for n, chunk in enumerate((citations[:PUBMED_PER_FILE], citations[PUBMED_PER_FILE:]), start=1):
        body = "".join(_citation(*c) for c in chunk)
        if n == 2:
            body += _book(
                99000001, "Synthetic Clinical Methods", "Measuring the pulse", "A chapter on the pulse."
            )
        _pubmed_file(root / "baseline" / f"pubmed25n{n:04d}.xml.gz", body)
    revised = [citations[5], citations[40], citations[41]]
    deleted = [citations[6][0], citations[45][0]]
    body = "".join(_citation(pmid, f"{title} (revised)", abstract, 2) for pmid, title, abstract in revised)
    _pubmed_file(root / "updatefiles" / "pubmed25n0003.xml.gz", body, deleted)
    for folder in ("baseline", "updatefiles"):
        (root / folder / "README.txt").write_text(
            "PubMed data files: terms and conditions at https://www.nlm.nih.gov/databases/download/terms_and_conditions.html\n"
        )
    xml = sorted(str(p) for p in root.rglob("*.xml.gz"))
    total = len(citations) + 1 + len(revised)  # + the book, + the revised versions
    return {
        "files": xml,
        "citations": total,
        "superseded": len(revised),
        "deleted": len(deleted),
        "not_available": 1,  # "[Not Available]." and no abstract: nothing to train on
        "no_abstract": 2,  # with require_abstract: the title-only citation and the one above
        "trained": total - len(revised) - len(deleted) - 1,
    }


# ---- MIMIC-IV-Note and MIMIC-CXR --------------------------------------------------------------------------

NOTE_COLUMNS = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
DETAIL_COLUMNS = ["note_id", "subject_id", "field_name", "field_value", "field_ordinal"]


def _cxr_reports() -> list[tuple[str, str]]:
    return [
        (p.stem, p.read_text(encoding="utf-8"))
        for p in sorted((SAMPLE_DATA_DIR / "mimic" / "cxr").glob("*.txt"))
    ]


def _physionet_sidecars(root: Path, files: list[Path]) -> None:
    (root / "LICENSE.txt").write_text("PhysioNet Credentialed Health Data License 1.5.0 (synthetic sample)\n")
    sums = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}\n" for p in files
    )
    (root / "SHA256SUMS.txt").write_text(sums)


def mimic_iv_note(root: Path) -> dict:
    """physionet.org/files/mimic-iv-note/2.2/: discharge (DS) and radiology (RR reports, AR addenda)."""
    notes = _sample_notes()
    discharge = [[n[c] for c in NOTE_COLUMNS] for n in notes]
    radiology = []
    for i, (study, report) in enumerate(_cxr_reports()):
        subject = f"1{i:07d}"
        radiology.append(
            [f"{subject}-RR-{i + 1}", subject, "", "RR", str(i + 1), "2150-01-01 10:00:00", "", report]
        )
        if i % 4 == 0:  # an addendum to every fourth report
            addendum = f"ADDENDUM: the findings of study {study} were discussed with the team."
            radiology.append([f"{subject}-AR-{i + 2}", subject, "", "AR", str(i + 2), "", "", addendum])
    note = root / "note"
    _csv_gz(note / "discharge.csv.gz", NOTE_COLUMNS, discharge)
    _csv_gz(note / "radiology.csv.gz", NOTE_COLUMNS, radiology)
    _csv_gz(
        note / "discharge_detail.csv.gz",
        DETAIL_COLUMNS,
        [[r[0], r[1], "author", "___", "1"] for r in discharge],
    )
    _csv_gz(
        note / "radiology_detail.csv.gz",
        DETAIL_COLUMNS,
        [[r[0], r[1], "exam_name", "CHEST (PA AND LAT)", "1"] for r in radiology],
    )
    _physionet_sidecars(root, sorted(note.glob("*.csv.gz")))
    return {
        "files": [str(note / "discharge.csv.gz"), str(note / "radiology.csv.gz")],
        "DS": len(discharge),
        "RR": sum(r[3] == "RR" for r in radiology),
        "AR": sum(r[3] == "AR" for r in radiology),
    }


def mimic_cxr(root: Path) -> dict:
    """physionet.org/files/mimic-cxr/2.0.0/: one report per study under files/, lists and sidecars at the root."""
    reports = []
    for i, (study, report) in enumerate(_cxr_reports()):
        subject = f"p1{i % 10}{i:06d}"
        path = root / "files" / subject[:3] / subject / f"{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report, encoding="utf-8")
        reports.append(path)
    records = [
        [p.parent.name[1:], p.stem[1:], f"{i:08x}-dicom", f"files/{p.parent.parent.name}"]
        for i, p in enumerate(reports)
    ]
    _csv_gz(root / "cxr-record-list.csv.gz", ["subject_id", "study_id", "dicom_id", "path"], records)
    _csv_gz(
        root / "cxr-study-list.csv.gz", ["subject_id", "study_id", "path"], [r[:2] + [r[3]] for r in records]
    )
    _physionet_sidecars(root, sorted(root.glob("*.csv.gz")))
    return {"files": sorted(str(p) for p in reports), "reports": len(reports)}


# ---- RedPajama ---------------------------------------------------------------------------------------------


def redpajama(root: Path) -> dict:
    """A RedPajama-Data-1T sample: one jsonl per subset, records with `meta.redpajama_set_name`."""
    docs = list(_sample_jsonl("redpajama", "heldout.jsonl"))
    root.mkdir(parents=True, exist_ok=True)
    by_set: dict[str, int] = {}
    for n, name in enumerate(REDPAJAMA_SETS):
        chunk = docs[n :: len(REDPAJAMA_SETS)]
        lines = [
            json.dumps(
                {"text": d["text"], "meta": {"redpajama_set_name": f"RedPajama{name}", "language": "en"}}
            )
            for d in chunk
        ]
        (root / f"{name.lower()}_sample.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        by_set[f"RedPajama{name}"] = len(chunk)
    (root / "urls.txt").write_text(
        "".join(
            f"https://data.together.xyz/redpajama-data-1T/v1.0.0/sample/{n.lower()}_sample.jsonl\n"
            for n in REDPAJAMA_SETS
        )
    )
    return {"files": sorted(str(p) for p in root.glob("*.jsonl")), "by_set": by_set}


def write_all(out: Path) -> dict[str, dict]:
    """Every download under `out`; returns, per download, its data files and the counts a reader must find."""
    return {
        "pubmed": pubmed(out / "pubmed"),
        "mimic-iv-note": mimic_iv_note(out / "mimic-iv-note"),
        "mimic-cxr": mimic_cxr(out / "mimic-cxr"),
        "redpajama": redpajama(out / "redpajama"),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mellama_train.sample_data.downloads OUT_DIR")
    target = Path(sys.argv[1])
    if target.exists() and any(target.iterdir()):
        sys.exit(f"{target}: not empty; give a new directory (nothing is overwritten)")
    for name, info in write_all(target).items():
        print(f"{target / name}: {len(info['files'])} data file(s)")
