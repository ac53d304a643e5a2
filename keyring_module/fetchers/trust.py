"""The trust policy: which fetched answers are stored, and which key conflicts they show.

Pure functions, no I/O: the chain (:mod:`keyring_module.fetchers.chain`) collects the
validated answers of one fetch round for a server, in a **deterministic order** (the
origin first, then the notaries in ``trusted_key_servers`` order), and asks
:func:`decide` what to do with them, given the keys already stored.

The policy (``key_trust:`` in the configuration):

* **Votes.** A *source* is the label of a :class:`~keyring_module.fetchers.base.FetchResult`
  (``origin`` or ``notary:<name>``). A source votes once for each (key_id, key bytes) found
  in any of its answers (``verify_keys`` and ``old_verify_keys`` alike).
* **Stored keys are settled (first seen wins, MSC4499).** A key id already in the store
  keeps its bytes: any other bytes for it are a conflict, and an answer holding them is
  rejected whole. The one exception: with ``confirm_notary_keys_directly`` and
  ``min_agreeing_sources == 1`` the origin's own answer overrides a stored *provisional*
  key (one whose source is a notary); the store replaces the row and records the conflict.
  With ``min_agreeing_sources > 1`` the origin is one vote like any other and cannot
  overturn keys that several sources agreed on: the disagreement is only recorded.
* **New key ids.** The winner is the first candidate (in the deterministic order) with at
  least ``min_agreeing_sources`` votes. With the default of 1 that is simply the first
  answer: the origin's if it answered, else the first notary's in configuration order.
  Every other candidate is a conflict against the winner; when no candidate has enough
  votes, nothing is trusted, and disagreeing candidates are still reported as conflicts
  against the first candidate.
* **Answers.** An answer is stored only if *every* key in it is trusted: its bytes are the
  stored ones, or the winner of its key id. So a notary never re-serves a blob holding an
  uncorroborated or conflicting key, and a response only one source vouches for (when N > 1)
  is not stored unless all its keys are already known.
* **Order.** Each trusted answer is stored once, in this order: the notaries' answers,
  the origin's overriding answers (``replace`` set), the notaries' answers that list an
  overridden key id (after the override, so that they agree with the stored key instead
  of conflicting with the provisional one), then the origin's other answers. So a key
  row whose newest copy came from the origin too is labelled ``origin``. A notary's copy
  that is byte for byte an overriding origin answer is not stored (it would add nothing
  but the notary's label); one edge remains: a notary answer that lists an overridden
  key id, differs from the origin's answer and has the same ``valid_until_ts`` labels
  the rows it shares with it as that notary's (provisional until the next direct
  confirmation, which relabels them).

A key counts as **provisional** while its stored source is not ``origin``
(:func:`is_provisional`).
"""

from typing import Mapping, Optional, Sequence

import attr

from keyring_module.fetchers.base import FetchResult
from keyring_module.model import SOURCE_ORIGIN, KeyConflict, StoredKey
from keyring_module.storage.limits import DEFAULT_STORE_LIMITS, StoreLimits
from keyring_module.storage.merge import key_entries, merge_server_keys

KeyEntry = tuple[str, bytes]  # (key_id, key bytes)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class AcceptedResult:
    """An answer to store, and the key ids it overrides (``store_server_keys(replace=)``)."""

    result: FetchResult
    replace: frozenset[str] = frozenset()


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RejectedResult:
    """An answer not to store, and why (for the log)."""

    result: FetchResult
    reason: str


@attr.s(auto_attribs=True, frozen=True, slots=True)
class TrustDecision:
    """What to do with one server's answers of one round.

    Attributes:
        accepted: answers to store, in this order (deterministic order); each answer at
            most once.
        rejected: answers not to store.
        conflicts: conflicts to record with ``record_conflicts``. Conflicts caused by an
            override are left out: the store records and returns those itself.
        copies: trusted notary answers not stored because they are byte for byte an
            overriding origin answer, which is stored instead.
    """

    accepted: tuple[AcceptedResult, ...]
    rejected: tuple[RejectedResult, ...]
    conflicts: tuple[KeyConflict, ...]
    copies: tuple[FetchResult, ...] = ()


