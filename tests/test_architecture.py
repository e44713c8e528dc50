"""Walls the code keeps, read from the imports (tools/arch_metrics.py): a change that breaks one fails here."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import arch_metrics  # noqa: E402

# The training loop and the parts it calls: none may import a concrete backend.
LOOP = [
    "train",
    "step",
    "accounting",
    "checkpointing",
    "startup",
    "checkpoint",
    "evaluation",
    "export.final",
    "lora",
    "feed",
]
# What data/ may never import (top-level names): the loop's side, the backends, the guard, the exports.
BACKEND_SIDE = {"train", "step", "accounting", "checkpointing", "startup", "checkpoint", "lora", "export"}
BACKEND_SIDE |= {"backends", "guard"}
# No import cycle is left (issue 16 broke up config <-> data <-> ds_config <-> plan), and none may appear.
KNOWN_CYCLE: set[str] = set()


def _imports(module: str) -> set[str]:
    path = arch_metrics.PACKAGE / (module.replace(".", "/") + ".py")
    return arch_metrics.imports_of(ast.parse(path.read_text()), f"mellama_train.{module}")


def test_only_the_deepspeed_backend_imports_deepspeed():
    importers = arch_metrics.measure()["import_deepspeed"]
    inside = ("mellama_train.backends.deepspeed", "mellama_train.backends.deepspeed.")
    assert importers and all(m == inside[0] or m.startswith(inside[1]) for m in importers), importers


def test_every_deepspeed_import_goes_through_load_first():
    """`import deepspeed` pulls in mlflow (its autotuner) unless backends.deepspeed.load() imports it first."""
    offenders = []
    for path in sorted((arch_metrics.PACKAGE / "backends" / "deepspeed").glob("*.py")):
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, ast.FunctionDef) or func.name == "load":
                continue
            loaded = False
            for node in func.body:
                calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
                loaded |= any(getattr(c.func, "id", None) == "load" for c in calls)
                names = [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
                module = node.module if isinstance(node, ast.ImportFrom) else None
                if (module or "").split(".")[0] == "deepspeed" or "deepspeed" in names:
                    if not loaded:
                        offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
    module_level = [
        p.name
        for p in (arch_metrics.PACKAGE / "backends" / "deepspeed").glob("*.py")
        for node in ast.parse(p.read_text()).body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and (
            (getattr(node, "module", None) or "").startswith("deepspeed")
            or "deepspeed" in [a.name for a in node.names]
        )
    ]
    assert not module_level, module_level


def test_importing_deepspeed_through_load_leaves_mlflow_unimported_and_importable(tmp_path):
    """A planted `mlflow` package that records its import: DeepSpeed's import does not run it, ours can."""
    import subprocess

    fake = tmp_path / "mlflow"
    fake.mkdir()
    (fake / "__init__.py").write_text("import os\nopen(os.environ['MARK'], 'a').write('imported\\n')\n")
    code = (
        "import sys, os\n"
        "from mellama_train.backends.deepspeed import load\n"
        "load()\n"
        "assert 'deepspeed' in sys.modules\n"
        "assert not os.path.exists(os.environ['MARK']), 'deepspeed imported mlflow'\n"
        "import mlflow\n"
        "assert os.path.exists(os.environ['MARK'])\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "MARK": str(tmp_path / "mark")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Without the guard, the same planted package is imported by `import deepspeed` (the test can fail).
    plain = subprocess.run(
        [sys.executable, "-c", "import os, deepspeed; assert os.path.exists(os.environ['MARK'])"],
        env={**env, "MARK": str(tmp_path / "mark2")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]


def test_the_loop_and_its_parts_import_no_concrete_backend():
    for module in LOOP:
        concrete = {m for m in _imports(module) if m.startswith(arch_metrics.CONCRETE_BACKENDS)}
        assert not concrete, (module, concrete)
    # Only the export command (reading ZeRO files offline) and the planner (DeepSpeed's estimator) may.
    assert set(arch_metrics.measure()["import_concrete_backend"]) <= {
        "mellama_train.export.verified",
        "mellama_train.plan",
    }


def test_the_config_imports_nothing_else_of_the_package():
    """config/ is plain data and its resolution: the checks that read the disk and every other layer live above
    it (preflight.py), so any module can import the config without pulling in the rest."""
    for path in sorted((arch_metrics.PACKAGE / "config").glob("*.py")):
        name = arch_metrics.module_name(path)
        own = {
            m
            for m in arch_metrics.imports_of(ast.parse(path.read_text()), name)
            if m.startswith("mellama_train") and not m.startswith("mellama_train.config")
        }
        assert not own, (name, own)


def test_metrics_receive_numbers_only(tmp_path):
    """The metrics writer imports nothing that holds text of the data, and keeps numbers only: a text value
    handed to it never reaches metrics.jsonl or TensorBoard."""
    from mellama_train.metrics import MetricsLogger

    assert not {m for m in _imports("metrics") if m.startswith("mellama_train.data")}
    logger = MetricsLogger(tmp_path, True)
    logger.log(3, {"train/loss": 1.5, "leak": "Pt is a 67 yo woman", "other": b"bytes", "nan": float("nan")})
    logger.close()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"67 yo" not in written and b"bytes" not in written
    assert b'"train/loss": 1.5' in (tmp_path / "metrics.jsonl").read_bytes()


def test_the_data_pipeline_never_reaches_into_the_training_backend():
    figures = arch_metrics.measure()
    graph = {}
    for path in sorted((arch_metrics.PACKAGE / "data").glob("*.py")):
        name = arch_metrics.module_name(path)
        graph[name] = arch_metrics.imports_of(ast.parse(path.read_text()), name)
    reached = {
        (name, dep)
        for name, deps in graph.items()
        for dep in deps
        if dep.split(".")[1:2] and dep.split(".")[1] in BACKEND_SIDE
    }
    assert not reached, reached
    assert figures["modules"] > 30  # the reader found the package


def test_no_import_cycle():
    cycles = arch_metrics.measure()["import_cycles"]
    assert all(set(cycle) <= KNOWN_CYCLE for cycle in cycles), cycles


def test_no_module_imports_one_of_a_higher_layer():
    """Foundation < config < data < backends and model < the training side < the command line
    (tools/arch_metrics.py LAYERS): a lower layer that reaches up is how the old config <-> plan circle began."""
    assert arch_metrics.measure()["upward_imports"] == []
    assert arch_metrics.layer_of("mellama_train.data.source") < arch_metrics.layer_of("mellama_train.train")


def test_the_entry_points_use_the_public_cli_only():
    for path in (REPO / "launch").glob("*.py"):
        imported = {
            m
            for m in arch_metrics.imports_of(ast.parse(path.read_text()), "launch")
            if m.startswith("mellama")
        }
        assert imported <= {
            "mellama_train.cli",
            "mellama_train.cli.pretrain_main",
            "mellama_train.cli.tune_main",
        }, path


def test_the_cycle_finder_finds_cycles_and_nothing_else():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["d"], "f": ["g"], "g": ["f"]}
    assert arch_metrics.cycles(graph) == [["a", "b", "c"], ["f", "g"]]
    tree = ast.parse(
        "import os\ndef f():\n    from mellama_train.data import source\n    from . import step\n"
    )
    found = arch_metrics.imports_of(tree, "mellama_train.cli")
    assert {
        "mellama_train.data.source",
        "mellama_train.step",
        "os",
    } <= found  # lazy and relative imports count
