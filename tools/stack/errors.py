"""The one error the stack raises, carrying what a user needs to fix the failing part."""

from __future__ import annotations

from pathlib import Path


class StackError(Exception):
    """A part of the local stack failed to start, stop or answer.

    ``part`` names the component (``memcached``, ``swift-proxy``, ``executor-edge-a``, …),
    ``log`` is its log file if it has one, and ``log_tail`` holds that file's last lines so the
    message alone explains the failure without opening anything.
    """

    def __init__(
        self,
        part: str,
        message: str,
        log: Path | None = None,
        log_tail: list[str] | None = None,
    ) -> None:
        self.part = part
        self.message = message
        self.log = log
        self.log_tail = list(log_tail or [])
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.part}: {self.message}"
        if self.log_tail:
            source = f"last lines of {self.log}" if self.log is not None else "its output"
            quoted = "\n".join(f"    {line}" for line in self.log_tail)
            text += f"\n  {source}:\n{quoted}"
        elif self.log is not None:
            text += f"\n  (log {self.log} is empty)"
        return text
