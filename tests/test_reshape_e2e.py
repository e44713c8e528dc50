"""A run over a prepared corpus resumes on another number of ranks (2 -> 1, 2 -> 4 and back to 2) through
DeepSpeed's universal checkpoint, with the same global batch: every sequence of the uninterrupted run is trained
exactly once (by the sequence ids the ranks log), the tokens per source are the same, the first loss after the
move equals the uninterrupted run's up to summation order, and later ones stay as close to it as the same run
started on that many ranks does. Resumed through the conversion on the same world size, the losses are bit-equal.
A streamed run on another world size keeps refusing, pointing at `prepare`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_train_e2e import REPO, TINY, deepspeed_launcher, interrupted_copy, losses, run

from mellama_train.config import resolve
from mellama_train.data.prepared import prepare
from mellama_train.metrics import read_metrics

pytestmark = pytest.mark.slow
LAUNCH = str(REPO / "tests" / "sequence_log_launch.py")
NAMES = ("pubmed", "mimic", "redpajama")
STEPS, BATCH = 8, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    prepare(resolve("tiny"), out, workers=1)
    return out


def launch(out: Path, corpus: Path, ranks: int, *args: str, port: int = 29541, universal: bool = False):
    sets = [a for n in NAMES for a in ("--set", f"data.sources.{n}.prepared={corpus}")]
    cmd = [*deepspeed_launcher(port), LAUNCH, "--ds", "ds_configs/zero3.json", "--output-dir", str(out)]
    cmd[cmd.index("--num_gpus") + 1] = str(ranks)
    cmd += [*TINY, *sets, "--max-steps", str(STEPS), *args]
    env = {"MELLAMA_SEQUENCE_LOG": str(out.parent / f"{out.name}.sequences")}
    return run(cmd, env={**env, "MELLAMA_FORCE_UNIVERSAL": "1"} if universal else env)


def sequences(out: Path) -> list[int]:
    """Every global sequence id the ranks of a run logged, all starts of it together."""
    ids = []
    for path in sorted((out.parent / f"{out.name}.sequences").glob("rank_*.jsonl")):
        ids += [g for line in path.read_text().splitlines() for g in json.loads(line)["rows"]]
    return ids


def first_start_ids(full: Path, resumed: Path, upto: int) -> None:
    """The resumed copy's sequence log starts with the uninterrupted run's ids up to the interruption."""
    log = resumed.parent / f"{resumed.name}.sequences"
    log.mkdir(exist_ok=True)
    kept = [g for g in sequences(full) if g < upto]
    (log / "rank_first.jsonl").write_text(json.dumps({"rows": kept}) + "\n")


def tokens_at(run_dir: Path, step: int) -> dict[str, float]:
    return {n: read_metrics(run_dir / "metrics.jsonl")[step][f"data/tokens/{n}"] for n in NAMES}


def test_a_prepared_run_resumes_on_another_world_size_with_exactly_the_next_sequences(corpus, tmp_path):
    full = tmp_path / "full"
    launch(full, corpus, 2, "--save-every", "4")
    reference = losses(full)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert sorted(sequences(full)) == list(range(STEPS * BATCH))

    # The conversion itself loses nothing: resumed through it on the same 2 ranks, the losses are bit-equal.
    same = interrupted_copy(full, tmp_path / "same", 4, ["checkpoints/step_00000008", "final"])
    launch(same, corpus, 2, port=29542, universal=True)
    assert [losses(same)[s] for s in range(5, STEPS + 1)] == [reference[s] for s in range(5, STEPS + 1)]

    # Interrupted after step 4, resumed on 1 rank, and (another copy) on 4 ranks that save at step 6, whose
    # step-6 checkpoint is resumed on 2 ranks again.
    moved = {}
    for name, ranks in (("one", 1), ("four", 4)):
        resumed = interrupted_copy(full, tmp_path / name, 4, ["checkpoints/step_00000008", "final"])
        launch(resumed, corpus, ranks, "--save-every", "2", port=29543 + ranks)
        moved[ranks] = losses(resumed)
        first_start_ids(full, resumed, upto=4 * BATCH)
        assert sorted(sequences(resumed)) == list(range(STEPS * BATCH)), name  # each sequence exactly once
        assert tokens_at(resumed, STEPS) == tokens_at(full, STEPS)
        # Retention deleted step 4 and its conversion together; DeepSpeed's `latest_universal` pointer is gone.
        kept = sorted(p.name for p in (resumed / "checkpoints").iterdir())
        assert not any(n.endswith(".universal") and n[: -len(".universal")] not in kept for n in kept), kept
        assert "latest_universal" not in kept
        trainer = json.loads((resumed / "checkpoints" / "step_00000008" / "trainer.json").read_text())
        assert trainer["world_size"] == ranks
    back = interrupted_copy(tmp_path / "four", tmp_path / "back", 6, ["checkpoints/step_00000008", "final"])
    launch(back, corpus, 2, port=29549)
    moved[2] = {s: v for s, v in losses(back).items() if s > 6}
    assert sorted(sequences(back)) == list(range(6 * BATCH, STEPS * BATCH))
    assert (back / "checkpoints" / "step_00000006.universal" / "SEAL.json").is_file()  # kept beside it

    # The same weights and the same global batch: step 5 (step 7 after the move back) is the same loss up to the
    # order the ranks sum it in. Later steps differ as much as the same run started on that many ranks does:
    # Adam turns a last-bit difference in a gradient summed over another number of ranks into a visible one.
    fresh = {}
    for ranks in (1, 4):
        fresh[ranks] = losses(launch_fresh(tmp_path / f"fresh{ranks}", corpus, ranks))
    noise = max(abs(fresh[r][s] - reference[s]) for r in fresh for s in reference)
    assert 0 < noise < 0.05 * reference[STEPS], noise
    # Each moved run against the run it continues: 2 -> 1 and 2 -> 4 the uninterrupted one, 4 -> 2 the 4-rank one.
    for after, before in ((moved[1], reference), (moved[4], reference), (moved[2], moved[4])):
        first = min(after)
        assert abs(after[first] - before[first]) <= 1e-6 * before[first], (first, after, before)
        for s in range(first + 1, STEPS + 1):
            assert abs(after[s] - before[s]) <= noise, (s, after[s], before[s], noise)


def launch_fresh(out: Path, corpus: Path, ranks: int) -> Path:
    launch(out, corpus, ranks, port=29550 + ranks)
    return out


def test_a_streamed_run_on_another_world_size_is_refused_pointing_at_prepare(tmp_path):
    full = tmp_path / "streamed"
    cmd = [*deepspeed_launcher(29550), str(REPO / "launch" / "pretrain.py"), "--ds", "ds_configs/zero3.json"]
    run([*cmd, "--output-dir", str(full), *TINY, "--max-steps", "4", "--save-every", "2"])
    out = interrupted_copy(full, tmp_path / "cut", 2, ["checkpoints/step_00000004", "final"])
    cmd[cmd.index("--num_gpus") + 1] = "1"
    proc = run_failing([*cmd, "--output-dir", str(out), *TINY, "--max-steps", "4", "--save-every", "2"])
    assert "its sources are streamed" in proc.stderr and "mellama-train prepare" in proc.stderr


def run_failing(cmd: list[str]):
    import subprocess

    from test_train_e2e import clean_env

    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    return proc


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
