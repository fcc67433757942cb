"""One exception family for every user-facing problem.

Shells (CLI, server) print ``str(err)`` as a single line and exit non-zero (or answer with its
status); anything else that escapes is a bug and keeps its traceback.

An engine's failure on one request is an `EngineError`: the scheduler fails the answer that made
the request, alone, and the status says whose fault it was (what a server answers its client).
"""


class RainError(Exception):
    """A problem with the user's input or environment, described in one line."""

    status = 400


class EngineError(RainError):
    """An engine could not answer a request (a bug in it, or something this client cannot read)."""

    status = 500


class EngineRefused(EngineError):
    """The engine refuses the request as invalid (a setting beyond its limits, a prompt too long)."""

    status = 400


class EngineUnavailable(EngineError):
    """The engine cannot be reached (down, restarting, overloaded past its retries)."""

    status = 503


class EngineTimeout(EngineError):
    """The engine did not answer within the request's deadline."""

    status = 504
