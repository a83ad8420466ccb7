"""The one error class for user mistakes: the CLI prints its message as one line and exits non-zero."""


class NanoseekError(Exception):
    """A mistake in what the user gave nanoseek (a path, a config, a flag); the message says what to fix."""
