"""Key fetchers: from the store, directly from origins, and through trusted notaries.

:class:`~keyring_module.fetchers.chain.KeyFetcherChain` puts them together: it serves
what the store already holds and asks the origin and the notaries (in the configured
order) only for what is missing, storing every validated response it gets.
"""
