"""Continual pretraining (Me-LLaMA recipe) on DeepSpeed ZeRO-3.

# the embedded tiny demo: CPU, offline, a couple of minutes
python launch/pretrain.py                                           # one process, no launcher
deepspeed launch/pretrain.py --ds ds_configs/zero3.json             # DeepSpeed launcher, local devices
deepspeed --num_gpus 2 launch/pretrain.py --ds ds_configs/zero3.json  # 2 ranks (gloo on CPU)

# the real thing: LLaMA-2 13B / 70B on a GPU cluster (see README: recipes, multi-node). `mellama-train launch`
# passes Ctrl-C/SIGTERM to every rank (save, exit 75) and keeps the ranks' exit code; deepspeed alone does neither.
mellama-train launch deepspeed launch/pretrain.py --ds ds_configs/zero3.json --profile 13b --config my_recipe.yaml
sbatch --nodes=16 slurm/pretrain.sh --profile 70b --config my_recipe.yaml    # SLURM: srun, no launcher needed
python launch/pretrain.py --profile 70b --dry-run                   # resolved config + derived numbers
"""

import sys
from pathlib import Path

# Run from a checkout without installing: make `src/` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mellama_train.cli import pretrain_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pretrain_main())
