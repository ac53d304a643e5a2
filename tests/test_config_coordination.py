"""``database.flight_lease`` and ``database.poll_interval``: the knobs of instances
sharing one database."""

from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import parse_config
from keyring_module.errors import ConfigError
from tests.test_config import minimal


class CoordinationConfigTests(SynchronousTestCase):
    """Parsed to ms, with sane bounds, named in errors."""

    def test_defaults(self) -> None:
        """A ten-second lease and a 100 ms poll unless configured."""
        database = parse_config(minimal()).database
        self.assertEqual((database.flight_lease_ms, database.poll_interval_ms), (10_000, 100))

    def test_configured(self) -> None:
        """Durations in any unit."""
        raw = minimal(database={"flight_lease": "30s", "poll_interval": "250ms"})
        database = parse_config(raw).database
        self.assertEqual((database.flight_lease_ms, database.poll_interval_ms), (30_000, 250))

    def test_out_of_bounds(self) -> None:
        """A lease under a second, or a poll interval outside 10 ms to 60 s, is an
        error naming the key."""
        for key, value in [
            ("flight_lease", "500ms"),
            ("poll_interval", "5ms"),
            ("poll_interval", "2m"),
        ]:
            with self.assertRaises(ConfigError) as cm:
                parse_config(minimal(database={key: value}))
            self.assertEqual(cm.exception.path, ("database", key))
