"""Cache the self-training teachers' outputs on the shared real cases.

For each case: ``image.npy`` (the preprocessed image, 0 outside the mask), ``full.npy`` (the same
standardisation applied to the unmasked image, for a student that may look past the mask), ``brain_mask.npy``,
``teacher_prob.npy`` (float16), ``teacher_mask.npy`` and ``label.npy`` (scoring only) under
``outputs/selftrain_cache/<case>/``, plus ``teacher.json`` (seconds, teacher scores).

    python -m benchmarks.selftrain_cache [case ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "outputs" / "selftrain_cache"
#: case -> teacher preset (the label convention of its manual label)
CASES = {
    "mra_mni_0656": "best_mra",
    "mra_mni_0590": "best_mra_tree",
    "mra_mni_0591": "best_mra_tree",
    "mra_mni_0592": "best_mra_tree",
    "mra_mni_0640": "best_mra_tree",
}


def cache_case(case_id: str, *, force: bool = False) -> Path:
    """Run the teacher preset of ``case_id`` once and write its outputs; return the case's cache folder."""
    from stego_core.methods.classical import build_segmenter
    from stego_core.config import BaselineConfig, load_config
    from stego_core.data.cases import ensure_cases, preprocess_case
    from stego_core.data.io import load_case
    from stego_core.evaluation.metrics import evaluate_segmentation
    from stego_core.engine.postprocess import apply_postprocessing
    from stego_core.data.preprocess import standardize
    from stego_core.engine.reconstruction import predict_volume

    out = CACHE / case_id
    if (out / "teacher.json").is_file() and not force:
        return out
    preset = CASES[case_id]
    cfg = load_config(BaselineConfig, str(ROOT / "experiments" / "configs" / f"{preset}.yaml"),
                      ["data.source=folder", f"data.root={DATA}", "split=all"])
    case = next(c for c in ensure_cases(cfg.data) if c.case_id == case_id)
    t0 = time.perf_counter()
    prepared = preprocess_case(case, cfg.data)
    settings = dict(cfg.settings)
    try:  # slice-based methods take the slicing axis; volume-level and intensity ones do not
        seg = build_segmenter(cfg.method, slice_axis=cfg.engine.axis, **settings)
    except ValueError:
        seg = build_segmenter(cfg.method, **settings)
    prob = predict_volume(seg, prepared.image, prepared.brain_mask, cfg.engine, progress=False)
    post = apply_postprocessing(prob, prepared.image, cfg.postprocess_steps(), None, threshold=0.5,
                                brain_mask=prepared.brain_mask, slice_axis=cfg.engine.axis,
                                crf_settings=cfg.crf_settings)
    seconds = time.perf_counter() - t0
    raw = load_case(case).image.data.astype(np.float32)
    full = standardize(raw, prepared.brain_mask, method=cfg.data.standardize)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image.npy", prepared.image.astype(np.float32))
    np.save(out / "full.npy", full.astype(np.float32))
    np.save(out / "brain_mask.npy", prepared.brain_mask.astype(bool))
    np.save(out / "teacher_prob.npy", np.asarray(post.prob, dtype=np.float16))
    np.save(out / "teacher_mask.npy", np.asarray(post.mask, dtype=bool))
    np.save(out / "label.npy", np.asarray(prepared.label) > 0)
    scores = evaluate_segmentation(post.mask, prepared.label)
    meta = {"case": case_id, "teacher": preset, "seconds": seconds, "skull_strip": cfg.data.skull_strip,
            "brain_fraction": float(prepared.brain_mask.mean()), "label_retention": prepared.label_retention,
            "teacher_voxels": int(post.mask.sum()), **{k: float(v) for k, v in scores.items()}}
    (out / "teacher.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta), flush=True)
    return out


if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        cache_case(name)
