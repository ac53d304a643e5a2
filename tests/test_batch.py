"""Tests for :mod:`keyring_module.keyring.batch`: how a batch's failed items end."""

from typing import Optional

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.keyring.batch import ItemBatch, VerifyItem, WaitingGroup, recheck_group
from keyring_module.keyring.planner import KeyNeed
from keyring_module.storage import KeysByServer

ORIGIN = "a.org"


class FailingItem:
    """An item of ``a.org`` whose check always raises ``error``."""

    servers = (ORIGIN,)

    def __init__(self, error: KeyVerificationError) -> None:
        self.error = error

    def check(self, keys: KeysByServer, now: int) -> None:
        raise self.error

    def key_needs(self) -> list[KeyNeed]:
        return []


class RecheckGroupTests(SynchronousTestCase):
    def recheck(self, *errors: KeyVerificationError) -> list[KeyVerificationError]:
        """Check items failing with ``errors`` again after a fetch of ``a.org`` that
        returned no keys; the errors they end with."""
        batch = ItemBatch()
        items: list[Optional[VerifyItem]] = [FailingItem(e) for e in errors]
        indexes = batch.extend((items, {}))
        recheck_group(WaitingGroup(indexes, set()), {ORIGIN: {}}, batch, {}, 0)
        ended = []
        for outcome in batch.outcomes:
            assert isinstance(outcome, Failure)
            assert isinstance(outcome.value, KeyVerificationError)
            ended.append(outcome.value)
        return ended

    def test_no_usable_key_after_the_fetch_says_so(self) -> None:
        """A NO_USABLE_KEY failure after the fetch keeps its reason, server and key ids and
        adds that the keys were fetched, whatever its text."""
        (error,) = self.recheck(
            KeyVerificationError(
                ORIGIN, ["ed25519:x"], VerificationFailure.NO_USABLE_KEY, "nothing fits"
            )
        )
        self.assertIs(error.reason, VerificationFailure.NO_USABLE_KEY)
        self.assertEqual(error.detail, "nothing fits, even after fetching its keys")
        self.assertEqual((error.server_name, error.key_ids), (ORIGIN, ("ed25519:x",)))

    def test_other_reasons_are_kept_as_they_are(self) -> None:
        """Any other failure ends as it was raised, even with text that reads like a
        missing key: the decision reads the reason, never the text."""
        bad = KeyVerificationError(
            ORIGIN, ["ed25519:x"], VerificationFailure.BAD_SIGNATURE, "no usable key, really"
        )
        malformed = KeyVerificationError(
            ORIGIN, ["ed25519:x"], VerificationFailure.MALFORMED_SIGNATURE, "malformed signature"
        )
        self.assertEqual(self.recheck(bad, malformed), [bad, malformed])
