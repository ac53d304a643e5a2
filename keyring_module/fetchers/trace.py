"""What one fetcher-chain call did, server by server, for people who ask why.

``keyring-module query`` passes a :class:`FetchTrace` to
:meth:`~keyring_module.fetchers.chain.KeyFetcherChain.get_keys` and reports from it which
sources were asked, which answered, which answers the trust policy used and why the
others were not::

    trace = FetchTrace()
    keys = await chain.get_keys([KeyRequest("example.org")], use_cache=False, trace=trace)
    server = trace.servers["example.org"]
    server.asked      # ["origin", "notary:notary.example.org"]
    server.failures   # [SourceFailure("origin", FailureKind.UNREACHABLE, "timeout (...)")]
    server.used       # the answers stored: [FetchResult(..., source="notary:...")]

A server is settled by the first answers that are enough, so a slower source may
answer after ``get_keys`` has returned. Its answer (and what the trust policy made of
it) is recorded when it comes, so a trace read at once may lack it: to see every
source's answer, wait for
:meth:`~keyring_module.fetchers.chain.KeyFetcherChain.wait_for_background` first (as
``keyring-module query`` does; a source is waited for at most the chain's timeout).
"""

import attr

from keyring_module.fetchers.base import FetchResult, SourceAnswers, SourceFailure


@attr.s(auto_attribs=True, frozen=True, slots=True)
class UnusedAnswer:
    """A valid answer that was not stored, and why (e.g. ``"not trusted: key
    ed25519:a has 1 of 2 agreeing sources"`` or ``"could not be stored: ..."``)."""

    result: FetchResult
    reason: str


@attr.s(auto_attribs=True, slots=True)
class ServerTrace:
    """One server's part of a chain call.

    Attributes:
        asked: the sources asked about the server, in the order asked.
        answers: every valid answer received.
        failures: why sources gave nothing usable.
        used: the answers stored (trusted).
        unused: the valid answers not stored, and why (not trusted, a copy of the
            origin's answer, or the store failed): every answer is either used or unused.
    """

    asked: list[str] = attr.Factory(list)
    answers: list[FetchResult] = attr.Factory(list)
    failures: list[SourceFailure] = attr.Factory(list)
    used: list[FetchResult] = attr.Factory(list)
    unused: list[UnusedAnswer] = attr.Factory(list)


@attr.s(auto_attribs=True, slots=True)
class FetchTrace:
    """Collects a :class:`ServerTrace` per server the chain fetched for."""

    servers: dict[str, ServerTrace] = attr.Factory(dict)

    def server(self, server_name: str) -> ServerTrace:
        """The server's trace, created on first use."""
        trace = self.servers.get(server_name)
        if trace is None:
            trace = self.servers[server_name] = ServerTrace()
        return trace

    def asked(self, server_names: "list[str] | tuple[str, ...]", sources: tuple[str, ...]) -> None:
        """Record that ``sources`` were asked about ``server_names``."""
        for name in server_names:
            self.server(name).asked.extend(sources)

    def answered(self, answers: SourceAnswers) -> None:
        """Record what a source answered."""
        for name, results in answers.results.items():
            self.server(name).answers.extend(results)
        for name, failures in answers.failures.items():
            self.server(name).failures.extend(failures)
