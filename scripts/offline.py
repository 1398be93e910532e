"""What the offline passes over a data source share (scripts/cache_teacher.py, scripts/select_prompts.py)."""

from __future__ import annotations

import logging
import sys

import yaml

from configs.schema import ConfigError, DataSource, RunConfig, load_config


def config_and_source(config: str, overrides: list[str], source: str) -> tuple[RunConfig, DataSource] | None:
    """The run config (with ``key=value`` overrides) and ``--source`` (a ``data.train`` entry as a YAML
    mapping), both validated; None after printing what is wrong (the script then exits with 2)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return load_config(config, overrides), DataSource.model_validate(yaml.safe_load(source))
    except (ConfigError, ValueError) as e:
        print(e, file=sys.stderr)
        return None
