"""Healing: from a monitoring finding to a retrained, gated challenger, promoted by policy
(issue 20). An orchestrator: it reads inference records and outcomes, runs monitoring's
windows, trains with the normal trainer and gates with the normal gate; it owns only the
decisions between them.

| module | owns |
| --- | --- |
| ``policy`` | the policy file (``heal.toml``): keys, defaults, validation, errors naming key and value |
| ``settings`` | the process's settings (``CREDIT_RISK_HEAL_POLICY``, the training settings, the lock folder) |
| ``tags`` | every ``heal.*`` tag key and value written on attempt runs, challenger runs and versions |
| ``assess`` | the policy's windows over the Production version, and whether they trigger a challenger |
| ``challenger_data`` | the challenger's training file: original rows, labelled production rows, the out-of-time holdout |
| ``attempts`` | one attempt as an MLflow run: the lease (one attempt at a time), the cooldown, the local lock |
| ``heal`` | ``heal_once``: one evaluation of the policy, start to end, and its result object |

Data flows one way: records and outcomes (``logging_sidecar.reader``,
``monitoring.outcomes``) into ``assess`` and ``challenger_data``; the file into
``training.train.train_candidate``; the candidate into ``training.gate.challenge``; the
decision into the registry (``training.registry``) only when the policy and the gate allow it.

Nothing is imported here, so that ``credit-risk --help`` and ``credit-risk status`` stay light.
"""
