"""Run one coroutine on the global reactor until it finishes (once per process).

outcome = run_on_reactor(lambda: main(args))
if isinstance(outcome, Failure):
    print(outcome.getTraceback())
"""

from typing import Any, Callable, Coroutine, Union

from twisted.python.failure import Failure


def run_on_reactor(start: Callable[[], Coroutine[Any, Any, Any]]) -> Union[Any, Failure]:
    """Start ``start()`` once the reactor runs, stop the reactor when it is done, and
    return its result (or its Failure). The global reactor cannot be run twice."""
    from twisted.internet import defer, reactor

    outcome: dict[str, Any] = {}

    def begin() -> None:
        d = defer.ensureDeferred(start())

        def done(result: Any) -> None:
            outcome["result"] = result
            reactor.stop()  # type: ignore[attr-defined]

        d.addBoth(done)

    reactor.callWhenRunning(begin)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return outcome.get("result")
