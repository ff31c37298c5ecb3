"""The one exception type for mistakes a user can fix (bad path, bad option, bad file).

It subclasses ValueError so library callers can catch it as one; the command line
prints its message without a traceback and exits with status 2.
"""


class UserError(ValueError):
    """Bad input from the user: the message says what was expected, what came, what to do."""
