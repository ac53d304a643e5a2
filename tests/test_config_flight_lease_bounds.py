"""``database.flight_lease`` has a floor and a ceiling (a holder that died must not
hold a flight back for hours)."""

from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import parse_config
from keyring_module.errors import ConfigError
from tests.test_config import minimal


class FlightLeaseBoundsTests(SynchronousTestCase):
    def test_from_one_second_to_five_minutes(self) -> None:
        """Both ends of the range are accepted."""
        for value, lease_ms in [("1s", 1000), ("5m", 300_000), ("300s", 300_000)]:
            database = parse_config(minimal(database={"flight_lease": value})).database
            self.assertEqual(database.flight_lease_ms, lease_ms)

    def test_over_five_minutes_is_an_error_naming_the_range(self) -> None:
        """A longer lease is refused, with the allowed range and the value given."""
        for value in ["301s", "1h"]:
            with self.assertRaises(ConfigError) as cm:
                parse_config(minimal(database={"flight_lease": value}))
            self.assertEqual(cm.exception.path, ("database", "flight_lease"))
            self.assertIn(
                'expected a duration from "1s" to "5m", got %r' % value, str(cm.exception)
            )
