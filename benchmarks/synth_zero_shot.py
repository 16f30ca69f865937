"""Zero-shot table of ``synth`` weights on the shared cases and the default phantoms, through the product's own
``baseline`` entry point (one MLflow run per weights file and case set, threshold 0.5 fixed a priori, no label
used for any choice).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/synth_zero_shot.py --out zs.json \
        --weights full=path/a.pt big_blobs=path/b.pt [--shared ../shared/data] [--store sqlite:///zs.db]

Case sets: ``mra`` (``mra_*``, ``skull_strip: auto`` as every MRA baseline), ``2pm`` (``2pm_*``,
``skull_strip: none`` as ``best_2pm.yaml``), ``phantom`` (``PhantomConfig()``, seeds 0-2). Writes one JSON row
per (weights, case): dice, cldice, precision, recall, and the run id.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def _linked(root: Path, prefix: str, into: Path) -> Path:
    """A folder of symlinks to the case folders of ``root`` whose names start with ``prefix``."""
    into.mkdir(parents=True, exist_ok=True)
    for case in sorted(root.glob(f"{prefix}*")):
        link = into / case.name
        if not link.exists():
            link.symlink_to(case.resolve())
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="+", required=True, help="name=path.pt ('name=' alone: the shipped weights)")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--sets", default="phantom,2pm,mra")
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", default="")
    ap.add_argument("--normalize", default="volume")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="synth-zs-"))
    if a.store:
        os.environ["MLFLOW_TRACKING_URI"] = a.store
    import torch

    from stego_core.config import load_config
    from stego_core.steps.evaluation import BaselineConfig, run_baseline

    torch.set_num_threads(1)
    shared = Path(a.shared)
    sets = {
        "phantom": {"data.source": "phantom", "data.root": str(work / "phantoms")},
        "2pm": {"data.source": "folder", "data.root": str(_linked(shared, "2pm_", work / "2pm")),
                "data.skull_strip": "none"},
        "mra": {"data.source": "folder", "data.root": str(_linked(shared, "mra_", work / "mra"))},
    }
    rows = []
    out = Path(a.out)
    for spec in a.weights:
        name, _, path = spec.partition("=")
        for set_name in a.sets.split(","):
            cfg = load_config(BaselineConfig, None, {
                **sets[set_name], "method": "synth", "split": "all", "viewer": False, "progress": False,
                "analysis": False, "log_model": False, "experiment": "synth-zero-shot",
                "output": str(work / "out"), "settings": {"weights": path, "normalize": a.normalize}})
            result = run_baseline(cfg, tags={"weights_name": name})
            for r in result.rows:
                rows.append({"weights": name, "set": set_name, "case": r["case_id"], "run_id": result.run_id,
                             **{k: r.get(k) for k in ("dice", "cldice", "precision", "recall")}})
                print(json.dumps(rows[-1]), flush=True)
            out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
