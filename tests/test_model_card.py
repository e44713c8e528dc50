"""Data licenses: from the recipe into checkpoints' trainer.json and the model card beside the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_checkpoint import seal

from mellama_train.config import resolve
from mellama_train.export.model_card import (
    HUB_LICENSES,
    LICENSE_NAME,
    _card_license,
    carry_model_card,
    front_matter,
    write_model_card,
)
from mellama_train.outputs import source_licenses

SYNTHETIC = "synthetic sample data, no patient information"
PHYSIONET = "PhysioNet Credentialed Health Data License 1.5.0"


def test_tiny_profiles_carry_a_license_note_and_new_files_need_their_own(tmp_path):
    for task in ("pretrain", "tune"):
        assert set(source_licenses(resolve("tiny", task=task)).values()) == {SYNTHETIC}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data:\n  sources:\n"
        "    - {name: mimic, paths: [/data/mimic/discharge.csv.gz]}\n"  # real files: the demo's note must go
        f"    - {{name: pubmed, paths: [/data/pubmed/], license: '{PHYSIONET}'}}\n"
        "    - {name: redpajama, weight: 2}\n"  # the profile's files: its note stays
    )
    cfg = resolve("tiny", str(recipe))
    assert source_licenses(cfg) == {"mimic": None, "pubmed": PHYSIONET, "redpajama": SYNTHETIC}


def fake_run(run_dir: Path, task: str = "pretrain") -> None:
    cfg = resolve(
        "tiny", task=task, overrides=["data.sources.0.license=" + PHYSIONET, f"train.output_dir={run_dir}"]
    )
    names = [s.name for s in cfg.data.sources]
    record = {"config": cfg.to_dict(), "data_manifest": {n: [{"path": f"/d/{n}.jsonl"}] for n in names}}
    run_dir.mkdir(parents=True)
    (run_dir / "run_record.json").write_text(json.dumps(record))
    for step, scale in ((10, 1), (20, 2)):
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        trainer = {
            "step": step,
            "tokens_by_source": {n: scale * 1000 * (i + 1) for i, n in enumerate(names)},
            "world_size": 1,
            "data_licenses": source_licenses(cfg),
        }
        (ckpt / "trainer.json").write_text(json.dumps(trainer))
        seal(ckpt)


def test_the_model_card_names_base_sources_licenses_tokens_and_steps(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    (run_dir / "final").mkdir()
    card = write_model_card(run_dir / "final", run_dir, "model").read_text()
    meta = ModelCard.load(run_dir / "final" / "README.md").data.to_dict()
    # No Hub base (random init), and sources whose notes are no single license identifier.
    assert meta == {
        "license": "other",
        "license_name": "base-model-and-training-data-terms",
        "tags": ["mellama-train", "llama", "medical"],
        "pipeline_tag": "text-generation",
        "library_name": "transformers",
    }
    assert "- base model: random initialisation (2 layers, hidden 64, vocabulary 2048)" in card
    assert (
        "- steps: 20, each 8 sequences of 256 tokens; peak lr 0.003, fp32" in card
    )  # the newest complete checkpoint
    assert "- training tokens: 12,000" in card
    assert f"| pubmed | {PHYSIONET} | 15 | 2,000 | 1 |" in card
    assert f"| mimic | {SYNTHETIC} | 1 | 4,000 | 1 |" in card
    # A directory this trainer did not write gets no card rather than a wrong one.
    assert write_model_card(tmp_path, tmp_path / "elsewhere", "model") is None


def test_the_adapter_card_is_carried_into_the_merged_model(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir, task="tune")
    (run_dir / "adapter").mkdir()
    adapter_card = write_model_card(run_dir / "adapter", run_dir, "adapter").read_text()
    assert "library_name: peft" in adapter_card and "a LoRA adapter (PEFT)" in adapter_card
    assert ModelCard.load(run_dir / "adapter" / "README.md").data.tags[-2:] == ["lora", "peft"]
    assert (
        "(written to the run's `base/`)" in adapter_card and f"| medinstruct | {PHYSIONET} |" in adapter_card
    )
    merged = tmp_path / "merged"
    merged.mkdir()
    text = carry_model_card(run_dir / "adapter", merged).read_text()
    assert "the base model with the LoRA adapter merged" in text and f"| medinstruct | {PHYSIONET} |" in text
    # An adapter from elsewhere (no run record beside it): its own card is copied.
    foreign = tmp_path / "foreign" / "adapter"
    foreign.mkdir(parents=True)
    (foreign / "README.md").write_text("their card")
    assert carry_model_card(foreign, merged).read_text() == "their card"


def _stale_empty_newest(run_dir: Path) -> None:  # a step directory left behind, its marker gone
    (run_dir / "checkpoints" / "step_99999999").mkdir()


def _nested_trainer_state_resealed(run_dir: Path) -> None:  # sizes and seal agree: only reading it fails
    newest = run_dir / "checkpoints" / "step_00000020"
    (newest / "trainer.json").write_text("[" * 100_000 + "]" * 100_000)
    seal(newest)


def _every_marker_removed(run_dir: Path) -> None:
    for marker in (run_dir / "checkpoints").glob("step_*/COMPLETE"):
        marker.unlink()


@pytest.mark.parametrize(
    "damage, steps, note",
    [
        (_stale_empty_newest, "- steps: 20,", "from checkpoint `step_00000020`; newer ones did not verify: "),
        (_nested_trainer_state_resealed, "- steps: 10,", "from checkpoint `step_00000010`; newer ones did"),
        (_every_marker_removed, "- steps: unknown,", "not given: no checkpoint of this run verifies ("),
    ],
    ids=["stale-empty-step-dir", "nested-trainer-json", "no-checkpoint-verifies"],
)
def test_a_damaged_or_stale_newest_checkpoint_never_fails_the_card(tmp_path, damage, steps, note, caplog):
    """The card is written on rank 0 after training (write_hf_model, save_adapter): a step directory it cannot
    trust is passed over and named, and with none left the card says its numbers are missing."""
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    damage(run_dir)
    (run_dir / "final").mkdir()
    card = write_model_card(run_dir / "final", run_dir, "model").read_text()
    assert steps in card and note in card
    assert f"| pubmed | {PHYSIONET} | 15 |" in card  # the sources and their terms are still there
    assert "model card:" in caplog.text  # and the log says what was passed over


def hub_cache(root: Path, repo: str, files: dict[str, str], kind: str = "models") -> Path:
    """A repo laid out as huggingface_hub lays out its cache: blobs by hash, a snapshot of links to them, and
    refs/main naming the snapshot's revision. Returns the snapshot directory."""
    import hashlib

    repo_dir = root / f"{kind}--{repo.replace('/', '--')}"
    revision = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for name, text in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(text.encode()).hexdigest()
        blob.write_text(text)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def test_a_card_a_hub_accepts_names_the_hub_base_its_license_and_hub_datasets(tmp_path, monkeypatch):
    """Base and data from the Hugging Face cache: the card's front matter names them by Hub id, as
    huggingface_hub's own ModelCard parses it back; the license is the one identifier base and data share."""
    cache = tmp_path / "hub"
    base = hub_cache(
        cache, "meta-llama/Llama-2-7b-hf", {"config.json": "{}", "README.md": "---\nlicense: llama2\n---\n"}
    )
    data = hub_cache(cache, "bigbio/med_qa", {"train.jsonl": "{}\n"}, kind="datasets")
    run_dir = tmp_path / "run"
    fake_run(run_dir, task="tune")
    record = json.loads((run_dir / "run_record.json").read_text())
    record["config"]["model"].update(init="pretrained", path=str(base))
    record["config"]["data"]["sources"] = [
        {**record["config"]["data"]["sources"][0], "paths": [str(data / "train.jsonl")], "license": "llama2"}
    ]
    (run_dir / "run_record.json").write_text(json.dumps(record))
    for step_dir in (run_dir / "checkpoints").iterdir():  # the checkpoints' notes agree with the recipe
        trainer = json.loads((step_dir / "trainer.json").read_text())
        trainer["data_licenses"] = {"medinstruct": "llama2"}
        (step_dir / "trainer.json").write_text(json.dumps(trainer))
        seal(step_dir)
    (run_dir / "adapter").mkdir()
    write_model_card(run_dir / "adapter", run_dir, "adapter")
    card = ModelCard.load(run_dir / "adapter" / "README.md")
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert card.data.license == "llama2" and card.data.datasets == ["bigbio/med_qa"]
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert "- base model: `meta-llama/Llama-2-7b-hf` (Hugging Face Hub)" in card.text
    # A source under other terms: no single identifier can say both.
    record["config"]["data"]["sources"][0]["license"] = PHYSIONET
    for step_dir in (run_dir / "checkpoints").iterdir():
        trainer = json.loads((step_dir / "trainer.json").read_text())
        trainer["data_licenses"] = {"medinstruct": PHYSIONET}
        (step_dir / "trainer.json").write_text(json.dumps(trainer))
        seal(step_dir)
    write_model_card(run_dir / "adapter", run_dir, "adapter")
    assert ModelCard.load(run_dir / "adapter" / "README.md").data.license == "other"


