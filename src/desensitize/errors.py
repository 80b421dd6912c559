"""The one exception type a user sees: its message says what is wrong and what to do."""


class DesensitizeError(Exception):
    """Bad input or an unmet precondition. The CLI prints the message as one line and exits 2."""
