class UserError(Exception):
  """A failure the user can fix; the CLI prints its message alone."""
