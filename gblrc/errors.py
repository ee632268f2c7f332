"""User-facing errors: one line saying what is wrong and what to do, non-zero exit."""

from __future__ import annotations

import click


class GblrcError(click.ClickException):
    """An error caused by the user's input; the CLI prints it as one line and exits 1."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class OptionError(ValueError):
    """A bad value of one named setting, raised by the API (``field`` is its Python name, e.g.
    ``target_fidelity``).  Python callers read ``field must be ...``; the CLI names its flag instead
    (``--target-fidelity must be ...``), so each check is written once, in the API."""

    def __init__(self, field: str, text: str):
        self.field, self.text = field, " ".join(str(text).split())
        super().__init__(f"{field} {self.text}")

    def for_flags(self, flags: dict | None = None) -> str:
        """The message with the setting named as the CLI flag (``flags``: field -> flag, default --field-name)."""
        flag = (flags or {}).get(self.field) or "--" + self.field.replace("_", "-")
        return f"{flag} {self.text}"
