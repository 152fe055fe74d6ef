"""Outcomes of a job that the command line reports in one line instead of a traceback."""


class RunInterrupted(BaseException):
    """The job was stopped by Ctrl-C or SIGTERM (after saving a resumable checkpoint when it was
    training). A BaseException, like KeyboardInterrupt, so that library code catching Exception
    (MLflow's store wraps whatever it catches) neither swallows nor rewraps the stop."""


class LostRank(RuntimeError):
    """A collective failed because other ranks stopped answering (their node died, was killed or was
    cut off); the message names them and says how to continue."""
