"""Errors a user can act on.

Every failure that comes from bad input or a bad cache is raised as a `LogitCacheError` whose
message names the problem and the fix; the CLIs turn it into one paragraph on stderr and exit
code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LogitCacheError(Exception):
    """A problem with the user's input, environment or cache, explained in the message."""

    exit_code = 2


class CorruptCacheError(LogitCacheError):
    """A cache whose bytes or invariants do not match its manifest."""


class SettingsMismatchError(LogitCacheError):
    """A resumed dump (or a merge) whose settings differ from the existing cache's."""
