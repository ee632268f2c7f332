"""User-facing errors: one line saying what is wrong and what to do, non-zero exit."""
from __future__ import annotations

import click


class GblrcError(click.ClickException):
    """An error caused by the user's input; the CLI prints it as one line and exits 1."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
