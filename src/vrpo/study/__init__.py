"""`vrpo study`: a paired (method x seed) grid on one model, budget and evaluation schedule.

``spec`` reads the study file, ``runner`` trains and evaluates its runs, ``records`` reads
what they left, ``statistics`` and ``report`` turn that into the markdown report and plot.
"""

from vrpo.study.records import RETENTION_MIN_RA, RunRecord, collect, read_run, training_wall_s
from vrpo.study.report import write_report
from vrpo.study.runner import run_study
from vrpo.study.spec import StudySpec, load_study, method_config
from vrpo.study.statistics import mean_ci, steps_to_reach, t_critical, verdict

__all__ = [
    "RETENTION_MIN_RA",
    "RunRecord",
    "StudySpec",
    "collect",
    "load_study",
    "mean_ci",
    "method_config",
    "read_run",
    "run_study",
    "steps_to_reach",
    "t_critical",
    "training_wall_s",
    "verdict",
    "write_report",
]
