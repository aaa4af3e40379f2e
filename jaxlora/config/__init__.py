"""Run configuration: the schema (`schema`), YAML + override parsing (`parse`), checks (`validate`).

`config` is plain data and the bottom layer with `jaxlora.errors`: it imports no other jaxlora
module. `schema` imports neither `parse` nor `validate`; `parse` imports both. Everything public is
re-exported here, so `from jaxlora.config import Config, load_config` is the one import to use.
"""

from jaxlora.config.parse import config_from_dict, load_config
from jaxlora.config.schema import (
    CHOICES,
    LINEAR_MODULES,
    REFERENCE_FREE_LOSSES,
    Config,
    DataArgs,
    FinetuneArgs,
    MeshArgs,
    ModelArgs,
    TrainArgs,
    config_to_dict,
    dump_config,
    lora_target_modules,
)

__all__ = [
    "CHOICES",
    "LINEAR_MODULES",
    "REFERENCE_FREE_LOSSES",
    "Config",
    "DataArgs",
    "FinetuneArgs",
    "MeshArgs",
    "ModelArgs",
    "TrainArgs",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "lora_target_modules",
]
