"""A command's status and the named sets of statuses every module asks about.

accepted → processing → succeeded | rejected | failed; `failed` may run again (a redrive
moves it back to accepted).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CommandStatus", "ALL", "TERMINAL", "ENDED", "STUCK", "REFUSED"]


class CommandStatus(StrEnum):
    ACCEPTED = "accepted"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"
    FAILED = "failed"


ALL: tuple[str, ...] = tuple(status.value for status in CommandStatus)
#: Never runs again: a duplicate gets this outcome as stored.
TERMINAL = frozenset({CommandStatus.SUCCEEDED.value, CommandStatus.REJECTED.value})
#: A caller waiting for the command stops here (failed waits for an operator's redrive).
ENDED = TERMINAL | {CommandStatus.FAILED.value}
#: Not yet ended and not failed: the sweep republishes these once they are old enough.
STUCK = frozenset({CommandStatus.ACCEPTED.value, CommandStatus.PROCESSING.value})
#: Carries an error code (the schema's CHECK says so too).
REFUSED = frozenset({CommandStatus.REJECTED.value, CommandStatus.FAILED.value})
