"""The one exception type that reaches the user as a single line."""


class LmtrainError(Exception):
    """A problem with the user's input or environment, not a bug.

    The CLI prints `error: <message>` on one line and exits with code 2.
    Messages name the offending path, key or value and, where it helps, the fix.
    """


def require(*checks: tuple[bool, str]) -> None:
    """Raise LmtrainError with the message of the first check that fails: (condition, message)."""
    for ok, message in checks:
        if not ok:
            raise LmtrainError(message)
