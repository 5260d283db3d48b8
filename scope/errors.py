"""The one exception type scope raises for bad input; the CLI prints it without a traceback."""


class ScopeError(ValueError):
    """Bad input or state, with a message that names the bad value and what would be accepted."""
