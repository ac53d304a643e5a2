"""More of Twisted's chatter demoted to DEBUG: a listener whose name has a space, the
DNS resolver reading ``/etc/resolv.conf``, and the reactor stopping at a command's end."""

from twisted.logger import LogEvent, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.twisted_logs import ChatterDemotingObserver, is_chatter

CHATTER = [
    "KeyServerSite (TLS) starting on 18095",
    "KeyServerSite starting on 8448",
    "Resolver added ('192.0.2.53', 53) to server list",
    "Resolver added ('2001:db8::53', 53) to server list",
    "/etc/resolv.conf changed, reparsing",
    "Main loop terminated.",
]

NOT_CHATTER = [
    "Listening on 0.0.0.0 port 8448",
    "Main loop terminated. Also something else",
    "Fetched keys of a.example starting on 3 tries",
    "resolver failed for a.example",
]


def event(text: str, level: LogLevel = LogLevel.info) -> LogEvent:
    return {"log_format": "{log_text}", "log_text": text, "log_level": level}


class MoreChatterTests(SynchronousTestCase):
    def test_chatter(self) -> None:
        for text in CHATTER:
            self.assertTrue(is_chatter(event(text)), text)

    def test_not_chatter(self) -> None:
        for text in NOT_CHATTER:
            self.assertFalse(is_chatter(event(text)), text)

    def test_warnings_keep_their_level(self) -> None:
        self.assertFalse(is_chatter(event("Main loop terminated.", LogLevel.warn)))

    def test_observer_demotes(self) -> None:
        seen: list[LogEvent] = []
        observer = ChatterDemotingObserver(seen.append)
        for text in CHATTER:
            observer(event(text))
        observer(event("Fetched keys"))
        self.assertEqual(
            [e["log_level"] for e in seen], [LogLevel.debug] * len(CHATTER) + [LogLevel.info]
        )
