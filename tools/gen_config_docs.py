"""Write docs/CONFIG.md from the config dataclasses' field docstrings, so the reference cannot drift.

python tools/gen_config_docs.py            # rewrite docs/CONFIG.md
python tools/gen_config_docs.py --check    # exit 1 if docs/CONFIG.md is stale (the tests run this)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_PY = REPO / "src" / "mellama_train" / "config" / "schema.py"
OUT = REPO / "docs" / "CONFIG.md"
# Section name in YAML -> dataclass, in the order a recipe reads.
SECTIONS = [
    ("(top level)", "Config"),
    ("model", "ModelConfig"),
    ("model.arch", "ArchConfig"),
    ("lora", "LoraConfig"),
    ("data", "DataConfig"),
    ("data.sources[]", "SourceConfig"),
    ("optim", "OptimConfig"),
    ("train", "TrainConfig"),
]


def field_docs(tree: ast.Module) -> dict[str, list[tuple[str, str, str, str]]]:
    """class name -> [(field, type, default, docstring)] from `name: type = default` + the string below it."""
    out: dict[str, list[tuple[str, str, str, str]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        rows, body = [], node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = ""
                nxt = body[i + 1] if i + 1 < len(body) else None
                if (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    doc = " ".join(nxt.value.value.split())
                default = ast.unparse(stmt.value) if stmt.value is not None else ""
                if default.startswith("field("):
                    default = default.replace("field(default_factory=lambda: ", "").replace(
                        "field(default_factory=", ""
                    )
                    default = default.rstrip(")") if default.count(")") > default.count("(") else default
                rows.append((stmt.target.id, ast.unparse(stmt.annotation), default, doc))
        out[node.name] = rows
    return out


def render() -> str:
    docs = field_docs(ast.parse(CONFIG_PY.read_text()))
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/mellama_train/config/schema.py` by `python tools/gen_config_docs.py`; do not edit by hand.",
        "",
        "Resolution (later wins): dataclass defaults ← profile (`--profile`, `src/mellama_train/profiles/<task>/*.yaml`)"
        " ← recipe (`--config`) ← flags (`--output-dir`, `--max-steps`, ...) ← `--set key.sub=value`.",
        "List items are addressed by index or by source name: `--set data.sources.mimic.weight=2`.",
        "`${sample_data}` in a path is the sample data shipped inside the package.",
        "",
    ]
    for section, cls in SECTIONS:
        lines += [f"## `{section}`", "", "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, typ, default, doc in docs[cls]:
            if typ.endswith("Config") or typ == "list[SourceConfig]":
                continue
            lines.append(
                f"| `{name}` | `{typ.replace(' | ', ' or ')}` | `{default}` | {doc.replace('|', '/')} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
