"""Puts our key fetcher into the homeserver's own keyring (``use_module_fetchers``).

This is the only module that imports ``synapse``, and only :func:`load_synapse_parts`
does, when :class:`~keyring_module.module.KeyringModule` is configured with::

    synapse_keyring:
      use_module_fetchers: true

Synapse's ``Keyring`` asks the fetchers of its ``_key_fetchers`` list in order, each
with ``async get_keys(server_name, key_ids, minimum_valid_until_ts) -> {key_id:
FetchKeyResult}``, until every key id is valid until the minimum. Its list is
Synapse's store, then its perspectives fetcher (when ``trusted_key_servers`` is set in
``homeserver.yaml``), then the origin. When the module is loaded (before Synapse
listens), it **replaces the whole list** with one
:class:`~keyring_module.synapse_fetcher.ModuleKeyFetcher`, Synapse's store fetcher
included:

* ours answers from our store first (the same first step), so keeping Synapse's store
  ahead of it would only let keys Synapse fetched before the switch (or last-answer-wins
  re-keyed ids in its table) skip our trust policy, forever, since nothing refreshes
  that table any more;
* every key the homeserver uses then comes from one place that workers and other
  modules share, with one limiter and one cache;
* the cost: after turning the option on, each server's keys are fetched once more
  (into our store); after turning it off, Synapse fetches into its own table again.

Until our key store is open, our fetcher waits for it (bounded by Synapse's
federation ``client_timeout``), then lets Synapse's replaced fetchers answer; if the
store fails to open, :meth:`InstalledFetcher.give_up` puts Synapse's list back. At
shutdown the module does the same before closing the store, since Synapse serves
requests until its own shutdown.

**Key fetches then follow the module's settings, not homeserver.yaml's**: the module's
``federation.ip_range_denylist``/``ip_range_allowlist``, ``federation.verify_tls`` and
``federation.ca_file`` (not Synapse's ``ip_range_*``, ``federation_verify_certificates``
and ``federation_custom_ca_list``), and the module's ``trusted_key_servers`` (empty by
default; Synapse's default is matrix.org). Two settings cannot be carried over: with
``federation_domain_whitelist`` or ``outbound_federation_restricted_to`` set in
``homeserver.yaml``, the adapter refuses to switch.

Fail safe: the switch is made only if the running Synapse is a tested version
(:data:`TESTED_SYNAPSE_VERSIONS`), neither of those two settings is set, and its keyring
looks exactly as expected (the ``Keyring`` class, a ``_key_fetchers`` list holding
Synapse's store, perspectives and origin fetchers in that order, each with the expected
``get_keys`` signature, and a ``FetchKeyResult(verify_key, valid_until_ts)``).
Otherwise one ERROR names the Synapse version and what differs, and Synapse keeps its
own fetchers. The new list is built whole and assigned once: never half-patched; a
lookup already running goes on with the old list. The replaced fetchers are not shut
down (they answer while our store is not ready, and go with the homeserver).

Example::

    installed = install_module_fetcher(api, None, metrics, reactor)
    ...                                    # once our key store is open:
    if installed is not None:
        installed.use(services.keyring)
"""

import inspect
import logging
import re
from typing import Any, Callable, ContextManager, Optional, Sequence

import attr

from keyring_module.clock import ReactorClock
from keyring_module.keyring.api import Keyring
from keyring_module.metrics import Metrics
from keyring_module.synapse_fetcher import DEFAULT_WAIT_S, ModuleKeyFetcher

logger = logging.getLogger(__name__)

#: The Synapse releases (major.minor) whose keyring this module was tested with.
TESTED_SYNAPSE_VERSIONS = ("1.163",)

#: The parameters every fetcher's ``get_keys`` must take (after ``self``).
GET_KEYS_PARAMETERS = ("server_name", "key_ids", "minimum_valid_until_ts")

_RELEASE = re.compile(r"^\s*v?(\d+)\.(\d+)")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SynapseParts:
    """What the adapter uses of Synapse (tests pass fakes).

    Attributes:
        version: ``synapse.__version__``, e.g. ``"1.163.2"``.
        keyring_class: ``synapse.crypto.keyring.Keyring``.
        store_fetcher: ``StoreKeyFetcher``.
        perspectives_fetcher: ``PerspectivesKeyFetcher``.
        server_fetcher: ``ServerKeyFetcher``.
        fetch_key_result: ``synapse.storage.keys.FetchKeyResult``.
        make_deferred_yieldable: ``synapse.logging.context.make_deferred_yieldable``.
        preserve_logging_context: ``synapse.logging.context.PreserveLoggingContext``.
    """

    version: str
    keyring_class: type
    store_fetcher: type
    perspectives_fetcher: type
    server_fetcher: type
    fetch_key_result: Callable[..., Any]
    make_deferred_yieldable: Callable[[Any], Any]
    preserve_logging_context: Callable[[], ContextManager[Any]]


