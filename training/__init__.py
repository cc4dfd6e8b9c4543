"""Training: read and fingerprint the data, fit the pipeline, log the run to MLflow,
register ``credit-risk-model`` and promote it to ``Production`` through a gate; and the
reference profile each version carries (``training.profile``), which monitoring reads."""
