"""Shift stores against real back ends: a folder, and real Redis servers (never a mock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shift_store import (
    CachedShiftSource,
    InvalidNamespaceError,
    LocalShiftStore,
    ShiftFormatError,
    ShiftKey,
    ShiftSignatureError,
    ShiftVector,
    StoreError,
    StoreUnavailableError,
    open_store,
)
from shift_store import base as store_base
from shift_store.redis_store import RedisShiftStore
from tests.helpers import SHARED_REDIS, key_of, make_vector


@pytest.fixture(params=["local", "redis"])
def store(request, tmp_path, namespace):
    if request.param == "local":
        return LocalShiftStore(tmp_path, namespace=namespace)
    return open_store(f"{SHARED_REDIS}?namespace={namespace}")


def test_round_trip_is_bit_exact_and_listed_without_tensors(store):
    vector = make_vector()
    version = store.put(key_of(vector), vector)
    got, got_version = store.get(key_of(vector))
    assert torch.equal(got.vectors, vector.vectors) and got.meta == vector.meta
    assert got_version == version == store.version(key_of(vector))
    [entry] = store.list()
    assert entry.key == key_of(vector).name and entry.meta == vector.meta
    assert store.delete(key_of(vector)) and store.get(key_of(vector)) is None
    assert store.list() == [] and not store.delete(key_of(vector))


def test_other_model_is_a_miss(store):
    vector = make_vector(model="w")
    store.put(key_of(vector), vector)
    changed_checkpoint = key_of(make_vector(model="w-finetuned"))
    assert changed_checkpoint != key_of(vector)
    assert store.get(changed_checkpoint) is None and store.version(changed_checkpoint) is None


def _damage(store, key: ShiftKey, payload: bytes) -> None:
    if isinstance(store, LocalShiftStore):
        (store.folder / f"{key.name}.safetensors").write_bytes(payload)
    else:
        store.client.hset(store.redis_key(key), mapping={"payload": payload, "sha256": "x"})


@pytest.mark.parametrize("payload", [b"not safetensors", b"\x10" + bytes(40)])
def test_damaged_data_is_rejected_then_recomputed(store, payload, caplog):
    vector = make_vector()
    key = key_of(vector)
    store.put(key, vector)
    _damage(store, key, payload)
    with pytest.raises(ShiftFormatError):
        store.get(key)
    assert "rejected" in caplog.text
    source = CachedShiftSource(store, key)
    lookup = source.current()
    assert lookup.vector is None and "rejected" in lookup.note
    recomputed = source.ensure(lambda: vector)
    assert lookup.vector is None and torch.equal(recomputed.vector.vectors, vector.vectors)
    assert torch.equal(store.get(key)[0].vectors, vector.vectors)


def test_payload_of_another_key_is_refused_by_version_check(namespace):
    store = open_store(f"{SHARED_REDIS}?namespace={namespace}")
    a, b = make_vector(1), make_vector(2)
    store.put(key_of(a), a)
    # the payload is replaced; the checksum field stays a's
    store.client.hset(store.redis_key(key_of(a)), "payload", b.to_bytes())
    with pytest.raises(ShiftFormatError, match="version"):
        store.get(key_of(a))


class CountingStore:
    """A real store, counting the calls that reach it."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        self.calls += 1
        return getattr(self.inner, name)


def test_warm_lookup_does_not_touch_the_store_and_notices_replacement(store):
    now = [0.0]
    v1, v2 = make_vector(1), make_vector(2)
    counting = CountingStore(store)
    source = CachedShiftSource(counting, key_of(v1), revalidate_s=1.0, clock=lambda: now[0])
    store.put(key_of(v1), v1)
    assert torch.equal(source.current().vector.vectors, v1.vectors)
    calls = counting.calls
    for _ in range(100):
        source.current()
    assert counting.calls == calls  # warm: no store access at all
    store.put(key_of(v1), v2)  # another replica replaces the vector
    assert torch.equal(source.current().vector.vectors, v1.vectors)  # until revalidation
    now[0] = 1.5
    assert torch.equal(source.current().vector.vectors, v2.vectors)


