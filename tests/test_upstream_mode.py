"""The addon's client finds mitmproxy's upstream proxy in the `mode` option as mitmproxy itself reads it.
tests/test_e2e_upstream_settings.py sends requests through one."""

from __future__ import annotations

import pytest

from kimi_rotator.upstream import upstream_proxy


@pytest.mark.parametrize(("modes", "proxy"), [
    (["upstream:http://corp:3128"], "http://corp:3128"),
    (["upstream:http://corp:3128@8081"], "http://corp:3128"),  # where mitmproxy listens is no part of the proxy
    (["upstream:http://corp:3128@127.0.0.1:8081"], "http://corp:3128"),
    (["upstream:https://corp.example:8443@[::1]:8081"], "https://corp.example:8443"),
    (["upstream:corp:3128"], "http://corp:3128"),  # mitmproxy's default scheme
    (["upstream:http://corp"], "http://corp:80"),  # and its default ports
    (["upstream:https://corp"], "https://corp:443"),
    (["upstream:http://[2001:db8::1]:3128@8081"], "http://[2001:db8::1]:3128"),
    (["upstream:http://10.0.0.1:3128"], "http://10.0.0.1:3128"),
    (["regular"], None),
    (["regular@8080", "socks5@1080", "reverse:https://example.com@8443"], None),
    ([], None),
    (["regular@8080", "upstream:http://corp:3128@8081"], "http://corp:3128"),
    (["upstream:http://first:1@8081", "upstream:http://second:2@8082"], "http://first:1"),  # the first one
    (["upstream:ftp://corp:21", "upstream:http://corp:3128@8081"], "http://corp:3128"),  # invalid: mitmproxy says so
])
def test_upstream_proxy_from_modes(modes: list[str], proxy: str | None) -> None:
    assert upstream_proxy(modes) == proxy
