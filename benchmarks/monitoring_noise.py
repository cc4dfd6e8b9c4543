"""How large PSI gets from sampling noise alone, by window size: the figures behind the
default minimum of 500 rows (``monitoring.status``).

    .venv/bin/python benchmarks/monitoring_noise.py [--data FILE] [--windows 1000]

Builds the profile on the training side of the content split of ``--data`` (default the real
file when present, else the bundled sample) and draws windows of 12 to 1,000 rows from the
held-out side (the same population, no drift). For each size, prints the share of windows in
which some feature's PSI reaches the warn (0.1) and alert (0.25) thresholds, and the 99.9th
percentile of the largest feature PSI of a window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from monitoring.drift import column_drift
from monitoring.status import Thresholds
from training.data import BUNDLED_SAMPLE, load_training_data
from training.profile import build_profile
from training.split import ContentSplit

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cs-training-dev.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL if REAL.is_file() else BUNDLED_SAMPLE)
    parser.add_argument("--windows", type=int, default=1000)
    arguments = parser.parse_args()
    data = load_training_data(arguments.data)
    held = ContentSplit.of(data.features, data.target, 0.2).evaluation
    training, held_out = data.features[~held], data.features[held]
    rng = np.random.default_rng(1)
    profile = build_profile(training, rng.beta(1, 12, len(training)), 0.2)
    columns = {name: held_out[name].to_numpy() for name in profile.features}
    every_size = Thresholds(min_rows=1)
    print(
        f"profile: {len(training)} training rows of {arguments.data.name}; windows from {len(held_out)} others"
    )
    for rows in (12, 100, 200, 500, 1000):
        largest = np.array(
            [
                max(
                    column_drift(columns[name][picked], reference, every_size).psi
                    for name, reference in profile.features.items()
                )
                for picked in (rng.integers(0, len(held_out), rows) for _ in range(arguments.windows))
            ]
        )
        print(
            f"{rows:>5} rows: some feature PSI >= 0.1 in {np.mean(largest >= 0.1):.1%} of windows, "
            f">= 0.25 in {np.mean(largest >= 0.25):.1%}; 99.9th percentile of the largest "
            f"{np.quantile(largest, 0.999):.3f}"
        )


if __name__ == "__main__":
    main()
