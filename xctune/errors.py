"""Errors that xctune reports to users.

`BadInput` is the one exception type for anything the user gave us that we
cannot use (malformed JSON, unknown preset, bad `--gpus` spec, impossible
budget). The CLI turns it into a one-line message and exit code 2; the Python
API lets it propagate so callers can catch it.
"""


class BadInput(ValueError):
    """User input that xctune cannot use. The message is one line and names the problem."""
