"""Tests for recording a worker's chunk on the reactor thread: ``_record_outcomes``
(the all-accepted shortcut and the mixed case) and the :class:`ItemBatch` helpers the
batch runner uses per part (``extend``, ``items_at``, ``deferreds``)."""

from typing import Any, Optional, cast

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.event_chunks import ChunkOutcome
from keyring_module.keyring.batch import EventItem, ItemBatch, event_items
from keyring_module.keyring.events import _record_outcomes
from keyring_module.roomversions import ROOM_VERSIONS

V10 = ROOM_VERSIONS["10"]


def _items(n: int) -> list[EventItem]:
    events = [
        {"sender": "@u:a.org", "type": "m.room.message", "origin_server_ts": i} for i in range(n)
    ]
    items, errors = event_items(events, V10, frozenset())
    assert not errors
    return cast(list[EventItem], items)


class RecordOutcomesTests(SynchronousTestCase):
    """``_record_outcomes`` turns a worker's outcomes into the keyring's results."""

    def test_all_accepted_is_the_workers_list(self) -> None:
        """A chunk whose events were all accepted gives back the worker's own list of
        None, and leaves every item without a redacted copy."""
        items = _items(3)
        outcomes: list[ChunkOutcome] = [None, None, None]
        results = _record_outcomes(outcomes, items)
        self.assertIs(results, outcomes)
        self.assertEqual([item.redacted for item in items], [None, None, None])

    def test_mixed_outcomes(self) -> None:
        """Accepted events give None, a redacted copy is kept on its item (and counts
        as accepted), an error tuple becomes a Failure and teaches its item a signer
        only the redacted copy needs."""
        items = _items(4)
        redacted: dict[str, Any] = {"type": "m.room.message"}
        outcomes: list[ChunkOutcome] = [
            None,
            redacted,
            ("c.org", ("ed25519:k",), "no_usable_key", "no key"),
            ("a.org", ("ed25519:a",), "bad_signature", "invalid signature"),
        ]
        results = _record_outcomes(outcomes, items)
        self.assertEqual(results[:2], [None, None])
        self.assertIs(items[1].redacted, redacted)
        self.assertIsNone(items[0].redacted)
        third, fourth = results[2], results[3]
        assert third is not None and fourth is not None
        third_error, fourth_error = third.value, fourth.value
        assert isinstance(third_error, KeyVerificationError)
        assert isinstance(fourth_error, KeyVerificationError)
        self.assertEqual(third_error.reason, VerificationFailure.NO_USABLE_KEY)
        self.assertEqual(items[2].servers, ("a.org", "c.org"))
        self.assertEqual(fourth_error.reason, VerificationFailure.BAD_SIGNATURE)
        self.assertEqual(items[3].servers, ("a.org",))
        self.assertEqual(items[0].servers, ("a.org",))  # the shared tuple is untouched

    def test_length_mismatch_raises(self) -> None:
        """A worker answer with the wrong number of outcomes is an error, not a silent
        misattribution."""
        with self.assertRaises(ValueError):
            _record_outcomes([None], _items(2))
        with self.assertRaises(ValueError):
            _record_outcomes([None, ("a.org", (), "bad_signature", "x")], _items(1))


class ItemBatchPartTests(SynchronousTestCase):
    """The per-part helpers of :class:`ItemBatch`."""

    def test_extend_returns_the_live_indexes(self) -> None:
        """Parts without errors give their whole index range; errors are resolved and
        left out."""
        batch = ItemBatch()
        self.assertEqual(batch.extend((cast(list[Optional[Any]], _items(3)), {})), [0, 1, 2])
        events: list[Any] = [
            {"sender": "@u:a.org", "origin_server_ts": 1},
            "not an event",
            {"sender": "@u:a.org", "origin_server_ts": 2},
        ]
        live = batch.extend(event_items(events, V10, frozenset()))
        self.assertEqual(live, [3, 5])
        self.assertIsInstance(batch.outcomes[4], Failure)

    def test_items_at(self) -> None:
        """``items_at`` gives the items at the indexes, consecutive or not."""
        batch = ItemBatch()
        items = _items(5)
        batch.extend((cast(list[Optional[Any]], items), {}))
        self.assertEqual(batch.items_at([1, 2, 3]), items[1:4])
        self.assertEqual(batch.items_at([0, 2, 4]), [items[0], items[2], items[4]])
        self.assertEqual(batch.items_at([3]), [items[3]])
        self.assertEqual(batch.items_at([]), [])

    def test_pending_deferreds_fire_on_record(self) -> None:
        """When nothing is resolved yet every Deferred is pending and distinct; recording
        fires the verified ones and returns the failed ones unresolved."""
        batch = ItemBatch()
        batch.extend((cast(list[Optional[Any]], _items(3)), {}))
        deferreds = batch.deferreds()
        self.assertEqual(len({id(d) for d in deferreds}), 3)
        self.assertFalse(any(d.called for d in deferreds))
        failure = Failure(
            KeyVerificationError("a.org", (), VerificationFailure.BAD_SIGNATURE, "bad")
        )
        failed = batch.record_checked([0, 1, 2], [None, failure, None])
        self.assertEqual(failed, [(1, failure)])
        self.assertEqual([d.called for d in deferreds], [True, False, True])
