"""Thin entry points: parse ``--config`` and ``key=value`` overrides, call stego_core, return an exit code."""
