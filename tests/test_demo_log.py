"""``make demo``'s output as a log file holds it (CI, ``> demo.log``): the demo's entry point run as a process on tiny
phantoms, its stdout and stderr to a file, read back as a person reads it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from stego_core.steps.pipeline import crf_available

TINY = [  # the demo's plan (experiments/configs/main.yaml), shrunk as in tests/test_pipeline.py
    "data.phantom.shape=[32, 32, 24]", "slicing.patch_size=16", "slicing.stride=8",
    "methods={otsu: {}, stego: {settings: {model: {backbone: mra_vit_t4_p2, code_dim: 16, n_clusters: 8, res: 16, "
    "cluster_fit: kmeans, cluster_rule: dice}, train: {max_steps: 6, val_every_n_steps: 6, batch_size: 8, "
    "accelerator: cpu}}}, stego+crf: {}}",
    "pretrain.max_steps=2", "pretrain.batch_size=4", "pretrain.augment.global_size=16",
    "pretrain.augment.local_size=8", "pretrain.out_dim=64", "pretrain.hidden_dim=32", "pretrain.bottleneck_dim=16",
    "experiment=demo-log-tests",
]
#: What a progress bar leaves in a log: carriage returns and terminal escape sequences.
CONTROL = re.compile(r"\r|\x1b\[")


@pytest.mark.slow
def test_the_demo_log_names_every_step_and_has_no_bars_or_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, "-m", "experiments.main", *TINY, f"data.root={tmp_path / 'phantoms'}",
                             f"output={tmp_path / 'outputs'}"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, timeout=600).returncode
    text = log_path.read_text()
    assert rc == 0, text[-3000:]
    assert not CONTROL.search(text), "progress-bar control characters in the log"

    # a banner before and the elapsed time after every step, numbered out of the whole
    steps = ["prepare", "pretrain mra_vit_t4_p2", "otsu", "stego", *(["stego+crf"] if crf_available() else []),
             "comparison"]
    n = len(steps)
    for i, step in enumerate(steps, 1):
        assert re.search(rf"^\d\d:\d\d:\d\d INFO [\w.]+: ==== \[{i}/{n}\] {re.escape(step)}(: .*)? ====$", text,
                         re.M), f"no banner for {step}"
        assert re.search(rf"---- \[{i}/{n}\] {re.escape(step)} done in (\d+ min \d\d|[\d.]+) s \(total ", text), step
    # progress of the long loops as plain lines, the scores of each volume as they come
    assert re.search(r"pretrain: step 2/2 \(100 %\)", text) and re.search(r"train: step 6/6 \(100 %\)", text)
    assert re.search(r"otsu on phantom_\d+ \(1/3\): dice [\d.]+, cldice [\d.]+", text)

    # the last block: the run, its report, make ui
    tail = text.rstrip().splitlines()[-4:]
    assert tail[0].startswith("==== done in ") and tail[1].startswith("pipeline run  ")
    report = tail[2].split()[1]
    assert report.endswith("/report.html") and os.path.isfile(report) and "make ui" in tail[3]

    # no noise the project causes
    for noise in ("ModuleNotFoundError", "Downloading artifacts", "💡", "litlogger", "LeafSpec", "weight_norm",
                  "ckpt_path", "weights_only", "Saving pytorch model by Pickle", "Traceback"):
        assert noise not in text, noise
    masks = re.findall(r"case (\S+): ((?:brain|head) mask \(data.skull_strip=\w+\)) keeps", text)
    assert len(masks) == len(set(masks)), "a case's brain-mask line repeated"
