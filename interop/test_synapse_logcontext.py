"""Our Synapse fetcher keeps Synapse's logcontext rules, checked with Synapse's own code.

Synapse awaits ``fetcher.get_keys(...)`` inside a logcontext (its key batch's background
process, started with ``run_in_background``). Its rules: work started for it must not
run in that context once control is back in the reactor, and when the awaited lookup
completes, the caller must be back in its own context. A plain Deferred awaited in a
coroutine breaks the second rule: the coroutine resumes in whatever context the reactor
fires the Deferred in (the sentinel). The adapter therefore starts our lookup under
``PreserveLoggingContext`` and awaits it through ``make_deferred_yieldable``.

This runs a short script in Synapse's virtualenv (``$KEYRING_SYNAPSE_PYTHON``) that
drives :class:`~keyring_module.synapse_fetcher.ModuleKeyFetcher` with Synapse's real
logcontext functions, once as the adapter wires it and once without them (the control:
the check must see the difference).
"""

import json
import os
import subprocess

from interop.harness import InteropTestCase, synapse_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import contextlib, json, logging, sys

from signedjson.key import generate_signing_key
from twisted.internet import defer
from twisted.internet.task import Clock

from synapse.logging.context import (
    LoggingContext, PreserveLoggingContext, current_context, make_deferred_yieldable,
    run_in_background,
)
from synapse.storage.keys import FetchKeyResult

from keyring_module.model import StoredKey
from keyring_module.signing import key_id_of
from keyring_module.synapse_fetcher import ModuleKeyFetcher
from signedjson.key import get_verify_key

warnings = []

class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())

logging.getLogger("synapse.logging.context").addHandler(Collect(logging.WARNING))

wired = sys.argv[1] == "wired"
key = generate_signing_key("k1")
kid = key_id_of(key)
pending = defer.Deferred()
seen = {}

def lookup(server_name, key_ids, minimum):
    seen["lookup"] = str(current_context())
    return pending

options = (
    {"yieldable": make_deferred_yieldable, "detached": PreserveLoggingContext} if wired else {}
)
fetcher = ModuleKeyFetcher(lookup, FetchKeyResult, lambda result: None, Clock(), **options)

async def synapse_side():
    # A background process (Synapse's key batch) awaiting a fetcher, as
    # Keyring._inner_fetch_key_request does, inside its own logcontext.
    with LoggingContext(name="keybatch-1", server_name="a.test") as context:
        keys = await fetcher.get_keys("b.test", [kid], 0)
        seen["after_await"] = str(current_context())
        seen["same_context"] = current_context() is context
    return sorted(keys)

d = run_in_background(synapse_side)
seen["reactor_before"] = str(current_context())
# The reactor fires the lookup's Deferred (in the sentinel context).
pending.callback({kid: StoredKey("b.test", kid, bytes(get_verify_key(key)), 10, None, 0, "origin", "r")})
seen["reactor_after"] = str(current_context())
seen["result"] = d.result if d.called else None
seen["warnings"] = warnings
print(json.dumps(seen))
"""


class LogcontextTests(InteropTestCase):
    """ModuleKeyFetcher under Synapse's real logcontext functions."""

    def run_script(self, mode: str) -> dict[str, object]:
        env = dict(os.environ, PYTHONPATH=ROOT)
        out = subprocess.run(
            [synapse_python(self), "-c", SCRIPT, mode],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    def test_the_caller_keeps_its_logcontext(self) -> None:
        """Wired as the adapter does, the lookup starts in the sentinel, the caller resumes in its own context, and nothing leaks or warns."""
        seen = self.run_script("wired")
        self.assertEqual(seen["result"], ["ed25519:k1"])
        self.assertEqual(seen["lookup"], "sentinel")
        self.assertEqual(seen["after_await"], "keybatch-1")
        self.assertIs(seen["same_context"], True)
        self.assertEqual(seen["reactor_before"], "sentinel")
        self.assertEqual(seen["reactor_after"], "sentinel")
        self.assertEqual(seen["warnings"], [])

    def test_control_without_the_logcontext_helpers_the_caller_loses_its_context(self) -> None:
        """Control: awaiting our plain Deferred, the lookup runs in Synapse's context, Synapse's coroutine resumes in the sentinel, and Synapse warns."""
        seen = self.run_script("plain")
        self.assertEqual(seen["result"], ["ed25519:k1"])
        self.assertEqual(seen["lookup"], "keybatch-1")
        self.assertEqual(seen["after_await"], "sentinel")
        self.assertIs(seen["same_context"], False)
        self.assertIn("Expected logging context keybatch-1 was lost", seen["warnings"])
