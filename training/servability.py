"""Whether a registered version can be served: loaded exactly as serving loads it
(``model.scoring.load``) and made to score a few rows (its logged input example, else rows of
the bundled sample). ``credit-risk promote`` and ``rollback`` check their target with it
before anything in the registry moves; the gate checks its candidate more thoroughly itself.
"""

from __future__ import annotations

import numpy as np

from model import scoring
from model.identity import version_uri
from training.data import BUNDLED_SAMPLE, load_training_data
from training.promotion_history import PromotionError

_SAMPLE_ROWS = 5


def check_servable(version: str) -> str:
    """Load ``version`` and score a few rows; raise ``PromotionError`` if it cannot, so that
    Production is left as it is. Returns what was scored, for the operator."""
    uri = version_uri(version)
    try:
        loaded = scoring.load(uri)
        rows, scored = loaded.pyfunc.input_example, "its input example"
        if rows is None:
            rows, scored = (
                load_training_data(BUNDLED_SAMPLE).features.head(_SAMPLE_ROWS),
                "the bundled sample",
            )
        prediction, probability = loaded.score_frame(rows)
    # Whatever stops it here would stop serving it, so every failure is a refusal.
    except Exception as error:
        raise PromotionError(
            f"v{version} cannot be served, so Production is left as it is: loading {uri} and "
            f"scoring a few rows failed with {type(error).__name__}: {error}"
        ) from error
    if not (
        len(prediction) == len(probability) == len(rows)
        and np.all((probability >= 0) & (probability <= 1))
        and np.isin(prediction, (0, 1)).all()
    ):
        raise PromotionError(
            f"v{version} cannot be served, so Production is left as it is: {uri} answered "
            f"{len(rows)} rows of {scored} with invalid outputs"
        )
    return f"{len(rows)} rows of {scored}"