def run_with_terms(run_dir: Path, note: str | None, base: Path | None = None) -> Path:
    """A tuning run whose every source has the license note `note` (in the recipe and in the checkpoints),
    from the pretrained base directory `base` (None: a random initialisation). Returns run_dir."""
    fake_run(run_dir, task="tune")
    record = json.loads((run_dir / "run_record.json").read_text())
    if base is not None:
        record["config"]["model"].update(init="pretrained", path=str(base))
    else:
        assert record["config"]["model"]["init"] != "pretrained"
    for source in record["config"]["data"]["sources"]:
        source["license"] = note
    (run_dir / "run_record.json").write_text(json.dumps(record))
    for step_dir in (run_dir / "checkpoints").iterdir():
        trainer = json.loads((step_dir / "trainer.json").read_text())
        trainer["data_licenses"] = {s["name"]: note for s in record["config"]["data"]["sources"] if note}
        (step_dir / "trainer.json").write_text(json.dumps(trainer))
        seal(step_dir)
    (run_dir / "adapter").mkdir()
    return run_dir


def test_the_hub_license_list_holds_the_hubs_identifiers_only():
    assert {
        "apache-2.0",
        "mit",
        "llama2",
        "llama3.3",
        "openrail++",
        "cc-by-nc-sa-4.0",
        "other",
    } <= HUB_LICENSES
    assert {"gpl-3.0-or-later", "physionet", "apache 2.0", "Apache-2.0"}.isdisjoint(HUB_LICENSES)
    assert all(name == name.strip().lower() for name in HUB_LICENSES)


