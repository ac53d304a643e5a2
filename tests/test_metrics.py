"""Metrics, health and logging: what an operator sees, checked on real requests."""

import json
import logging
import os
import urllib.request
from typing import Any, Optional

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.clock import global_reactor as typed_global_reactor
from keyring_module.config import LoggingConfig, parse_config
from keyring_module.errors import KeyVerificationError
from keyring_module.logconfig import setup_logging
from keyring_module.metrics import AnswerResult, Metrics
from keyring_module.resources.tree import build_root
from keyring_module.server import KeyServer
from keyring_module.signing import OwnKeys
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import KeyringServices
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient, FakeOriginResource
from tests.utils import key_id, new_signing_key, sign_as

NOTARY = "notary.test"
ORIGIN = "origin.test"


class NotaryMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.clock.advance(1_700_000_000)
        self.origin_key = new_signing_key("o1")
        self.origin = FakeOriginResource(self.origin_key, ORIGIN, self.clock)
        self.registry = CollectorRegistry()
        self.client = FakeFederationClient({ORIGIN: self.origin})
        config = parse_config(
            {"server_name": NOTARY, "signing_key_path": "unused", "listeners": [{"port": 1}]}
        )
        self.services = KeyringServices.build(
            self.clock,
            config,
            OwnKeys(NOTARY, [new_signing_key("n1")]),
            InMemoryKeyStore(),
            client=self.client,
            metrics=Metrics(self.registry),
        )
        self.http = StubTreq(build_root(self.services.key_resource()))

    def sample(self, name: str, **labels: str) -> float:
        value: Optional[float] = self.registry.get_sample_value(name, labels)
        return value or 0.0

    def post(self, server_keys: Any) -> int:
        d = self.http.post(  # type: ignore[attr-defined]
            "https://notary.test/_matrix/key/v2/query",
            data=json.dumps({"server_keys": server_keys}).encode(),
        )
        self.http.flush()
        response = self.successResultOf(d)
        self.successResultOf(response.content())
        code: int = response.code
        return code

    def test_requests_answers_and_fetches_counted(self) -> None:
        """Notary requests, how each server was answered and origin fetches are counted."""
        criteria = {ORIGIN: {key_id(self.origin_key): {"minimum_valid_until_ts": 0}}}
        self.assertEqual(self.post(criteria), 200)
        self.assertEqual(self.post(criteria), 200)
        self.assertEqual(self.post({NOTARY: {}}), 200)
        self.assertEqual(self.post([]), 400)
        total = "keyring_notary_requests_total"
        self.assertEqual(self.sample(total, endpoint="post_query", code="200"), 3)
        self.assertEqual(self.sample(total, endpoint="post_query", code="400"), 1)
        self.assertEqual(
            self.sample("keyring_notary_request_seconds_count", endpoint="post_query"), 4
        )
        self.assertEqual(self.sample("keyring_notary_answers_total", result="fetched"), 1)
        self.assertEqual(self.sample("keyring_notary_answers_total", result="fresh"), 1)
        self.assertEqual(self.sample("keyring_notary_answers_total", result="self"), 1)
        self.assertEqual(self.sample("keyring_origin_fetches_total", outcome="ok"), 1)
        self.assertEqual(self.sample("keyring_keys_stored_total", source="origin"), 1)
        self.assertEqual(self.sample("keyring_origin_fetch_seconds_count"), 1)

    def test_failures_stale_and_backoff_counted(self) -> None:
        """Invalid origin answers, stale answers, misses and backoff show up in the metrics."""
        self.post({ORIGIN: {}})
        self.clock.advance(2 * 86400)
        wrong = self.origin.keys_json()
        wrong["server_name"] = "evil.test"
        self.origin.body_override = wrong
        self.post({ORIGIN: {}})
        self.assertEqual(
            self.sample("keyring_origin_fetches_total", outcome="invalid_wrong_server_name"), 1
        )
        self.assertEqual(self.sample("keyring_notary_answers_total", result="stale"), 1)
        self.assertEqual(self.sample("keyring_origins_backed_off"), 0)  # it answered: up
        self.post({"nowhere.test": {}})
        self.assertEqual(self.sample("keyring_notary_answers_total", result="miss"), 1)
        self.assertEqual(self.sample("keyring_origin_fetches_total", outcome="connect_error"), 1)
        self.assertEqual(self.sample("keyring_origins_backed_off"), 1)
        self.post({"nowhere.test": {}})
        # Backed off, and no notary to ask instead: not fetched at all.
        self.assertEqual(
            self.sample("keyring_notary_fetches_skipped_total", reason="backed_off"), 1
        )
        self.assertEqual(self.sample("keyring_origin_fetches_total", outcome="connect_error"), 1)
        # The oldest served response is reported for the current and previous 5 minutes.
        oldest = "keyring_notary_oldest_served_age_seconds"
        self.assertGreaterEqual(self.sample(oldest), 2 * 86400)
        self.clock.advance(300)
        self.assertGreaterEqual(self.sample(oldest), 2 * 86400)
        self.clock.advance(600)
        self.assertEqual(self.sample(oldest), 0)

    def settle(self) -> None:
        for _ in range(3):
            self.clock.advance(0)
            self.client.flush()

    def test_verification_outcomes_counted(self) -> None:
        """Every keyring check is counted as verified or failed."""
        signed = sign_as({"a": 1}, ORIGIN, self.origin_key)
        now = int(self.clock.seconds() * 1000)
        d = self.services.keyring.verify_json_for_server(ORIGIN, signed, now)
        self.settle()
        self.successResultOf(d)
        tampered = dict(signed, a=2)
        results = self.services.keyring.verify_json_objects(
            [(ORIGIN, tampered, now), (ORIGIN, signed, now), (ORIGIN, {"a": 1}, now)]
        )
        self.settle()
        self.assertIsNone(self.successResultOf(results[1]))
        self.failureResultOf(results[0], KeyVerificationError)
        self.failureResultOf(results[2], KeyVerificationError)
        self.assertEqual(self.sample("keyring_verifications_total", result="verified"), 2)
        self.assertEqual(self.sample("keyring_verifications_total", result="failed"), 2)


