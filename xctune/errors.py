"""Errors that xctune reports to users.

`BadInput` is the one exception type for anything the user gave us that we
cannot use (malformed JSON, unknown preset, bad `--gpus` spec, impossible
budget). The CLI turns it into a one-line message and exit code 2; the Python
API lets it propagate so callers can catch it.
"""


class BadInput(ValueError):
    """User input that xctune cannot use. The message is one line and names the problem."""


def shown(value, limit: int = 80) -> str:
    """`value` as a message may quote it: its repr, cut to `limit` characters (never echo a huge input)."""
    text = repr(value) if not isinstance(value, str) or len(value) <= 4 * limit else repr(value[: 4 * limit])
    return text if len(text) <= limit else f"{text[:limit]}... ({_size(value)})"


def _size(value) -> str:
    try:
        return f"{len(value):,} {'characters' if isinstance(value, str) else 'items'}"
    except TypeError:
        return "cut"
