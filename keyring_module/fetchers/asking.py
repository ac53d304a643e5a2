"""Asking one key source, bounded by the chain's deadline, recorded in a trace.

The fetcher chain asks every source through :func:`ask_source`, so a source that fails
unexpectedly, or is too slow, gives failures for the servers asked instead of an
exception::

    found = await ask_source(
        reactor, 10.0, trace, "notary source 0", notary_fetcher, {"example.org": request}
    )
    found.results.get("example.org")   # [FetchResult(...)] or None
    found.failures.get("example.org")  # [SourceFailure(..., FailureKind.TIMED_OUT, ...)]
"""

import logging
from typing import Mapping, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.clock import DeadlineExceeded, ReactorClock, with_deadline
from keyring_module.fetchers.base import (
    FailureKind,
    KeyFetcher,
    SourceAnswers,
    SourceFailure,
    merge_answers,
)
from keyring_module.fetchers.trace import FetchTrace
from keyring_module.model import KeyRequest

# The chain's lines share the chain's logger, which operators filter on.
logger = logging.getLogger("keyring_module.fetchers.chain")


async def ask_source(
    clock: ReactorClock,
    timeout_s: Optional[float],
    trace: Optional[FetchTrace],
    label: str,
    fetcher: KeyFetcher,
    asked: Mapping[str, KeyRequest],
) -> SourceAnswers:
    """One source's answers, bounded by the timeout (recorded in ``trace``, if any).

    At the deadline this caller stops waiting: its wait is cancelled, down to the
    limiter's flights (:class:`~keyring_module.flights.Flight`). A fetch still queued for
    a slot that nobody else waits for leaves the queue without being sent (and gives its
    token back); a fetch already sent goes on for the other callers sharing it, and ends
    on the HTTP client's own timeout. What a source finds after the deadline is not used
    by this call. This never raises: an unexpected error is logged with its traceback
    and reported as an ``ERROR`` failure for every server asked.

    Args:
        clock: where the deadline is scheduled.
        timeout_s: how long the source is waited for (None: as long as it takes).
        trace: where to record who was asked and what they answered, if anyone asked.
        label: the source in log lines, e.g. ``"origin of example.org"``.
        fetcher: the source.
        asked: what it is asked, by server name.

    Returns:
        The source's validated answers and failures, by server name.
    """
    if trace is not None:
        trace.asked(sorted(asked), fetcher.sources)
    fetching = defer.ensureDeferred(fetcher.fetch_keys(asked))
    fetching.addErrback(_source_failed, label, fetcher, asked)
    try:
        found = await with_deadline(clock, fetching, timeout_s, cancel_work=True)
    except DeadlineExceeded as e:
        logger.info(
            "Key source %s did not answer within %.1fs (asked about %d servers); going on",
            label,
            e.seconds,
            len(asked),
        )
        detail = "timeout (no answer within %.3gs)" % (e.seconds,)
        found = _failed_everywhere(fetcher, asked, FailureKind.TIMED_OUT, detail)
    if trace is not None:
        trace.answered(found)
    return found


def _source_failed(
    failure: Failure, label: str, fetcher: KeyFetcher, asked: Mapping[str, KeyRequest]
) -> SourceAnswers:
    if failure.check(defer.CancelledError):
        # Cancelled at the deadline (see above), where the timeout is reported: quiet.
        return _failed_everywhere(fetcher, asked, FailureKind.TIMED_OUT, "stopped waiting")
    logger.error("Key source %s failed: %s", label, failure.getTraceback())
    detail = "unexpected error: %s" % (failure.getErrorMessage(),)
    return _failed_everywhere(fetcher, asked, FailureKind.ERROR, detail)


def _failed_everywhere(
    fetcher: KeyFetcher, asked: Mapping[str, KeyRequest], kind: FailureKind, detail: str
) -> SourceAnswers:
    """The same failure for every server asked, from each of the fetcher's sources."""
    return merge_answers(
        SourceAnswers.failed(asked, SourceFailure(source, kind, detail))
        for source in fetcher.sources
    )
