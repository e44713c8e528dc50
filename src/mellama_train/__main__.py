"""`python -m mellama_train <command>` = `mellama-train <command>` (pretrain, tune, merge, plan, status, report)."""

import sys

from mellama_train.cli import main

sys.exit(main())
