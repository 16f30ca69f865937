"""Does DINO pretraining on CPU beat random weights? One pretraining run with a label-scored token probe logged
against steps, beside the same probe on random weights (issue 22, item 3).

The probe (the token probe of ``benchmarks/RESULTS.md``): the ``--probe-crops`` crops per case with the largest
fraction of pixels above the case's 99th brain percentile (chosen without labels), the backbone's patch tokens,
spherical k-means with K clusters (faiss, fixed seed), cluster ids nearest-upsampled to pixels, and the Dice of
the best union of clusters against the label (clusters ranked by vessel fraction; an oracle read-out of how well
the tokens *can* separate vessels, not a method). Labels only score: the pretraining step never sees them.

Logged on the pretraining run, every ``--probe-every`` steps: ``probe/dice_k<K>`` of the teacher, and
``probe/random_dice_k<K>`` (the mean over ``--random-seeds`` randomly initialised backbones of the same
architecture, the control; constant over steps, logged at every probe step so the two lines share a chart),
with ``pretrain/teacher_entropy`` from the step itself. The summary is printed as a table.

    python benchmarks/dino_probe.py --root ../shared/data --max-steps 1000 --batch-size 16 --n-local 2
    python benchmarks/dino_probe.py --root ../shared/data --resume <run id>      # continue an interrupted run
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from stego_core.data.cases import (
    DataConfig,
    discover_cases,
    make_crop_set,
    preprocess_case,
)
from stego_core.data.sampling import bright_threshold
from stego_core.data.slicing import SlicingConfig
from stego_core.features.backbones import get_spec
from stego_core.features.base import normalize_input
from stego_core.features.vit import create_vit
from stego_core.features.dino import AugmentConfig
from stego_core.methods.stego.mapping import map_clusters_dice
from stego_core.steps.pretrain import PretrainConfig, run_pretrain


def probe_crops(root: str, per_case: int, slicing: SlicingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Crops ``(N, P, P)`` and labels ``(N, P, P)``: per labelled case the ``per_case`` crops with the largest
    fraction of pixels above its 99th brain percentile (a label-free choice)."""
    data = DataConfig(source="folder", root=root)
    crops, labels = [], []
    for case in discover_cases(Path(root), require_labels=True):
        prepared = preprocess_case(case, data)
        cs = make_crop_set([prepared], slicing)
        thr = bright_threshold(prepared.image, prepared.brain_mask, 99.0)
        bright = (cs.crops > thr).mean(axis=(1, 2))
        keep = np.argsort(-bright, kind="stable")[:per_case]
        crops.append(cs.crops[keep])
        labels.append(cs.labels[keep])
    return np.concatenate(crops), np.concatenate(labels)


@torch.no_grad()
def token_probe(backbone: torch.nn.Module, spec, crops: np.ndarray, labels: np.ndarray, ks: Sequence[int],
                *, seed: int = 0, batch_size: int = 128) -> dict[int, float]:
    """Best-union Dice of spherical k-means on the backbone's patch tokens, for each K in ``ks``."""
    import faiss

    tokens = []
    for i in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[i:i + batch_size])[:, None]
        out = backbone.forward_features(normalize_input(x, spec)).float()[:, backbone.num_prefix_tokens:]
        tokens.append(torch.nn.functional.normalize(out, dim=-1).cpu().numpy())
    t = np.ascontiguousarray(np.concatenate(tokens), dtype=np.float32)  # (N, g*g, C)
    n, hw, c = t.shape
    g = int(np.sqrt(hw))
    up = crops.shape[-1] // g
    result = {}
    for k in ks:
        km = faiss.Kmeans(c, k, niter=25, seed=seed, spherical=True)
        km.train(t.reshape(-1, c))
        _, ids = km.index.search(t.reshape(-1, c), 1)
        ids = ids.reshape(n, g, g).repeat(up, axis=1).repeat(up, axis=2)
        vessel = map_clusters_dice(ids, labels.astype(np.int64), k)
        pred = vessel[ids]
        inter = float(np.logical_and(pred, labels).sum())
        result[k] = 2.0 * inter / max(float(pred.sum() + labels.sum()), 1.0)
    return result


def make_probe(spec, crops: np.ndarray, labels: np.ndarray, ks: Sequence[int], random_seeds: Sequence[int]
               ) -> tuple[Callable[[torch.nn.Module], dict[str, float]], dict[int, float]]:
    """The probe callback for :func:`run_pretrain` and the random-weight control it logs beside the teacher."""
    random = [token_probe(create_vit(spec, seed=s, dynamic_img_size=True).eval(), spec, crops, labels, ks)
              for s in random_seeds]
    control = {k: float(np.mean([r[k] for r in random])) for k in ks}

    def probe(backbone: torch.nn.Module) -> dict[str, float]:
        dice = token_probe(backbone, spec, crops, labels, ks)
        out = {f"probe/dice_k{k}": v for k, v in dice.items()}
        out.update({f"probe/random_dice_k{k}": v for k, v in control.items()})
        logging.info("probe: %s", ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
        return out

    return probe, control


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/mra", help="folder of labelled case folders (pretraining and probe)")
    p.add_argument("--backbone", default="mra_vit_t4_p2")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-local", type=int, default=2)
    p.add_argument("--probe-every", type=int, default=100)
    p.add_argument("--probe-crops", type=int, default=200, help="probe crops per case")
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="random initialisations averaged as the control (seed 0 is the run's own start)")
    p.add_argument("--resume", default="", help="pretraining run id to continue")
    p.add_argument("--experiment", default="stego-vessels-dino-probe")
    p.add_argument("--output", default="outputs/dino_probe")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    spec = get_spec(args.backbone)
    slicing = SlicingConfig()
    crops, labels = probe_crops(args.root, args.probe_crops, slicing)
    print(f"probe: {len(crops)} crops, {labels.mean() * 100:.2f} % vessel pixels", flush=True)
    probe, control = make_probe(spec, crops, labels, args.ks, args.random_seeds)
    print("random-weight control:", {k: round(v, 4) for k, v in control.items()}, flush=True)
    cfg = PretrainConfig(data=DataConfig(source="folder", root=args.root), backbone=args.backbone,
                         max_steps=args.max_steps, batch_size=args.batch_size,
                         augment=dataclasses.replace(AugmentConfig(), n_local=args.n_local),
                         figure_every=args.probe_every, checkpoint_every=args.probe_every, resume=args.resume,
                         experiment=args.experiment, output=args.output, progress=False)
    result = run_pretrain(cfg, probe=probe, probe_every=args.probe_every, run_name="dino-probe")
    print(f"run {result.run_id}: {result.metrics.get('final/steps')} steps, teacher entropy ratio "
          f"{result.metrics.get('final/teacher_entropy_ratio'):.3f}")
    from stego_core.platform import tracking
    client = tracking.client()
    print("| step | " + " | ".join(f"teacher K={k} | random K={k}" for k in args.ks) + " |")
    history = {k: {m.step: m.value for m in client.get_metric_history(result.run_id, f"probe/dice_k{k}")}
               for k in args.ks}
    for step in sorted(history[args.ks[0]]):
        print(f"| {step} | " + " | ".join(f"{history[k].get(step, float('nan')):.4f} | {control[k]:.4f}"
                                          for k in args.ks) + " |")


if __name__ == "__main__":
    main()
