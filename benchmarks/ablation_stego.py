"""STEGO ablation: which part makes STEGO see vessels offline? One MLflow parent run, every variant nested.

Protocols (``--protocols``):

- ``phantoms``: the demo phantoms, one held out (the default split);
- ``single``: mra_mni_0656 alone, trained on its own slices without labels, brightness rule for the vessel
  cluster, evaluated on the same volume (``--single-root``: a folder holding only that case);
- ``rotate``: the real cases of ``--real-root``, each held out once (``test_cases=<case>``): STEGO trained on
  the other four, clusters mapped to vessel with their labels (the union of clusters that maximises Dice on
  them; recorded as the run's ``cluster_mapping_rule``), evaluated on the held-out one. The phantoms map the
  same way on their two training phantoms.

For each data set, DINO pretraining of the in-domain ViT once on all its volumes (labels never read;
time-boxed), shared by its protocols. Variants: STEGO with (a) the classical featurizer, (b) the in-domain DINO
backbone (``runs:/<pretrain run>``), (c) the same ViT with random weights, each with each ``--samplings``
(label-free bright-crop sampling and uniform), the bright ones also with the dense CRF on their
reconstruction (``--crf [seed] [thin]``: one row per named setting of :data:`stego_core.engine.crf.CRF_PRESETS`, ``seed``
alone when no name is given; about 3.5 min per real volume and setting on one core); beside the percentile and
GMM baselines on the same held-out volume.

Scores are Dice / clDice / precision / recall of the full 3D reconstruction of the held-out volume (STEGO: the
training run's final validation, stride ``--val-stride``; ``-crf`` / ``-crf-thin``: the seed's / the ``thin``
CRF of those probabilities). A variant with precision < 0.2, or recall > 0.98 at precision < 0.5, is tagged
``degenerate=true``. The table goes to the parent run (``ablation.md``, ``ablation.json``) and to stdout.

Example (the budget used for the issue's closing note)::

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db OMP_NUM_THREADS=1 python benchmarks/ablation_stego.py \\
        --protocols phantoms single rotate --real-root ../shared/data --single-root data/mra_0656 --crf

The rotation per labelling convention (``benchmarks/RESULTS.md``, "STEGO at its ceiling offline"): the tree
cases from a folder holding only them, ``--real-root <tree cases> --n-clusters 1024``; the lumen case 0656 with
``--rotate-cases mra_mni_0656 --cluster-rule bright_cut`` (both with ``--vit mra_vit_t4_p1 --patch-size 16
--val-stride 16 --variants random --samplings none``).

``--weights <file or runs:/id>`` skips the pretraining: the ``dino`` rows use those teacher weights of ``VIT``
(e.g. a GPU pretraining's ``teacher_backbone.safetensors``, ``benchmarks/gpu_stego.sh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stego_core._markdown import cell
from stego_core.config import load_config
from stego_core.data.cases import DataConfig, ensure_cases
from stego_core.data.phantom import PhantomConfig
from stego_core.engine.crf import CRF_PRESETS
from stego_core.engine.reconstruction import EngineConfig
from stego_core.platform import tracking
from stego_core.engine.postprocess import PostprocessStep
from stego_core.steps.evaluation import BaselineConfig, ReconstructConfig, run_baseline, run_reconstruct
from stego_core.steps.pretrain import PretrainConfig, run_pretrain
from stego_core.steps.training import TrainConfig, run_train

KEYS = ("dice", "cldice", "precision", "recall")
VIT = "mra_vit_t4_p2"


@dataclass(frozen=True)
class Fold:
    """One evaluation: a protocol's data, which cases are held out, and the data set whose pretraining it uses."""

    name: str
    dataset: str
    data: DataConfig
    test_cases: tuple[str, ...] = ()
    cluster_rule: str = "dice"


@dataclass(frozen=True)
class GivenWeights:
    """Teacher weights given with ``--weights`` (a file or ``runs:/<id>``) in place of a pretraining run."""

    weights_uri: str


def is_degenerate(precision: float, recall: float) -> bool:
    """Precision < 0.2, or recall > 0.98 at precision < 0.5: the variant marks noise or (nearly) everything.

    A near-complete recall alone is no sign (the percentile row on mra_mni_0656: recall .998 at precision .69).
    """
    return precision < 0.2 or (recall > 0.98 and precision < 0.5)


def folds(args: argparse.Namespace) -> list[Fold]:
    """The evaluations the chosen protocols make, in order."""
    out = []
    for protocol in args.protocols:
        if protocol == "phantoms":
            data = DataConfig(source="phantom", root=args.phantom_root,
                              phantom=PhantomConfig(n_volumes=args.phantom_n, shape=tuple(args.phantom_shape)))
            out.append(Fold("phantoms", "phantoms", data))
        elif protocol == "single":
            out.append(Fold("single-0656", "mra", DataConfig(source="folder", root=args.single_root),
                            cluster_rule="brightness"))
        elif protocol == "rotate":
            data = DataConfig(source="folder", root=args.real_root)
            cases = [c.case_id for c in ensure_cases(data)]
            held = args.rotate_cases or cases
            out += [Fold(f"rotate-{cid}", "mra", data, test_cases=(cid,)) for cid in held]
        else:
            raise ValueError(f"unknown protocol {protocol!r}; expected phantoms, single or rotate")
    return out


