"""Answering one server of a notary query from its stored responses, co-signed.

A server's part of an answer is the stored origin responses holding the keys asked
for, each with one signature of ours added (:class:`~keyring_module.notary.caches.CoSigner`).
When every key id asked for comes from one response, the server's newest copy, already
co-signed, the answer is taken from the co-signed cache with no read of the stored
responses (Synapse's batches ask one key id per server, so a batch of stored servers
costs the keys read for the whole batch and nothing more). Otherwise a slice of a big
batch has the stored responses of its servers read with one store call, and its
co-signing misses signed together::

    answerer = StoredAnswerer(store, cosigner, publisher, metrics)
    from_store = [s for s in plan.servers if s.step is not Step.FETCH]
    answers = await answerer.answer_together(from_store, plan.now_ms)
    # [ServerAnswer(blobs=[b'{"server_name":"example.org",...}'],
    #               result=<AnswerResult.FRESH: 'fresh'>, ...), ...]
"""

import functools
from typing import Mapping, Optional, Sequence

import attr
from twisted.internet import defer

from keyring_module.metrics import AnswerResult, Metrics
from keyring_module.model import StoredKey, StoredResponse
from keyring_module.notary.caches import CoSigner
from keyring_module.notary.freshness import fresh_until_ms, met_minimum
from keyring_module.notary.plan import ServerPlan, Step
from keyring_module.notary.query import ServerQuery
from keyring_module.signing import ServerKeyPublisher
from keyring_module.storage import KeyStore

__all__ = ["LEFT_OUT", "AnswerSizeCap", "ServerAnswer", "StoredAnswerer", "gather_answers"]

#: The highest minimum an answer about ourselves meets (we always answer it).
_ANY_MINIMUM = 2**63 - 1

#: Stored responses read ahead for some servers of a slice, by server name (a server
#: read with none has an empty list; a server not in it reads its own when needed).
ReadResponses = Mapping[str, Sequence[StoredResponse]]
#: Nothing read ahead.
NOTHING_READ: ReadResponses = {}


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ServerAnswer:
    """One server's part of an answer: its blobs, how it was answered, and, when it
    came from fresh stored copies, until when and up to which minimum it holds."""

    blobs: list[bytes]
    result: AnswerResult
    fresh_until_ms: Optional[int] = None  # None: not reusable
    met_minimum: int = 0


#: A server left out of an answer that reached its byte cap (see :class:`AnswerSizeCap`).
LEFT_OUT = ServerAnswer([], AnswerResult.MISS)


def entry_bytes(answer: ServerAnswer) -> int:
    """The bytes ``answer`` adds to an answer body (its blobs and their commas).

    Example:
        >>> entry_bytes(ServerAnswer([b"{}", b"{}"], AnswerResult.FRESH))
        6
    """
    return sum(len(blob) + 1 for blob in answer.blobs)


