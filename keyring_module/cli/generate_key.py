"""``keyring-module generate-key``: write a new signing key and say what to paste where.

::

    keyring-module generate-key --output notary.signing.key --server-name notary.example.org
    keyring-module generate-key --output notary.signing.key.new --config keyring.yaml

The first line is always ``Wrote <key id> to <path>``. The rest of the output is YAML
(comments and settings) to paste:

* a ``trusted_key_servers`` entry with the new public key, for the servers that use
  this one as a notary. The server name comes from ``--server-name`` or the config's
  ``server_name``; without either a placeholder is printed, marked as such;
* with ``--config``, when the config's ``signing_key_path`` file exists: the
  ``old_signing_keys`` setting that retires the keys in it (``expired_ts`` now), with
  the config's current ``old_signing_keys`` kept. This is step 2 of the README's
  "Rotating the signing key".

Run as root, the new file (mode 0600) gets the owner and group of the current key
file (with ``--config``) or else of its folder, so the service user can read it; other
users' files are their own.

Exit status: 0 written; 1 the output file exists (never overwritten) or cannot be
written, or the config cannot be read.
"""

import argparse
import json
import os
import sys
import time
from typing import Iterable, Optional, TextIO

from signedjson.key import encode_verify_key_base64, get_verify_key
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from keyring_module.config import OldSigningKey
from keyring_module.config_file import load_config_file
from keyring_module.signing import key_id_of, load_signing_keys, write_new_signing_key

#: The server name printed when none is known (with a comment saying it is one).
PLACEHOLDER_SERVER_NAME = "CHANGE-ME.example.org"


def add_generate_key_arguments(gen: argparse.ArgumentParser) -> None:
    """The options of ``generate-key`` besides ``--output``."""
    name = gen.add_mutually_exclusive_group()
    name.add_argument(
        "--server-name",
        metavar="NAME",
        help="this server's name, for the trusted_key_servers entry printed",
    )
    name.add_argument(
        "--config",
        "-c",
        help="the server's config: its server_name, and old_signing_keys to retire "
        "the keys now in its signing_key_path",
    )


def trusted_key_servers_snippet(server_name: Optional[str], key: SigningKey) -> str:
    """A ``trusted_key_servers`` setting trusting ``key`` for ``server_name``, as YAML.

    Example:
        >>> from signedjson.key import decode_signing_key_base64
        >>> key = decode_signing_key_base64("ed25519", "a_Test", "A" * 43)
        >>> print(trusted_key_servers_snippet("notary.example.org", key))
        trusted_key_servers:
          - server_name: "notary.example.org"
            verify_keys:
              "ed25519:a_Test": "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik"
    """
    if server_name is None:
        name_line = '"%s"  # placeholder: put this server\'s server_name here' % (
            PLACEHOLDER_SERVER_NAME,
        )
    else:
        name_line = json.dumps(server_name)
    return "\n".join(
        [
            "trusted_key_servers:",
            "  - server_name: %s" % (name_line,),
            "    verify_keys:",
            '      "%s": "%s"' % (key_id_of(key), encode_verify_key_base64(get_verify_key(key))),
        ]
    )


def old_signing_keys_snippet(
    retired: Iterable[SigningKey], kept: Iterable[OldSigningKey], expired_ts: int
) -> str:
    """An ``old_signing_keys`` setting: the ``kept`` entries plus ``retired`` keys with
    ``expired_ts``, as YAML (one flow mapping per key, as in ``sample_config.yaml``).

    Example:
        >>> from signedjson.key import decode_signing_key_base64
        >>> key = decode_signing_key_base64("ed25519", "a_Old", "A" * 43)
        >>> print(old_signing_keys_snippet([key], [], 1767225600000))
        old_signing_keys:
          "ed25519:a_Old": {key: "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik", expired_ts: 1767225600000}
    """
    entries = {old.key_id: (encode_base64(old.verify_key_bytes), old.expired_ts) for old in kept}
    for key in retired:
        entries[key_id_of(key)] = (encode_verify_key_base64(get_verify_key(key)), expired_ts)
    lines = ["old_signing_keys:"]
    for key_id in sorted(entries):
        public, ts = entries[key_id]
        lines.append('  "%s": {key: "%s", expired_ts: %d}' % (key_id, public, ts))
    return "\n".join(lines)


def give_owner_of(path: str, current_key_path: str = "") -> Optional[str]:
    """When run as root, give the new key file ``path`` the owner and group of the
    current key file (``current_key_path``, if it exists) or else of the folder it is
    written to, so that the service user can read it (it is mode 0600). Returns why
    that failed, or None. Does nothing for other users, whose files are their own.

    Example: ``sudo keyring-module generate-key --output
    /var/lib/keyring/notary.signing.key.new`` in a folder owned by ``keyring`` writes a
    file owned by ``keyring``.
    """
    if os.geteuid() != 0:
        return None
    reference = current_key_path if current_key_path and os.path.exists(current_key_path) else ""
    reference = reference or os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(reference)
        os.chown(path, st.st_uid, st.st_gid)
    except OSError as e:
        return "cannot give %s the owner of %s: %s" % (path, reference, e.strerror)
    return None


def cmd_generate_key(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Write a new signing key (mode 0600, never overwriting) and print the snippets
    (on ``out``, standard output by default)."""
    out = out or sys.stdout
    server_name: Optional[str] = args.server_name
    retiring: list[SigningKey] = []
    kept: tuple[OldSigningKey, ...] = ()
    current_path = ""
    if args.config:
        config = load_config_file(args.config, standalone=True)
        server_name = config.server_name
        current_path = config.signing_key_path
        if os.path.exists(current_path):
            retiring = load_signing_keys(current_path)
            kept = config.old_signing_keys
    try:
        key = write_new_signing_key(args.output)
    except FileExistsError:
        print(
            "keyring-module: %s already exists; refusing to overwrite a signing key "
            "(move it away first)" % (args.output,),
            file=sys.stderr,
        )
        return 1
    except OSError as e:
        print("keyring-module: cannot write %s: %s" % (args.output, e.strerror), file=sys.stderr)
        return 1
    owner_problem = give_owner_of(args.output, current_path)
    if owner_problem:
        print("keyring-module: %s" % (owner_problem,), file=sys.stderr)
    print("Wrote %s to %s" % (key_id_of(key), args.output), file=out)
    print("", file=out)
    print("# Servers that use this one as a notary trust it with:", file=out)
    print(trusted_key_servers_snippet(server_name, key), file=out)
    if retiring:
        print("", file=out)
        print(
            "# To rotate: point signing_key_path at %s and retire the keys of %s with\n"
            "# (expired_ts is now; make it the time you restart if that is later):"
            % (args.output, current_path),
            file=out,
        )
        print(old_signing_keys_snippet(retiring, kept, int(time.time() * 1000)), file=out)
    return 0
