"""The project's own error type. Every bad input a user can give (a file, a field, a value) is
raised as a `Gemma3LabError` with one line that names it; the CLI prints it as `error: ...` and
exits 2, the app shows it as a message. It is a ValueError, so older `except ValueError` code and
tests keep working."""


class Gemma3LabError(ValueError):
    """A bad input, named in one line."""