def is_provisional(key: StoredKey) -> bool:
    """Whether a stored key was learned only from notaries (not yet confirmed directly)."""
    return key.source != SOURCE_ORIGIN


def count_votes(results: Sequence[FetchResult]) -> dict[KeyEntry, tuple[str, ...]]:
    """The distinct sources behind each (key_id, key bytes), in order of first answer.

    Dict order is the order in which each (key_id, key bytes) was first seen.
    """
    votes: dict[KeyEntry, list[str]] = {}
    for result in results:
        for key_id, (key_bytes, _) in key_entries(result.response).items():
            sources = votes.setdefault((key_id, key_bytes), [])
            if result.source not in sources:
                sources.append(result.source)
    return {entry: tuple(sources) for entry, sources in votes.items()}


def decide(
    stored: Mapping[str, StoredKey],
    results: Sequence[FetchResult],
    min_agreeing_sources: int = 1,
    origin_overrides_provisional: bool = False,
    seen_ts: int = 0,
) -> TrustDecision:
    """Apply the policy (see the module docstring) to one server's answers of one round.

    Args:
        stored: the server's stored keys before the round, by key id.
        results: the round's validated answers about the server, in deterministic order
            (origin first, then notaries in configuration order).
        min_agreeing_sources: N, the distinct sources needed for a new key.
        origin_overrides_provisional: whether the origin's answer replaces differing
            provisional keys (``confirm_notary_keys_directly``; ignored when N > 1).
        seen_ts: the ``seen_ts`` of the conflicts found.

    Returns:
        Which answers to store (and with which overrides), which to drop, and the
        conflicts to record.
    """
    server_name = results[0].response.server_name if results else ""
    votes = count_votes(results)
    candidates: dict[str, list[bytes]] = {}
    for key_id, key_bytes in votes:
        candidates.setdefault(key_id, []).append(key_bytes)
    overrides = origin_overrides_provisional and min_agreeing_sources <= 1

    trusted: dict[str, bytes] = {}
    replaced: set[str] = set()
    conflicts: list[KeyConflict] = []

    def conflict(key_id: str, kept: bytes, kept_source: str, rejected: bytes) -> None:
        conflicts.append(
            KeyConflict(
                server_name=server_name,
                key_id=key_id,
                kept_key_bytes=kept,
                kept_source=kept_source,
                rejected_key_bytes=rejected,
                rejected_source=votes[(key_id, rejected)][0],
                seen_ts=seen_ts,
            )
        )

    for key_id, options in candidates.items():
        known = stored.get(key_id)
        origin_bytes = _origin_answer(votes, key_id, options)
        if known is not None and not (
            overrides
            and is_provisional(known)
            and origin_bytes is not None
            and origin_bytes != known.verify_key_bytes
        ):
            trusted[key_id] = known.verify_key_bytes
            for option in options:
                if option != known.verify_key_bytes:
                    conflict(key_id, known.verify_key_bytes, known.source, option)
            continue
        if known is not None and origin_bytes is not None:
            # The origin overrides a provisional key; the store records that conflict.
            trusted[key_id] = origin_bytes
            replaced.add(key_id)
            for option in options:
                if option not in (origin_bytes, known.verify_key_bytes):
                    conflict(key_id, origin_bytes, SOURCE_ORIGIN, option)
            continue
        winner = next((o for o in options if len(votes[(key_id, o)]) >= min_agreeing_sources), None)
        if winner is not None:
            trusted[key_id] = winner
        reference = winner if winner is not None else options[0]
        for option in options:
            if option != reference:
                conflict(key_id, reference, votes[(key_id, reference)][0], option)

    rejected: list[RejectedResult] = []
    trusted_results: list[FetchResult] = []
    for result in results:
        reason = _untrusted_reason(result, trusted, votes, stored, min_agreeing_sources)
        if reason is not None:
            rejected.append(RejectedResult(result, reason))
        else:
            trusted_results.append(result)
    accepted, copies = _storing_order(trusted_results, replaced)
    return TrustDecision(tuple(accepted), tuple(rejected), tuple(conflicts), tuple(copies))


