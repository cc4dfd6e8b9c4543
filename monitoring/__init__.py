"""Monitoring: drift and delayed-outcome monitoring of a model version over its shipped
inference records (issue 19).

| module | owns |
| --- | --- |
| ``status`` | statuses, thresholds, and how a figure becomes a status |
| ``drift`` | PSI, KS, missing and out-of-range shares, score and confidence, per window |
| ``outcomes`` | the outcome CSV, its strict parsing, idempotent storage in MLflow, reading back |
| ``performance`` | the join of outcomes to records, AUC, Gini, KS, Brier, calibration |
| ``window`` | one window: records, profile, outcomes, thresholds in; one result out |
| ``report`` | figures and the monitoring run in MLflow |
| ``store`` | monitoring's experiments and the profile among a training run's artifacts |

Data flows one way: records (``logging_sidecar.read_records``) and outcomes
(``read_outcomes``) with a profile (``store.load_profile``) into ``monitor_window``, whose
result goes to ``report.log_monitoring_run``, to the command's output, and to a service's
gauges.

The reference profile each version carries is made at training and read here: its format is
``training.profile``, the one module of ``training`` monitoring imports.
"""