def test_concurrent_cold_start_computes_once_threads(store):
    vector = make_vector()
    computed = []

    def compute() -> ShiftVector:
        computed.append(1)
        time.sleep(0.3)
        return vector

    results = []

    def replica() -> None:
        source = CachedShiftSource(store, key_of(vector))
        results.append(source.ensure(compute, lock_timeout_s=10))

    threads = [threading.Thread(target=replica) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1
    assert all(torch.equal(r.vector.vectors, vector.vectors) for r in results)


def test_replica_that_cannot_wait_reports_a_miss(store):
    vector = make_vector()
    with store.lock(key_of(vector), timeout_s=0) as held:
        assert held
        lookup = CachedShiftSource(store, key_of(vector)).ensure(lambda: vector, lock_timeout_s=0)
    assert lookup.vector is None and "another process" in lookup.note


_REPLICA = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from tests.helpers import make_vector, key_of
    from shift_store import open_store, CachedShiftSource
    store = open_store({url!r})
    vector = make_vector()
    def compute():
        with open({log!r}, "a") as f:
            f.write("computed\\n")
        time.sleep(0.5)
        return vector
    lookup = CachedShiftSource(store, key_of(vector)).ensure(compute, lock_timeout_s=30)
    assert torch.equal(lookup.vector.vectors, vector.vectors)
    print("ok")
""")


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_concurrent_cold_start_computes_once_processes(backend, tmp_path, namespace):
    url = (
        f"file://{tmp_path}?namespace={namespace}"
        if backend == "local"
        else f"{SHARED_REDIS}?namespace={namespace}"
    )
    log = tmp_path / "computed.log"
    code = _REPLICA.format(tests=str(Path(__file__).parents[1]), url=url, log=str(log))
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4 and all("ok" in o for o in outputs)
    assert log.read_text().count("computed") == 1


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from tests.helpers import make_vector, key_of
    from shift_store import open_store
    store = open_store({url!r})
    with store.lock(key_of(make_vector()), timeout_s=5, expire_s=1.5) as held:
        print("held" if held else "not held", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_crashed_lock_holder_does_not_block_forever(backend, tmp_path, namespace):
    url = (
        f"file://{tmp_path}?namespace={namespace}"
        if backend == "local"
        else f"{SHARED_REDIS}?namespace={namespace}"
    )
    code = _HOLD_LOCK.format(tests=str(Path(__file__).parents[1]), url=url)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    store = open_store(url)
    with store.lock(key_of(make_vector()), timeout_s=0) as held:
        assert not held  # really held by the other process
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with store.lock(key_of(make_vector()), timeout_s=10) as held:
        assert held  # file lock: at once; Redis: after its 1.5 s expiry


def test_local_store_never_exposes_a_partial_write(tmp_path):
    big = make_vector(layers=32, hidden=4096)
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from tests.helpers import make_vector, key_of
        from shift_store import LocalShiftStore
        store = LocalShiftStore({str(tmp_path)!r})
        i = 0
        print("writing", flush=True)
        while True:
            v = make_vector(i % 3, layers=32, hidden=4096)
            store.put(key_of(v), v)
            i += 1
    """)
    store = LocalShiftStore(tmp_path)
    valid = [make_vector(i, 32, 4096).vectors for i in range(3)]
    for delay in (0.3, 0.45, 0.6, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        got = store.get(key_of(big))
        assert got is None or any(torch.equal(got[0].vectors, v) for v in valid)
        assert [e.key for e in store.list()] in ([], [key_of(big).name])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (store.folder / f".tmp-{dead}-left.safetensors").write_bytes(b"x" * 1000)  # a dead writer's
    old = store.folder / ".tmp-unknown.safetensors"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))  # two hours old
    store.put(key_of(big), big)  # the next write removes the killed writers' temporary files
    assert sorted(p.name for p in store.folder.iterdir() if not p.name.endswith(".lock")) == [
        f"{key_of(big).name}.safetensors"
    ]