class AnswerResultLabelTests(SynchronousTestCase):
    def test_each_answer_result_counts_under_its_documented_label(self) -> None:
        """Every AnswerResult is counted under its contract label, and there are no others."""
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        labels = {
            "fresh": AnswerResult.FRESH,
            "refresh": AnswerResult.REFRESH,
            "fetched": AnswerResult.FETCHED,
            "stale": AnswerResult.STALE,
            "miss": AnswerResult.MISS,
            "self": AnswerResult.SELF,
        }
        self.assertEqual(set(labels.values()), set(AnswerResult))
        for count, result in enumerate(labels.values(), start=1):
            metrics.notary_answer(result).inc(count)
        for count, label in enumerate(labels, start=1):
            sample = registry.get_sample_value("keyring_notary_answers_total", {"result": label})
            self.assertEqual(sample, count, label)


class ServerOperationsTests(TestCase):
    """The standalone server's metrics listener and /health, on 127.0.0.1."""

    def make_server(self) -> KeyServer:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = parse_config(
            {
                "server_name": "localhost:8448",
                "signing_key_path": os.path.join(directory, "signing.key"),
                "listeners": [{"port": 0}],
                "database": {"path": os.path.join(directory, "keyring.db")},
                "metrics": {"enabled": True, "port": 0},
            }
        )
        server = KeyServer(typed_global_reactor(), config)
        self.addCleanup(server.stop)
        return server

    async def fetch(self, url: str, data: Optional[bytes] = None) -> tuple[int, bytes]:
        def get() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, data=data, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        result: tuple[int, bytes] = await deferToThread(get)
        return result

    async def test_metrics_scraped_after_requests(self) -> None:
        """A query shows up on the /metrics listener of the standalone server."""
        server = self.make_server()
        api_port, metrics_port = [p.getHost().port for p in await server.start()]  # type: ignore[attr-defined]
        code, _ = await self.fetch(
            "http://127.0.0.1:%d/_matrix/key/v2/query" % api_port,
            json.dumps({"server_keys": {"localhost:8448": {}}}).encode(),
        )
        self.assertEqual(code, 200)
        code, body = await self.fetch("http://127.0.0.1:%d/metrics" % metrics_port)
        self.assertEqual(code, 200)
        lines = body.decode().splitlines()
        matching = [
            line
            for line in lines
            if line.startswith("keyring_notary_requests_total{")
            and 'endpoint="post_query"' in line
            and 'code="200"' in line
        ]
        self.assertEqual(len(matching), 1, lines[:40])
        self.assertGreaterEqual(float(matching[0].split()[-1]), 1)

    async def test_health_reflects_broken_store(self) -> None:
        """/health is 200 while the store answers and 503 once it does not."""
        server = self.make_server()
        api_port = (await server.start())[0].getHost().port  # type: ignore[attr-defined]
        code, body = await self.fetch("http://127.0.0.1:%d/health" % api_port)
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))
        assert server.services is not None
        await server.services.store.close()  # the database goes away
        code, body = await self.fetch("http://127.0.0.1:%d/health" % api_port)
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["status"], "unavailable")


class LoggingConfigTests(SynchronousTestCase):
    def tearDown(self) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(logging.WARNING)

    def test_level_honoured(self) -> None:
        """logging.level WARNING drops INFO lines."""
        setup_logging(LoggingConfig(level="WARNING"))
        self.assertFalse(logging.getLogger("keyring_module.x").isEnabledFor(logging.INFO))
        self.assertTrue(logging.getLogger("keyring_module.x").isEnabledFor(logging.WARNING))

    def test_config_file_honoured(self) -> None:
        """A YAML logging config file is applied (here: a file handler with its own format)."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        log_path = os.path.join(directory, "out.log")
        config_path = os.path.join(directory, "log.yaml")
        with open(config_path, "w") as f:
            f.write(
                "version: 1\n"
                "formatters: {plain: {format: 'LINE %(levelname)s %(message)s'}}\n"
                "handlers: {file: {class: logging.FileHandler, filename: FILE, formatter: plain}}\n"
                "root: {level: DEBUG, handlers: [file]}\n"
                "disable_existing_loggers: false\n".replace("FILE", json.dumps(log_path))
            )
        setup_logging(LoggingConfig(config_file=config_path))
        logging.getLogger("keyring_module.test").debug("hello %d", 42)
        for handler in logging.getLogger().handlers:
            handler.flush()
        with open(log_path) as f:
            self.assertIn("LINE DEBUG hello 42", f.read())

    def test_bad_config_file_is_config_error(self) -> None:
        """An unusable logging config file names the setting."""
        from keyring_module.errors import ConfigError

        self.assertRaisesRegex(
            ConfigError,
            "logging.config_file",
            setup_logging,
            LoggingConfig(config_file=os.path.abspath(self.mktemp()) + ".yaml"),
        )
