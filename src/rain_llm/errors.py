"""One exception type for every user-facing problem.

Shells (CLI, server) print ``str(err)`` as a single line and exit non-zero; anything
else that escapes is a bug and keeps its traceback.
"""


class RainError(Exception):
    """A problem with the user's input or environment, described in one line."""
