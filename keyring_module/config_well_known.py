"""The ``well_known:`` setting: what the standalone server serves at
``/.well-known/matrix/server``.

::

    well_known:
      m.server: "notary.example.org:443"

``m.server`` is required and must be a Matrix server name (``host`` or ``host:port``,
an IP literal allowed): the delegated name the specification's server discovery reads.
The specification defines no other key, so any other key is an error naming it, like
every unknown setting. Left out (or ``null``) nothing is served there, and the path
answers 404 ``M_UNRECOGNIZED`` like any unknown path.
"""

import attr

from keyring_module.config_values import Path, as_mapping, as_str
from keyring_module.errors import ConfigError

#: The only key of the ``/.well-known/matrix/server`` document.
M_SERVER = "m.server"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class WellKnownConfig:
    """The delegation served at ``/.well-known/matrix/server`` (standalone).

    Attributes:
        m_server: the ``m.server`` value, e.g. ``"notary.example.org:443"``.
    """

    m_server: str

    def document(self) -> dict[str, str]:
        """The JSON object served.

        Example:
            >>> WellKnownConfig("notary.example.org:443").document()
            {'m.server': 'notary.example.org:443'}
        """
        return {M_SERVER: self.m_server}


def parse_well_known(value: object, path: Path) -> WellKnownConfig:
    """Read ``well_known:`` (given and not null).

    Raises:
        ConfigError: not a mapping, ``m.server`` missing or not a server name, or
            another key.

    Example:
        >>> parse_well_known({"m.server": "notary.example.org:443"}, ("well_known",))
        WellKnownConfig(m_server='notary.example.org:443')
        >>> parse_well_known({"m.server": "https://notary.example.org"}, ("well_known",))
        Traceback (most recent call last):
        ...
        keyring_module.errors.ConfigError: well_known.m.server: expected a Matrix server name like "example.org" or "example.org:443", got 'https://notary.example.org'
    """
    from keyring_module.servername import is_valid_server_name

    section = as_mapping(value, path)
    for key in section:
        if key != M_SERVER:
            raise ConfigError(
                "unknown setting; the only valid setting here is: %s" % M_SERVER,
                path + (str(key),),
            )
    if section.get(M_SERVER) is None:
        raise ConfigError("this setting is required", path + (M_SERVER,))
    name = as_str(section[M_SERVER], path + (M_SERVER,))
    if not is_valid_server_name(name):
        raise ConfigError(
            'expected a Matrix server name like "example.org" or "example.org:443", got %r'
            % (name,),
            path + (M_SERVER,),
        )
    return WellKnownConfig(name)