@pytest.mark.parametrize(
    "note, license",
    [
        ("apache-2.0", "apache-2.0"),
        (" Apache-2.0 ", "apache-2.0"),  # the Hub's identifiers are lower case
        ("llama3.3", "llama3.3"),
        ("openrail++", "openrail++"),
        ("cc-by-nc-sa-4.0", "cc-by-nc-sa-4.0"),
        ("gpl-3.0-or-later", "other"),  # an SPDX id the Hub does not list
        ("physionet-credentialed-1.5.0", "other"),  # looks like an identifier, is none
        (None, "other"),  # no note: the data's terms are unknown
    ],
)
def test_only_a_license_identifier_the_hub_accepts_becomes_the_cards_license(tmp_path, note, license):
    """A random initialisation has no base terms: the sources' shared note is the license when the Hub lists it;
    any other terms are `other`, named by license_name (the Hub requires one with `other`)."""
    run_dir = run_with_terms(tmp_path / "run", note)
    write_model_card(run_dir / "adapter", run_dir, "adapter")
    meta = ModelCard.load(run_dir / "adapter" / "README.md").data.to_dict()
    assert meta["license"] == license
    assert meta.get("license_name") == (LICENSE_NAME if license == "other" else None)


@pytest.mark.parametrize(
    "readme, license",
    [
        (None, "other"),  # no card: the base's terms are unknown
        ("# A model without front matter\n", "other"),
        ("---\ntags: [llama]\n---\n", "other"),  # front matter without a license
        ("---\nlicense: [apache-2.0]\n---\n", "other"),  # a license that is no string
        ("---\nlicense: Llama 2 Community License\n---\n", "other"),
        ("---\nlicense: llama2\n---\n", "other"),  # the base's terms differ from the data's
        ("---\nlicense: apache-2.0\n---\n", "apache-2.0"),  # base and data agree
        ("---\nlicense: Apache-2.0\n---\n\udcff", "apache-2.0"),  # undecodable bytes after it
    ],
    ids=["no-card", "no-front-matter", "no-license", "list", "not-an-id", "other-terms", "same", "bad-utf8"],
)
def test_a_pretrained_base_whose_license_cannot_be_read_makes_the_license_other(tmp_path, readme, license):
    """Every source says apache-2.0, but the weights start from a pretrained base: its terms apply too, and
    when its card names none they are unknown, which no identifier can say."""
    base = tmp_path / "base"
    base.mkdir()
    if readme is not None:
        (base / "README.md").write_bytes(readme.encode("utf-8", "surrogateescape"))
    run_dir = run_with_terms(tmp_path / "run", "apache-2.0", base)
    card = write_model_card(run_dir / "adapter", run_dir, "adapter").read_text()
    meta = ModelCard.load(run_dir / "adapter" / "README.md").data.to_dict()
    assert meta["license"] == license
    assert meta.get("license_name") == (LICENSE_NAME if license == "other" else None)
    if readme is None or "license: " not in readme or "[" in readme:
        assert "- base model license: not given by its card (README.md front matter)" in card
    else:
        named = readme.split("license: ")[1].split("\n")[0]
        assert f"- base model license: `{named}` (its card's" in card


