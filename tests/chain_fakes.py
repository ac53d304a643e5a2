"""A key source the test drives, for fetcher-chain tests on a ``Clock``.

:class:`ScriptedFetcher` is a ``KeyFetcher`` with one source label: it answers each
``fetch_keys`` call with the responses it was given, at once, after a delay on the
clock, or never (the test may then answer the call itself, late).
"""

from typing import Mapping, Optional

from twisted.internet import defer
from twisted.internet.task import Clock

from keyring_module.fetchers.base import (
    FailureKind,
    FetchResult,
    SourceAnswers,
    SourceFailure,
)
from keyring_module.model import KeyRequest, ServerKeysResponse


class ScriptedFetcher:
    """A key source answering from ``responses`` after ``delay_s`` (None: never).

    Args:
        source: the label its answers carry (``origin`` or ``notary:<name>``).
        clock: where the delay runs.
        responses: what it answers about each server; other servers get a
            ``NOT_IN_ANSWER`` failure.
        delay_s: seconds until each call is answered; 0 answers at once, None never.

    Attributes:
        calls: the servers each call asked about, in order.
        pending: the calls not answered yet (see :meth:`answer_pending`).
    """

    def __init__(
        self,
        source: str,
        clock: Clock,
        responses: Optional[Mapping[str, ServerKeysResponse]] = None,
        delay_s: Optional[float] = 0,
    ) -> None:
        self.source = source
        self.clock = clock
        self.responses: dict[str, ServerKeysResponse] = dict(responses or {})
        self.delay_s = delay_s
        self.calls: list[list[str]] = []
        self.pending: list[tuple[list[str], "defer.Deferred[SourceAnswers]"]] = []

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,)

    def answers_for(self, server_names: list[str]) -> SourceAnswers:
        """What this source says about ``server_names`` now."""
        found = SourceAnswers()
        for name in server_names:
            response = self.responses.get(name)
            if response is None:
                failure = SourceFailure(self.source, FailureKind.NOT_IN_ANSWER, "not known")
                found.add_failure(name, failure)
            else:
                found.add_result(name, FetchResult(response, self.source))
        return found

    async def fetch_keys(self, requests: Mapping[str, KeyRequest]) -> SourceAnswers:
        names = sorted(requests)
        self.calls.append(names)
        if self.delay_s == 0:
            return self.answers_for(names)
        waiting: "defer.Deferred[SourceAnswers]" = defer.Deferred()
        self.pending.append((names, waiting))
        if self.delay_s is not None:
            self.clock.callLater(self.delay_s, self._answer, names, waiting)
        return await waiting

    def answer_pending(self) -> None:
        """Answer every call still waiting, from ``responses`` as they are now."""
        for names, waiting in list(self.pending):
            self._answer(names, waiting)

    def _answer(self, names: list[str], waiting: "defer.Deferred[SourceAnswers]") -> None:
        if (names, waiting) in self.pending:
            self.pending.remove((names, waiting))
            waiting.callback(self.answers_for(names))