class AnswerSizeCap:
    """Bounds the bytes of one answer's entries to ``max_bytes``: from the first server
    whose entries would take them over it, every server is left out (its requester asks
    the origins itself). Real answers are far below it (a 10,000-server one is about
    4.6 MB); padded responses of servers an attacker controls could make one of many
    gigabytes.

    While answering, :meth:`note` the answers made; once :attr:`reached`, the servers
    not answered yet need no work (no read, no signing): they are left out
    (:data:`LEFT_OUT` in their place). :meth:`apply` then cuts the answers in their
    final order.

    Example:
        >>> cap = AnswerSizeCap(10)
        >>> answers = [ServerAnswer([b"{1}"], AnswerResult.FRESH)] * 4
        >>> cap.note(answers[:2]); cap.reached
        False
        >>> capped, left_out = cap.apply(answers)
        >>> [a.blobs for a in capped], left_out
        ([[b'{1}'], [b'{1}'], [], []], 2)
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._noted = 0

    def note(self, answers: Sequence[ServerAnswer]) -> None:
        """Count the bytes of answers made."""
        self._noted += sum(entry_bytes(answer) for answer in answers)

    @property
    def reached(self) -> bool:
        """Whether the answers noted reach the cap: no more are needed."""
        return self._noted >= self.max_bytes

    def apply(self, answers: Sequence[ServerAnswer]) -> tuple[list[ServerAnswer], int]:
        """``answers`` in order, :data:`LEFT_OUT` from the first one that does not fit
        (or was not made); and how many were left out."""
        total = 0
        for index, answer in enumerate(answers):
            total += entry_bytes(answer)
            if answer is LEFT_OUT or total > self.max_bytes:
                left_out = len(answers) - index
                return list(answers[:index]) + [LEFT_OUT] * left_out, left_out
        return list(answers), 0


class StoredAnswerer:
    """Answers servers of a query from the store, co-signing what it serves, and
    counts each answer by how it was answered.

    Args:
        store: the key store (with its in-memory cache in front).
        cosigner: the co-signed response cache.
        publisher: our ready ``/server`` response, served for queries about ourselves.
        metrics: where to count answers and the age of served responses (optional).
    """

    def __init__(
        self,
        store: KeyStore,
        cosigner: CoSigner,
        publisher: ServerKeyPublisher,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self._store = store
        self._cosigner = cosigner
        self._publisher = publisher
        self._metrics = metrics

    def count(self, result: AnswerResult, count: int = 1) -> None:
        """Count ``count`` servers answered as ``result``."""
        if self._metrics is not None:
            self._metrics.notary_answer(result).inc(count)

    async def answer_together(
        self,
        servers: Sequence[ServerPlan],
        now: int,
        refresh_skipped: frozenset[str] = frozenset(),
    ) -> list[ServerAnswer]:
        """The answers of ``servers`` (a slice of a big batch; none is fetched first), in
        order: in turn with no Deferred each when nothing needs co-signing, else the
        stored responses of those not answered by the co-signed shortcut are read with
        one store call, and all are answered together so that their co-signing misses
        are signed at once (in worker jobs when many). A refresh in ``refresh_skipped``
        was not started (served as stale)."""
        to_read = [server for server in servers if not self._signs_nothing(server)]
        if not to_read:
            return [await self.answer(server, now, refresh_skipped) for server in servers]
        read = await self._read_responses(to_read)
        started = self._cosigner.cosign_together(
            functools.partial(self._start_answers, servers, now, refresh_skipped, read)
        )
        return await gather_answers(started)

    async def answer(
        self,
        server: ServerPlan,
        now: int,
        refresh_skipped: frozenset[str] = frozenset(),
        read: ReadResponses = NOTHING_READ,
    ) -> ServerAnswer:
        """A server's answer with no fetch to wait for (its step is not FETCH); a
        refresh in ``refresh_skipped`` was not started (served as stale). Its stored
        responses are taken from ``read`` when they were read there, else read when
        needed."""
        if server.step is Step.SELF:
            return self._answer_self()
        responses = read.get(server.query.server_name)
        if server.step is Step.STORE:
            return await self._answer_fresh(server.query, server.keys, now, responses)
        refreshed = server.step is Step.REFRESH and server.query.server_name not in refresh_skipped
        result = AnswerResult.REFRESH if refreshed else AnswerResult.STALE
        return await self.answer_with(server.query, server.keys, now, result, responses)

    async def answer_with(
        self,
        query: ServerQuery,
        keys: Mapping[str, StoredKey],
        now: int,
        result: AnswerResult,
        responses: Optional[Sequence[StoredResponse]] = None,
    ) -> ServerAnswer:
        """The answer from ``keys``, counted as ``result`` (or ``miss`` when nothing is
        served); ``responses``: the server's stored responses, if read already."""
        blobs = await self._blobs(query, keys, now, responses)
        if not blobs:
            result = AnswerResult.MISS
        self.count(result)
        return ServerAnswer(blobs, result)

    async def _read_responses(self, servers: Sequence[ServerPlan]) -> ReadResponses:
        """The stored responses of ``servers``, by server name, read with one call of the
        store (a server with none has an empty list)."""
        names = [server.query.server_name for server in servers]
        found = await self._store.get_many_server_responses(names)
        return {name: found.get(name, []) for name in names}

    def _start_answers(
        self,
        servers: Sequence[ServerPlan],
        now: int,
        refresh_skipped: frozenset[str],
        read: ReadResponses,
    ) -> list["defer.Deferred[ServerAnswer]"]:
        """Start answering ``servers`` from the store (with the responses in ``read``)."""
        return [
            defer.ensureDeferred(self.answer(server, now, refresh_skipped, read))
            for server in servers
        ]

    def _answer_self(self) -> ServerAnswer:
        self.count(AnswerResult.SELF)
        return ServerAnswer(
            [self._publisher.response_bytes()],
            AnswerResult.SELF,
            self._publisher.refresh_at_ms,
            _ANY_MINIMUM,
        )

    async def _answer_fresh(
        self,
        query: ServerQuery,
        keys: Mapping[str, StoredKey],
        now: int,
        responses: Optional[Sequence[StoredResponse]] = None,
    ) -> ServerAnswer:
        answer = await self.answer_with(query, keys, now, AnswerResult.FRESH, responses)
        if answer.result is AnswerResult.MISS:
            return answer
        if query.preferred_key_id is not None and query.preferred_key_id not in keys:
            # Same answer as without a preference; not kept under an unknown key id.
            return answer
        return attr.evolve(
            answer,
            fresh_until_ms=fresh_until_ms(query, keys),
            met_minimum=met_minimum(query, keys) or 0,
        )

    async def _blobs(
        self,
        query: ServerQuery,
        keys: Mapping[str, StoredKey],
        now: int,
        stored: Optional[Sequence[StoredResponse]] = None,
    ) -> list[bytes]:
        """The co-signed responses answering ``query``: the newest copy already
        co-signed when it answers alone, else the server's ``stored`` responses (read
        from the store when not given) that hold the keys asked for, those holding the
        preferred key id first."""
        if not keys:
            return []
        cosigned = self._cosigned_without_store_read(query, keys, now)
        if cosigned is not None:
            return [cosigned]
        if stored is None:
            stored = await self._store.get_server_responses(query.server_name)
        responses = list(stored)
        if query.key_criteria:
            selected = _responses_of(query, keys, responses)
            if selected is None:
                # Keys rewritten since ``keys`` were read (a fetch stored a newer copy
                # and the old one is gone): read them again, once.
                keys = await self._store.get_server_keys(query.server_name)
                selected = _responses_of(query, keys, responses)
            responses = selected or []
        if query.preferred_key_id is not None:
            preferred = keys.get(query.preferred_key_id)
            if preferred is not None:
                responses.sort(key=lambda r: r.response_id != preferred.response_id)
        if self._metrics is not None:
            for r in responses:
                self._metrics.served_response((now - r.fetched_ts) / 1000)
        blobs = [await self._cosigner.cosign(r) for r in responses]
        return [b for b in blobs if b is not None]

    def _cosigned_without_store_read(
        self, query: ServerQuery, keys: Mapping[str, StoredKey], now: int
    ) -> Optional[bytes]:
        """The answer for a query whose asked-for keys all come from one stored
        response already co-signed, with no read of the stored responses; None when
        the store must be read.

        Synapse's batches ask one key id per server, so a batch of stored servers is
        answered from the keys read for the whole batch and the co-signed cache alone.
        The shortcut is taken only when that response is the server's newest copy (see
        :func:`_is_newest_copy`): the store may drop an older copy at its bounds while
        key rows still point at it, and a dropped copy is not served.
        """
        key = _sole_response_key(query, keys)
        if key is None:
            return None
        if not _is_newest_copy(key, keys):
            return None
        blob = self._cosigner.cached(key.response_id)
        if blob is not None and self._metrics is not None:
            self._metrics.served_response((now - key.fetched_ts) / 1000)
        return blob

    def _signs_nothing(self, server: ServerPlan) -> bool:
        """Whether answering ``server`` from the store surely needs no co-signing
        (ourselves, nothing stored, or its one response, the newest copy, co-signed before)."""
        if server.step is Step.SELF or not server.keys:
            return True
        key = _sole_response_key(server.query, server.keys)
        return (
            key is not None
            and _is_newest_copy(key, server.keys)
            and self._cosigner.is_cached(key.response_id)
        )


