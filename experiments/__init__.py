"""Thin entry points: parse ``--config`` and ``key=value`` overrides, call stego_core, return an exit code."""

from pathlib import Path

#: The entry points' YAML configs (each states only what differs from the defaults in stego_core.config).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
