"""Errors a user can cause. The CLI turns these into one line and exit code 2."""


class PqkError(Exception):
    """Base class: the message is meant for the user, without a traceback."""


class CheckpointError(PqkError):
    """A checkpoint file is unreadable, unsafe, or not a DUSt3R of the expected shape."""


class InputError(PqkError):
    """Bad user input: missing files, non-images, wrong scene graph, ..."""


class ConfigError(PqkError):
    """A model or run configuration that pqk cannot build."""


class WriteError(InputError, OSError):
    """A file could not be written (a full disk, a read-only folder): one line for the user, and
    still an OSError for code that handles failed writes."""
