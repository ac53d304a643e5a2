"""Tests for the Matrix server name grammar."""

from twisted.trial.unittest import SynchronousTestCase

from keyring_module.servername import ParsedServerName, is_valid_server_name, parse_server_name


class ServerNameTests(SynchronousTestCase):
    def test_valid_names(self) -> None:
        """DNS names, IPv4 and bracketed IPv6, with or without a port, are valid."""
        self.assertEqual(
            parse_server_name("example.org"), ParsedServerName("example.org", None, False)
        )
        self.assertEqual(
            parse_server_name("example.org:8448"), ParsedServerName("example.org", 8448, False)
        )
        self.assertEqual(parse_server_name("1.2.3.4:80"), ParsedServerName("1.2.3.4", 80, True))
        self.assertEqual(parse_server_name("[::1]:8448"), ParsedServerName("::1", 8448, True))
        self.assertEqual(
            parse_server_name("[2001:db8::1]"), ParsedServerName("2001:db8::1", None, True)
        )
        for name in (
            "localhost",
            "a-b.c",
            "matrix.org.",
            "xn--bcher-kva.example",
            "a" * 63 + ".org",
        ):
            self.assertTrue(is_valid_server_name(name), name)

    def test_invalid_names(self) -> None:
        """Bad characters, ports, brackets and lengths are refused."""
        for name in (
            "",
            "bad name",
            "exa_mple.org",
            "example.org:",
            "example.org:0",
            "example.org:65536",
            "example.org:80a",
            "[::1",
            "::1",
            "[not-ip]:80",
            "[::1]80",
            "-a.org",
            "a-.org",
            "a..org",
            "a" * 64 + ".org",
            "a" * 256,
            "example.org/path",
            "user@example.org",
            "1.2.3.4:8448:1",
        ):
            self.assertFalse(is_valid_server_name(name), name)
