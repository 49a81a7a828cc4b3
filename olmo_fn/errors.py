"""The exception families a user can meet. The CLI prints them without a traceback.

Every message names the thing that is wrong (file, field, value) and what would be valid.
"""


class OlmoFnError(Exception):
    """Base of every error olmo_fn raises on purpose."""


class ConfigError(OlmoFnError):
    """A configuration that cannot work: unknown preset, inconsistent sizes, bad option values."""


class DataError(OlmoFnError):
    """Input data that cannot be used as given: missing, empty, malformed or out-of-range files."""


class CheckpointError(OlmoFnError):
    """A checkpoint that cannot be written or read back as asked."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of `exc`, for an error reported in one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
