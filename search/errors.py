"""The one error type the command line turns into exit code 2 with a message and no traceback."""


class ConfigError(Exception):
    """Bad input found before the first trial: a space file, a name, missing data, an unreachable store."""
