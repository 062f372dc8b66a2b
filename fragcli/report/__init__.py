"""`frag report`: collect a run's files, score hypotheses and gates, diff against a baseline, write plots."""

from fragcli.report.build import ReportResult, make_report

__all__ = ["ReportResult", "make_report"]