def pretrain_data(args: argparse.Namespace, dataset: str, fold: Fold) -> DataConfig:
    """The volumes a data set's DINO pretraining reads: every real case (labels never read), or the phantoms."""
    return fold.data if dataset == "phantoms" else DataConfig(source="folder", root=args.real_root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocols", nargs="+", default=["phantoms", "single"])
    p.add_argument("--real-root", default="data/mra", help="folder of the real cases (rotation, pretraining)")
    p.add_argument("--single-root", default="data/mra_0656", help="folder holding only the mra_mni_0656 case")
    p.add_argument("--rotate-cases", nargs="*", default=[], help="held-out cases of the rotation (default all)")
    p.add_argument("--phantom-root", default="data/phantoms")
    p.add_argument("--phantom-n", type=int, default=3)
    p.add_argument("--phantom-shape", type=int, nargs=3, default=[96, 96, 64])
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--pretrain-minutes", type=float, default=4.0)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--max-crops", type=int, default=1500)
    p.add_argument("--n-clusters", type=int, default=64)
    p.add_argument("--cluster-fit", default="kmeans", choices=["probe", "kmeans"])
    p.add_argument("--alpha", type=float, default=None, help="model.alpha (default: the config's)")
    p.add_argument("--val-stride", type=int, default=32)
    p.add_argument("--vit", default=VIT, help="the in-domain ViT of the dino and random rows (mra_vit_t4_p1: one "
                   "token per voxel, with --patch-size 16)")
    p.add_argument("--cluster-rule", default="", help="model.cluster_rule of every fold (default: dice on the "
                   "rotation's training volumes, brightness on the single volume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="outputs/feature_cache")
    p.add_argument("--output", default="outputs/ablation")
    p.add_argument("--experiment", default="stego-ablation")
    p.add_argument("--variants", nargs="+", default=["classical", "dino", "random"])
    p.add_argument("--samplings", nargs="+", default=["bright", "none"])
    p.add_argument("--baselines", nargs="*", default=["percentile", "gmm"])
    p.add_argument("--crf", nargs="*", default=None, choices=tuple(CRF_PRESETS), metavar="PRESET",
                   help="also score the dense CRF of every bright-crop STEGO reconstruction, one row per named "
                        f"setting ({', '.join(CRF_PRESETS)}; none named: seed)")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="train.accelerator of the STEGO rows (the pretraining uses a GPU when one is present)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--write", default="", help="also write the table here (ablation.md, ablation.json)")
    p.add_argument("--weights", default="",
                   help="teacher weights of the dino rows (a file or runs:/<pretrain run>); skips the pretraining")
    args = p.parse_args(argv)
    crf_names = [] if args.crf is None else (args.crf or ["seed"])
    torch.set_num_threads(args.threads)

    table: list[dict] = []
    pretrained: dict[str, object] = {}

    def add(row: dict, run_id: str | None) -> None:
        row["degenerate"] = is_degenerate(row["precision"], row["recall"])
        if run_id:
            tracking.client().set_tag(run_id, "degenerate", str(row["degenerate"]).lower())
        table.append(row)
        print(json.dumps(row, default=str), flush=True)

    with tracking.start_run(args.experiment, run_name="ablation-stego", output_root=args.output,
                            tags={"step": "ablation", "method": "ablation"}) as parent:
        tracking.log_params({f"budget.{k}": v for k, v in vars(args).items()})
        for fold in folds(args):
            if "dino" in args.variants and args.weights:
                pretrained.setdefault(fold.dataset, GivenWeights(args.weights))
            if "dino" in args.variants and fold.dataset not in pretrained:
                t0 = time.time()
                pcfg = load_config(PretrainConfig, None, {
                    "backbone": args.vit, "max_steps": 2000, "max_minutes": args.pretrain_minutes,
                    "batch_size": args.pretrain_batch, "augment.n_local": 4, "figure_every": 50,
                    "slicing.patch_size": args.patch_size, "augment.global_size": args.patch_size,
                    "augment.local_size": args.patch_size // 2, "seed": args.seed,
                    "progress": False, "output": f"{args.output}/pretrain", "experiment": args.experiment})
                pre = run_pretrain(dataclasses.replace(pcfg, data=pretrain_data(args, fold.dataset, fold)),
                                   nested=True, run_name=f"pretrain-{fold.dataset}", tags={"dataset": fold.dataset})
                pretrained[fold.dataset] = pre
                table.append({"dataset": fold.dataset, "variant": "dino-pretrain", "run_id": pre.run_id,
                              "steps": pre.metrics.get("final/steps"),
                              "crops_per_s": pre.metrics.get("final/crops_per_s"),
                              "teacher_entropy_ratio": pre.metrics.get("final/teacher_entropy_ratio"),
                              "seconds": time.time() - t0})
            pre = pretrained.get(fold.dataset)
            for variant in args.variants:
                backbone = {"classical": "classical", "dino": args.vit, "random": args.vit}[variant]
                weights = {"classical": "none", "dino": pre.weights_uri if pre else "", "random": "random"}[variant]
                for sampling in args.samplings:
                    t1 = time.time()
                    over = {"model.backbone": backbone, "model.weights": weights, "model.code_dim": 32,
                            "model.n_clusters": args.n_clusters, "model.cluster_fit": args.cluster_fit,
                            "model.cluster_rule": args.cluster_rule or fold.cluster_rule, "train.max_steps": args.max_steps,
                            "train.val_every_n_steps": args.max_steps, "train.progress": False,
                            "train.accelerator": args.accelerator, "train.cache_dir": args.cache_dir, "train.seed": args.seed,
                            "sampling.method": sampling, "sampling.max_crops": args.max_crops,
                            "val_stride": args.val_stride, "slicing.patch_size": args.patch_size,
                            "slicing.stride": args.patch_size // 2, "output": f"{args.output}/train",
                            "experiment": args.experiment, "log_model": bool(crf_names)}
                    if backbone == "classical":
                        over["model.res"] = 16
                    if args.alpha is not None:
                        over["model.alpha"] = args.alpha
                    cfg = dataclasses.replace(load_config(TrainConfig, None, over), data=fold.data,
                                              test_cases=fold.test_cases)
                    name = f"{variant}-{sampling}"
                    res = run_train(cfg, nested=True, run_name=f"stego-{name}-{fold.name}",
                                    tags={"dataset": fold.name, "variant": name})
                    row = {"dataset": fold.name, "variant": f"stego-{name}", "run_id": res.run_id,
                           "mapping": res.mapping_rule, "seconds": time.time() - t1,
                           **{k: res.metrics.get(f"val/{k}", float("nan")) for k in KEYS}}
                    add(row, res.run_id)
                    for preset in crf_names if sampling == "bright" and res.model_uri else ():
                        # the one evaluation run: the trained model reconstructed on the fold's held-out volume,
                        # its probabilities refined by the dense CRF of the named preset
                        t2 = time.time()
                        held = fold.test_cases or (_first_held_out(cfg),)
                        crf = run_reconstruct(ReconstructConfig(
                            data=fold.data, test_cases=tuple(held), model_uri=res.model_uri, progress=False,
                            viewer=False, postprocess=(PostprocessStep("crf", preset=preset),),
                            output=f"{args.output}/crf", experiment=args.experiment), nested=True)
                        add({"dataset": fold.name, "variant": f"stego-{name}-crf-{preset}", "run_id": crf.run_id,
                             "mapping": res.mapping_rule, "seconds": time.time() - t2,
                             **{k: crf.summary.get(f"{k}_mean", float("nan")) for k in KEYS}}, crf.run_id)
            for method in args.baselines:
                t1 = time.time()
                bres = run_baseline(BaselineConfig(data=fold.data, method=method, output=f"{args.output}/baseline",
                                                   engine=EngineConfig(patch_size=None, blend="constant"),
                                                   test_cases=fold.test_cases, experiment=args.experiment,
                                                   progress=False),
                                    nested=True, tags={"dataset": fold.name, "variant": method})
                add({"dataset": fold.name, "variant": method, "run_id": bres.run_id, "mapping": "",
                     "seconds": time.time() - t1,
                     **{k: bres.summary.get(f"{k}_mean", float("nan")) for k in KEYS}}, bres.run_id)
            tracking.log_text(format_table(table), "ablation.md")
            tracking.log_text(json.dumps(table, indent=2, default=str), "ablation.json")
        tracking.log_metrics({f"{r['dataset']}.{r['variant']}.{k}": float(r[k]) for r in table for k in KEYS
                              if k in r})
        print(format_table(table))
        print(f"parent run {parent.run_id}")
        if args.write:
            folder = Path(args.write)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "ablation.md").write_text(format_table(table))
            (folder / "ablation.json").write_text(json.dumps(table, indent=2, default=str))
    return 0


def _first_held_out(cfg: TrainConfig) -> str:
    from stego_core.data.cases import split_cases

    cases = ensure_cases(cfg.data)
    return split_cases(cases, cfg.test_fraction, seed=cfg.split_seed, test_ids=cfg.test_cases)[1][0].case_id


def format_table(table: list[dict]) -> str:
    """A Markdown table: one row per data set and variant."""
    lines = ["| data set | variant | mapping | Dice | clDice | precision | recall | degenerate | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if "dice" not in r:
            lines.append(f"| {cell(r['dataset'])} | {cell(r['variant'])} (steps {r.get('steps')}, "
                         f"{r.get('crops_per_s', float('nan')):.1f} crops/s, teacher entropy "
                         f"{r.get('teacher_entropy_ratio', float('nan')):.2f} log K) | | | | | | | "
                         f"{r['seconds']:.0f} |")
            continue
        lines.append(f"| {cell(r['dataset'])} | {cell(r['variant'])} | {cell(r.get('mapping', ''))} | "
                     f"{r['dice']:.3f} | {r['cldice']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{'yes' if r['degenerate'] else ''} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
