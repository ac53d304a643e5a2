"""Fixtures shared by the keyring-side tests (``test_keyring``, ``test_cli_query``)."""

from typing import Any, Optional

from twisted.internet.task import Clock

from keyring_module.http.agent import run_with_timeout
from tests.fakes import FakeFederationClient

#: The real federation client's default request timeout.
REQUEST_TIMEOUT_S = 10.0


class TimeoutClient:
    """A :class:`~tests.fakes.FakeFederationClient` with the real client's request
    timeout, run on the test's ``Clock``: a request to a hanging fake fails after
    ``timeout_s`` of fake time."""

    def __init__(
        self, inner: FakeFederationClient, clock: Clock, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.inner = inner
        self._clock = clock
        self._timeout_s = timeout_s

    async def get_json(self, server_name: str, path: str, timeout_ms: Optional[int] = None) -> Any:
        return await run_with_timeout(
            self._clock, self._timeout_s, lambda: self.inner.get_json(server_name, path)
        )

    async def post_json(
        self, server_name: str, path: str, body: object, timeout_ms: Optional[int] = None
    ) -> Any:
        return await run_with_timeout(
            self._clock, self._timeout_s, lambda: self.inner.post_json(server_name, path, body)
        )
