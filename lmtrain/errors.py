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


MESSAGE_LIMIT = 600  # characters of an error line; a value echoed back (a 100 kB --set) is cut in its middle


def one_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """`message` as one bounded line: line breaks become spaces, and a message longer than `limit`
    keeps its head and its tail (where the fix is said) around a note of what was left out."""
    text = " ".join(str(message).splitlines())
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]} … ({len(text) - 2 * keep:,} characters left out) … {text[-keep:]}"
