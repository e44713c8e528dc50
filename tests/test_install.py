"""A regular (non-editable) install works from any directory: the DeepSpeed JSONs, profiles and sample data
travel inside the package, and nothing looks for the checkout it was built from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_install_resolves_the_documented_paths_from_any_directory(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True
    )
    (wheel,) = wheels.glob("mellama_train-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    probe = (
        "import json, os\n"
        "from mellama_train.config import resolve\n"
        "from mellama_train.outputs import git_revision\n"
        "cfg = resolve('tiny', overrides=['train.ds_config=ds_configs/zero2.json'])\n"
        "print(json.dumps([cfg.train.ds_config, os.path.isfile(cfg.train.ds_config), git_revision(),"
        " os.path.isdir(cfg.data.sources[0].paths[0].split('*')[0].rstrip('/'))]))\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    import json

    ds_config, exists, revision, sample_dir = json.loads(out.stdout)
    assert ds_config.startswith(str(target)) and exists and ds_config.endswith("ds_configs/zero2.json")
    assert revision is None  # not the checkout's commit: the install is not a checkout
    assert sample_dir
    for name in (
        "zero2.json",
        "zero3.json",
        "zero3_offload.json",
    ):  # the packaged copies are the repo's files
        assert (target / "mellama_train" / "ds_configs" / name).read_bytes() == (
            REPO / "ds_configs" / name
        ).read_bytes()
