"""Why a server's keys still do not answer a request after a fetch round, for the log.

The chain logs one line for the servers whose keys still do not answer their request
once every source was asked (it then uses what is stored). A source that answered does
not mean the request is met: the answer may not list a key id asked for, its
``valid_until_ts`` may be in the past (some servers, SyTest's among them, only ever
publish expired keys) or before the ``minimum_valid_until_ts`` asked for (a query or
an event from the future), or the trust policy may not have trusted it. Each such line
says which, per server, from what the round saw::

    reason = unusable_reason(request, keys, answers, rejected, failures, now_ms)
    # "'ed25519:a' valid until 2026-12-03T10:00:00Z, before the minimum
    #  2026-12-04T00:00:00Z (the origin answered)"

The wording is built from the request, the keys stored after the round, the round's
validated answers, the ones the trust policy rejected and the sources' failures; no
I/O, so it is cheap enough to run for every server of a big batch.
"""

from typing import Mapping, Sequence

from keyring_module.fetchers.base import FetchResult, SourceFailure
from keyring_module.fetchers.trust import RejectedResult
from keyring_module.model import KeyRequest, StoredKey
from keyring_module.quoting import quote_untrusted
from keyring_module.timestamps import format_ts

#: How many failures or key ids one reason names at most.
MAX_NAMED = 3


def key_problem(request: KeyRequest, keys: Mapping[str, StoredKey], now_ms: int) -> tuple[str, str]:
    """What is wrong with the stored keys for this request, as ``(kind, text)``.

    ``kind`` is one of ``unknown`` (no current key known), ``missing`` (a key id asked
    for is not listed), ``expired`` (``valid_until_ts`` already past) and
    ``below_minimum`` (valid now, but not until the ``minimum_valid_until_ts`` asked for).

    Example:
        >>> k = StoredKey("a.example", "ed25519:a", b"k" * 32, 5000, None, 0, "origin", "r")
        >>> key_problem(KeyRequest("a.example", frozenset({"ed25519:b"}), 0), {"ed25519:a": k}, 0)
        ('missing', "key 'ed25519:b' not listed (known: 'ed25519:a')")
        >>> key_problem(KeyRequest("a.example", None, 6000), {"ed25519:a": k}, 0)[1]
        "'ed25519:a' valid until 1970-01-01T00:00:05Z, before the minimum 1970-01-01T00:00:06Z"
        >>> key_problem(KeyRequest("a.example", None, 9000), {"ed25519:a": k}, 7000)[1]
        "'ed25519:a' expired at 1970-01-01T00:00:05Z (the minimum is 1970-01-01T00:00:09Z)"
    """
    minimum = request.minimum_valid_until_ts
    if request.key_ids is None:
        current = [k for k in keys.values() if k.expired_ts is None]
        if not current:
            if not keys:
                return UNKNOWN, "no key known"
            return UNKNOWN, "no current key (old keys only: %s)" % _names(sorted(keys))
        best = max(current, key=lambda k: (k.valid_until_ts, k.key_id))
        return _too_old(best, minimum, now_ms)
    missing = sorted(k for k in request.key_ids if k not in keys)
    if missing:
        known = " (known: %s)" % _names(sorted(keys)) if keys else ""
        return MISSING, "key %s not listed%s" % (_names(missing), known)
    stale = sorted(
        (keys[key_id] for key_id in request.key_ids if keys[key_id].expired_ts is None),
        key=lambda k: k.key_id,
    )
    stale = [k for k in stale if k.valid_until_ts < minimum]
    if not stale:  # (not for a request the keys answer)
        return BELOW_MINIMUM, "the keys answer the request"
    return _too_old(stale[0], minimum, now_ms)


#: The kinds of :func:`key_problem`.
UNKNOWN, MISSING, EXPIRED, BELOW_MINIMUM = "unknown", "missing", "expired", "below_minimum"


def _too_old(key: StoredKey, minimum: int, now_ms: int) -> tuple[str, str]:
    if key.valid_until_ts < now_ms:
        return EXPIRED, "%s expired at %s (the minimum is %s)" % (
            quote_untrusted(key.key_id),
            format_ts(key.valid_until_ts),
            format_ts(minimum),
        )
    return BELOW_MINIMUM, "%s valid until %s, before the minimum %s" % (
        quote_untrusted(key.key_id),
        format_ts(key.valid_until_ts),
        format_ts(minimum),
    )


def sources_said(
    answers: Sequence[FetchResult],
    rejected: Sequence[RejectedResult],
    failures: Sequence[SourceFailure],
) -> str:
    """What the round's sources did about the server, in a few words.

    Example:
        >>> from keyring_module.fetchers.base import FailureKind
        >>> sources_said([], [], [SourceFailure("origin", FailureKind.UNREACHABLE, "timeout")])
        "no source answered: origin unreachable ('timeout')"
    """
    if rejected:
        first = rejected[0]
        return "not trusted: %s's answer: %s" % (first.result.source, first.reason)
    if answers:
        sources = sorted({a.source for a in answers})
        return "%s answered" % ("the origin" if sources == ["origin"] else ", ".join(sources))
    if failures:
        shown = [
            "%s %s (%s)" % (f.source, f.kind.value, quote_untrusted(f.detail))
            for f in failures[:MAX_NAMED]
        ]
        more = len(failures) - len(shown)
        return "no source answered: %s%s" % (
            "; ".join(shown),
            "; and %d more" % more if more > 0 else "",
        )
    return "no source was asked"


def unusable_reason(
    request: KeyRequest,
    keys: Mapping[str, StoredKey],
    answers: Sequence[FetchResult],
    rejected: Sequence[RejectedResult],
    failures: Sequence[SourceFailure],
    now_ms: int,
) -> str:
    """Why ``keys`` (stored after the round) still do not answer ``request``.

    Args:
        request: what was asked for the server.
        keys: its stored keys after the round.
        answers: the round's validated answers about it.
        rejected: those of ``answers`` the trust policy did not trust.
        failures: why sources gave nothing usable about it.
        now_ms: the current time.

    Returns:
        For example ``"key 'ed25519:b' not listed (known: 'ed25519:a') (the origin
        answered)"`` or ``"no key known (no source answered: origin unreachable
        (connect_error ...))"``.
    """
    _, problem = key_problem(request, keys, now_ms)
    return "%s (%s)" % (problem, sources_said(answers, rejected, failures))


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(quote_untrusted(i) for i in items[:MAX_NAMED])
    more = len(items) - MAX_NAMED
    return shown + (" and %d more" % more if more > 0 else "")
