"""More start-up checks (``keyring_module.startup_checks``), and ``serve`` meeting the
same problems in the same words."""

import os
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from keyring_module import listen_addresses, privileged_ports
from keyring_module.config_file import load_config_file
from keyring_module.errors import ConfigError
from keyring_module.server import KeyServer
from keyring_module.startup_checks import startup_problems
from tests.fake_reactors import FakeReactor

#: One TLS listener whose certificate and key are ``tls.crt`` and ``tls.key``.
TLS_LISTENERS = [
    {
        "port": 8448,
        "tls": True,
        "tls_certificate_path": "tls.crt",
        "tls_private_key_path": "tls.key",
    }
]


class StartupCheckCase(SynchronousTestCase):
    """A temporary folder holding a standalone config file and what it points at."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def write(self, name: str, data: "str | bytes") -> str:
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(self.path(name), mode) as f:
            f.write(data)
        return self.path(name)

    def config(self, **raw: Any) -> Any:
        settings: dict[str, Any] = {
            "server_name": "notary.example.org",
            "signing_key_path": "notary.signing.key",
            "listeners": [{"port": 8080}],
        }
        settings.update(raw)
        return load_config_file(self.write("config.yaml", yaml.safe_dump(settings)))

    def problems(self, **raw: Any) -> list[str]:
        return [str(problem) for problem in startup_problems(self.config(**raw))]


class DanglingSymlinkTests(StartupCheckCase):
    def test_signing_key_path_dangling_symlink(self) -> None:
        """A symbolic link to nothing at signing_key_path is reported by check-config,
        and serve refuses it in the same words (rather than ``[Errno 17] File exists``)."""
        link = self.path("notary.signing.key")
        os.symlink(self.path("gone", "k.key"), link)
        expected = "signing_key_path: dangling symlink: %s (-> %s)" % (
            link,
            self.path("gone", "k.key"),
        )
        self.assertEqual(self.problems(), [expected])
        with self.assertRaises(ConfigError) as caught:
            KeyServer(FakeReactor(), self.config())
        self.assertEqual(str(caught.exception), expected)
        self.assertFalse(os.path.lexists(self.path("gone")))

    def test_tls_file_dangling_symlink(self) -> None:
        """Every file check says so, e.g. a listener's certificate."""
        os.symlink(self.path("nothing.crt"), self.path("tls.crt"))
        self.write("tls.key", "")
        problems = self.problems(listeners=TLS_LISTENERS)
        self.assertIn(
            "listeners.0.tls_certificate_path: dangling symlink: %s (-> %s)"
            % (self.path("tls.crt"), self.path("nothing.crt")),
            problems,
        )

    def test_serve_names_the_setting_when_it_cannot_create_the_key(self) -> None:
        """An OSError creating the key file is reported under signing_key_path."""
        path = self.path("missing-folder", "k.key")
        with self.assertRaises(ConfigError) as caught:
            KeyServer(FakeReactor(), self.config(signing_key_path=path))
        self.assertEqual(
            str(caught.exception),
            "signing_key_path: cannot create signing key file %s: No such file or directory"
            % (path,),
        )


class SqliteFileTests(StartupCheckCase):
    def setUp(self) -> None:
        super().setUp()
        from signedjson.key import generate_signing_key, write_signing_keys

        with open(self.path("notary.signing.key"), "w") as f:
            write_signing_keys(f, [generate_signing_key("a_1")])

    def test_existing_file_that_is_not_sqlite(self) -> None:
        """An existing database.path that is not an SQLite database is a problem."""
        path = self.write("keyring.db", b"\x00" * 100)
        self.assertEqual(
            self.problems(database={"path": path}),
            ["database.path: not an SQLite database: %s" % (path,)],
        )
        path = self.write("notes.txt", "database notes\n" * 20)
        self.assertEqual(
            self.problems(database={"path": path}),
            ["database.path: not an SQLite database: %s" % (path,)],
        )

    def test_empty_file_and_real_database_pass(self) -> None:
        import sqlite3

        empty = self.write("empty.db", b"")
        self.assertEqual(self.problems(database={"path": empty}), [])
        real = self.path("real.db")
        connection = sqlite3.connect(real)
        connection.execute("CREATE TABLE t (x)")
        connection.commit()
        connection.close()
        self.assertEqual(self.problems(database={"path": real}), [])


