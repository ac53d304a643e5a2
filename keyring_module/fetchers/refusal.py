"""Which server names the fetcher chain refuses to fetch for, and why.

A refused name gets no keys: no origin fetch is made for it and it is never sent to a
notary, and a traced call records it as ``REFUSED`` by every source, with the reason.
Two rules:

* a name that is not a valid server name (:mod:`~keyring_module.servername`) is always
  refused (``"invalid server name"``);
* a local policy may refuse more: :func:`denied_ip_literals` refuses names whose host is
  an IP literal the federation IP guard denies (``federation.ip_range_denylist`` minus
  ``ip_range_allowlist``), e.g. ``10.0.0.1`` or ``[fd00::1]:8448``. Host names are not
  judged here: where they resolve to is checked when connecting.

Example::

    refuse_reason = denied_ip_literals(IPRangeFilter(["10.0.0.0/8"]))
    refusal_reason("10.0.0.1:8448", refuse_reason)  # "IP address 10.0.0.1 is denied"
    refusal_reason("bad name", refuse_reason)       # "invalid server name"
    refusal_reason("example.org", refuse_reason)    # None: fetched as usual
"""

from typing import Callable, Optional

from keyring_module.http.ipfilter import IPRangeFilter
from keyring_module.servername import is_valid_server_name, parse_server_name

#: ``refuse_reason(server_name)``: why our local policy refuses to fetch for a valid
#: server name, or None to fetch as usual.
RefuseReason = Callable[[str], Optional[str]]

INVALID_SERVER_NAME = "invalid server name"


def refusal_reason(server_name: str, refuse_reason: Optional[RefuseReason]) -> Optional[str]:
    """Why the chain refuses ``server_name``, or None when it may be fetched for.

    Example:
        >>> refusal_reason("example.org\\n", None), refusal_reason("example.org", None)
        ('invalid server name', None)
    """
    if not is_valid_server_name(server_name):
        return INVALID_SERVER_NAME
    return None if refuse_reason is None else refuse_reason(server_name)


def denied_ip_literals(ip_filter: IPRangeFilter) -> RefuseReason:
    """A policy refusing server names whose host is an IP literal ``ip_filter`` denies.

    Example:
        >>> refuse = denied_ip_literals(IPRangeFilter(["10.0.0.0/8", "fd00::/8"]))
        >>> refuse("10.0.0.1"), refuse("[fd00::1]:8448"), refuse("10.example.org")
        ('IP address 10.0.0.1 is denied by the federation IP ranges', \
'IP address fd00::1 is denied by the federation IP ranges', None)
    """

    def refuse_reason(server_name: str) -> Optional[str]:
        parsed = parse_server_name(server_name)
        if parsed is None or not parsed.is_ip_literal or not ip_filter.is_denied(parsed.host):
            return None
        return "IP address %s is denied by the federation IP ranges" % (parsed.host,)

    return refuse_reason
