"""The run configuration: what a run is, before anything checks it against the disk or starts.

    config/
      schema.py          the typed dataclasses (a docstring per field: docs/CONFIG.md), freezing
      resolve.py         profile <- recipe <- aliases <- --set, coerced to the fields' types
      llamafactory.py    a source named by a LLaMA-Factory dataset_info.json entry takes its file and columns
    profiles/            the named profiles (tiny, 8gb, 13b, 70b per entry point)

Checks of values against the disk, the environment, DeepSpeed's JSON and the memory planner are preflight.py's,
which returns the frozen config that `train()` accepts. This package imports nothing else of mellama_train
(tests/test_architecture.py).
"""

from mellama_train.config.resolve import (
    NULL,
    PACKAGE_DIR,
    PROFILES_DIR,
    SAMPLE_DATA_VAR,
    load_yaml,
    parse_override,
    profile_names,
    resolve,
)
from mellama_train.config.schema import (
    KINDS,
    PRETRAIN,
    SOURCE_FORMATS,
    TASKS,
    TUNE,
    ArchConfig,
    Config,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    SourceConfig,
    Task,
    TrainConfig,
    freeze,
    is_frozen,
    replaced,
)

__all__ = [
    "KINDS",
    "PRETRAIN",
    "TUNE",
    "NULL",
    "PACKAGE_DIR",
    "PROFILES_DIR",
    "SAMPLE_DATA_VAR",
    "SOURCE_FORMATS",
    "TASKS",
    "ArchConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "SourceConfig",
    "TrainConfig",
    "Task",
    "freeze",
    "is_frozen",
    "load_yaml",
    "parse_override",
    "profile_names",
    "replaced",
    "resolve",
]
