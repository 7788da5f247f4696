"""The error hierarchy, by what the caller does next (see STYLE.md section 5)."""

from __future__ import annotations


class EmpError(Exception):
    """Base of every error emp-machine raises on purpose; the CLI prints these without a traceback."""

    exit_code = 1


class ManifestError(EmpError):
    """The manifest cannot be used: each problem names the file, line, field path and the fix."""

    exit_code = 2

    def __init__(self, file: str, problems: list["ManifestProblem"]):
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"{self.file}: {count} problem{'s' if count != 1 else ''} in the manifest"
        return "\n".join([head, *(f"  - {p.render()}" for p in self.problems)])


class ManifestProblem:
    """One thing wrong with a manifest, at one place."""

    __slots__ = ("path", "line", "message", "hint")

    def __init__(self, path: str, message: str, line: int | None = None, hint: str | None = None):
        self.path = path
        self.line = line
        self.message = message
        self.hint = hint

    def render(self) -> str:
        where = self.path or "(top level)"
        if self.line is not None:
            where = f"line {self.line}, {where}"
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def __repr__(self) -> str:
        return f"ManifestProblem({self.render()!r})"


class SupervisorError(EmpError):
    """supervisord could not be started, reached or commanded."""


class NoMachineRunning(EmpError):
    """An operator command found no running machine to talk to."""
