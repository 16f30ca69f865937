"""Self-training combination rules scored on one set of student probabilities (issue 34 item 1's probe).

For each case of a folder: the teacher preset's mask and one default student (the code ``selftrain`` runs),
cached as ``<cache>/<case>.npz``; then every rule of ``CombineSettings`` below scored with the case's label
(labels only score; nothing here chooses a preset). Prints one markdown table per case.

    python benchmarks/probe_combine_rules.py --root ../shared/data --teacher experiments/configs/best_mra.yaml \
        --cache /tmp/rules_cache [--skull-strip auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from stego_core.data.cases import DataConfig, ensure_cases, preprocess_case
from stego_core.evaluation.metrics import evaluate_segmentation
from stego_core.methods import build_method
from stego_core.methods.selftrain.settings import CombineSettings
from stego_core.methods.selftrain.student import combine, self_train

RULES = {"intersection + keep_trees .05": CombineSettings(rule="intersection", keep_trees=0.05),
         "intersection": CombineSettings(rule="intersection"), "student": CombineSettings(rule="student"),
         "union": CombineSettings(rule="union"), "union_bright": CombineSettings(rule="union_bright"),
         "union_bright + keep_trees .05": CombineSettings(rule="union_bright", keep_trees=0.05),
         **{f"topn_mean {w}": CombineSettings(rule="topn_mean", teacher_weight=w) for w in (0.3, 0.5)}}


def cache_case(case, data: DataConfig, method, cache: Path) -> Path:
    """The teacher's mask and one student's probability of ``case``, computed once."""
    path = cache / f"{case.case_id}.npz"
    if not path.exists():
        start = time.time()
        prepared = preprocess_case(case, data)
        t_prob, t_mask = method.teacher_output(prepared)
        _, s_prob, _ = self_train(prepared.image, prepared.brain_mask, t_prob, t_mask, method.student)
        np.savez_compressed(path, t_prob=t_prob, t_mask=t_mask, s_prob=s_prob, image=prepared.image,
                            label=prepared.label, brain=prepared.brain_mask)
        print(f"{case.case_id}: teacher and student in {time.time() - start:.0f} s", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="a folder of case folders (image, label)")
    parser.add_argument("--teacher", required=True, help="the teacher preset, e.g. experiments/configs/best_mra.yaml")
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--skull-strip", default="auto")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    data = DataConfig(source="folder", root=args.root, skull_strip=args.skull_strip)
    method = build_method("selftrain", {"teacher": {"preset": str(Path(args.teacher).resolve())}})
    for case in ensure_cases(data):
        z = np.load(cache_case(case, data, method, args.cache))
        label, brain, teacher = z["label"] > 0, z["brain"] > 0, z["t_mask"] > 0
        print(f"\n| {case.case_id} | Dice / clDice | precision / recall |\n|---|---|---|")
        masks = {"teacher": teacher}
        for name, rule in RULES.items():
            masks[name] = combine(z["t_prob"], teacher, z["s_prob"], z["image"],
                                  dataclasses.replace(method.student, combine=rule)) & brain
        for name, mask in masks.items():
            s = evaluate_segmentation(mask, label)
            print(f"| {name} | {s['dice']:.3f} / {s['cldice']:.3f} | {s['precision']:.3f} / {s['recall']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
