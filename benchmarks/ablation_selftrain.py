"""Self-training ablation on the five shared real cases: teacher alone vs student variants.

Transductive (each volume's student is trained on that volume's pseudo-labels) unless a variant says
``inductive``: leave-one-out within the convention (trained on the other cases' crops, applied to this one).
The teachers' outputs are cached by :mod:`benchmarks.selftrain_cache`; each student's probability is cached
too, so that combination rules (cheap, label-free) are scored without retraining. Labels only score.

    python -m benchmarks.ablation_selftrain --variants recipe,rounds2 [--cases mra_mni_0590,...]
    python -m benchmarks.ablation_selftrain --table          # print / write the tables of all rows so far

Rows are appended to ``outputs/selftrain/rows.jsonl``; ``--table`` writes ``outputs/selftrain/ablation.csv``
and ``ablation.md`` (per-case Dice / clDice / precision / recall and seconds per volume; means per convention).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.selftrain_cache import CASES, cache_case

OUT = Path(__file__).resolve().parents[1] / "outputs" / "selftrain"
LUMEN = [c for c, t in CASES.items() if t == "best_mra"]
TREE = [c for c, t in CASES.items() if t == "best_mra_tree"]

#: teacher preset -> the convention's fixed recipe: the student section of its self-training preset
CONVENTION = {"best_mra": "selftrain_mra.yaml", "best_mra_tree": "selftrain_mra_tree.yaml"}


def recipe(teacher: str):
    """The student settings of the self-training preset for ``teacher``'s labelling convention."""
    from stego_core.config import MainConfig, load_config

    path = Path(__file__).resolve().parents[1] / "experiments" / "configs" / CONVENTION[teacher]
    return load_config(MainConfig, path).selftrain.student

#: variants: overrides of the convention's recipe; "rules" scores extra combination rules of the same student
VARIANTS: dict[str, dict] = {
    "recipe": {},
    "rounds2": {"rounds": 2},
    "no_band": {"band_vox": 0},
    "dice_only": {"bce_weight": 0.0, "cldice_weight": 0.0},
    "dice_cldice": {"cldice_weight": 0.5},
    "2d": {"dims": "2d"},
    "band1": {"band_vox": 1},
    "one_view": {"views": ()},
    "tri_view": {"views": (0, 1, 2)},
    "inductive": {"inductive": True},
}

#: combination rules scored on every student (label-free; the recipe's own rule is the row "student")
EXTRA_RULES = [
    {"combine": "student"},
    {"combine": "topn"},
    {"combine": "union_bright"},
    {"combine": "topn_mean", "teacher_weight": 0.5},
    {"combine": "intersection"},
    {"combine": "topn_mean", "teacher_weight": 0.5, "mask_teacher_prob": True},
    {"combine": "topn_mean", "teacher_weight": 0.6},
    {"combine": "topn_mean", "teacher_weight": 0.7},
    {"combine": "topn_mean", "teacher_weight": 1.0},   # control: the teacher's own top-N, no student
    {"combine": "student", "student_cut": 0.3},
    {"combine": "student", "student_cut": 0.7},
    {"combine": "intersection", "student_cut": 0.3},
    {"combine": "union", "student_cut": 0.7},
]


def load(case_id: str) -> dict[str, np.ndarray]:
    folder = cache_case(case_id)
    arrays = {name: np.load(folder / f"{name}.npy") for name in
              ("image", "full", "brain_mask", "teacher_prob", "teacher_mask", "label")}
    arrays["teacher_prob"] = arrays["teacher_prob"].astype(np.float32)
    arrays["meta"] = json.loads((folder / "teacher.json").read_text())
    return arrays


def score(mask: np.ndarray, label: np.ndarray) -> dict[str, float]:
    from stego_core.evaluation.metrics import evaluate_segmentation

    s = evaluate_segmentation(mask, label)
    return {k: float(s[k]) for k in ("dice", "cldice", "precision", "recall")} | {"voxels": int(mask.sum())}


def settings_for(case_id: str, overrides: dict):
    """The recipe of ``case_id``'s convention with a variant's ``overrides`` (``inductive`` / ``input`` aside)."""
    params = {k: v for k, v in overrides.items() if k not in ("inductive", "input")}
    for key in ("channels", "views"):
        if key in params:
            params[key] = tuple(params[key])
    return recipe(CASES[case_id]).replace(**params)


def _cached_seconds(key: str, case_id: str) -> float | None:
    side = OUT / "students" / key / f"{case_id}.json"
    if side.is_file():
        return json.loads(side.read_text())["seconds"]
    rows = [json.loads(line) for line in open(OUT / "rows.jsonl")] if (OUT / "rows.jsonl").is_file() else []
    times = [r["seconds"] for r in rows if r["variant"] == key and r["case"] == case_id]
    return times[-1] if times else None


