"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, paths): printed as `error: <message>`."""
