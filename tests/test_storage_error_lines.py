"""A storage error is reported on one line, whatever the database driver put in it."""

from twisted.trial.unittest import TestCase

from keyring_module.config import DatabaseConfig
from keyring_module.storage import open_key_store
from keyring_module.storage.errors import StorageError, StorageUnavailableError

# psycopg2's message for a refused connection, as the driver words it.
PG_REFUSED = (
    'connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
    "\tIs the server running on that host and accepting TCP/IP connections?\n"
)


class StorageErrorLineTests(TestCase):
    def test_message_is_one_line(self) -> None:
        for cls in (StorageError, StorageUnavailableError):
            error = cls("postgres database unavailable during migrate: %s" % (PG_REFUSED,))
            self.assertEqual(
                str(error),
                "postgres database unavailable during migrate: connection to server at "
                '"127.0.0.1", port 1 failed: Connection refused Is the server running on '
                "that host and accepting TCP/IP connections?",
            )

    def test_not_a_string_kept(self) -> None:
        self.assertEqual(StorageError(3).args, (3,))

    async def test_refused_postgres_connection(self) -> None:
        """psycopg2's two-line "connection refused" reaches the caller as one line."""
        from twisted.internet import reactor

        config = DatabaseConfig(backend="postgres", dsn="host=127.0.0.1 port=1 connect_timeout=5")
        with self.assertRaises(StorageError) as caught:
            await open_key_store(config, reactor, reactor)  # type: ignore[arg-type]
        message = str(caught.exception)
        self.assertIn("Connection refused", message)
        self.assertNotIn("\n", message)
        self.assertNotIn("\t", message)
