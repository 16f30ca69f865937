"""Clean up after killed processes: ``python -m stego_core.platform.doctor [--cache DIR ...] [--data DIR ...] [--dry-run]``.

- MLflow runs RUNNING whose owner (tags ``owner_host`` / ``owner_pid``, recorded by
  :func:`stego_core.platform.tracking.start_run`) is a process of this host that no longer exists end KILLED, with the
  tag ``end_reason`` (:func:`stego_core.platform.tracking.reap_dead_runs`, which ``start_run`` also calls before each
  top-level run).
- ``*.<pid>.partial*`` feature-cache files of dead processes are removed.
- Half-made data folders (phantom folders without ``phantom_settings.json``, leftover ``.tmp-*`` folders of an
  interrupted generation) are reported, not deleted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stego_core.platform import tracking
from stego_core.runtime import faults

log = logging.getLogger(__name__)


@dataclass
class DoctorReport:
    """What :func:`doctor` found and did."""

    killed_runs: list[str] = field(default_factory=list)
    removed_partials: list[Path] = field(default_factory=list)
    half_made: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"runs marked KILLED (owner process gone): {len(self.killed_runs)}"]
        lines += [f"  {r}" for r in self.killed_runs]
        lines.append(f"stale partial cache files removed: {len(self.removed_partials)}")
        lines += [f"  {p}" for p in self.removed_partials]
        lines.append(f"half-made data folders (delete them, or rerun to regenerate): {len(self.half_made)}")
        lines += [f"  {p}" for p in self.half_made]
        return "\n".join(lines)


def remove_stale_partials(roots: list[str | Path], *, dry_run: bool = False) -> list[Path]:
    """Remove ``*.<pid>.partial*`` files under ``roots`` whose process is gone; returns them."""
    found = [p for root in roots for p in faults.stale_partials(root)]
    if not dry_run:
        for path in found:
            path.unlink(missing_ok=True)
    return found


def half_made_data(roots: list[str | Path]) -> list[Path]:
    """Folders under (or equal to) ``roots`` left by an interrupted phantom generation."""
    out = []
    for root in map(Path, roots):
        if not root.exists():
            continue
        parent = root.parent
        out += sorted(p for p in parent.glob(f".{root.name}.tmp-*") if p.is_dir())
        if root.is_dir() and any(root.iterdir()) and not (root / "phantom_settings.json").exists() \
                and not any(root.rglob("*.nii*")):
            out.append(root)
    return out


def doctor(*, cache_roots: list[str | Path], data_roots: list[str | Path], dry_run: bool = False) -> DoctorReport:
    """Run every check; see the module docstring."""
    return DoctorReport(killed_runs=tracking.reap_dead_runs(tracking.client(), dry_run=dry_run),
                        removed_partials=remove_stale_partials(cache_roots, dry_run=dry_run),
                        half_made=half_made_data(data_roots))


def main(argv: list[str] | None = None) -> int:
    """Command line of :func:`doctor`; the tracking store is ``$MLFLOW_TRACKING_URI`` (default
    ``sqlite:///mlflow.db``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", action="append", default=None,
                        help="feature cache folder to clean (repeatable; default: outputs and data)")
    parser.add_argument("--data", action="append", default=None,
                        help="data folder to check (repeatable; default: data/phantoms)")
    parser.add_argument("--dry-run", nargs="?", const="true", default="false",
                        help="report only (also --dry-run true|false, for MLproject)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = doctor(cache_roots=args.cache or ["outputs", "data"], data_roots=args.data or ["data/phantoms"],
                        dry_run=str(args.dry_run).lower() in ("true", "1", "yes"))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