def test_redis_outage_is_bounded_served_from_cache_and_recovers(own_redis):
    vector = make_vector()
    store = open_store(f"{own_redis.url}?namespace=outage&retries=1")
    now = [0.0]
    warm = CachedShiftSource(
        store, key_of(vector), revalidate_s=1, retry_after_s=5, clock=lambda: now[0]
    )
    computed = []
    assert warm.ensure(lambda: computed.append(1) or vector).vector is not None
    assert computed == [1]
    own_redis.kill()
    now[0] = 2.0
    asked = []
    version = store.version
    store.version = lambda key: asked.append(key) or version(key)  # count store round trips
    lookup = warm.current()
    assert torch.equal(lookup.vector.vectors, vector.vectors) and len(asked) == 1
    assert "unreachable" in lookup.note and "cached" in lookup.note
    for _ in range(50):
        warm.current()  # inside retry_after_s: no new connection attempts
    assert len(asked) == 1
    cold = CachedShiftSource(store, key_of(vector), clock=lambda: now[0])
    assert cold.current().vector is None and "unreachable" in cold.current().note
    with pytest.raises(StoreUnavailableError):
        store.put(key_of(vector), vector)
    own_redis.start()  # back, empty (it keeps nothing on disk): recomputed, once
    now[0] = 8.0
    lookup = warm.current()
    assert torch.equal(lookup.vector.vectors, vector.vectors) and lookup.note is None
    assert store.get(key_of(vector))[0].checksum == vector.checksum and computed == [1, 1]
    now[0] = 20.0
    assert warm.current().note is None and computed == [1, 1]


def test_redis_url_options_ttl_namespace_and_acl(own_redis):
    admin = redis.Redis(port=own_redis.port)
    admin.execute_command("ACL", "SETUSER", "guard", "on", ">s3cret", "~cmrm:*", "+@all")
    vector = make_vector()
    url = f"redis://guard:s3cret@127.0.0.1:{own_redis.port}/0?namespace=bot&ttl=100"
    store = open_store(url)
    assert isinstance(store, RedisShiftStore) and store.namespace == "bot"
    store.put(key_of(vector), vector)
    assert 0 < admin.ttl(f"cmrm:bot:shift:{key_of(vector).name}") <= 100
    wrong = open_store(f"redis://guard:wrong@127.0.0.1:{own_redis.port}/0?retries=0")
    with pytest.raises(StoreUnavailableError):
        wrong.get(key_of(vector))
    with pytest.raises(ValueError, match="scheme"):
        open_store("ftp://example/x")


def test_outage_note_clears_when_the_store_answers_again(own_redis):
    vector = make_vector()
    store = open_store(f"{own_redis.url}?namespace=recover&retries=0")
    now = [0.0]
    source = CachedShiftSource(store, key_of(vector), revalidate_s=1, clock=lambda: now[0])
    source.ensure(lambda: vector)
    own_redis.kill()
    now[0] = 2.0
    assert source.current().store_down
    own_redis.start()
    store.put(key_of(vector), vector)  # the same vector again: the same version
    now[0] = 20.0
    lookup = source.current()
    assert lookup.vector is not None and lookup.note is None and not lookup.store_down


