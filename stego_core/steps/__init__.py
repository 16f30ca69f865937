"""The tracked steps: each opens an MLflow run, logs its config, data, metrics and pictures, and calls the pure
array / torch modules of :mod:`stego_core` for the work.

- :mod:`~stego_core.steps.prepare`: volumes -> preprocessed crops in the seed's dataset layout;
- :mod:`~stego_core.steps.training`: STEGO training (``run_train``);
- :mod:`~stego_core.steps.evaluation`: reconstruction + metrics of any segmenter (``run_baseline``,
  ``run_reconstruct``);
- :mod:`~stego_core.steps.pipeline`: all of them nested under one ``pipeline`` run (``run_main``).
"""
