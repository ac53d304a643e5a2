"""Key fetchers: from the store, directly from origins, and through trusted notaries.

:class:`~keyring_module.fetchers.chain.KeyFetcherChain` puts them together: it serves
what the store already holds and asks the origin and the notaries (in the configured
order) only for what is missing, storing the answers the trust policy
(:mod:`~keyring_module.fetchers.trust`) accepts. The fetchers are
:mod:`~keyring_module.fetchers.origin` (``GET /_matrix/key/v2/server``) and
:mod:`~keyring_module.fetchers.notary_client` (``POST /_matrix/key/v2/query`` to trusted
notaries); what they share is in :mod:`~keyring_module.fetchers.base`. Only
:mod:`keyring_module.wiring` builds them.
"""
