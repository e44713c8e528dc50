"""Why a record was not trained on: the fixed list of reasons every count, metric and status line uses.

Two kinds: a record that could not be used (bad data, held against data.max_skip_fraction) and a record the
recipe chose to leave out (a filter, never limited). Metrics count them per source as `data/skipped/<source>`
and `data/filtered/<source>`, and per reason as `data/reasons/<source>/<reason>`. The order is fixed because
the per-step all-reduce of the counts sums one vector slot per reason on every rank.
"""

from __future__ import annotations

FILTER_REASONS = (
    "not_selected",  # the source's `where` left it out
    "no_abstract",  # PubMed, require_abstract: a title-only citation
    "not_available",  # PubMed: NLM's "[Not Available]." title and no abstract, nothing to train on
    "too_short",  # under the source's min_chars after cleaning
    "superseded",  # PubMed: a later update file has a newer version of this PMID (data/pubmed.py)
    "deleted",  # PubMed: a later update file deletes this PMID
    "too_long",  # (tune) longer than seq_len, data.overflow: drop
    "contaminated",  # shares an n-gram with a benchmark (data.decontamination)
)
"""Skip reasons that are the recipe's choice (or NCBI's rule for its update files), not bad data: counted as `data/filtered/<source>` and never
held against data.max_skip_fraction."""
SKIP_REASONS = (
    "bad_json",
    "bad_utf8",
    "too_deep",
    "missing_field",
    "empty",
    "not_text",
    "bad_text",
    "too_large",
    "unreadable_remainder",
    "tokenizer_rejected",
    "bad_messages",
    "bad_history",
    "no_response",
    "template_rejected",
)
"""Skip reasons that say a record could not be used: counted as `data/skipped/<source>`, limited by
data.max_skip_fraction. (A reason in neither tuple is counted as a skip, under "other".)"""
REASONS = (*SKIP_REASONS, *FILTER_REASONS, "other")
"""Every counted reason, in the order of the all-reduced vector."""


def is_filter(reason: str) -> bool:
    """True for a reason the recipe chose (a filter), False for a record that could not be used."""
    return reason in FILTER_REASONS