class SynapseMismatch(Exception):
    """The running Synapse is not what the adapter was tested with."""


@attr.s(auto_attribs=True, slots=True)
class InstalledFetcher:
    """Our fetcher, in place in the homeserver's keyring.

    Attributes:
        fetcher: the fetcher in Synapse's list.
        synapse_keyring: the homeserver's keyring.
        original: Synapse's own list, as it was.
        replacement: the list holding our fetcher.
    """

    fetcher: ModuleKeyFetcher
    synapse_keyring: Any
    original: list[Any]
    replacement: list[Any]

    def use(self, keyring: Keyring) -> None:
        """Our key store is open: lookups go through ``keyring`` from now on."""
        self.fetcher.use(keyring.lookup_keys)

    def restore(self) -> bool:
        """Put Synapse's own list back (one assignment), unless someone replaced ours.

        Returns:
            Whether Synapse's list is back.
        """
        if self.synapse_keyring._key_fetchers is not self.replacement:
            return False
        self.synapse_keyring._key_fetchers = self.original
        return True

    def give_up(self) -> None:
        """Our key store will not answer (it failed to open, or is closing): Synapse's
        own list is back, and a lookup that still reaches our fetcher (one that began
        with our list) is answered by Synapse's own fetchers too."""
        self.restore()
        self.fetcher.give_up()


def synapse_version() -> str:
    """``synapse.__version__``, or ``"unknown"`` if Synapse cannot be imported."""
    try:
        import synapse

        return str(getattr(synapse, "__version__", "unknown"))
    except Exception:
        return "unknown"


def load_synapse_parts() -> SynapseParts:
    """Import what the adapter needs from Synapse.

    Raises:
        SynapseMismatch: a name is missing (a different Synapse).
    """
    try:
        import synapse
        from synapse.crypto.keyring import (
            Keyring as SynapseKeyring,
        )
        from synapse.crypto.keyring import (
            PerspectivesKeyFetcher,
            ServerKeyFetcher,
            StoreKeyFetcher,
        )
        from synapse.logging.context import PreserveLoggingContext, make_deferred_yieldable
        from synapse.storage.keys import FetchKeyResult
    except ImportError as e:
        raise SynapseMismatch("cannot import %s" % (e,)) from e
    return SynapseParts(
        version=str(getattr(synapse, "__version__", "unknown")),
        keyring_class=SynapseKeyring,
        store_fetcher=StoreKeyFetcher,
        perspectives_fetcher=PerspectivesKeyFetcher,
        server_fetcher=ServerKeyFetcher,
        fetch_key_result=FetchKeyResult,
        make_deferred_yieldable=make_deferred_yieldable,
        preserve_logging_context=PreserveLoggingContext,
    )


def is_tested_version(version: str) -> bool:
    """Whether ``version``'s major.minor is in :data:`TESTED_SYNAPSE_VERSIONS`.

    Example:
        >>> is_tested_version("1.163.2 (b=main,abc123)"), is_tested_version("1.164.0")
        (True, False)
    """
    match = _RELEASE.match(version)
    return match is not None and "%s.%s" % match.groups() in TESTED_SYNAPSE_VERSIONS


def check_keyring(synapse_keyring: Any, parts: SynapseParts) -> list[Any]:
    """The keyring's fetcher list, if everything looks as tested.

    Raises:
        SynapseMismatch: saying what differs.
    """
    if not is_tested_version(parts.version):
        raise SynapseMismatch("is not a tested version")
    if _parameters(parts.fetch_key_result) != ("verify_key", "valid_until_ts"):
        raise SynapseMismatch("FetchKeyResult does not take (verify_key, valid_until_ts)")
    if not isinstance(synapse_keyring, parts.keyring_class):
        raise SynapseMismatch(
            "the homeserver's keyring is a %s, not Synapse's Keyring"
            % (type(synapse_keyring).__name__,)
        )
    if not hasattr(synapse_keyring, "_inner_fetch_key_request"):
        raise SynapseMismatch("its Keyring has no _inner_fetch_key_request")
    fetchers = getattr(synapse_keyring, "_key_fetchers", None)
    if type(fetchers) is not list:
        raise SynapseMismatch("its Keyring has no _key_fetchers list")
    kinds = [type(f) for f in fetchers]
    expected = [
        [parts.store_fetcher, parts.server_fetcher],
        [parts.store_fetcher, parts.perspectives_fetcher, parts.server_fetcher],
    ]
    if kinds not in expected:
        raise SynapseMismatch(
            "its keyring's fetchers are [%s], not Synapse's own"
            % (", ".join(k.__name__ for k in kinds),)
        )
    for fetcher in fetchers:
        get_keys = getattr(fetcher, "get_keys", None)
        if not inspect.iscoroutinefunction(get_keys):
            raise SynapseMismatch("%s.get_keys is not async" % (type(fetcher).__name__,))
        if _parameters(get_keys) != GET_KEYS_PARAMETERS:
            raise SynapseMismatch(
                "%s.get_keys takes (%s), not (%s)"
                % (
                    type(fetcher).__name__,
                    ", ".join(_parameters(get_keys)),
                    ", ".join(GET_KEYS_PARAMETERS),
                )
            )
    return fetchers


