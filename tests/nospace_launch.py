"""Test-only entry point: launch/pretrain.py without the free-space checks (at start and before each save), as if
another job filled the disk between a check and the save (tests/test_checkpoint_faults.py). The product code has
no such switch: this replaces the disk_space functions the training loop calls."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mellama_train import disk_space  # noqa: E402
from mellama_train.cli import pretrain_main  # noqa: E402

if __name__ == "__main__":
    disk_space.ensure_room = lambda *args, **kwargs: None
    disk_space.check_room = lambda *args, **kwargs: None
    sys.exit(pretrain_main())
