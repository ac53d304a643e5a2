"""``X-Matrix`` request authentication: parsing the Authorization header and building
the object a request's signatures cover.

The signatures themselves are checked by the keyring
(:meth:`~keyring_module.keyring.Keyring.verify_request`), with keys of the origin that
are valid now. Everything here comes from the sender, so it is held to the grammars
(origin and destination are server names, the key an ``ed25519:`` key id, all ASCII)
and shown in error messages only escaped and shortened::

    auth = parse_x_matrix_header('X-Matrix origin="a.org",key="ed25519:1",sig="AbC"')
    origin, signed = signed_request_object(b"GET", uri, request.requestHeaders, None,
                                           "our.example.org")
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import attr
from twisted.web.http_headers import Headers

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.json_codec import loads_strict, unencodable_part
from keyring_module.keyids import is_ed25519_key_id, is_key_id
from keyring_module.quoting import quote_untrusted
from keyring_module.servername import is_valid_server_name
from keyring_module.verify import ED25519_PREFIX

_X_MATRIX_SCHEME = "x-matrix"
_PARAM_RE = re.compile(
    r'[ \t]*([A-Za-z0-9_.-]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^",\s]*))[ \t]*(,|\Z)'
)
_ESCAPE_RE = re.compile(r"\\(.)")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class XMatrixAuthorization:
    """One parsed ``Authorization: X-Matrix ...`` header.

    Attributes:
        origin: the sending server.
        destination: the server the request was meant for: None if the header leaves
            the parameter out (older senders may), ``""`` if it is present but empty.
        key: the key id the signature was made with, e.g. ``ed25519:a_1``.
        sig: the unpadded base64 signature.
    """

    origin: str
    destination: Optional[str]
    key: str
    sig: str


def parse_x_matrix_header(value: Union[bytes, str]) -> XMatrixAuthorization:
    """Parse an ``X-Matrix`` Authorization header value.

    Parameter names are case-insensitive; values may be quoted (with backslash escapes)
    or bare; whitespace around ``,`` and ``=`` is allowed; unknown parameters are ignored.

    Args:
        value: the header value, e.g.
            ``X-Matrix origin="a.org",destination="b.org",key="ed25519:1",sig="AbC"``.

    Returns:
        The parsed header.

    Raises:
        ValueError: not an X-Matrix header, malformed, a parameter repeated, or
            ``origin``, ``key`` or ``sig`` missing or invalid (``origin`` and a
            non-empty ``destination`` must be server names, ``key`` a key id, all
            ASCII). The message shows parts of the header only escaped and shortened.
            An empty ``destination`` is kept as ``""`` (present, naming no server):
            :func:`signed_request_object` refuses it, as it refuses any destination
            that is not ours.

    Example:
        >>> parse_x_matrix_header('X-Matrix origin=a.org,Key="ed25519:1",sig="x"').key
        'ed25519:1'
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("header is not UTF-8") from None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != _X_MATRIX_SCHEME:
        raise ValueError("not an X-Matrix header")
    params: dict[str, str] = {}
    rest = rest.strip()
    pos = 0
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if match is None:
            raise ValueError("malformed parameter at %s" % quote_untrusted(rest[pos:], 20))
        name = match.group(1).lower()
        quoted, bare = match.group(2), match.group(3)
        param = _ESCAPE_RE.sub(r"\1", quoted) if quoted is not None else bare
        if name in params:
            raise ValueError("parameter %s given twice" % quote_untrusted(name))
        params[name] = param
        pos = match.end()
        if match.group(4) == "," and pos >= len(rest):
            raise ValueError("trailing comma")
    for required in ("origin", "key", "sig"):
        if not params.get(required):
            raise ValueError("missing %r parameter" % (required,))
    origin = params["origin"]
    if not is_valid_server_name(origin):
        raise ValueError("origin %s is not a valid server name" % quote_untrusted(origin))
    destination = params.get("destination")
    if destination and not is_valid_server_name(destination):
        raise ValueError("destination %s is not a valid server name" % quote_untrusted(destination))
    if not is_key_id(params["key"]):
        raise ValueError("key %s is not a valid key id" % quote_untrusted(params["key"]))
    return XMatrixAuthorization(origin, destination, params["key"], params["sig"])


def authorization_headers(headers: Union[Headers, Mapping[Any, Sequence[Any]]]) -> list[Any]:
    """Every ``Authorization`` header value, from Twisted ``Headers`` or a dict of lists
    (names compared case-insensitively)."""
    if isinstance(headers, Headers):
        return list(headers.getRawHeaders(b"Authorization") or [])
    values: list[Any] = []
    for name, header_values in headers.items():
        header_name = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        if header_name.lower() == "authorization":
            if isinstance(header_values, (bytes, str)):
                values.append(header_values)
            else:
                values.extend(header_values)
    return values


