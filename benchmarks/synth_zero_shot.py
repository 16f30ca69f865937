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


#: The best registry method at its defaults per case set (Dice / clDice per case, measured with the same
#: preprocessing: MRA and phantoms with the automatic brain mask, 2PM without), by mean Dice: percentile (q 99) on
#: MRA, GMM on the phantoms (the research notes' baselines), twophoton on 2PM (docs/domains.md).
BEST_CLASSICAL = {
    "mra_mni_0590": ("percentile", .399, .436), "mra_mni_0591": ("percentile", .341, .382),
    "mra_mni_0592": ("percentile", .461, .550), "mra_mni_0640": ("percentile", .415, .499),
    "mra_mni_0656": ("percentile", .818, .595),
    "2pm_burgess2014_noisysparsevessels": ("twophoton", .850, .889), "2pm_burgess2014_tgmouse": ("twophoton", .836, .761),
    "2pm_poon2015_bbb_leakage": ("twophoton", .662, .812), "2pm_poon2015_plaquevessels": ("twophoton", .868, .769),
    "2pm_santos2015_lowcontrastvessels": ("twophoton", .835, .886),
    "2pm_santos2015_mixedsizelowcontrastvessels": ("twophoton", .699, .818),
    "phantom_000": ("gmm", .732, .687), "phantom_001": ("gmm", .675, .578), "phantom_002": ("gmm", .688, .606),
}


def markdown(rows: list[dict]) -> str:
    """A Dice / clDice table: one row per case, one column per weights name, the best classical method last;
    then the mean per case set."""
    names = list(dict.fromkeys(r["weights"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    cell = {(r["weights"], r["case"]): r for r in rows}
    lines = ["| case | " + " | ".join(names) + " | best classical (defaults) |",
             "|---" * (len(names) + 2) + "|"]
    for c in cases:
        best = BEST_CLASSICAL.get(c)
        vals = [f"{cell[n, c]['dice']:.3f}/{cell[n, c]['cldice']:.3f}" if (n, c) in cell else "" for n in names]
        ref = f"{best[0]} {best[1]:.3f}/{best[2]:.3f}" if best else ""
        lines.append(f"| {c} | " + " | ".join(vals) + f" | {ref} |")
    for set_name in dict.fromkeys(r["set"] for r in rows):
        ids = [c for c in cases if any(r["case"] == c and r["set"] == set_name for r in rows)]
        vals = []
        for n in names:
            got = [cell[n, c] for c in ids if (n, c) in cell]
            vals.append(f"**{sum(g['dice'] for g in got) / len(got):.3f}/{sum(g['cldice'] for g in got) / len(got):.3f}**"
                        if len(got) == len(ids) else "")
        refs = [BEST_CLASSICAL[c] for c in ids if c in BEST_CLASSICAL]
        ref = (f"**{sum(b[1] for b in refs) / len(refs):.3f}/{sum(b[2] for b in refs) / len(refs):.3f}**"
               if len(refs) == len(ids) else "")
        lines.append(f"| mean {set_name} ({len(ids)}) | " + " | ".join(vals) + f" | {ref} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default="", help="print the markdown table of a written --out file and stop")
    ap.add_argument("--weights", nargs="+", default=[], help="name=path.pt ('name=' alone: the shipped weights)")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--sets", default="phantom,2pm,mra")
    ap.add_argument("--out", default="synth_zero_shot.json")
    ap.add_argument("--store", default="")
    ap.add_argument("--normalize", default="volume")
    a = ap.parse_args()
    if a.report:
        print(markdown(json.loads(Path(a.report).read_text())))
        return
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
