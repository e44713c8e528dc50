"""LoRA instruction tuning (Me-LLaMA's second stage) on DeepSpeed ZeRO-3, same engine and flags as pretraining.

# the embedded tiny demo: a tiny random-init base, the sample instructions, CPU, offline, a couple of minutes
python launch/tune.py                                               # one process, no launcher
deepspeed launch/tune.py --ds ds_configs/zero3.json                 # DeepSpeed launcher, local devices

# the real thing: tune the continually pretrained model (the two stages chain with no conversion); `mellama-train
# launch` passes Ctrl-C/SIGTERM to every rank (save, exit 75) and keeps the ranks' exit code
mellama-train launch deepspeed launch/tune.py --ds ds_configs/zero3.json --profile 13b \
    --base runs/pretrain-13b/final --config my_instructions.yaml
sbatch slurm/tune.sh --profile 13b --base /models/me-llama-13b --config my_instructions.yaml
"""

import sys
from pathlib import Path

# Run from a checkout without installing: make `src/` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mellama_train.cli import tune_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(tune_main())
