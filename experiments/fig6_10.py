"""Fig. 6.10: SRS against mPE under white noise (sigma 0.1..0.2) and Gaussian blur (kernels 3..7) across the
model zoo, with Pearson and Spearman correlations per level (``experiments.ch6.robustness_run``)."""
from __future__ import annotations

from . import ch6

TABLE = "robustness.csv"
NOTES = [ch6.JPEG_NOTE,
         "SRS from the zoo's SIDs (zero absences, l_inf bands, conf/figure/fig6_zoo.yaml figure.sid); mPE on a "
         "separate seeded set of test images. White noise is clipped to [0, 1]; the blur's sigma follows OpenCV's "
         "rule for the kernel size (0.8, 1.1, 1.4 for 3, 5, 7), reflect padding.",
         "With a handful of models a correlation is weak evidence: read the p-values."]


def run(cfg, run_dir):
    return ch6.robustness_run(cfg, run_dir, TABLE)


def aggregate(cfg, fig_dir, runs) -> None:
    ch6.robustness_aggregate(cfg, fig_dir, runs, TABLE, NOTES)
