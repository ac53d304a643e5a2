"""Exceptions shared across the package.

Each layer raises its own kind of error; the web layer turns :class:`RequestError`
into a JSON error body (``{"errcode": ..., "error": ...}``).
"""

import enum
import heapq
from collections.abc import Collection
from typing import Optional

from keyring_module.quoting import quote_untrusted

#: How many key ids an error message shows at most; the others are only counted.
MAX_SHOWN_KEY_IDS = 5


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range.

    ``path`` names the offending key, e.g. ``("federation", "request_timeout")``,
    and ``str(error)`` reads ``federation.request_timeout: expected a duration ...``.
    """

    def __init__(self, msg: str, path: tuple[str, ...] = ()) -> None:
        self.msg = msg
        self.path = tuple(path)
        super().__init__(msg)

    def __str__(self) -> str:
        if not self.path:
            return self.msg
        return "%s: %s" % (".".join(self.path), self.msg)


class RequestError(Exception):
    """A client request that we refuse, rendered as ``{"errcode", "error"}``.

    Example: ``RequestError(400, "M_NOT_JSON", "Content not JSON.")``.
    """

    def __init__(
        self,
        code: int,
        errcode: str,
        msg: str,
        retry_after_ms: Optional[int] = None,
    ) -> None:
        super().__init__("%d %s: %s" % (code, errcode, msg))
        self.code = code
        self.errcode = errcode
        self.msg = msg
        self.retry_after_ms = retry_after_ms


class KeyLookupError(Exception):
    """Keys could not be fetched or a key response was rejected."""


class VerificationFailure(enum.Enum):
    """Why a signature check failed: what code may decide on (never the error's text).

    Each ``.value`` is a stable label for logs and metrics.

    Example:
        >>> VerificationFailure.BAD_SIGNATURE.value
        'bad_signature'
    """

    #: The object has no ``signatures`` object.
    NO_SIGNATURES = "no_signatures"
    #: A server that must sign did not sign at all (no signature, or no ed25519 one).
    NOT_SIGNED = "not_signed"
    #: Signed, but by no key we hold and may use at that time (unknown, expired, old,
    #: compromised), possibly even after fetching the signer's keys.
    NO_USABLE_KEY = "no_usable_key"
    #: Signed more than 7 days ahead of now: no key can be valid then (the spec's cap).
    BEYOND_KEY_VALIDITY = "beyond_key_validity"
    #: A signature by a usable key is not base64 of 64 bytes.
    MALFORMED_SIGNATURE = "malformed_signature"
    #: A signature by a usable key does not verify.
    BAD_SIGNATURE = "bad_signature"
    #: A stored verify key cannot be used as an ed25519 key.
    INVALID_VERIFY_KEY = "invalid_verify_key"
    #: The signed object cannot be encoded as canonical JSON, or (an event in room v6
    #: and later) holds a float or an integer outside ±(2^53-1).
    NOT_CANONICAL_JSON = "not_canonical_json"
    #: The event's ``event_id`` is not its reference hash (room v3 and later).
    EVENT_ID_MISMATCH = "event_id_mismatch"
    #: A create event's ``room_id`` is not its reference hash (room v12).
    ROOM_ID_MISMATCH = "room_id_mismatch"
    #: The input cannot be checked: not a JSON object, a ``valid_at_ts`` that is not an
    #: integer, a request whose body is not JSON or whose method or URI is not ASCII.
    MALFORMED_OBJECT = "malformed_object"
    #: The event cannot be checked: not an object, no integer ``origin_server_ts``, or
    #: no valid server name where a required signer is named.
    MALFORMED_EVENT = "malformed_event"
    #: A request carries no ``Authorization: X-Matrix`` header.
    NO_REQUEST_AUTH = "no_request_auth"
    #: A request's X-Matrix headers are malformed, name different origins or another
    #: destination, or use a key algorithm other than ed25519.
    BAD_REQUEST_AUTH = "bad_request_auth"
    #: Fetching the signer's keys failed.
    FETCH_FAILED = "fetch_failed"
    #: Fetching the signer's keys took longer than the keyring waits.
    FETCH_TIMED_OUT = "fetch_timed_out"
    #: The key store could not be read.
    STORE_FAILED = "store_failed"
    #: Checking failed for a reason that is no fault of the input (a bug, a dead worker).
    INTERNAL_ERROR = "internal_error"


class KeyVerificationError(Exception):
    """A signature could not be verified.

    Code that decides anything tests :attr:`reason`; :attr:`detail` and ``str(error)``
    are for people.

    Attributes:
        server_name: the server whose signature was checked ("" when not known).
        key_ids: the key ids involved (possibly empty).
        reason: why, as a :class:`VerificationFailure`.
        detail: a human readable explanation, e.g. ``"invalid signature"``.

    Example:
        >>> error = KeyVerificationError(
        ...     "a.org", ["ed25519:1"], VerificationFailure.BAD_SIGNATURE, "invalid signature")
        >>> str(error)
        "invalid signature (server a.org, keys 'ed25519:1')"
        >>> error.reason is VerificationFailure.BAD_SIGNATURE
        True
    """

    def __init__(
        self,
        server_name: str,
        key_ids: "list[str] | tuple[str, ...]",
        reason: VerificationFailure,
        detail: str,
    ) -> None:
        self.server_name = server_name
        self.key_ids = tuple(key_ids)
        self.reason = reason
        self.detail = detail
        super().__init__(
            "%s (server %s, keys %s)" % (detail, server_name, describe_key_ids(self.key_ids))
        )


def describe_key_ids(key_ids: Collection[str], max_shown: int = MAX_SHOWN_KEY_IDS) -> str:
    """Key ids for an error message or a log line: key ids come from peers (an event's
    signatures, a notary's answer), so each is quoted (:func:`quote_untrusted`) and only
    the first ``max_shown`` in sorted order are shown; the others are counted.

    Example:
        >>> print(describe_key_ids(["ed25519:b", "ed25519:a\\n"]))
        'ed25519:a\\n', 'ed25519:b'
        >>> print(describe_key_ids(["ed25519:k%d" % i for i in range(9)], max_shown=2))
        'ed25519:k0', 'ed25519:k1' and 7 more
        >>> describe_key_ids([])
        'none'
    """
    if not key_ids:
        return "none"
    shown = ", ".join(quote_untrusted(key_id) for key_id in heapq.nsmallest(max_shown, key_ids))
    hidden = len(key_ids) - max_shown
    return shown if hidden <= 0 else "%s and %d more" % (shown, hidden)