class EncryptedTLSKeyTests(StartupCheckCase):
    def test_passphrase_protected_key_is_refused_without_prompting(self) -> None:
        """An encrypted private key is reported, by check-config and serve alike, instead
        of OpenSSL asking for its passphrase on the terminal (or, with none, failing
        with a reason that does not say why)."""
        import trustme
        from cryptography.hazmat.primitives import serialization

        from keyring_module.server import StartupError, TLSServerContextFactory

        cert = trustme.CA().issue_cert("notary.example.org")
        cert.cert_chain_pems[0].write_to_path(self.path("tls.crt"))
        key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        self.write("tls.key", encrypted)
        expected = (
            "listeners.0.tls_private_key_path: encrypted private key: %s "
            "(passphrase-protected keys are not supported)" % (self.path("tls.key"),)
        )
        problems = self.problems(listeners=TLS_LISTENERS)
        self.assertEqual(problems, [expected])
        with self.assertRaises(StartupError) as caught:
            TLSServerContextFactory(self.path("tls.crt"), self.path("tls.key"), ("listeners", "0"))
        self.assertEqual(str(caught.exception), expected)


class AddressClashTests(StartupCheckCase):
    """Listen addresses that overlap on one port, as Linux binds them."""

    def setUp(self) -> None:
        super().setUp()
        from signedjson.key import generate_signing_key, write_signing_keys

        with open(self.path("notary.signing.key"), "w") as f:
            write_signing_keys(f, [generate_signing_key("a_1")])
        self.dual_stack = True
        self.patch(listen_addresses, "ipv6_dual_stack", lambda: self.dual_stack)

    def clashes(self, *listeners: Any, **raw: Any) -> list[str]:
        return self.problems(
            listeners=[{"port": port, "bind_addresses": list(a)} for port, a in listeners], **raw
        )

    def test_wildcards(self) -> None:
        self.assertEqual(
            self.clashes((8448, ["0.0.0.0", "::"])),
            [
                "listeners.0: :: port 8448 clashes with 0.0.0.0 port 8448 of listeners.0 "
                '(:: is every IPv4 address too while net.ipv6.bindv6only is 0; list only "::")'
            ],
        )
        self.assertEqual(
            self.clashes((8448, ["::"]), (8448, ["0.0.0.0"])),
            [
                "listeners.1: 0.0.0.0 port 8448 clashes with :: port 8448 of listeners.0 "
                '(:: is every IPv4 address too while net.ipv6.bindv6only is 0; list only "::")'
            ],
        )
        self.assertEqual(
            self.clashes((8080, ["0.0.0.0"]), metrics={"enabled": True, "port": 8080}),
            [
                "metrics: 127.0.0.1 port 8080 clashes with 0.0.0.0 port 8080 of listeners.0 "
                "(0.0.0.0 is every IPv4 address)"
            ],
        )
        self.assertEqual(
            self.clashes((8448, ["::"]), (8448, ["::1", "127.0.0.1"])),
            [
                "listeners.1: ::1 port 8448 clashes with :: port 8448 of listeners.0 "
                "(:: is every IPv6 address)",
                "listeners.1: 127.0.0.1 port 8448 clashes with :: port 8448 of listeners.0 "
                "(:: is every IPv4 address too while net.ipv6.bindv6only is 0)",
            ],
        )

    def test_no_clash(self) -> None:
        """Different ports, one wildcard alone, specific addresses of both families,
        and IPv4 beside :: when :: is IPv6 only."""
        self.assertEqual(self.clashes((8448, ["::"]), (8449, ["0.0.0.0"])), [])
        self.assertEqual(self.clashes((8448, ["127.0.0.1", "::1", "192.0.2.1"])), [])
        self.dual_stack = False
        self.assertEqual(self.clashes((8448, ["0.0.0.0", "::"])), [])

    def test_same_address_written_two_ways(self) -> None:
        self.assertEqual(
            self.clashes((8448, ["::1"]), (8448, ["0:0:0:0:0:0:0:1"])),
            ["listeners.1: 0:0:0:0:0:0:0:1 port 8448 is also used by listeners.0"],
        )

    def test_agrees_with_the_system(self) -> None:
        """Each pair the check calls a clash fails to listen here, and each pair it
        does not listens (loopback and wildcard addresses only; IPv6 pairs where this
        machine has IPv6). Sockets as Twisted makes them: SO_REUSEADDR, IPv6 sockets
        left to the system's bindv6only."""
        import socket

        self.dual_stack = listen_addresses.ipv6_dual_stack()

        def listen(address: str, port: int) -> socket.socket:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            self.addCleanup(sock.close)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(1)
            return sock

        pairs = [("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "0.0.0.0"), ("127.0.0.1", "127.0.0.2")]
        try:
            listen("::1", 0)
        except OSError:
            pass  # no IPv6 here
        else:
            pairs += [("::", "0.0.0.0"), ("0.0.0.0", "::"), ("::", "::1"), ("::", "127.0.0.1")]
            pairs += [("127.0.0.1", "::1")]
        for first, second in pairs:
            number = listen(first, 0).getsockname()[1]
            try:
                listen(second, number)
            except OSError:
                binds = False
            else:
                binds = True
            found = self.clashes((number, [first]), (number, [second]))
            self.assertEqual(not found, binds, (first, second, found))


class PrivilegedPortTests(StartupCheckCase):
    """A port below net.ipv4.ip_unprivileged_port_start: check-config warns (without
    failing) when this user could not listen on it; serve says why listening failed."""

    def setUp(self) -> None:
        super().setUp()
        from signedjson.key import generate_signing_key, write_signing_keys

        with open(self.path("notary.signing.key"), "w") as f:
            write_signing_keys(f, [generate_signing_key("a_1")])
        self.may_bind = False
        self.patch(privileged_ports, "unprivileged_port_start", lambda: 1024)
        self.patch(privileged_ports, "may_bind_privileged_ports", lambda: self.may_bind)

    def check_config(self, **raw: Any) -> tuple[int, str, str]:
        import io
        import sys

        from keyring_module.cli import main

        self.config(**raw)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["check-config", "--config", self.path("config.yaml")])
        return code, out.getvalue(), err.getvalue()

    def test_check_config_warns(self) -> None:
        code, out, err = self.check_config(
            listeners=[{"port": 443}, {"port": 8448}], metrics={"enabled": True, "port": 80}
        )
        self.assertEqual(code, 0)
        self.assertIn(": OK (server_name notary.example.org)", out)
        self.assertEqual(
            err,
            "keyring-module: warning: listeners.0: port 443 is below 1024: serve needs root "
            "or CAP_NET_BIND_SERVICE to listen on it\n"
            "keyring-module: warning: metrics: port 80 is below 1024: serve needs root "
            "or CAP_NET_BIND_SERVICE to listen on it\n",
        )

    def test_no_warning_with_the_capability(self) -> None:
        self.may_bind = True
        code, _, err = self.check_config(listeners=[{"port": 443}])
        self.assertEqual((code, err), (0, ""))

    def test_warnings_beside_problems(self) -> None:
        """Problems still fail the check, printed after the warnings."""
        code, _, err = self.check_config(
            listeners=[{"port": 443}], signing_key_path="/nonexistent/k.key"
        )
        self.assertEqual(code, 1)
        self.assertEqual(
            [line.split(":")[1].strip() for line in err.splitlines()],
            ["warning", "signing_key_path"],
        )

    def listen_failure(self, error_number: int, port: int) -> str:
        import errno as errno_module

        from twisted.internet.error import CannotListenError

        from keyring_module.config import ListenerConfig
        from keyring_module.server import StartupError

        reactor = FakeReactor()

        def refuse(*args: object, **kwargs: object) -> None:
            error = OSError(error_number, os.strerror(error_number))
            raise CannotListenError("0.0.0.0", port, error)

        self.patch(reactor, "listenTCP", refuse)
        server = KeyServer(reactor, self.config())
        self.assertIn(error_number, (errno_module.EACCES, errno_module.EADDRINUSE))
        listener = ListenerConfig(port=port, bind_addresses=("0.0.0.0",))
        site: Any = None  # never reached: listening fails first
        with self.assertRaises(StartupError) as caught:
            server._listen(0, listener, "0.0.0.0", site)
        return str(caught.exception)

    def test_serve_says_why(self) -> None:
        import errno

        self.assertEqual(
            self.listen_failure(errno.EACCES, 443),
            "listeners.0: cannot listen on 0.0.0.0 port 443: [Errno 13] Permission denied "
            "(ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        )
        self.assertEqual(
            self.listen_failure(errno.EADDRINUSE, 8448),
            "listeners.0: cannot listen on 0.0.0.0 port 8448: [Errno 98] Address already in "
            "use (is another server running?)",
        )