async def gather_answers(
    deferreds: Sequence["defer.Deferred[ServerAnswer]"],
) -> list[ServerAnswer]:
    """Every answer, in order. The first failure is raised as itself (not wrapped in
    ``FirstError``), so a cancellation (the client went away) stays a cancellation;
    cancelling the wait cancels them all."""
    try:
        return await defer.gatherResults(list(deferreds), consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()
        raise  # not reached: raiseException raises


def _responses_of(
    query: ServerQuery, keys: Mapping[str, StoredKey], responses: Sequence[StoredResponse]
) -> Optional[list[StoredResponse]]:
    """The stored responses holding the keys ``query`` asks for, or None when fewer of
    them are among ``responses`` than ``keys`` point at (``keys`` may be out of date)."""
    wanted = {keys[k].response_id for k in query.key_criteria if k in keys}
    selected = [r for r in responses if r.response_id in wanted]
    if len({r.response_id for r in selected}) < len(wanted):
        return None
    return selected


def _is_newest_copy(key: StoredKey, keys: Mapping[str, StoredKey]) -> bool:
    """Whether ``key``'s copy is, without doubt, the one most recently stored for its
    server: its ``fetched_ts`` is the newest of the server's keys, and every key with
    that ``fetched_ts`` points at the same copy.

    A store never drops the response it is storing, and a later store that drops copies
    points some key at a newer one; so the newest copy is still stored.

    Example:
        >>> def key(key_id, fetched_ts, response_id):
        ...     return StoredKey("a", key_id, b"k" * 32, 9, None, fetched_ts, "origin", response_id)
        >>> keys = {"k1": key("k1", 5, "r1"), "k2": key("k2", 7, "r2")}
        >>> _is_newest_copy(keys["k2"], keys), _is_newest_copy(keys["k1"], keys)
        (True, False)
        >>> keys["k3"] = key("k3", 7, "r3")  # stored at the same time: which came last?
        >>> _is_newest_copy(keys["k2"], keys)
        False
    """
    newest = max(k.fetched_ts for k in keys.values())
    return key.fetched_ts == newest and all(
        k.response_id == key.response_id for k in keys.values() if k.fetched_ts == newest
    )


def _sole_response_key(query: ServerQuery, keys: Mapping[str, StoredKey]) -> Optional[StoredKey]:
    """A stored key of the one response all the key ids ``query`` asks for come from;
    None when it asks for all keys, for none stored, or for keys of several responses."""
    if not query.key_criteria:
        return None  # all keys: every stored response is served
    stored = [keys[k] for k in query.key_criteria if k in keys]
    if not stored or any(k.response_id != stored[0].response_id for k in stored):
        return None
    return stored[0]
