"""Outcomes of a job that the command line reports in one line instead of a traceback."""


class RunInterrupted(RuntimeError):
    """Training was stopped by Ctrl-C or SIGTERM after saving a resumable checkpoint."""
