"""The store step every backend shares: from one server's rows to what a write changes.

Both the SQL store (inside its write transaction, holding the server's write lock) and
:class:`~keyring_module.storage.memory.InMemoryKeyStore` read all the key rows of the
server and what it has stored of its responses (:data:`~keyring_module.storage.rows.COPY_COLUMNS`,
not their bytes), call :func:`plan_store`, and write back what it says:

* the response row, if ``outcome.stores_response``;
* the key rows named in ``outcome.merged.written`` (as :func:`~keyring_module.storage.rows.key_row`
  with their first-seen copy);
* the conflicts, within the server's bound
  (:func:`~keyring_module.storage.bounds.record_within_cap`);
* and they delete the server's responses named in ``outcome.dropped``.

So the rule (:mod:`~keyring_module.storage.merge`), the bounds
(:mod:`~keyring_module.storage.bounds`) and the log lines are the same everywhere.
"""

import logging
from typing import Any, Collection, Sequence

from keyring_module.model import ServerKeysResponse
from keyring_module.storage.bounds import StoreOutcome, store_response
from keyring_module.storage.limits import StoreLimits
from keyring_module.storage.rows import stored_server_from_rows

logger = logging.getLogger(__name__)


def plan_store(
    rows: Sequence[Sequence[Any]],
    copy_rows: Sequence[Sequence[Any]],
    response: ServerKeysResponse,
    source: str,
    fetched_ts: int,
    replace: Collection[str],
    limits: StoreLimits,
) -> StoreOutcome:
    """What storing ``response`` changes, given all the ``server_keys`` rows of its server.

    Logs a WARNING for each corrupt row replaced, and one when the bounds refuse new key
    ids or the whole response, and an INFO line when stored responses a row still points
    at are dropped at a bound.

    Args:
        rows: every ``server_keys`` row of the server, in
            :data:`~keyring_module.storage.rows.KEY_COLUMNS` order.
        copy_rows: every stored response of the server, in
            :data:`~keyring_module.storage.rows.COPY_COLUMNS` order.
        response: the validated response being stored.
        source: where it came from (``origin`` or ``notary:<name>``).
        fetched_ts: when it was fetched.
        replace: key ids for which the response wins over differing stored bytes.
        limits: the per-server bounds.

    Returns:
        The outcome of :func:`~keyring_module.storage.bounds.store_response`.
    """
    stored, problems = stored_server_from_rows(rows, copy_rows)
    outcome = store_response(stored, response, source, fetched_ts, replace, limits)
    server_name = response.server_name
    for key_id in outcome.merged.written:
        if key_id in problems:
            logger.warning(
                "Replacing corrupt stored key %s %s: %s", server_name, key_id, problems[key_id]
            )
    refused = outcome.merged.refused
    if outcome.response_refused:
        logger.warning(
            "Not storing a response of %s from %s (%d bytes): it does not fit the server's"
            " %d stored responses of %d bytes (max_responses_per_server: %d,"
            " max_response_bytes_per_server: %d, notaries at most half); %d new key ids"
            " refused",
            server_name,
            source,
            len(response.json_bytes),
            len(outcome.responses),
            sum(copy.size for copy in outcome.responses.values()),
            limits.max_responses,
            limits.max_response_bytes,
            len(refused),
        )
    elif refused:
        logger.warning(
            "Not storing %d new key ids of %s from %s (first: %s): the server has %d keys"
            " (max_keys_per_server: %d, notaries at most half)",
            len(refused),
            server_name,
            source,
            refused[0],
            len(outcome.merged.keys) + len(set(stored.unreadable) - set(outcome.merged.keys)),
            limits.max_keys,
        )
    if outcome.evicted:
        logger.info(
            "Dropped %d stored responses of %s to stay within its bounds (max_responses_per"
            "_server: %d, max_response_bytes_per_server: %d); its keys stay stored",
            len(outcome.evicted),
            server_name,
            limits.max_responses,
            limits.max_response_bytes,
        )
    return outcome
