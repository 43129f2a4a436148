"""Schemathesis against the registry (live server, Postgres and SQLite): no server error and
responses that match the schema, with the write token and without it."""

from __future__ import annotations

from collections.abc import Callable

from services.registry.main import create_app
from services.registry.settings import RegistrySettings
from tests.fuzz import fuzz
from tests.services.registry.helpers import AUTH, live_server


def test_fuzz_the_registry(make_settings: Callable[..., RegistrySettings]) -> None:
    # reads closed, so a request without the token is refused on every route (auth is fuzzed too)
    with live_server(create_app(make_settings(open_reads=False))) as url:
        with_token = fuzz(url, headers=AUTH, max_examples=15, seed_value=1)
        without = fuzz(url, headers=None, max_examples=5, seed_value=2)
    print(f"\nregistry with the token: {with_token.summary()}")
    print(f"registry without a token: {without.summary()}")
    assert with_token.failures == [] and without.failures == []
    assert with_token.server_errors == 0 and without.server_errors == 0
    assert with_token.operations >= 14 and with_token.requests >= 100
    assert set(without.statuses) <= {200, 401, 403}  # /health is open
