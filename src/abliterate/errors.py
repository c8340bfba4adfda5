"""One exception type for everything a user can get wrong.

Library code raises `AbliterateError` with a message that names the bad value and
the fix; the CLI prints that one line and exits non-zero.
"""


class AbliterateError(Exception):
    """A problem with the user's input or environment, explained for people."""
