"""Errors a user can fix (bad file, field, flag); the CLI prints them as one line."""


class UserError(Exception):
    """A problem with the user's input: the message names the file, line, field or flag."""


class CheckpointFormatError(UserError):
    """A weights file or folder is malformed, incomplete or of an unsupported kind."""
