"""The one exception type scope raises for bad input; the CLI prints it without a traceback."""


class ScopeError(ValueError):
    """Bad input or state, with a message that names the bad value and what would be accepted."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
