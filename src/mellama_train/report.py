"""`mellama-train report RUN_DIR [--out DIR]`: a self-contained HTML page and PNG plots of a run, from its
metrics.jsonl, run record and newest checkpoint, without a TensorBoard server (the page embeds its plots, so
it can be mailed or attached to a lab notebook as one file).

Plots: loss per source (train lines, held-out markers), learning rate, throughput (tokens/s, and MFU on GPU
runs), each source's share of the mixture against its target, skipped records and steps. Only numbers are
read and drawn: no training text reaches the report.
"""

from __future__ import annotations

import base64
import html
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mellama_train.metrics import finite_number, read_metrics
from mellama_train.outputs import latest_run_record
from mellama_train.status import read_run_record
from mellama_train.status import report as status_report

log = logging.getLogger(__name__)

Series = dict[str, tuple[list[int], list[float]]]


def _series(metrics: dict[int, dict[str, Any]], prefix: str) -> Series:
    """{name after the prefix: (steps, values)} for every finite numeric key that starts with `prefix`."""
    out: Series = {}
    for step in sorted(metrics):
        for key, value in metrics[step].items():
            if key.startswith(prefix) and (number := finite_number(value)) is not None:
                steps, values = out.setdefault(key[len(prefix) :] or key, ([], []))
                steps.append(step)
                values.append(number)
    return out


def _key(metrics: dict[int, dict[str, Any]], key: str, label: str) -> Series:
    """One metric as {label: (steps, values)} where it is a finite number, or {} when it never was."""
    steps = [s for s in sorted(metrics) if finite_number(metrics[s].get(key)) is not None]
    values = [float(metrics[s][key]) for s in steps]
    return {label: (steps, values)} if steps else {}


def _plot(path: Path, title: str, ylabel: str, draw: Callable[[Any], bool]) -> bool:
    """One PNG; False (and no file) when there was nothing to draw, or it cannot be drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=110)
    try:
        # Finite values far apart (1e308 and -1e308 in an edited metrics.jsonl) overflow the axis arithmetic:
        # that plot is left out, with one line, rather than the report lost or numpy's warnings printed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if not draw(ax):
                return False
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(path)
        return True
    except (ValueError, OverflowError) as exc:
        log.warning("report: %s left out: its values cannot be drawn (%s)", path.name, exc)
        path.unlink(missing_ok=True)
        return False
    finally:
        plt.close(fig)


def _lines(series: Series, style: str = "-", label: str = "{}") -> Callable[[Any], bool]:
    def draw(ax: Any) -> bool:
        for name, (steps, values) in series.items():
            ax.plot(steps, values, style, label=label.format(name), markersize=4)
        return bool(series)

    return draw


def make_plots(metrics: dict[int, dict[str, Any]], targets: dict[str, float], out: Path) -> list[Path]:
    """The run's PNG plots in `out`; returns the files written."""
    train, held_out = _series(metrics, "train/loss/"), _series(metrics, "eval/loss/")

    def losses(ax: Any) -> bool:  # one colour per source: solid for training, dashed markers held-out
        names = list(dict.fromkeys([*targets, *train, *held_out]))
        for i, name in enumerate(names):
            colour = f"C{i % 10}"
            if name in train:
                ax.plot(*train[name], "-", color=colour, label=f"train {name}")
            if name in held_out:
                ax.plot(*held_out[name], "o--", color=colour, markersize=4, label=f"held-out {name}")
        return bool(train or held_out)

    def shares(ax: Any) -> bool:
        series = _series(metrics, "data/share/")
        for name, (steps, values) in series.items():
            (line,) = ax.plot(steps, values, label=f"{name} (target {targets.get(name, 0):.1%})")
            if name in targets:
                ax.axhline(targets[name], color=line.get_color(), linestyle=":", linewidth=1)
        return bool(series)

    def skips(ax: Any) -> bool:
        records = {k: v for k, v in _series(metrics, "data/skipped/").items() if "/" not in k}
        chosen = {k: v for k, v in _series(metrics, "data/filtered/").items() if "/" not in k}
        dropped = _series(metrics, "data/decontaminated/")
        steps = _key(metrics, "train/skipped_steps", "optimizer steps skipped")
        _lines(records, "-", "records skipped: {}")(ax)
        _lines(chosen, "--", "records filtered: {}")(ax)
        _lines(dropped, ":", "of which decontaminated: {}")(ax)
        _lines(steps)(ax)
        return bool(records or chosen or steps)

    def throughput(ax: Any) -> bool:
        speed = _key(metrics, "train/tokens_per_sec", "tokens/s (all ranks)")
        _lines(speed)(ax)
        mfu = _key(metrics, "train/mfu", "MFU")
        if mfu:
            twin = ax.twinx()
            steps, values = mfu["MFU"]
            twin.plot(steps, [100 * v for v in values], color="tab:red", label="MFU")
            twin.set_ylabel("MFU (%)", color="tab:red")
        return bool(speed)

    plots = [
        ("loss.png", "Loss per source", "loss (nats)", losses),
        ("lr.png", "Learning rate", "lr", _lines(_key(metrics, "train/lr", "lr"))),
        ("throughput.png", "Throughput", "tokens/s", throughput),
        ("mixture.png", "Share of the mixture per source (dotted: target)", "share", shares),
        ("skipped.png", "Skipped and filtered records, skipped optimizer steps (run totals)", "count", skips),
    ]
    out.mkdir(parents=True, exist_ok=True)
    return [out / name for name, title, ylabel, draw in plots if _plot(out / name, title, ylabel, draw)]


def write_report(run_dir: Path, out: Path | None = None) -> tuple[Path, list[str]]:
    """Write report.html and the PNGs into `out` (default run_dir/report); returns (the page, the summary
    lines printed on the terminal). ValueError when run_dir is not a run directory."""
    metrics_path = run_dir / "metrics.jsonl"
    if latest_run_record(run_dir) is None or not metrics_path.is_file():
        raise ValueError(
            f"{run_dir}: no run_record.json and metrics.jsonl; pass a run directory (its --output-dir)"
        )
    record = read_run_record(run_dir)
    out = out or run_dir / "report"
    metrics = read_metrics(metrics_path)
    pngs = make_plots(metrics, record.targets, out)
    summary, alarms = status_report(run_dir)

    images = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.name)}</figcaption></figure>'
        for p in pngs
    )
    title = f"{run_dir.name}: {record.task}, profile {record.profile}"
    alarm_html = (
        "<ul class=alarm>" + "".join(f"<li>{html.escape(a)}</li>" for a in alarms) + "</ul>" if alarms else ""
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
pre {{ background: #f6f6f6; padding: 1rem; overflow-x: auto; }}
figure {{ margin: 1rem 0; }} img {{ max-width: 100%; }} .alarm {{ color: #b00020; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Made by <code>mellama-train report</code> from <code>{html.escape(str(run_dir))}</code>: metrics.jsonl, the run
record and the newest checkpoint. The full configuration is in the run's run_record.json.</p>
{alarm_html}
<h2>Status</h2>
<pre>{html.escape(chr(10).join(summary))}</pre>
<h2>Plots</h2>
{images}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path, summary
