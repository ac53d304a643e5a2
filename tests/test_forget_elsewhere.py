"""A key forgotten by another process never comes back from this process's cache.

``keys forget`` on one instance tells the others through the database's news; they
must drop their cached copy outright, not keep it as the last resort served while the
database is down (an operator forgets a compromised key to have it gone everywhere).
"""

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.memory import InMemoryKeyStore
from tests.storage_writer import make_response


class FailingBackend(InMemoryKeyStore):
    """An in-memory store whose reads fail once ``down`` is set (a database outage)."""

    down = False

    async def get_server_keys(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise RuntimeError("database down")
        return await super().get_server_keys(*args, **kwargs)

    async def get_many_server_keys(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise RuntimeError("database down")
        return await super().get_many_server_keys(*args, **kwargs)


class ForgetElsewhereTests(TestCase):
    async def keys_during_outage(self, cache: CachedKeyStore) -> dict[str, Any]:
        """The keys the cache answers while the database is down: its own copy, or
        nothing (the outage's error)."""
        try:
            return dict(await cache.get_server_keys("s.example"))
        except RuntimeError:
            return {}

    async def read_then_outage(self, news: Any) -> tuple[CachedKeyStore, FailingBackend]:
        backend = FailingBackend()
        other = CachedKeyStore(backend, Clock(), 100, 10_000)  # another instance's cache
        response = make_response("s.example", 10**13, {"ed25519:bad": b"b" * 32})
        await backend.store_server_keys(response, "origin", 1)
        self.assertEqual(sorted(await other.get_server_keys("s.example")), ["ed25519:bad"])
        await backend.forget_server_keys("s.example")  # `keys forget` elsewhere
        news(other)  # ... and its news reaches this instance
        backend.down = True
        return other, backend

    async def test_news_of_a_forget_drops_the_last_resort_copy(self) -> None:
        other, _ = await self.read_then_outage(lambda c: c.changed_elsewhere("s.example"))
        self.assertEqual(await self.keys_during_outage(other), {})

    async def test_news_of_any_change_drops_every_copy(self) -> None:
        other, _ = await self.read_then_outage(lambda c: c.changed_elsewhere(None))
        self.assertEqual(await self.keys_during_outage(other), {})

    async def test_the_old_news_handling_would_serve_the_forgotten_key(self) -> None:
        """What the news used to do (expire, keep as a last resort) serves the forgotten
        key in an outage: the reason for dropping it."""
        other, _ = await self.read_then_outage(lambda c: c.forget("s.example"))
        self.assertEqual(sorted(await self.keys_during_outage(other)), ["ed25519:bad"])

    async def test_a_local_write_still_keeps_the_last_resort(self) -> None:
        """Our own store keeps the old copy for an outage (the write is ours: it forgot
        nothing), as before."""
        backend = FailingBackend()
        cache = CachedKeyStore(backend, Clock(), 100, 10_000)
        response = make_response("s.example", 10**13, {"ed25519:a": b"a" * 32})
        await cache.store_server_keys(response, "origin", 1)
        self.assertEqual(sorted(await cache.get_server_keys("s.example")), ["ed25519:a"])
        cache.forget("s.example")
        backend.down = True
        self.assertEqual(sorted(await cache.get_server_keys("s.example")), ["ed25519:a"])
