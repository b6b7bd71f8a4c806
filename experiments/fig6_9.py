"""Fig. 6.9: SRS against mPE under FGSM and PGD (eps 0.1..0.2) across the model zoo, with Pearson and
Spearman correlations per eps (``experiments.ch6.robustness_run``)."""
from __future__ import annotations

from . import ch6

TABLE = "robustness.csv"
NOTES = [ch6.JPEG_NOTE,
         "SRS from the zoo's SIDs (zero absences, l_inf bands, conf/figure/fig6_zoo.yaml figure.sid); mPE on a "
         "separate seeded set of test images. PGD: L_inf, random start, step 2.5 eps / steps. With eps >= 0.1 on "
         "[0, 1] pixels both attacks fool nearly every model, so mPE approaches the mean clean confidence Q(y|x).",
         "With a handful of models a correlation is weak evidence: read the p-values."]


def run(cfg, run_dir):
    return ch6.robustness_run(cfg, run_dir, TABLE)


def aggregate(cfg, fig_dir, runs) -> None:
    ch6.robustness_aggregate(cfg, fig_dir, runs, TABLE, NOTES)
