"""Errors raised by the key store.

The web layer answers :class:`StorageUnavailableError` (and any other
:class:`StorageError`) with a 5xx JSON error; start-up reports :class:`SchemaTooNewError`
and stops.
"""


class StorageError(Exception):
    """The key store failed to run a query or holds something it cannot use.

    The message is one line: database drivers put newlines and tabs in theirs
    (PostgreSQL's ``connection ... failed: ...\\n\\tIs the server running ...``), and
    every place that reports a storage error prints it as one ``database: ...`` line.

    Example:
        >>> str(StorageError("connection failed\\n\\tIs the server running?\\n"))
        'connection failed Is the server running?'
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(" ".join(a.split()) if isinstance(a, str) else a for a in args))


class StorageUnavailableError(StorageError):
    """The database cannot be reached (refused connection, lost connection, locked file)."""


class SchemaTooNewError(StorageError):
    """The database was written by a newer ``keyring_module`` whose schema we don't know.

    Attributes:
        found_version: the schema version recorded in the database.
        supported_version: the newest schema version this code knows.
    """

    def __init__(self, found_version: int, supported_version: int) -> None:
        self.found_version = found_version
        self.supported_version = supported_version
        super().__init__(
            "database schema version %d is newer than this keyring_module supports (%d); "
            "upgrade keyring_module" % (found_version, supported_version)
        )
