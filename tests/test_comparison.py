"""Statistics across cases on parent runs: the shared helper, the ablation parent and a sweep's best trials."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from stego_core.platform import tracking
from stego_core.steps.comparison import IMAGE_KEY, log_comparison

PER_CASE = {"otsu": {"a": {"dice": 0.60, "cldice": 0.50}, "b": {"dice": 0.55, "cldice": 0.52},
                     "c": {"dice": 0.70, "cldice": 0.61}},
            "stego": {"a": {"dice": 0.70, "cldice": 0.66}, "b": {"dice": 0.65, "cldice": 0.60},
                      "c": {"dice": 0.72, "cldice": 0.70}}}


def artifacts(run_id: str) -> set[str]:
    return {a.path for a in tracking.client().list_artifacts(run_id)}


def read_artifact(run_id: str, path: str) -> str:
    return Path(tracking.download_artifacts(f"runs:/{run_id}/{path}")).read_text()


def image_steps(run_id: str, key: str) -> set[int]:
    """Steps of the stepped image ``key`` (MLflow files them as images/<key with / as ~>+step+<n>+...)."""
    names = [a.path for a in tracking.client().list_artifacts(run_id, "images")]
    prefix = "images/" + key.replace("/", "~") + "+step+"
    return {int(n[len(prefix):].split("+")[0]) for n in names if n.startswith(prefix)}


@pytest.mark.slow
def test_log_comparison_logs_tables_chart_and_says_n_is_too_small():
    with tracking.start_run("exp-comparison") as run:
        note = log_comparison(PER_CASE, title="Across cases")
    assert {"comparison.csv", "comparison.md", "comparison_ci.png"} <= artifacts(run.run_id)
    assert image_steps(run.run_id, IMAGE_KEY) == {0}  # the card opens on step 0, where the chart is
    table = list(csv.reader(io.StringIO(read_artifact(run.run_id, "comparison.csv"))))
    assert table[0] == ["case_id", "otsu/dice", "otsu/cldice", "stego/dice", "stego/cldice"]
    assert [row[0] for row in table[1:]] == ["a", "b", "c"] and table[1][1] == "0.6000"
    md = read_artifact(run.run_id, "comparison.md")
    assert "**dice** across cases" in md and "**cldice** across cases" in md and "**stego** (best)" in md
    assert note.startswith("### Across cases") and "comparison.csv" in note and IMAGE_KEY in note
    assert note.startswith("### Across cases (n = 3 cases)")
    # what n = 3 cannot support is said once (not once per method and metric), and not printed degenerate
    assert note.count("No Wilcoxon test: with n = 3 cases no two-sided p can be below 0.25") == 1
    assert md.count("No Wilcoxon test") == 1 and "Wilcoxon p |" not in md and "attainable" not in md
    with tracking.start_run("exp-comparison") as empty:
        assert log_comparison({"otsu": {}}) == ""
    assert not artifacts(empty.run_id) & {"comparison.csv", "comparison.md"}


def test_one_case_gives_one_sentence_and_no_degenerate_statistics():
    one = {m: {"a": rows["a"]} for m, rows in PER_CASE.items()}
    with tracking.start_run("exp-comparison") as run:
        note = log_comparison(one, title="Across cases")
    assert artifacts(run.run_id) & {"comparison.csv", "comparison.md", "comparison_ci.png"} == {"comparison.csv"}
    assert image_steps(run.run_id, IMAGE_KEY) == set()
    assert note.startswith("### Across cases (n = 1 case)") and note.count("n = 1 case: no spread") == 1
    assert "±" not in note and "CI" not in note.replace("a CI 3", "") and "Wilcoxon" not in note


@pytest.mark.slow
def test_ablation_parent_compares_variants_across_cases(tmp_path):
    from stego_core.config import from_dict
    from stego_core.steps.ablation import AblationConfig, run_ablation

    cfg = from_dict(AblationConfig, {
        "datasets": [{"root": str(tmp_path / "ph"), "phantom": {"n_volumes": 2, "shape": [32, 32, 24]}}],
        "progress": False, "experiment": "ablation-tests", "output": str(tmp_path / "out"),
        "methods": [{"name": "percentile"}, {"name": "otsu"}],
        "variants": [{"name": "none"}, {"name": "largest", "postprocess": [{"step": "largest"}]}]})
    run_ablation(cfg)
    client = tracking.client()
    exp = client.get_experiment_by_name("ablation-tests")
    (parent,) = client.search_runs([exp.experiment_id], "tags.step = 'ablation'")
    assert {"ablation.csv", "ablation.md", "comparison.csv", "comparison.md"} <= artifacts(parent.info.run_id)
    note = parent.data.tags[tracking.NOTE_TAG]
    assert note.startswith("**Post-processing ablation**: 4 variants")
    assert "No Wilcoxon test: with n = 2 cases no two-sided p can be below 0.5" in note
    assert "No 95 % CI where n < 3 (cases)." in note
    header = read_artifact(parent.info.run_id, "comparison.csv").splitlines()[0].split(",")
    assert header[0] == "case_id" and "percentile|auto|none/dice" in header and "otsu|auto|largest/cldice" in header


def _sweep_config(**values):
    from sweeps.space import SweepConfig

    base = {"study_name": "cmp", "storage": "sqlite:///optuna.db", "experiment": "sweep-cmp",
            "heartbeat_interval_s": 0, "log_plots": False, "sampler": "grid", "pruner": "none",
            "base_overrides": ("data.root=data/tiny", "data.phantom.shape=[32, 32, 24]",
                               "data.phantom.n_volumes=2")}
    return SweepConfig(**{**base, **values})


def _parent(result) -> tuple[dict[str, str], set[str]]:
    run = tracking.client().get_run(result.parent_run_id)
    return run.data.tags, artifacts(result.parent_run_id)


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.slow
def test_sweep_parent_compares_best_trials_across_seeds_without_per_case_scores():
    from sweeps.driver import run_sweep

    def train(cfg, *, report=None, nested=False, run_name=None, tags=None):
        with tracking.start_run(cfg.experiment, run_name=run_name, nested=nested, tags=tags) as run:
            value = 0.2 * cfg.model.n_clusters + 0.01 * cfg.train.seed
            metrics = {"val/cldice": value, "val/dice": value / 2}
            tracking.log_metrics({"val_final/cldice": value, "val_final/dice": value / 2})
            return SimpleNamespace(run_id=run.run_id, metrics=metrics)

    cfg = _sweep_config(space={"model.n_clusters": {"type": "categorical", "choices": [2, 3, 4]}},
                        seeds=(0, 1, 2), n_trials=3)
    result = run_sweep(cfg, train_fn=train)
    assert result.best_params == {"model.n_clusters": 4}
    tags, files = _parent(result)
    note = tags[tracking.NOTE_TAG]
    assert "The 3 best trials across seeds" in note and "paired by seed" in note
    assert f"**trial {result.best_trial_number}** (best) | 3 | 0.8100" in note
    assert "No Wilcoxon test: with n = 3 seeds no two-sided p can be below 0.25" in note
    assert {"comparison.csv", "comparison.md"} <= files


@pytest.mark.slow
def test_sweep_parent_compares_best_trials_across_cases_when_trials_score_cases():
    from sweeps.driver import run_sweep

    def baseline(cfg, *, nested=False, tags=None):
        with tracking.start_run(cfg.experiment, nested=nested, tags=tags) as run:
            k = float(cfg.settings["k_std"])
            rows = {f"case_{i}": {"dice": 0.5 + 0.05 * i - 0.01 * k, "cldice": 0.4 + 0.02 * i + 0.01 * k}
                    for i in range(6)}
            tracking.log_metrics({f"{m}/{c}": v for c, row in rows.items() for m, v in row.items()})
            summary = {"cldice_mean": sum(r["cldice"] for r in rows.values()) / 6}
            tracking.log_metrics(summary)
            return SimpleNamespace(run_id=run.run_id, summary=summary)

    cfg = _sweep_config(target="baseline", base_config="experiments/configs/baseline.yaml",
                        base_overrides=("method=frangi", "settings.rule=mean_std", "data.root=data/tiny",
                                        "data.phantom.shape=[32, 32, 24]", "data.phantom.n_volumes=2",
                                        "progress=false"),
                        space={"settings.k_std": {"type": "categorical", "choices": [1.0, 2.0, 3.0]}},
                        n_trials=3, objective="cldice")
    result = run_sweep(cfg, baseline_fn=baseline)
    tags, _ = _parent(result)
    note = tags[tracking.NOTE_TAG]
    assert "The 3 best trials across cases (seeds averaged)" in note and "paired by seed" not in note
    assert "(n = 6 cases)" in note and "| Wilcoxon p |" in note and "No Wilcoxon test" not in note
    table = read_artifact(result.parent_run_id, "comparison.csv").splitlines()
    assert table[0].startswith("case_id,trial ") and len(table) == 7
