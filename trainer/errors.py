"""The one exception type for user mistakes: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing path, unreachable hub id, ...).

    The CLI shows only the message, no stack trace (unless ``HYDRA_FULL_ERROR=1``).
    """
