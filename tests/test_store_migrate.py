"""Moving a pool between stores: the whole-store image (Store.image / load_image) in both backends, the
`kimi-rotate store migrate` command (to Redis and back), and `store rotate-secret`, all on a real redis-server."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer
from typer.testing import CliRunner

from kimi_rotator import cli
from kimi_rotator.caps import state_caps
from kimi_rotator.models import CapSource, LearnedCap, Limit, Outcome, OutcomeKind, Quota, Scope, Strategy, Surface
from kimi_rotator.secret_box import SecretBox
from kimi_rotator.store import Attempt, Counts, NewKey, Store, StoreError, StoreImage
from kimi_rotator.store_redis import RedisStore
from kimi_rotator.store_sqlite import SqliteStore

NOW = 1_790_000_000.0
DAY = 86400.0
SECRETS = [f"sk-{c * 40}" for c in "abcdef"]
runner = CliRunner()


def success(key_id: int, at: float) -> Attempt:
    return Attempt(key_id, Outcome(kind=OutcomeKind.SUCCESS, scope=Scope.KEY), at)


def limited(key_id: int, at: float) -> Attempt:
    return Attempt(key_id, Outcome(kind=OutcomeKind.RATE_LIMITED, scope=Scope.KEY, until=at + 600.0), at)


def fill(store: Store) -> StoreImage:
    """A store with something of everything an image holds; returns its image."""
    added, _ = store.add_keys([
        NewKey(secret=SECRETS[0], name="main", surface=Surface.MOONSHOT_AI, account="acme"),
        NewKey(secret=SECRETS[1], name="spare", surface=Surface.MOONSHOT_AI, account="acme"),
        NewKey(secret=SECRETS[2], name="gone", surface=Surface.MOONSHOT_AI),
        NewKey(secret=SECRETS[3], name="code", surface=Surface.KIMI_CODE, health=40.0),
    ], NOW - 30 * DAY)
    main, spare, gone, code = added
    store.remove_key(gone.id)  # a hole in the ids: the copy must not hand id 3 out again
    # Counters 20 days ago (daily only, once newer hours push them out of the hourly table) and today.
    store.record([success(main.id, NOW - 20 * DAY), success(spare.id, NOW - 20 * DAY)], mark=2)
    store.record([success(main.id, NOW - 3600), success(main.id, NOW), limited(spare.id, NOW)], mark=5)
    store.set_disabled(code.id, "paused by ops")
    group = main.limit_group
    store.update_account(group, lambda r: state_caps(r, group, {Limit.RPM: 12}))
    cap = LearnedCap(limit=Limit.CONCURRENCY, value=50, source=CapSource.HEADER, at=NOW - 60, detail="tier 3")
    store.update_account(group, lambda r: None if r is None else replace(r, learned={Limit.CONCURRENCY: cap}))
    store.record_quota(group, Quota(checked_at=NOW, balance=3.5))
    store.update_settings(strategy="round-robin")
    store.use_key(spare.id)
    store.remember_file("file-1", main.id, group, NOW - 10)
    return store.image()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    with contextlib.closing(SqliteStore(tmp_path / "local")) as s:
        yield s


def test_an_image_survives_sqlite_to_redis_to_sqlite(sqlite_store: SqliteStore, redis_url: str,
                                                     tmp_path: Path) -> None:
    image = fill(sqlite_store)
    assert [k.name for k in image.keys] == ["main", "spare", "code"] and image.next_key_id == 5
    assert image.days() == 2 and image.files["file-1"].key_id == image.keys[0].id
    main, spare, code = image.keys
    assert spare.cooldown_until is not None and code.disabled_reason == "paused by ops" and code.health == 40.0
    assert image.settings.strategy is Strategy.ROUND_ROBIN and image.settings.active_key_id == spare.id
    assert image.rev > 0 and image.accounts[main.limit_group].quota is not None

    with contextlib.closing(RedisStore(redis_url, tmp_path / "redis-home")) as redis_store:
        redis_store.load_image(image)
        assert redis_store.image() == image
        opened = [k.secret.get_secret_value() for k in redis_store.snapshot().keys]
        assert opened == [SECRETS[0], SECRETS[1], SECRETS[3]]
        hour = int(NOW // 3600) * 3600
        assert redis_store.counts(NOW - 3600, per_hour=True)[spare.id] == {hour: Counts(1, 0, 1)}
        assert redis_store.counts(0, per_hour=False)[main.id][int((NOW - 20 * DAY) // DAY * DAY)] == Counts(1, 1, 0)
        assert redis_store.file_owner("file-1") == (main.id, main.limit_group)
        assert redis_store.accounts()[main.limit_group].cap(Limit.RPM) == 12
        back = redis_store.image()
        with pytest.raises(StoreError, match="already holds 3 key"):
            redis_store.load_image(image)

    with contextlib.closing(SqliteStore(tmp_path / "back")) as local:
        local.load_image(back)
        assert local.image() == image
        # The stores go on as the source would: the next key gets the source's next id, outcomes add up.
        assert local.add_key(NewKey(secret=SECRETS[4], surface=Surface.MOONSHOT_AI), NOW).id == 5
        local.record([success(main.id, NOW)], mark=1)
        assert local.counts(NOW, per_hour=True)[main.id][int(NOW // 3600) * 3600].requests == 2


def test_load_image_refuses_a_store_with_keys_and_changes_nothing(sqlite_store: SqliteStore, tmp_path: Path) -> None:
    image = fill(sqlite_store)
    with contextlib.closing(SqliteStore(tmp_path / "other")) as other:
        other.add_key(NewKey(secret=SECRETS[5], name="theirs", surface=Surface.MOONSHOT_AI), NOW)
        before = other.image()
        with pytest.raises(StoreError, match="already holds 1 key"):
            other.load_image(image)
        assert other.image() == before


# -- the CLI ----------------------------------------------------------------------------------

def run(*args: str, input: str | None = None) -> Any:
    result = runner.invoke(cli.app, list(args), input=input)
    for secret in SECRETS:
        assert secret not in result.output and secret[-12:] not in result.output, f"a key leaked from {args}"
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), result.exception
    return result


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return str(result.stdout)


def fails(*args: str, contains: str) -> str:
    result = run(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], result.stderr
    assert "Traceback" not in result.output and contains in lines[0], lines
    return str(lines[0])


@pytest.fixture(autouse=True)
def no_store_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIMI_ROTATE_STORE", raising=False)
    monkeypatch.delenv("KIMI_ROTATE_STORE_SECRET", raising=False)


@pytest.fixture
def filled_home(kimi_home: Path) -> Iterator[StoreImage]:
    with contextlib.closing(SqliteStore(kimi_home)) as s:
        yield fill(s)


def test_migrate_to_redis_then_list_keys_there(filled_home: StoreImage, kimi_home: Path, redis_url: str,
                                               redis_server: RedisServer) -> None:
    out = ok("store", "migrate", "--to", redis_url, "--yes")
    assert "Copied 3 key(s), 1 account(s), counters for 2 day(s)" in out
    assert "Verified" in out and str(kimi_home / "store-secret") in out
    assert str(redis_server.password) not in out  # the URL is shown without its password
    listed = ok("--store", redis_url, "list-keys")
    assert all(name in listed for name in ("main", "spare", "code"))
    with contextlib.closing(SqliteStore(kimi_home)) as source:
        assert source.image() == filled_home  # the source is left as it was
    fails("store", "migrate", "--to", redis_url, "--yes", contains="already holds 3 key(s)")
    with contextlib.closing(RedisStore(redis_url, kimi_home)) as target:
        assert target.image() == filled_home


def test_migrate_asks_first_without_yes(filled_home: StoreImage, redis_url: str, redis_server: RedisServer) -> None:
    fails("store", "migrate", "--to", redis_url, contains="pass --yes")
    assert redis_server.client().hlen("kimi-rotate:keys") == 0


def test_wrong_password_and_unreachable_redis_are_one_line(filled_home: StoreImage, redis_server: RedisServer,
                                                           redis_url: str) -> None:
    password = str(redis_server.password)
    wrong = redis_url.replace(password, "not-the-password")
    line = fails("store", "migrate", "--to", wrong, "--yes", contains="user and password are right")
    assert "not-the-password" not in line and password not in line
    fails("store", "migrate", "--to", "redis://127.0.0.1:1/0", "--yes", contains="check that Redis runs")
    fails("--store", wrong, "store", "migrate", "--to", "sqlite", "--yes", contains="AuthenticationError")


def test_back_out_of_redis_into_a_local_folder(filled_home: StoreImage, kimi_home: Path, redis_url: str,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok("store", "migrate", "--to", redis_url, "--yes")
    # The local store still holds the keys it was copied from: the command will not mix two pools.
    fails("--store", redis_url, "store", "migrate", "--to", "sqlite", "--yes", contains="already holds 3 key(s)")
    folder = tmp_path / "backed-out"
    out = ok("--store", redis_url, "store", "migrate", "--to", str(folder), "--yes")
    assert "Verified" in out and "store-secret" not in out
    with contextlib.closing(SqliteStore(folder)) as local:
        assert local.image() == filled_home
    monkeypatch.setenv("KIMI_ROTATE_HOME", str(folder))
    assert "spare" in ok("list-keys")


def test_migrate_needs_the_secret_file_of_a_redis_source(filled_home: StoreImage, kimi_home: Path, redis_url: str,
                                                         tmp_path: Path) -> None:
    ok("store", "migrate", "--to", redis_url, "--yes")
    (kimi_home / "store-secret").rename(tmp_path / "elsewhere")
    fails("--store", redis_url, "store", "migrate", "--to", str(tmp_path / "copy"), "--yes",
          contains="no secret file at")
    fails("store", "migrate", "--to", "", "--yes", contains="--to is empty")


def _redis_values(server: RedisServer) -> str:
    """The keys' records as Redis holds them."""
    return "\n".join(str(v) for v in server.client(decode_responses=True).hvals("kimi-rotate:keys"))


