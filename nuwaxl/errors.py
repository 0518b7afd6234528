"""User-facing errors: each names the bad value and the fix; the CLI prints them without a traceback."""


class UserError(ValueError):
    """A problem with what the user asked for (input, path, file), as opposed to a bug."""
