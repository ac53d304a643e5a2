"""What processes sharing a database tell each other of an origin fetch
(:mod:`keyring_module.fetchers.shared_origin`): the signed answer, validated again by
the reader, or the failure, rebuilt so that each process's limiter judges it alike."""

from typing import Optional

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.fetchers.shared_origin import (
    OriginOutcomeCodec,
    SharedFetchAnsweredError,
    SharedFetchUnreachableError,
)
from keyring_module.http import HttpStatusError, RequestTimeoutError
from keyring_module.json_codec import loads_strict
from keyring_module.model import ServerKeysResponse
from keyring_module.ratelimit import RateLimitedError, is_unreachable
from keyring_module.storage.coordination import OUTCOME_ANSWERED, OUTCOME_UNREACHABLE
from keyring_module.validation import (
    InvalidKeyResponseError,
    InvalidKeyResponseReason,
    parse_server_keys_response,
)
from tests.utils import make_signed_server_keys, new_signing_key

NAME = "example.org"


async def validate(body: bytes) -> ServerKeysResponse:
    return parse_server_keys_response(loads_strict(body), NAME)


class OriginOutcomeCodecTests(SynchronousTestCase):
    """Answers and failures, written by one process and read by another."""

    def setUp(self) -> None:
        self.codec = OriginOutcomeCodec(validate)
        self.response = parse_server_keys_response(
            make_signed_server_keys(NAME, [new_signing_key("k1")], 10**13), NAME
        )

    def decode(self, body: Optional[bytes] = None) -> "defer.Deferred[ServerKeysResponse]":
        outcome = self.codec.encode(self.response, 5, "a1")
        if body is not None:
            outcome = outcome.__class__(5, "a1", outcome.outcome, "ok", "", body)
        return defer.ensureDeferred(self.codec.decode(outcome))

    def test_an_answer_is_shared_as_its_signed_bytes(self) -> None:
        """The reader gets the very answer, validated again."""
        self.assertEqual(self.successResultOf(self.decode()), self.response)

    def test_a_shared_answer_that_does_not_validate_is_refused(self) -> None:
        """Bytes changed in the database fail validation like a bad fetch would; bytes
        that are not JSON count as an origin that answered badly."""
        tampered = self.response.json_bytes.replace(b"10000000000000", b"10000000000001")
        failure = self.failureResultOf(self.decode(tampered), InvalidKeyResponseError)
        self.assertEqual(failure.value.reason, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)
        self.failureResultOf(self.decode(b"{nope"), SharedFetchAnsweredError)

    def test_an_unreachable_origin_is_unreachable_for_the_reader(self) -> None:
        """A timeout is shared as unreachable with its label; the reader's error backs
        the origin off in its own limiter too."""
        outcome = self.codec.encode_error(RequestTimeoutError("no answer in 10s"), 5, "a1")
        assert outcome is not None
        self.assertEqual((outcome.outcome, outcome.label), (OUTCOME_UNREACHABLE, "timeout"))
        error = self.failureResultOf(
            defer.ensureDeferred(self.codec.decode(outcome)), SharedFetchUnreachableError
        ).value
        self.assertTrue(is_unreachable(error))
        self.assertEqual(error.outcome, "timeout")

    def test_an_origin_that_answered_badly_is_not_backed_off(self) -> None:
        """An HTTP error or an invalid answer is shared as answered: not unreachable."""
        invalid = InvalidKeyResponseError(InvalidKeyResponseReason.NO_VERIFY_KEYS, "none")
        for error in (HttpStatusError(500), invalid):
            outcome = self.codec.encode_error(error, 5, "a1")
            assert outcome is not None
            self.assertEqual(outcome.outcome, OUTCOME_ANSWERED)
            rebuilt = self.failureResultOf(
                defer.ensureDeferred(self.codec.decode(outcome)), SharedFetchAnsweredError
            ).value
            self.assertFalse(is_unreachable(rebuilt))

    def test_errors_not_about_the_origin_are_not_shared(self) -> None:
        """A limiter's refusal or a bug says nothing about the origin: not shared."""
        self.assertIsNone(self.codec.encode_error(RateLimitedError(NAME, 5), 5, "a1"))
        self.assertIsNone(self.codec.encode_error(KeyError("bug"), 5, "a1"))
