"""User-facing errors.

Anything a user can fix (bad config key, malformed data row, missing checkpoint file) raises
`UserError`. The CLI prints its message and exits non-zero without a traceback; library callers
get an ordinary `ValueError` subclass they can catch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """A mistake in the user's input, with a message that says how to fix it."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
