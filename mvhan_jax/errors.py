"""Exceptions the command line reports as one line, without a traceback."""


class UserError(Exception):
  """A failure the user can fix; the CLI prints its message alone."""
