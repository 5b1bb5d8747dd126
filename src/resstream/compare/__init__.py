"""`resstream compare`: budget-matched, multi-seed comparisons of residual-stream variants with
honest statistics and a written report (study.py: the study file; runner.py: running and
measuring; stats.py: the statistics; report.py: report.md and figures)."""
from resstream.compare.stats import compare_to_baseline, holm, paired_difference, summarize
from resstream.compare.study import Study, load_study, parse_study, shipped_studies

__all__ = ["Study", "compare_to_baseline", "holm", "load_study", "paired_difference",
           "parse_study", "shipped_studies", "summarize"]
