"""The one error type that the CLI renders as a one-line message with exit code 2."""

from __future__ import annotations


class FragError(Exception):
    """A user-facing error: what is wrong, and how to fix it.

    The CLI prints ``error: <problem> -- <fix>`` on one line and exits with ``code`` (2 by default).
    """

    def __init__(self, problem: str, fix: str | None = None, code: int = 2):
        self.problem = problem.rstrip(".")
        self.fix = fix
        self.code = code
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem
        if self.fix:
            text += f" -- {self.fix}"
        return " ".join(text.split())  # never more than one line
