"""The errors the command line turns into exit codes with a message and no traceback: 2 for ConfigError, 1 for
SearchAborted."""


class ConfigError(Exception):
    """Bad input found before the first trial: a space file, a name, missing data, an unreachable store."""


class SearchAborted(RuntimeError):
    """Too many trials failed in a row; the message names the last reason (exit 1)."""


class SurplusTrial(RuntimeError):
    """A trial claimed after the study reached its target (a race between workers)."""
