"""Exceptions shared across the package.

Each layer raises its own kind of error; the web layer turns :class:`RequestError`
into a JSON error body (``{"errcode": ..., "error": ...}``).
"""

from typing import Optional


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range.

    ``path`` names the offending key, e.g. ``("federation", "request_timeout")``,
    and ``str(error)`` reads ``federation.request_timeout: expected a duration ...``.
    """

    def __init__(self, msg: str, path: tuple[str, ...] = ()) -> None:
        self.msg = msg
        self.path = tuple(path)
        super().__init__(msg)

    def __str__(self) -> str:
        if not self.path:
            return self.msg
        return "%s: %s" % (".".join(self.path), self.msg)


class RequestError(Exception):
    """A client request that we refuse, rendered as ``{"errcode", "error"}``.

    Example: ``RequestError(400, "M_NOT_JSON", "Content not JSON.")``.
    """

    def __init__(
        self,
        code: int,
        errcode: str,
        msg: str,
        retry_after_ms: Optional[int] = None,
    ) -> None:
        super().__init__("%d %s: %s" % (code, errcode, msg))
        self.code = code
        self.errcode = errcode
        self.msg = msg
        self.retry_after_ms = retry_after_ms


class KeyLookupError(Exception):
    """Keys could not be fetched or a key response was rejected."""


class KeyVerificationError(Exception):
    """A signature could not be verified.

    Attributes:
        server_name: the server whose signature was checked.
        key_ids: the key ids involved (possibly empty).
        reason: a human readable reason.
    """

    def __init__(
        self, server_name: str, key_ids: "list[str] | tuple[str, ...]", reason: str
    ) -> None:
        self.server_name = server_name
        self.key_ids = tuple(key_ids)
        self.reason = reason
        super().__init__(
            "%s (server %s, keys %s)" % (reason, server_name, ", ".join(self.key_ids) or "none")
        )
