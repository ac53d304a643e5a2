"""Tests for the Matrix server name grammar."""

from hypothesis import given, settings
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.servername import (
    ParsedServerName,
    is_valid_hostname,
    is_valid_server_name,
    parse_server_name,
)
from tests.hostile_inputs import hostile_text, server_name_like


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

    def test_only_ascii_digits_count(self) -> None:
        """Ports and IPv4 parts made of other Unicode digits (superscript, Arabic-Indic,
        fullwidth) are refused, never turned into numbers."""
        for name in (
            "example.org:\u00b9\u00b2",  # superscript 1 2: str.isdigit() says True
            "example.org:\u0668\u0664\u0664\u0668",  # Arabic-Indic 8448
            "example.org:\uff18\uff14\uff14\uff18",  # fullwidth 8448
            "1.2.3.\u00b9",
            "1.2.3.\u0664",
            "[::\u0661]",
        ):
            self.assertIsNone(parse_server_name(name), ascii(name))

    def test_anchored_at_the_very_end(self) -> None:
        """A trailing newline (which ``$`` would let through) or other control character
        makes any form of name invalid."""
        for valid in ("example.org", "example.org:8448", "1.2.3.4", "[::1]", "[::1]:8448"):
            self.assertTrue(is_valid_server_name(valid), valid)
            for suffix in ("\n", "\r\n", "\x00", " "):
                self.assertFalse(is_valid_server_name(valid + suffix), ascii(valid + suffix))

    def test_non_ascii_and_unencodable_names(self) -> None:
        """Letters outside ASCII, a lone surrogate or a bidi control are refused."""
        for name in (
            "b\u00fccher.example",
            "example.org\ud800",
            "\u202eexample.org",
            "\ufeffa.org",
        ):
            self.assertFalse(is_valid_server_name(name), ascii(name))

    def test_ipv6_literals_without_scope_ids(self) -> None:
        """IPv6 literals are hex digits, colons and dots only: scope ids are refused."""
        self.assertEqual(
            parse_server_name("[::ffff:1.2.3.4]:8"), ParsedServerName("::ffff:1.2.3.4", 8, True)
        )
        for name in ("[fe80::1%eth0]", "[fe80::1%25eth0]:8448", "[fe80::1%1]", "[::1 ]"):
            self.assertIsNone(parse_server_name(name), name)

    def test_dotted_numbers_are_addresses_or_nothing(self) -> None:
        """Dotted numbers must be a canonical IPv4 address: no leading zeros, no part over
        255, and never a hostname with an all-digit last label that a resolver could read
        as an address."""
        for name in ("010.0.0.1", "0177.0.0.1", "256.1.1.1", "1.2.3", "1.2.3.4.5", "2130706433"):
            self.assertIsNone(parse_server_name(name), name)
        self.assertEqual(parse_server_name("10.0.0.1"), ParsedServerName("10.0.0.1", None, True))
        self.assertTrue(is_valid_server_name("1.2.3.example"))
        self.assertTrue(is_valid_server_name("example.123a"))

    def test_idna_labels_are_checked(self) -> None:
        """A label starting with ``xn--`` must be a valid IDNA A-label (any case); other
        labels with hyphens stay valid."""
        for name in ("xn--bcher-kva.example", "XN--BCHER-KVA.example", "xn--80ak6aa92e.com"):
            self.assertTrue(is_valid_server_name(name), name)
        for name in ("xn--zz.example", "xn--.example", "xn--a.example", "xn--ls8h.example"):
            self.assertFalse(is_valid_server_name(name), name)
        self.assertTrue(is_valid_server_name("r3---sn-abc.example"))

    def test_hostname_helper(self) -> None:
        """``is_valid_hostname`` takes hostnames only: no port, no IP literal."""
        self.assertTrue(is_valid_hostname("matrix.example.org."))
        for host in ("example.org:8448", "1.2.3.4", "[::1]", "", ".", "a..b"):
            self.assertFalse(is_valid_hostname(host), host)


class ServerNamePropertyTests(SynchronousTestCase):
    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(hostile_text(max_size=40) | server_name_like())
    def test_every_valid_name_is_plain_ascii(self, name: str) -> None:
        """Whatever the text, validation answers without raising, and a valid name is
        printable ASCII without spaces that splits into its host and port exactly."""
        parsed = parse_server_name(name)
        self.assertEqual(is_valid_server_name(name), parsed is not None)
        if parsed is None:
            return
        self.assertTrue(name.isascii() and name.isprintable(), ascii(name))
        self.assertNotIn(" ", name)
        host = "[%s]" % parsed.host if name.startswith("[") else parsed.host
        if parsed.port is None:
            self.assertEqual(name, host)
        else:
            self.assertEqual(
                (name[: len(host) + 1], int(name[len(host) + 1 :])), (host + ":", parsed.port)
            )
