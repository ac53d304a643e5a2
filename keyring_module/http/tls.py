"""TLS for outbound federation: trust roots and per-name connection creators.

With ``federation.verify_tls: true`` the peer's certificate must chain to the platform
trust store (OpenSSL's default verify paths, which honour ``SSL_CERT_FILE`` and
``SSL_CERT_DIR``) or to one of the CAs in ``federation.ca_file``, and must name the
expected host (a DNS name, or an IP address for IP-literal servers). With
``verify_tls: false`` nothing is checked, but SNI is still sent.

Example::

    policy = FederationTLSPolicy(verify=True, ca_file="/etc/keyring/extra-ca.pem")
    endpoint = wrapClientTLS(policy.creator_for("example.org"), tcp_endpoint)
"""

import collections
import logging
import re
from typing import Optional

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from keyring_module.http import TLSError

logger = logging.getLogger(__name__)

_PEM_CERT_RE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_CREATOR_CACHE_SIZE = 1024


def load_pem_certificates(path: str) -> list[ssl.Certificate]:
    """Read every certificate of a PEM bundle.

    Args:
        path: a file holding one or more ``BEGIN CERTIFICATE`` blocks.

    Returns:
        The certificates, in file order.

    Raises:
        TLSError: the file cannot be read or holds no valid certificate.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSError("cannot read CA file %s: %s" % (path, e.strerror)) from None
    blocks = _PEM_CERT_RE.findall(data)
    if not blocks:
        raise TLSError("no PEM certificate found in CA file %s" % (path,))
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise TLSError("invalid certificate in CA file %s: %s" % (path, e)) from None


@implementer(IOpenSSLTrustRoot)
class PlatformPlusTrustRoot:
    """Trust the platform's CAs plus some extra ones.

    Twisted offers ``platformTrust()`` and ``trustRootFromCertificates()`` but no way to
    combine them; this does both: OpenSSL's default verify paths, then each extra CA
    added to the context's store.

    Args:
        extra: additional trusted CA certificates (e.g. from ``federation.ca_file``).

    Example::

        root = PlatformPlusTrustRoot(load_pem_certificates("ca.pem"))
        options = optionsForClientTLS("example.org", trustRoot=root)
    """

    def __init__(self, extra: list[ssl.Certificate]) -> None:
        self._extra = [cert.original for cert in extra]

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        if store is None:  # pragma: no cover - OpenSSL always has a store
            return
        for cert in self._extra:
            store.add_cert(cert)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedConnectionCreator:
    """Creates client TLS connections that send SNI but check nothing."""

    def __init__(self, options: ssl.CertificateOptions, hostname: str) -> None:
        self._options = options
        self._sni: Optional[bytes] = None
        if not (isIPAddress(hostname) or isIPv6Address(hostname)):
            self._sni = hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


class FederationTLSPolicy:
    """Builds TLS connection creators for federation targets.

    Creators are cached per name (bounded), so the SSL context and the trust store
    are built once per name rather than once per connection.

    Args:
        verify: check the certificate chain and the name (``federation.verify_tls``).
        ca_file: PEM bundle of extra trusted CAs (``federation.ca_file``), or None.

    Raises:
        TLSError: ``ca_file`` cannot be read or parsed.

    Example::

        policy = FederationTLSPolicy(verify=True, ca_file=None)
        creator = policy.creator_for("matrix.example.org")   # SNI + name check
        creator = policy.creator_for("192.0.2.7")            # IP SAN check, no SNI
    """

    def __init__(self, verify: bool = True, ca_file: Optional[str] = None) -> None:
        self._verify = verify
        extra = load_pem_certificates(ca_file) if ca_file else []
        self._trust_root = PlatformPlusTrustRoot(extra)
        self._unverified_options = ssl.CertificateOptions(
            verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2
        )
        self._cache: collections.OrderedDict[str, IOpenSSLClientConnectionCreator] = (
            collections.OrderedDict()
        )
        if not verify:
            logger.warning("federation.verify_tls is false: peer certificates are not checked")

    def creator_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """The connection creator for a peer that must present a cert for ``hostname``.

        Args:
            hostname: a DNS name or an IP address (IPv6 without brackets).
        """
        creator = self._cache.get(hostname)
        if creator is not None:
            self._cache.move_to_end(hostname)
            return creator
        if self._verify:
            creator = ssl.optionsForClientTLS(
                hostname,
                trustRoot=self._trust_root,
                extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
            )
        else:
            creator = _UnverifiedConnectionCreator(self._unverified_options, hostname)
        self._cache[hostname] = creator
        if len(self._cache) > _CREATOR_CACHE_SIZE:
            self._cache.popitem(last=False)
        return creator