def signed_request_object(
    method: Union[bytes, str],
    uri: Union[bytes, str],
    headers: Union[Headers, Mapping[Any, Sequence[Any]]],
    body: Optional[bytes],
    destination: str,
) -> tuple[str, dict[str, Any]]:
    """The object an ``X-Matrix``-signed request's signatures cover, and its origin.

    The object is ``{"method", "uri", "origin", "destination", "signatures"}`` plus
    ``content`` when there is a body. Several X-Matrix headers are allowed if they name
    the same origin; headers with another scheme are ignored. A header that names a
    destination must name ours: another server or an empty value is refused (the spec
    says to deny such a request with 401); a header without the parameter is accepted,
    as the spec asks for the sake of older senders.

    Args:
        method: the HTTP method, e.g. ``b"GET"``.
        uri: the request URI as sent: path and query.
        headers: the request headers (Twisted ``Headers`` or a dict of lists).
        body: the request body (JSON), or None/empty when there is none.
        destination: our server name, the one the request was addressed to.

    Returns:
        ``(origin, signed_object)``, ready for
        :func:`~keyring_module.verify.verify_signed_json_with_keys`.

    Raises:
        KeyVerificationError: ``NO_REQUEST_AUTH`` (no X-Matrix header),
            ``BAD_REQUEST_AUTH`` (malformed X-Matrix headers, headers naming different
            origins, another or an empty destination, a key that is not ``ed25519:``), or
            ``MALFORMED_OBJECT`` (a method or URI that is not ASCII, a body that is not
            JSON or that canonical JSON cannot hold: ``NaN``, infinities, lone
            surrogates, nesting deeper than
            :data:`~keyring_module.json_codec.MAX_JSON_DEPTH`).

    Example::

        origin, signed = signed_request_object(
            b"GET", b"/_matrix/federation/v1/version", request.requestHeaders, None,
            "our.example.org")
    """
    auths: list[XMatrixAuthorization] = []
    for value in authorization_headers(headers):
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if not text.strip().lower().startswith(_X_MATRIX_SCHEME):
            continue
        try:
            auths.append(parse_x_matrix_header(text))
        except ValueError as e:
            raise KeyVerificationError(
                "", (), VerificationFailure.BAD_REQUEST_AUTH, "bad X-Matrix header: %s" % (e,)
            ) from None
    if not auths:
        raise KeyVerificationError(
            "", (), VerificationFailure.NO_REQUEST_AUTH, "no X-Matrix Authorization header"
        )
    origin = auths[0].origin
    signatures: dict[str, str] = {}
    for auth in auths:
        if auth.origin != origin:
            raise KeyVerificationError(
                origin,
                (),
                VerificationFailure.BAD_REQUEST_AUTH,
                "X-Matrix headers name different origins",
            )
        if auth.destination is not None and auth.destination != destination:
            raise KeyVerificationError(
                origin,
                (auth.key,),
                VerificationFailure.BAD_REQUEST_AUTH,
                _wrong_destination(auth.destination, destination),
            )
        if not auth.key.startswith(ED25519_PREFIX):
            raise KeyVerificationError(
                origin,
                (auth.key,),
                VerificationFailure.BAD_REQUEST_AUTH,
                "unsupported key algorithm",
            )
        if not is_ed25519_key_id(auth.key):
            raise KeyVerificationError(
                origin, (), VerificationFailure.BAD_REQUEST_AUTH, "malformed ed25519 key id"
            )
        signatures[auth.key] = auth.sig
    signed: dict[str, Any] = {
        "method": _text(method, "method").upper(),
        "uri": _text(uri, "uri"),
        "origin": origin,
        "destination": destination,
        "signatures": {origin: signatures},
    }
    if body is not None and body.strip():
        signed["content"] = _parse_body(body, origin, tuple(signatures))
    return origin, signed


def _wrong_destination(named: str, ours: str) -> str:
    """Why a header naming ``named`` as its destination is refused by ``ours``."""
    if not named:
        return "X-Matrix destination is empty, not us (%s)" % (quote_untrusted(ours),)
    return "request is for %s, not for us (%s)" % (quote_untrusted(named), quote_untrusted(ours))


def _parse_body(body: bytes, origin: str, key_ids: tuple[str, ...]) -> Any:
    """The JSON of a request body, if canonical JSON can represent it.

    Refused (``MALFORMED_OBJECT``): not UTF-8 JSON, ``NaN`` or ``Infinity`` (also as a
    number too large for a float), strings UTF-8 cannot encode (lone surrogates written
    as ``\\ud800``), and nesting deeper than
    :data:`~keyring_module.json_codec.MAX_JSON_DEPTH`. The last two are found from the
    body's text (:func:`~keyring_module.json_codec.unencodable_part`), not by walking it.
    """

    def refuse(why: str) -> KeyVerificationError:
        return KeyVerificationError(origin, key_ids, VerificationFailure.MALFORMED_OBJECT, why)

    try:
        content = loads_strict(body)
    except ValueError:
        raise refuse("body is not JSON") from None
    why = unencodable_part(body)
    if why is not None:
        raise refuse("body is not canonical JSON: %s" % why)
    return content


def _text(value: Union[bytes, str], what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise KeyVerificationError(
            "", (), VerificationFailure.MALFORMED_OBJECT, "%s is not ASCII" % (what,)
        ) from None