def _fifo(readme: Path) -> None:  # a plain open waits for a writer forever
    os.mkfifo(readme)


def _link_to_dev_zero(readme: Path) -> None:  # endless: a plain read never ends (or ends the memory)
    readme.symlink_to("/dev/zero")


def _directory(readme: Path) -> None:
    readme.mkdir()


def _nested_unclosed(readme: Path) -> None:  # deeper than the YAML composer recurses
    readme.write_text("---\nlicense: " + "[" * 100_000 + "\n")


def _nested_closed(readme: Path) -> None:
    readme.write_text("---\nlicense: " + "[" * 100_000 + "]" * 100_000 + "\n---\n")


def _link_loop(readme: Path) -> None:
    readme.symlink_to(readme)


@pytest.mark.parametrize(
    "plant", [_fifo, _link_to_dev_zero, _directory, _nested_unclosed, _nested_closed, _link_loop]
)
def test_a_hostile_base_card_never_hangs_or_fails_the_final_export(tmp_path, plant):
    """The base directory is not ours: its README.md may be a FIFO, a link to a device, or front matter nested
    past the parser's recursion. The card is written after training, on rank 0: reading the base's license
    must neither block, nor read without end, nor raise. The license is then unknown (`other`) and the card
    is written. Run in a child process with a time limit, so that a regression fails instead of hanging."""
    base = tmp_path / "base"
    base.mkdir()
    plant(base / "README.md")
    run_dir = run_with_terms(tmp_path / "run", "apache-2.0", base)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mellama_train.export.model_card import _card_license, write_model_card\n"
        "run = Path(sys.argv[1])\n"
        "assert _card_license(sys.argv[2]) is None\n"
        "print(write_model_card(run / 'adapter', run, 'adapter'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(run_dir), str(base)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = ModelCard.load(run_dir / "adapter" / "README.md")
    assert card.data.license == "other" and card.data.license_name == LICENSE_NAME
    assert "- base model license: not given by its card (README.md front matter)" in card.text
    assert "| medinstruct | apache-2.0 |" in card.text


def test_front_matter_renders_whatever_the_base_card_holds(tmp_path):
    """front_matter itself, in this process, on the nested card (no hang to guard against here)."""
    base = tmp_path / "base"
    base.mkdir()
    _nested_unclosed(base / "README.md")
    assert _card_license(str(base)) is None
    config = resolve("tiny", task="tune", overrides=["model.init=pretrained", f"model.path={base}"]).to_dict()
    meta = front_matter(config, "adapter", {s["name"]: "apache-2.0" for s in config["data"]["sources"]})
    assert meta["license"] == "other" and meta["license_name"] == LICENSE_NAME
