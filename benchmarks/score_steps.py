"""The post-processing registry's mask steps scored on a run's saved predictions (issue 34 item 2).

For every ``<case>_<row>_pred.nii.gz`` under ``<run folder>/predictions``: the mask as is, after each step below
(``engine.postprocess.apply_postprocessing``, what a pipeline row's ``postprocess`` runs) and cut at the case's
own brain q99 (the percentile row's level); one markdown row per case and variant, Dice / clDice, precision /
recall and components (the label's). Labels are read from ``<data root>/<case>/label.nii.gz`` and only score.

    python benchmarks/score_steps.py outputs/stego/<run id> --data-root ../shared/data [--row stego]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from stego_core.data.cases import DataConfig, ensure_cases, preprocess_case
from stego_core.engine.postprocess import PostprocessStep, apply_postprocessing
from stego_core.evaluation.metrics import evaluate_segmentation

VARIANTS = {"as is": [], "cc 10": [PostprocessStep("cc", min_size_vox=10)],
            "cc 100": [PostprocessStep("cc", min_size_vox=100)],
            "largest .05": [PostprocessStep("largest", min_fraction=0.05)],
            "largest .01": [PostprocessStep("largest", min_fraction=0.01)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's output folder (holding predictions/)")
    parser.add_argument("--data-root", required=True, help="the folder of case folders the run segmented")
    parser.add_argument("--row", default="stego", help="the row whose predictions are scored")
    parser.add_argument("--skull-strip", default="auto", help="the run's data.skull_strip (for the q99 cut)")
    args = parser.parse_args()
    data = DataConfig(source="folder", root=args.data_root, skull_strip=args.skull_strip)
    print("| case | variant | Dice / clDice | precision / recall | components (label) |\n|---|---|---|---|---|")
    for case in ensure_cases(data):
        path = args.run / "predictions" / f"{case.case_id}_{args.row}_pred.nii.gz"
        if not path.is_file() or case.label is None:
            continue
        prepared = preprocess_case(case, data)
        pred, label = np.asarray(nib.load(path).dataobj) > 0, prepared.label > 0
        masks = {name: apply_postprocessing(pred, None, steps).mask if steps else pred
                 for name, steps in VARIANTS.items()}
        bright = prepared.image >= np.percentile(prepared.image[prepared.brain_mask], 99.0)
        masks["cut at brain q99 + cc 10"] = apply_postprocessing(pred & bright, None, VARIANTS["cc 10"]).mask
        for name, mask in masks.items():
            s = evaluate_segmentation(mask, label)
            print(f"| {case.case_id} | {name} | {s['dice']:.3f} / {s['cldice']:.3f} | {s['precision']:.3f} / "
                  f"{s['recall']:.3f} | {int(s['n_components_pred'])} ({int(s['n_components_gt'])}) |", flush=True)


if __name__ == "__main__":
    main()
