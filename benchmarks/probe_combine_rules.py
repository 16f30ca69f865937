"""Self-training combination rules scored on one set of student probabilities (issue 34 item 1's probe).

For each case of a folder: the teacher preset's mask and one default student (the code ``selftrain`` runs),
cached as ``<cache>/<case>.npz``; then every rule of ``CombineSettings`` below scored with the case's label
(labels only score; nothing here chooses a preset). Prints one markdown table per case. ``--grid`` then adds
the boundary diagnostics (where the student's extra voxels lie: the teacher's one-voxel ring or beyond, how many
are vessel, their intensity) and a grid of drop / add / branch rules scored against the teacher on every case
(docs/domains.md, "Self-training on lumen MRA labels").

    python benchmarks/probe_combine_rules.py --root ../shared/data --teacher experiments/configs/best_mra.yaml \
        --cache /tmp/rules_cache [--skull-strip auto] [--grid]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from stego_core.data.cases import DataConfig, ensure_cases, preprocess_case
from stego_core.engine.postprocess import keep_largest_trees, remove_small_components
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

CUBE = np.ones((3, 3, 3), bool)


def _joined(core: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """``core`` and the parts of ``extra`` 26-connected to it."""
    lab, _ = ndi.label(core | extra, structure=CUBE)
    keep = np.unique(lab[core])
    return np.isin(lab, keep[keep > 0])


def boundary_rule(z, drop_cut: float, add_cut: float, bright_q: float, joined: bool, trees: float) -> np.ndarray:
    """Drop teacher voxels under ``drop_cut`` of the student; add student voxels above ``add_cut`` at least as
    bright as the ``bright_q`` quantile of the teacher's vessel intensities (joined to the mask or anywhere)."""
    t, sp, img, brain = z["t_mask"] > 0, z["s_prob"], z["image"], z["brain"] > 0
    m = t & ~(sp < drop_cut)
    if add_cut < 1:
        add = (sp > add_cut) & (img >= np.quantile(img[t], bright_q)) & brain
        m = _joined(m, add) if joined else m | add
    return (keep_largest_trees(m, min_fraction=trees) if trees else m) & brain


def branch_rule(z, ring: int, cut: float, min_vox: int) -> np.ndarray:
    """The teacher's mask plus student components beyond its ``ring``-voxel ring (new branches, at least
    ``min_vox`` voxels) joined to it through the ring."""
    t, sp, brain = z["t_mask"] > 0, z["s_prob"], z["brain"] > 0
    near = ndi.binary_dilation(t, CUBE, iterations=ring)
    far = (sp > cut) & ~near & brain
    if min_vox:
        far = remove_small_components(far, min_size_vox=min_vox)
    bridge = (sp > cut) & brain & near & ~t
    kept = _joined(t, far | bridge)
    return t | (far & kept) | (bridge & kept & ndi.binary_dilation(far & kept, CUBE, iterations=ring))


def boundary_report(cases: dict) -> None:
    """Where the student's voxels outside the teacher lie and how many are vessel (the label only scores)."""
    print("\n| case | extra voxels in the 1-voxel ring | vessel among them | vessel beyond | median intensity "
          "in the ring / teacher's 5 % |\n|---|---|---|---|---|")
    for name, z in cases.items():
        t, sp, lab, brain, img = z["t_mask"] > 0, z["s_prob"], z["label"] > 0, z["brain"] > 0, z["image"]
        extra = (sp > 0.5) & ~t & brain
        ring = extra & ndi.binary_dilation(t, CUBE)
        beyond = extra & ~ring
        print(f"| {name} | {ring.sum() / max(extra.sum(), 1):.2f} | {(ring & lab).sum() / max(ring.sum(), 1):.2f} | "
              f"{(beyond & lab).sum() / max(beyond.sum(), 1):.2f} | {np.median(img[ring]) if ring.any() else 0:.3f}"
              f" / {np.quantile(img[t], 0.05):.3f} |", flush=True)


def grid_report(cases: dict) -> None:
    """Every grid rule's Dice / clDice change against the teacher per case, and its worst change."""
    base = {k: evaluate_segmentation(z["t_mask"] > 0, z["label"] > 0) for k, z in cases.items()}
    rules = {f"drop<{d} add>{a} q{q}{' joined' if j else ''}{' trees' if tr else ''}":
             (boundary_rule, (d, a, q, j, tr))
             for d, a, q, j, tr in itertools.product((0, 0.1, 0.3, 0.5), (1, 0.5, 0.9, 0.97), (0.05, 0.25, 0.5),
                                                     (False, True), (0, 0.05)) if a < 1 or (q == 0.05 and not j)}
    rules |= {f"branch ring {r} >{c} min {n}": (branch_rule, (r, c, n))
              for r, c, n in itertools.product((1, 2), (0.5, 0.9), (0, 20, 100))}
    print(f"\n| rule | worst | {' | '.join(cases)} |\n|---|---|{'---|' * len(cases)}")
    for name, (fn, args) in rules.items():
        d = []
        for k, z in cases.items():
            s = evaluate_segmentation(fn(z, *args), z["label"] > 0)
            d.append((s["dice"] - base[k]["dice"], s["cldice"] - base[k]["cldice"]))
        print(f"| {name} | {min(min(p) for p in d):+.3f} | " + " | ".join(f"{a:+.3f}/{b:+.3f}" for a, b in d)
              + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="a folder of case folders (image, label)")
    parser.add_argument("--teacher", required=True, help="the teacher preset, e.g. experiments/configs/best_mra.yaml")
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--skull-strip", default="auto")
    parser.add_argument("--grid", action="store_true", help="also the boundary diagnostics and the rule grid")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    data = DataConfig(source="folder", root=args.root, skull_strip=args.skull_strip)
    method = build_method("selftrain", {"teacher": {"preset": str(Path(args.teacher).resolve())}})
    cases = {}
    for case in ensure_cases(data):
        z = cases[case.case_id] = dict(np.load(cache_case(case, data, method, args.cache)))
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

    if args.grid:
        boundary_report(cases)
        grid_report(cases)


if __name__ == "__main__":
    main()
