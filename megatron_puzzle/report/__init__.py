"""The eval stage: parent, child and baselines measured side by side; report.md, report.json and plots."""

from .config import BaselinesConfig, ReportConfig, load_report_config

__all__ = ["BaselinesConfig", "ReportConfig", "load_report_config", "make_report"]


def make_report(run_dir, config=None):
    """Build RUN/report.json, RUN/report.md and the plots (see `make.make_report`)."""
    from .make import make_report as _make

    return _make(run_dir, config)
