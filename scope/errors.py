"""The one exception type scope raises for bad input; the CLI prints it without a traceback."""


class ScopeError(ValueError):
    """Bad input or state, with a message that names the bad value and what would be accepted."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def validation_summary(err, valid_keys=None) -> str:
    """A pydantic ValidationError in one line, one clause per error: pydantic's own text spans lines, its first
    line ("1 validation error for X") names no key, and its last is a link. ``valid_keys(loc)``, when given, lists
    the keys accepted where an unknown one was found."""
    parts = []
    for e in err.errors():
        where, msg = ".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")
        if not where:  # a check across fields: its message names them
            parts.append(msg)
        elif e["type"] == "missing":
            parts.append(f"missing key {where!r}")
        elif e["type"] == "extra_forbidden":
            hint = f"; valid keys there: {', '.join(valid_keys(e['loc']))}" if valid_keys else ""
            parts.append(f"unknown key {where!r}{hint}")
        else:
            parts.append(f"{where}: {msg} (got {e.get('input')!r})")
    return "; ".join(parts)
