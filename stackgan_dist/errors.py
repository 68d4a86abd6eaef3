"""One exception type for problems the user can fix: the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, command line). Printed without a traceback."""

    exit_code = 2


class DataError(UserError):
    """A dataset that is missing, malformed or does not match the config."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible with the config."""