def run_variant(name: str, overrides: dict, case_id: str, *, tag: str = "", progress: bool = True,
                reuse: bool = False) -> list[dict]:
    """Train (or, with ``reuse``, reload) the student of ``case_id`` for a variant; score the recipe's rule and
    the extra rules."""
    from stego_core.methods.selftrain import combine, predict_student, pseudo_labels, self_train, train_student

    data = load(case_id)
    settings = settings_for(case_id, overrides)
    key = f"{name}{tag}"
    folder = OUT / "students" / key
    folder.mkdir(parents=True, exist_ok=True)
    prob_file = folder / f"{case_id}.npy"
    inp = data[overrides.get("input", "image")]
    t0, c0 = time.perf_counter(), time.process_time()
    seconds = _cached_seconds(key, case_id) if reuse and prob_file.is_file() else None
    if seconds is not None:
        s_prob = np.load(prob_file).astype(np.float32)
    elif overrides.get("inductive"):
        others = [c for c, t in CASES.items() if t == CASES[case_id] and c != case_id]
        imgs, brains, tgts, wgts = [], [], [], []
        for other in others:
            d = load(other)
            tgt, wgt = pseudo_labels(d["teacher_prob"], d["teacher_mask"], d["brain_mask"], settings)
            imgs.append(d[overrides.get("input", "image")]); brains.append(d["brain_mask"])
            tgts.append(tgt); wgts.append(wgt)
        if not imgs:
            print(f"{case_id}: no other case of its convention for the inductive variant; skipped")
            return []
        views = settings.views or (settings.axis,)
        s_prob = 0.0
        for i, view in enumerate(views):
            s = settings.replace(axis=view, seed=settings.seed + i)
            model = train_student(imgs, brains, tgts, wgts, s, progress=progress)
            s_prob = s_prob + predict_student(model, inp, data["brain_mask"], s) / len(views)
    else:
        _, s_prob, _ = self_train(inp, data["brain_mask"], data["teacher_prob"], data["teacher_mask"], settings,
                                  progress=progress)
    if seconds is None:
        seconds = time.perf_counter() - t0
        np.save(prob_file, s_prob.astype(np.float16))
        (folder / f"{case_id}.json").write_text(json.dumps({"seconds": seconds,
                                                            "cpu_seconds": time.process_time() - c0,
                                                            "settings": repr(settings)}))
    rows = []
    for rule in [{}] + EXTRA_RULES:
        s = settings.replace(**rule)
        mask = combine(data["teacher_prob"], data["teacher_mask"], s_prob, inp, s)
        rows.append({"variant": key, "case": case_id, "teacher": CASES[case_id], "rule": "recipe" if not rule
                     else "+".join(f"{k}={v}" for k, v in rule.items()), "seconds": seconds,
                     "settings": {**overrides}, **score(mask, data["label"])})
    rows.append({"variant": "teacher", "case": case_id, "teacher": CASES[case_id], "rule": "teacher",
                 "seconds": data["meta"]["seconds"], "settings": {},
                 **score(data["teacher_mask"], data["label"])})
    with open(OUT / "rows.jsonl", "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    t = rows[-1]
    for row in rows[:-1]:
        print(f"{key:14s} {case_id} {row['rule']:32s} dice {row['dice']:.4f} ({row['dice'] - t['dice']:+.4f}) "
              f"cldice {row['cldice']:.4f} ({row['cldice'] - t['cldice']:+.4f}) prec {row['precision']:.3f} "
              f"rec {row['recall']:.3f} {seconds:.0f} s", flush=True)
    return rows


def _markdown(df) -> str:
    cols = list(df.columns)
    fmt = [lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt[0](v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def table() -> None:
    """Write the per-case table (latest row per variant / rule / case) as CSV and markdown; print the summary."""
    import pandas as pd

    rows = [json.loads(line) for line in open(OUT / "rows.jsonl")]
    df = pd.DataFrame(rows).drop(columns=["settings"])
    df = df.drop_duplicates(["variant", "rule", "case"], keep="last")
    teacher = df[df.variant == "teacher"].set_index("case")
    df["d_dice"] = df.dice - df.case.map(teacher.dice)
    df["d_cldice"] = df.cldice - df.case.map(teacher.cldice)
    df = df.sort_values(["teacher", "variant", "rule", "case"])
    df.to_csv(OUT / "ablation.csv", index=False)
    summary = (df.groupby(["teacher", "variant", "rule"])
               .agg(n=("case", "size"), dice=("dice", "mean"), cldice=("cldice", "mean"),
                    precision=("precision", "mean"), recall=("recall", "mean"), d_dice=("d_dice", "mean"),
                    d_cldice=("d_cldice", "mean"), worst_d_dice=("d_dice", "min"),
                    worst_d_cldice=("d_cldice", "min"), seconds=("seconds", "mean"))
               .reset_index())
    with open(OUT / "ablation.md", "w") as fh:
        fh.write("# Self-training ablation\n\n## Per case\n\n")
        fh.write(_markdown(df))
        fh.write("\n\n## Means per convention\n\n")
        fh.write(_markdown(summary))
        fh.write("\n")
    with pd.option_context("display.width", 250, "display.max_rows", 500, "display.max_columns", 30):
        print(summary.round(4).to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="recipe")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--set", default="{}", help="JSON overrides applied to every variant")
    parser.add_argument("--tag", default="", help="suffix of the variant names (screening runs)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="rescore cached student probabilities")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        extra = json.loads(args.set)
        for case_id in args.cases.split(","):
            for name in args.variants.split(","):
                run_variant(name, {**VARIANTS[name], **extra}, case_id, tag=args.tag, reuse=args.reuse)
    table()


if __name__ == "__main__":
    main()
