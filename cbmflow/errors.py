"""Error taxonomy shared by components.

The split between permanent and transient failures is what the worker uses to decide between
dead-lettering a job at once and requeueing it with backoff; the API maps the user-facing ones
to HTTP statuses.
"""


class CbmflowError(Exception):
    """Base class of every error cbmflow raises on purpose."""


class ConfigError(CbmflowError):
    """Missing or inconsistent configuration; the operator must act."""


class PermanentJobError(CbmflowError):
    """A job that can never succeed as sent (corrupt raster, unknown scene, malformed message)."""


class InvalidInputError(CbmflowError):
    """Bad user input: a parameter, a file or a geometry that cannot be accepted."""


class NotFoundError(CbmflowError):
    """A dataset, parcel or scene that does not exist."""


class PermissionDeniedError(CbmflowError):
    """Authenticated, but not granted the dataset asked for."""