def check_federation_settings(homeserver: Any) -> float:
    """Refuse the homeserver settings our fetches could not follow; return Synapse's
    federation ``client_timeout`` in seconds (how long a lookup waits for our store).

    Raises:
        SynapseMismatch: ``federation_domain_whitelist`` or
            ``outbound_federation_restricted_to`` is set, or cannot be read.
    """
    config = getattr(homeserver, "config", None)
    federation = getattr(config, "federation", None)
    worker = getattr(config, "worker", None)
    if not hasattr(federation, "federation_domain_whitelist"):
        raise SynapseMismatch("has no config.federation.federation_domain_whitelist")
    restricted = getattr(worker, "outbound_federation_restricted_to", None)
    if not hasattr(restricted, "instances"):
        raise SynapseMismatch("has no config.worker.outbound_federation_restricted_to")
    for name, value in (
        ("federation_domain_whitelist", getattr(federation, "federation_domain_whitelist", None)),
        ("outbound_federation_restricted_to", getattr(restricted, "instances", None)),
    ):
        if value is not None:
            raise SynapseMismatch(
                "has %s set in homeserver.yaml, which keyring_module's key fetches would "
                "not follow" % (name,)
            )
    timeout_ms = getattr(federation, "client_timeout_ms", None)
    return timeout_ms / 1000 if isinstance(timeout_ms, int) and timeout_ms > 0 else DEFAULT_WAIT_S


def install_module_fetcher(
    api: Any,
    keyring: Optional[Keyring],
    metrics: Metrics,
    clock: ReactorClock,
    load: Callable[[], SynapseParts] = load_synapse_parts,
    *,
    trusted_key_servers: Sequence[str] = (),
) -> Optional[InstalledFetcher]:
    """Replace the homeserver keyring's fetchers with one :class:`ModuleKeyFetcher`.

    Args:
        api: Synapse's ``ModuleApi`` (the homeserver is its ``_hs``).
        keyring: our keyring, which answers the lookups; None while our key store is
            opening (then :meth:`InstalledFetcher.use` gives it).
        metrics: where ``keyring_synapse_key_requests_total`` is counted.
        clock: the reactor.
        load: imports Synapse's parts (tests pass fakes).
        trusted_key_servers: the module's notaries, named in the INFO line.

    Returns:
        The installed fetcher if the fetchers were replaced; None (after one ERROR
        naming the Synapse version) if Synapse was left as it was.
    """
    version = "unknown"
    try:
        parts = load()
        version = parts.version
        homeserver = getattr(api, "_hs", None)
        if homeserver is None or not hasattr(homeserver, "get_keyring"):
            raise SynapseMismatch("its ModuleApi has no homeserver with get_keyring()")
        if not is_tested_version(version):
            raise SynapseMismatch("is not a tested version")
        wait_s = check_federation_settings(homeserver)
        synapse_keyring = homeserver.get_keyring()
        old = check_keyring(synapse_keyring, parts)
        counter = metrics.synapse_key_requests
        fetcher = ModuleKeyFetcher(
            None if keyring is None else keyring.lookup_keys,
            parts.fetch_key_result,
            lambda result: counter.labels(result).inc(),
            clock,
            yieldable=parts.make_deferred_yieldable,
            detached=parts.preserve_logging_context,
            fallback=old,
            wait_s=wait_s,
        )
        replacement: list[Any] = [fetcher]
        synapse_keyring._key_fetchers = replacement  # the one change, made whole
    except Exception as e:
        if version == "unknown":
            version = synapse_version()
        logger.error(
            "keyring_module: synapse_keyring.use_module_fetchers is on, but Synapse %s %s: "
            "the homeserver keeps its own key fetchers (tested with Synapse %s)",
            version,
            e if isinstance(e, SynapseMismatch) else "could not be checked (%r)" % (e,),
            ", ".join(TESTED_SYNAPSE_VERSIONS),
        )
        return None
    logger.info(
        "keyring_module: Synapse %s's keyring now gets keys through keyring_module "
        "(in place of %s). Key fetches follow the module's config, not homeserver.yaml: "
        "federation.ip_range_denylist/ip_range_allowlist, federation.verify_tls/ca_file, "
        "and its trusted_key_servers (%s)",
        version,
        ", ".join(type(f).__name__ for f in old),
        ", ".join(trusted_key_servers) or "none",
    )
    return InstalledFetcher(fetcher, synapse_keyring, old, replacement)


def _parameters(function: Any) -> tuple[str, ...]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in signature.parameters if name != "self")