def test_a_damaged_version_field_is_a_format_error_not_a_crash(namespace):
    store = open_store(f"{SHARED_REDIS}?namespace={namespace}")
    vector = make_vector()
    store.put(key_of(vector), vector)
    store.client.hset(store.redis_key(key_of(vector)), "sha256", b"\xff\xfe not text")
    with pytest.raises(ShiftFormatError, match="damaged version field"):
        store.version(key_of(vector))
    with pytest.raises(ShiftFormatError):
        store.get(key_of(vector))
    lookup = CachedShiftSource(store, key_of(vector)).current()
    assert lookup.vector is None and "rejected" in lookup.note


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_signed_store_refuses_unsigned_and_foreign_signed_vectors(
    backend, tmp_path, namespace, monkeypatch
):
    monkeypatch.setenv("CMRM_TEST_SIGNING_KEY", "deployment secret")
    base = (
        f"file://{tmp_path}?namespace={namespace}"
        if backend == "local"
        else f"{SHARED_REDIS}?namespace={namespace}"
    )
    signed = open_store(f"{base}&key_env=CMRM_TEST_SIGNING_KEY")
    plain = open_store(base)  # same place, no key: someone with write access but not the key
    foreign = open_store(base, signing_key=b"another key")
    vector = make_vector()
    key = key_of(vector)
    plain.put(key, vector)
    with pytest.raises(ShiftSignatureError, match="unsigned"):
        signed.get(key)
    foreign.put(key, vector)
    with pytest.raises(ShiftSignatureError, match="does not match"):
        signed.get(key)
    signed.put(key, vector)
    assert signed.get(key)[0].checksum == vector.checksum
    lookup = CachedShiftSource(signed, key).current()
    assert lookup.vector is not None and lookup.verified and signed.signed and not plain.signed
    monkeypatch.delenv("CMRM_TEST_SIGNING_KEY")
    with pytest.raises(StoreError, match="CMRM_TEST_SIGNING_KEY"):
        open_store(f"{base}&key_env=CMRM_TEST_SIGNING_KEY")


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_signed_vector_copied_to_another_entry_is_refused(backend, tmp_path, namespace):
    """A writer without the key copies a vector the deployment signed for one app (namespace)
    or anchor set over another entry: the signature binds the entry, so it is refused."""
    root = f"file://{tmp_path}" if backend == "local" else SHARED_REDIS
    stores = {
        name: open_store(f"{root}?namespace={namespace}-{name}", signing_key=b"k")
        for name in ("support", "search")
    }
    raw_search = open_store(f"{root}?namespace={namespace}-search")  # same place, no key
    vector = make_vector()
    key = key_of(vector)
    stores["support"].put(key, vector)
    signed_for_support = stores["support"].inner.get(key)[0]
    raw_search.put(key, signed_for_support)  # copied over the other app's entry
    with pytest.raises(ShiftSignatureError, match="does not match"):
        stores["search"].get(key)
    other_anchor = key.model_copy(update={"anchor": "another-anchor-set"})
    stores["support"].inner.put(other_anchor, signed_for_support)
    with pytest.raises(ShiftSignatureError, match="does not match"):
        stores["support"].get(other_anchor)
    assert stores["support"].get(key)[0].checksum == vector.checksum


@pytest.mark.parametrize("backend", ["local", "redis"])
@pytest.mark.parametrize("name", ["../../x", "a/b", "a:b", "..", "", "with space", "x" * 200])
def test_a_namespace_that_names_another_place_is_refused(backend, name, tmp_path):
    root = tmp_path / "root"
    url = f"file://{root}" if backend == "local" else SHARED_REDIS
    with pytest.raises(InvalidNamespaceError):
        open_store(url, namespace=name)
    assert not any(tmp_path.rglob("x")) and not (tmp_path / "a").exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "oversized"])
def test_whatever_sits_at_a_keys_path_is_a_format_error_found_without_reading_it(
    kind, tmp_path, monkeypatch
):
    """A writer of the folder puts a named pipe (start-up hung), a directory (IsADirectoryError
    escaped) or a huge file (read whole) where an entry belongs: each is refused, at once."""
    store = LocalShiftStore(tmp_path)
    vector = make_vector()
    key = key_of(vector)
    path = store.folder / f"{key.name}.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        monkeypatch.setattr(store_base, "MAX_ENTRY_BYTES", 1000)
        path.write_bytes(vector.to_bytes() + bytes(1000))
    started = time.perf_counter()
    with pytest.raises(ShiftFormatError, match=r"regular file|cap"):
        store.get(key)
    assert time.perf_counter() - started < 1.0
    assert store.list() == []  # listed entries skip it too
    lookup = CachedShiftSource(store, key).current()
    assert lookup.vector is None and "rejected" in lookup.note


