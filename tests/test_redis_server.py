"""The tests' real Redis (tests/redis_server.py): it starts, stops for real, comes back empty on the same port, keeps
the default user out, and MONITOR sees what clients send."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import redis
import redis_server as helper
from redis_server import RedisServer


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_server_answers_stops_and_comes_back_empty_on_the_same_port(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        port = server.port
        assert server.url == f"redis://127.0.0.1:{port}/0"
        with server.client() as client:
            assert client.ping() is True
            client.set("k", "v")
            assert client.get("k") == b"v"

        assert server.stop() == 0
        assert not server.running
        assert refuses_connections(port)
        with server.client(socket_connect_timeout=1.0) as client, pytest.raises(redis.ConnectionError):
            client.ping()

        server.start()
        assert server.port == port
        with server.client() as client:
            assert client.get("k") is None  # no persistence: a restart forgets everything
            assert client.dbsize() == 0
    assert not list(tmp_path.glob("*.rdb")) and not list(tmp_path.glob("appendonly*"))


def test_kill_ends_the_server_at_once_and_it_starts_again(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        port = server.port
        assert server.kill() == -9
        assert refuses_connections(port)
        server.start()
        with server.client() as client:
            assert client.ping() is True


def test_the_acl_user_gets_in_and_the_default_user_does_not(tmp_path: Path) -> None:
    with RedisServer(tmp_path, username="kimi", password="s3cret-pass") as server:
        assert server.url == f"redis://kimi:s3cret-pass@127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True
            assert client.acl_whoami() == "kimi"
        with server.client(username=None, password=None) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with server.client(password="wrong") as wrong, pytest.raises(redis.AuthenticationError):
            wrong.ping()


def test_monitor_collects_the_commands_sent_inside_the_block(tmp_path: Path) -> None:
    with RedisServer(tmp_path, username="kimi") as server, server.client() as client:
        client.set("before", "not-seen")
        with server.monitor() as seen:
            client.set("token", "visible-value-123")
            client.eval("return redis.call('GET', KEYS[1])", 1, "token")
        client.set("after", "not-seen-either")
        text = seen.text()
        assert '"SET" "token" "visible-value-123"' in text
        assert '[0 lua] "GET" "token"' in text  # a script's own calls are in the feed too
        assert "not-seen" not in text
        assert "monitor-end" not in text  # the helper's end marker is not one of the lines
        assert server.password is not None and server.password not in text  # AUTH is never shown


def test_monitor_keeps_what_it_saw_when_the_server_restarts_inside_the_block(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        with server.monitor() as seen:
            with server.client() as client:
                client.set("k", "seen-before-the-stop")
            server.stop()
            server.start()
            with server.client() as client:
                client.set("k", "after-the-restart")
        assert '"SET" "k" "seen-before-the-stop"' in seen.text()
        assert "after-the-restart" not in seen.text()


def test_a_server_that_cannot_start_says_why_with_its_log(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.binary = str(tmp_path / "not-redis")
    (tmp_path / "not-redis").write_text("#!/bin/sh\necho 'cannot start: testing' >&2\nexit 3\n")
    os.chmod(tmp_path / "not-redis", stat.S_IRWXU)
    with pytest.raises(RuntimeError, match=r"exited with 3 before answering PING:\n(.|\n)*cannot start: testing"):
        server.start()
    assert not server.running


def test_redis_url_is_the_session_server_emptied(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == redis_server.url and redis_url.startswith("redis://kimi:")
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("left-behind", "1")  # the next test's redis_url must not see it


def test_redis_url_flushes_what_an_earlier_test_left(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.get("left-behind") is None


def test_a_private_server_is_the_tests_own(private_redis_server: RedisServer, redis_server: RedisServer) -> None:
    assert private_redis_server.port != redis_server.port
    private_redis_server.stop()
    with redis_server.client() as client:
        assert client.ping() is True


def test_without_redis_server_the_fixtures_skip_locally_and_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(helper.REDIS_SERVER_ENV, str(tmp_path / "missing"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no redis-server"):
        helper.require_redis_server()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI runs the Redis tests"):
        helper.require_redis_server()
