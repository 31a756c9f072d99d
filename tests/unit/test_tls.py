"""The server clients' TLS settings: shared to save a CA-bundle load per client, never weaker."""
from __future__ import annotations

import ssl

from handoff_magic.remote.http import tls_context


def test_https_servers_are_verified_against_the_trusted_roots_and_share_them() -> None:
    ctx = tls_context("https://cloud.example.org:8888")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] > 0
    assert tls_context("HTTPS://other.example.org") is ctx


def test_a_plain_http_server_gets_a_context_that_could_only_refuse() -> None:
    ctx = tls_context("http://127.0.0.1:8888")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == 0