def _storing_order(
    results: Sequence[FetchResult], replaced: set[str]
) -> tuple[list[AcceptedResult], list[FetchResult]]:
    """The trusted answers in storing order (see "Order" in the module docstring).

    Returns:
        The answers to store, each once, and the notary copies of overriding origin
        answers (not stored).
    """
    overridden = [replaced.intersection(key_entries(r.response)) for r in results]
    overriding_ids = {
        result.response.response_id
        for result, key_ids in zip(results, overridden, strict=True)
        if result.source == SOURCE_ORIGIN and key_ids
    }
    from_notaries: list[AcceptedResult] = []
    overriding: list[AcceptedResult] = []
    after_override: list[AcceptedResult] = []
    from_origin: list[AcceptedResult] = []
    copies: list[FetchResult] = []
    for result, key_ids in zip(results, overridden, strict=True):
        if result.source == SOURCE_ORIGIN:
            if key_ids:
                overriding.append(AcceptedResult(result, frozenset(key_ids)))
            else:
                from_origin.append(AcceptedResult(result))
        elif result.response.response_id in overriding_ids:
            copies.append(result)
        elif key_ids:
            after_override.append(AcceptedResult(result))
        else:
            from_notaries.append(AcceptedResult(result))
    return from_notaries + overriding + after_override + from_origin, copies


def _origin_answer(
    votes: Mapping[KeyEntry, tuple[str, ...]], key_id: str, options: Sequence[bytes]
) -> Optional[bytes]:
    """The key bytes the origin itself gave for a key id this round, if any."""
    return next((o for o in options if SOURCE_ORIGIN in votes[(key_id, o)]), None)


def _untrusted_reason(
    result: FetchResult,
    trusted: Mapping[str, bytes],
    votes: Mapping[KeyEntry, tuple[str, ...]],
    stored: Mapping[str, StoredKey],
    min_agreeing_sources: int,
) -> Optional[str]:
    """Why an answer may not be stored (None when every key in it is trusted)."""
    for key_id, (key_bytes, _) in sorted(key_entries(result.response).items()):
        good = trusted.get(key_id)
        if good == key_bytes:
            continue
        if good is not None or key_id in stored:
            return "key %s conflicts with the trusted one" % (key_id,)
        return "key %s has %d of %d agreeing sources" % (
            key_id,
            len(votes[(key_id, key_bytes)]),
            min_agreeing_sources,
        )
    return None


def project_keys(
    stored: Mapping[str, StoredKey],
    accepted: Sequence[AcceptedResult],
    fetched_ts: int,
    limits: StoreLimits = DEFAULT_STORE_LIMITS,
) -> dict[str, StoredKey]:
    """The keys the store will hold once ``accepted`` is stored (to judge a round early).

    The store-merge rule (:func:`~keyring_module.storage.merge.merge_server_keys`)
    folded over the accepted answers in order, from the stored keys, within the store's
    key bounds: new key ids beyond the room a source has are refused (notaries fill at
    most half of ``max_keys``, see :mod:`keyring_module.storage.limits`), and an answer
    too big for the response bytes bound on its own is not stored. So a notary answer
    the store will refuse does not settle a server whose origin would be stored.

    One case is not foreseen, as it depends on the stored responses: a notary's answer
    that needs a new stored copy while the origin's own copies fill the server's
    response bounds is refused by the store although projected here.

    Args:
        stored: the server's stored keys before the round.
        accepted: the answers to store, in storing order.
        fetched_ts: the ``fetched_ts`` they are stored with.
        limits: the store's per-server bounds (``KeyStore.limits``).
    """
    keys = dict(stored)
    for item in accepted:
        response, source = item.result.response, item.result.source
        if not limits.can_hold_alone(len(response.json_bytes), source):
            continue
        keys = merge_server_keys(
            keys,
            response,
            source,
            fetched_ts,
            item.replace,
            new_key_room=limits.new_key_room(keys, 0, source),
        ).keys
    return keys
