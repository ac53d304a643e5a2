"""The notary service: answer key queries about other servers, co-signing every answer.

* :mod:`~keyring_module.notary.service`: :class:`NotaryService`, which answers
  ``/_matrix/key/v2/query`` from the store and fetches through the shared chain;
* :mod:`~keyring_module.notary.stored_answers`: one server's part of an answer, from
  its stored responses, co-signed;
* :mod:`~keyring_module.notary.server_fetches`: the fetches a query waits for, and
  background refreshes;
* :mod:`~keyring_module.notary.query`: what a query asks per server
  (:class:`ServerQuery`), and its normalised form, the answer cache's key;
* :mod:`~keyring_module.notary.freshness`: when stored keys may answer a query (pure
  policy: the :class:`~keyring_module.notary.freshness.Verdict` per query);
* :mod:`~keyring_module.notary.caches`: the co-signed response cache and the whole
  answer cache, bounded in bytes, which keep the hot path free of signing and encoding.
"""

from keyring_module.notary.service import NotaryService, ServerQuery

__all__ = ["NotaryService", "ServerQuery"]