def test_rotate_secret_end_to_end(filled_home: StoreImage, kimi_home: Path, redis_url: str,
                                  redis_server: RedisServer) -> None:
    ok("store", "migrate", "--to", redis_url, "--yes")
    secret_file = kimi_home / "store-secret"
    old_id = SecretBox.load(secret_file).key_id
    # A proxy on another machine, started before the rotation with its own copy of the file.
    other_file = kimi_home.parent / "other-machine-secret"
    other_file.write_bytes(secret_file.read_bytes())
    other_file.chmod(0o600)
    with contextlib.closing(RedisStore(redis_url, kimi_home.parent / "other", other_file)) as running:
        assert len(running.keys()) == 3
        fails("store", "rotate-secret", contains="the local file")
        out = ok("--store", redis_url, "store", "rotate-secret", "--add")
        new_id = SecretBox.load(secret_file).key_id
        assert new_id != old_id and f"Added secret {new_id}" in out and "--finish" in out
        assert SecretBox.load(secret_file).key_ids == (new_id, old_id)
        assert f"v1.{old_id}." in _redis_values(redis_server)  # nothing in Redis changed yet
        other_file.write_bytes(secret_file.read_bytes())  # step 1's copy to every machine
        assert f"3 with {old_id}" in ok("--store", redis_url, "store", "rotate-secret")

        out = ok("--store", redis_url, "store", "rotate-secret", "--finish")
        assert f"Re-sealed 3 key(s) with secret {new_id}; dropped 1 old secret(s)" in out
        values = _redis_values(redis_server)
        assert f"v1.{old_id}." not in values and values.count(f"v1.{new_id}.") == 3
        assert SecretBox.load(secret_file).key_ids == (new_id,)
        # The running proxy, which read its file before the rotation, still opens every key.
        assert [k.secret.get_secret_value() for k in running.snapshot().keys] == [SECRETS[0], SECRETS[1], SECRETS[3]]
    with contextlib.closing(RedisStore(redis_url, kimi_home)) as fresh:
        assert fresh.image() == filled_home
    fails("--store", redis_url, "store", "rotate-secret", "--finish", contains="nothing to finish")


def test_a_key_sealed_with_a_secret_the_file_lacks_is_refused(filled_home: StoreImage, kimi_home: Path,
                                                              redis_url: str, redis_server: RedisServer) -> None:
    ok("store", "migrate", "--to", redis_url, "--yes")
    client = redis_server.client(decode_responses=True)
    data = json.loads(str(client.hget("kimi-rotate:keys", "1")))
    data["sealed"] = "v1.00000000." + data["sealed"].split(".", 2)[2]
    client.hset("kimi-rotate:keys", "1", json.dumps(data))
    fails("--store", redis_url, "store", "rotate-secret", "--add", contains="copy the current secret file")
    assert len(SecretBox.load(kimi_home / "store-secret").key_ids) == 1  # refused before adding a secret
