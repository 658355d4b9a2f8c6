"""Helpers shared by the command modules: model-config sources and progress bars."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowar.config import PRESETS, FlowARConfig, model_config_from_dict
from flowar.errors import ConfigError, UserError


def load_model_config(source: str) -> FlowARConfig:
    """A model config from a preset name, a JSON file, or a checkpoint folder."""
    if source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        known = ", ".join(sorted(PRESETS))
        raise UserError(f"{source!r} is neither a preset ({known}) nor an existing config file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]  # a checkpoint's config.json
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of model config fields")
    return model_config_from_dict(data)


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    """Parse ``text`` as an integer >= ``minimum``; ``expected`` names the rule in errors."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")
