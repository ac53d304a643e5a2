"""The standalone server's TLS context, from a listener's PEM certificate and key files.

Used both to listen (``serve``) and to check a config (``check-config``), so both report
a bad file in the same words. The files are checked before OpenSSL reads them, because
OpenSSL's error list never says "file not found"::

    context = load_tls_server_context("/etc/keyring/fullchain.pem", "/etc/keyring/privkey.pem")

    load_tls_server_context("cert.pem", "key.pem", setting_path=("listeners", "0"))
    # TLSFilesError: listeners.0.tls_certificate_path: file not found: cert.pem
    #                listeners.0.tls_private_key_path: file not found: key.pem
"""

from typing import Sequence

from OpenSSL import SSL

from keyring_module.config_values import Path
from keyring_module.errors import ConfigError
from keyring_module.file_checks import file_problem


class TLSFilesError(ConfigError):
    """A listener's certificate or key cannot be used; one :class:`ConfigError` per
    problem in :attr:`problems`, and one line per problem in ``str()``."""

    def __init__(self, problems: Sequence[ConfigError]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def openssl_reason(error: SSL.Error) -> str:
    """OpenSSL's error list as one short phrase (its reasons, without duplicates).

    Example:
        >>> openssl_reason(SSL.Error([("PEM routines", "", "no start line")]))
        'no start line'
        >>> openssl_reason(SSL.Error("odd"))
        'odd'
    """
    entries = error.args[0] if error.args else None
    if not isinstance(entries, list):
        return str(error)
    reasons: list[str] = []
    for entry in entries:
        reason = str(entry[-1]) if isinstance(entry, tuple) and entry else str(entry)
        if reason and reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or str(error)


def load_tls_server_context(
    certificate_path: str, private_key_path: str, setting_path: Path = ()
) -> SSL.Context:
    """A TLS 1.2+ server context holding the certificate (chain) and its private key.

    Args:
        certificate_path: a PEM file with the certificate, optionally followed by its
            chain.
        private_key_path: a PEM file with the matching private key.
        setting_path: the listener's key path (e.g. ``("listeners", "0")``) that
            problems are reported under, before ``tls_certificate_path`` /
            ``tls_private_key_path``.

    Raises:
        TLSFilesError: every problem found: a file missing or unreadable, not PEM, a
            passphrase-protected key (never prompted for), or a key that does not match
            the certificate.
    """
    cert_where = tuple(setting_path) + ("tls_certificate_path",)
    key_where = tuple(setting_path) + ("tls_private_key_path",)
    problems = []
    for path, where in ((certificate_path, cert_where), (private_key_path, key_where)):
        problem = file_problem(path)
        if problem:
            problems.append(ConfigError(problem, where))
    if problems:
        raise TLSFilesError(problems)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # The key first: loading a key after a certificate it does not match fails with
    # "key values mismatch", which reads as if the key file were broken.
    key_problem = None
    asked = []

    def no_passphrase(max_length: int, prompt_twice: bool, userdata: object) -> bytes:
        # Without a callback OpenSSL would prompt on the terminal and wait.
        asked.append(True)
        return b""

    ctx.set_passwd_cb(no_passphrase)
    try:
        ctx.use_privatekey_file(private_key_path)
    except SSL.Error as e:
        if asked:
            key_problem = ConfigError(
                "encrypted private key: %s (passphrase-protected keys are not supported)"
                % (private_key_path,),
                key_where,
            )
        else:
            key_problem = ConfigError(
                "not a PEM private key: %s (%s)" % (private_key_path, openssl_reason(e)),
                key_where,
            )
    try:
        ctx.use_certificate_chain_file(certificate_path)
    except SSL.Error as e:
        problems.append(
            ConfigError(
                "not a PEM certificate: %s (%s)" % (certificate_path, openssl_reason(e)),
                cert_where,
            )
        )
    if key_problem is not None:
        problems.append(key_problem)
    if not problems:
        try:
            ctx.check_privatekey()
        except SSL.Error:
            problems.append(
                ConfigError(
                    "%s does not match the certificate in %s"
                    % (private_key_path, certificate_path),
                    key_where,
                )
            )
    if problems:
        raise TLSFilesError(problems)
    return ctx
