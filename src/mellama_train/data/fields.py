"""A record's fields: the dotted path to a value (into nested JSON or parquet structs), the `where` filter,
and the column names a message may show (only identifier-like ones: a headerless first row is data).
"""

from __future__ import annotations

import json
import re

import pyarrow as pa

from mellama_train.data.files import DataFileError, Skip, _as_text

_ABSENT = object()


_MAX_NESTED_JSON = 1 << 20


def field_value(record: dict, name: str) -> object:
    """A record's value of a field: a key of its own, else a dotted path into nested objects
    (`meta.redpajama_set_name`), also through an object stored as a JSON string (RedPajama's `meta` as the
    Hugging Face copies hold it); _ABSENT when it has neither."""
    if name in record:
        return record[name]
    value: object = record
    for part in name.split("."):
        if isinstance(value, str) and value.lstrip().startswith("{") and len(value) <= _MAX_NESTED_JSON:
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                return _ABSENT
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _as_compared(value: object) -> str | None:
    """A field's value as the text `where` compares: strings as they are, numbers and booleans as YAML
    writes them; None for anything else (absent, null, a list or an object)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value if isinstance(value, str) else None


def is_selected(record: dict, where: dict[str, frozenset[str]] | None) -> bool:
    """True when every `where` field of the record holds one of its allowed values."""
    return not where or all(
        _as_compared(field_value(record, name)) in allowed for name, allowed in where.items()
    )


def _value(
    obj: object, field: str | None, where: str, select: dict[str, frozenset[str]] | None = None
) -> str | dict | Skip:
    """A record's text field, or (field None: record mode) the whole record as a dict; Skip "not_selected"
    for a record the source's `where` leaves out."""
    if not isinstance(obj, dict):
        return Skip("bad_json", where)
    if not is_selected(obj, select):
        return Skip("not_selected", where)
    if field is None:
        return obj
    return _as_text(obj.get(field), where)


_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def describe_columns(columns: list[str]) -> str:
    """A table's column names for a message: at most 8. Names are shown only when every one looks like an
    identifier (`note_id`, `meta.set`): a first line that is data, not a header (a CSV exported without one, a
    JSON line read as CSV), could be a patient's note, and is then only counted, never shown."""
    if not columns:
        return "no columns"
    if len(columns) > 512 or not all(_COLUMN_NAME.fullmatch(name) for name in columns):
        return f"{len(columns)} columns; is its first line a header, and is it CSV?"
    shown = ", ".join(columns[:8])
    return f"columns: {shown}{', ...' if len(columns) > 8 else ''}"


def _require_column(path: str, field: str | None, columns: list[str]) -> None:
    if field is not None and field not in columns:
        raise DataFileError(
            f"{path}: no column {field!r} ({describe_columns(columns)}); set the source's text_field to the"
            " column that holds the text, or if this table is not data (metadata), leave it out with the"
            " source's exclude"
        )


def _where_columns(
    path: str, where: dict[str, frozenset[str]] | None, columns: list[str], nested: bool = True
) -> list[str]:
    """The table columns a source's `where` reads, in its order, each checked to exist (`nested`: a dotted
    name not itself a column reads the struct column of its first part)."""
    needed = []
    for name in where or {}:
        column = name if name in columns or not nested else name.split(".")[0]
        if column not in columns:
            raise DataFileError(
                f"{path}: no column {name!r} for the source's where ({describe_columns(columns)}); name a"
                " column it has, or leave this file out with exclude"
            )
        needed.append(column)
    return needed


def _arrow_selection(
    table: pa.RecordBatch | pa.Table, where: dict[str, frozenset[str]] | None, columns: list[str]
) -> list[bool] | None:
    """Per row of an Arrow batch: does `where` keep it (None: no `where`)."""
    if not where:
        return None
    columns = list(dict.fromkeys(columns))
    values = {name: table.column(name).to_pylist() for name in columns}
    return [is_selected({name: values[name][i] for name in columns}, where) for i in range(table.num_rows)]
