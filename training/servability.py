"""Whether a registered version can be served: checked and loaded exactly as serving loads it
(``model.verified``: its run in the training experiment, its files against the integrity
record training wrote, before anything is unpickled; then its logged held-out rows answered
bit for bit as at training) and made to score a few rows (its logged input example, else rows
of the bundled sample). ``credit-risk promote`` and ``rollback`` check their target with it
before anything in the registry moves; the gate checks its candidate through the same loader.
"""

from __future__ import annotations

import numpy as np

from model import verified
from model.identity import REGISTERED_MODEL_NAME, version_uri
from training.data import BUNDLED_SAMPLE, load_training_data
from training.promotion_history import PromotionError

_SAMPLE_ROWS = 5


def check_servable(version: str, verification: verified.VerificationSettings | None = None) -> str:
    """Check, load and score ``version``; raise ``PromotionError`` if serving would refuse it or
    could not serve it, so that Production is left as it is. Returns what was checked, for the
    operator. ``verification``: default from the environment, as serving reads it."""
    uri = version_uri(version)
    refused = f"v{version} cannot be served, so Production is left as it is"
    try:
        with verified.verified_version(REGISTERED_MODEL_NAME, version, settings=verification) as checked:
            loaded = checked.model
            rows, scored = loaded.pyfunc.input_example, "its input example"
            if rows is None:
                rows, scored = (
                    load_training_data(BUNDLED_SAMPLE).features.head(_SAMPLE_ROWS),
                    "the bundled sample",
                )
            prediction, probability = loaded.score_frame(rows)
    except verified.VersionRefused as refusal:
        raise PromotionError(f"{refused}: {refusal}") from refusal
    # Whatever stops it here would stop serving it, so every failure is a refusal.
    except Exception as error:
        raise PromotionError(
            f"{refused}: loading {uri} and scoring a few rows failed with {type(error).__name__}: {error}"
        ) from error
    if not (
        len(prediction) == len(probability) == len(rows)
        and np.all((probability >= 0) & (probability <= 1))
        and np.isin(prediction, (0, 1)).all()
    ):
        raise PromotionError(f"{refused}: {uri} answered {len(rows)} rows of {scored} with invalid outputs")
    return f"{len(rows)} rows of {scored}; {checked.description}"
