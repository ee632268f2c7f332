"""The API's errors as the CLI shows them: one line, settings named as flags."""

from __future__ import annotations

import contextlib

from gblrc.errors import GblrcError, OptionError

__all__ = ["api_errors"]


@contextlib.contextmanager
def api_errors(flags: dict | None = None, failed: str = "the command failed"):
    """The API's ValueErrors as one-line user errors; a setting's error names its flag (``flags``: setting ->
    flag where it is not --setting-name; ``failed``: the message of an error that has none)."""
    try:
        yield
    except OptionError as e:
        raise GblrcError(e.for_flags(flags)) from None
    except ValueError as e:
        raise GblrcError(" ".join(str(e).split()) or failed) from None