def test_an_oversized_redis_field_is_refused_without_fetching_it(namespace, monkeypatch):
    store = open_store(f"{SHARED_REDIS}?namespace={namespace}")
    vector = make_vector()
    key = key_of(vector)
    store.put(key, vector)
    monkeypatch.setattr(store_base, "MAX_ENTRY_BYTES", 100)
    with pytest.raises(ShiftFormatError, match="over the 100-byte cap"):
        store.get(key)
    monkeypatch.undo()
    assert store.get(key)[0].checksum == vector.checksum


def test_the_checksum_covers_the_metadata(tmp_path):
    """Editing a stored vector's metadata (say, the anchor-distance threshold that the trust
    policy reads) without recomputing the checksum is caught even without a key."""
    vector = make_vector()
    payload = vector.to_bytes()
    tensors = st_load(payload)
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])["__metadata__"]
    meta = json.loads(header["cmrm_meta"]) | {"anchor_distance_threshold": 1e9}
    edited = st_save(tensors, metadata={**header, "cmrm_meta": json.dumps(meta)})
    with pytest.raises(ShiftFormatError, match="checksum"):
        ShiftVector.from_bytes(edited)


def _rewritten(payload: bytes, *, drop: str | None = None, meta: dict | None = None) -> bytes:
    """``payload`` as a writer without the key rewrites it: a tensor dropped, metadata edited,
    the header otherwise kept."""
    tensors = st_load(payload)
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])["__metadata__"]
    if drop:
        tensors.pop(drop)
    if meta:
        header["cmrm_meta"] = json.dumps(json.loads(header["cmrm_meta"]) | meta)
    return st_save(tensors, metadata=header)


def test_an_entry_missing_a_tensor_its_metadata_lists_is_refused():
    base = make_vector()
    vector = ShiftVector(vectors=base.vectors, meta=base.meta, decode_vectors=base.vectors / 2)
    assert vector.meta.tensors == ("shift", "decode_vectors")
    with pytest.raises(ShiftFormatError, match="metadata lists"):
        ShiftVector.from_bytes(_rewritten(vector.to_bytes(), drop="decode_vectors"))
    with pytest.raises(ShiftFormatError, match="does not list"):
        ShiftVector.from_bytes(_rewritten(vector.to_bytes(), meta={"tensors": []}))


@pytest.mark.parametrize(
    "field, value", [("anchor_distance_threshold", 0.0), ("anchor_distance_threshold", -1.0)]
)
def test_a_threshold_that_is_not_a_positive_number_is_a_format_error(field, value):
    """0.0 used to be read as 'no threshold', which the trust policy took as infinity."""
    vector = make_vector()
    edited = ShiftVector(vectors=vector.vectors, meta=vector.meta.model_copy(update={field: value}))
    with pytest.raises(ShiftFormatError, match="anchor_distance_threshold"):
        ShiftVector.from_bytes(edited.to_bytes())


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_replayed_older_calibration_is_refused(backend, tmp_path, namespace):
    """A writer without the key copies an older signed calibration of the same entry back."""
    root = f"file://{tmp_path}" if backend == "local" else SHARED_REDIS
    signed = open_store(f"{root}?namespace={namespace}", signing_key=b"k")
    older = make_vector(seed=1)
    newer = make_vector(seed=2)
    assert older.meta.created_at < newer.meta.created_at
    key = key_of(newer)
    signed.put(key, older)
    older_signed = signed.inner.get(key)[0]
    signed.put(key, newer)
    assert signed.get(key)[0].checksum == newer.checksum
    signed.inner.put(key, older_signed)  # the replay
    with pytest.raises(ShiftSignatureError, match="older than one already used"):
        signed.get(key)
    signed.put(key, newer)
    assert signed.get(key)[0].meta.calibration_id == newer.meta.calibration_id


def test_a_failed_write_is_a_store_error_and_keeps_the_previous_entry(tmp_path, monkeypatch):
    store = LocalShiftStore(tmp_path)
    vector = make_vector()
    key = key_of(vector)
    store.put(key, vector)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StoreUnavailableError, match="No space left"):
        store.put(key, make_vector(seed=3))
    monkeypatch.undo()
    assert store.get(key)[0].checksum == vector.checksum
    assert [p.name for p in store.folder.iterdir()] == [f"{key.name}.safetensors"]
