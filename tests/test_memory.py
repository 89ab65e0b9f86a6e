"""The memory store on SQLite and on a real PostgreSQL server (tests/postgres_server.py):
TTL, the LRU cap, per-user scoping, the knowledge base's versions, search, the memory tool's
path confinement (traversal attempts), checkpoints (pruning, blobs, fencing, bounded storage)
and the `cellblock memory` CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anthropic.lib.tools import ToolError
from postgres_server import pg  # noqa: F401  (the fixture)

import cellblock
from cellblock.memory import (
    CheckpointConfig,
    KnowledgeSource,
    MemoryConfig,
    MemoryPathError,
    MemoryStore,
    MemoryStoreError,
    StaleCheckpoint,
    _db,
)
from cellblock.memory.checkpoint import digest, restore_workspace, snapshot_workspace
from cellblock.memory.tool import StoreMemoryTool, search

DAY = 86_400.0


class Clock:
    """A settable clock for the store (TTL and refresh intervals without sleeping)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'memory.db'}"
    return request.getfixturevalue("pg").new_database()


_opened: list[MemoryStore] = []


@pytest.fixture(autouse=True)
def close_stores() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def open_store(url: str, clock: Clock | None = None, **config: Any) -> MemoryStore:
    store = MemoryStore(url, config=MemoryConfig(**config), clock=clock or Clock())
    _opened.append(store)
    return store


def rows(store: MemoryStore, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Raw rows, bypassing the store's filters (what is really kept)."""
    with store.db.transaction() as tx:
        return tx.rows(sql, params)


# ---- medium-term: TTL, cap, scoping -------------------------------------------------------

def test_expired_entries_are_invisible_at_once_and_swept(url):
    clock = Clock()
    store = open_store(url, clock, ttl_days=90)
    store.write("alice", "/memories/prefs.md", "likes green tea")
    store.write("alice", "/memories/later.md", "written later")
    clock.now += 89 * DAY
    store.write("alice", "/memories/later.md", "rewritten: its TTL starts again")
    assert store.read("alice", "/memories/prefs.md").content == "likes green tea"
    clock.now += 1 * DAY + 1  # prefs.md is now 90 days and 1 s old
    with pytest.raises(MemoryPathError):
        store.read("alice", "/memories/prefs.md")
    assert [e.path for e in store.entries("alice")] == ["/memories/later.md"]
    assert store.search("alice", "green tea") == []
    assert store.kind("alice", "/memories/prefs.md") is None
    assert "prefs" not in json.dumps(store.export("alice"))
    # Invisible before the sweep, deleted by it (the row is really gone).
    assert len(rows(store, "SELECT path FROM memories WHERE user_id = ?", ("alice",))) == 2
    assert store.sweep() == 1
    assert rows(store, "SELECT path FROM memories") == [("/memories/later.md",)]
    # An expired file does not block creating a new one at its path.
    StoreMemoryTool(store, "alice").call(
        {"command": "create", "path": "/memories/prefs.md", "file_text": "new"})
    assert store.read("alice", "/memories/prefs.md").content == "new"


def test_cap_evicts_the_least_recently_used(url):
    clock = Clock()
    store = open_store(url, clock, max_entries=5)
    for i in range(5):
        clock.now += 1
        store.write("alice", f"/memories/n{i}.md", f"note {i}")
    clock.now += 1
    store.read("alice", "/memories/n0.md")  # n0 used: n1 is now the least recently used
    clock.now += 1
    store.write("alice", "/memories/n5.md", "note 5")
    kept = [e.path for e in store.entries("alice")]
    assert kept == [f"/memories/n{i}.md" for i in (0, 2, 3, 4, 5)]
    # Another user's entries neither count towards alice's cap nor get evicted by it.
    store.write("bob", "/memories/b.md", "bob's")
    for i in range(6, 9):
        clock.now += 1
        store.write("alice", f"/memories/n{i}.md", "x")
    assert len(store.entries("alice")) == 5 and [e.path for e in store.entries("bob")] == [
        "/memories/b.md"]
    assert rows(store, "SELECT count(*) FROM memories WHERE user_id = ?", ("alice",)) == [(5,)]


def test_every_operation_is_scoped_to_its_user(url):
    store = open_store(url)
    alice, bob = StoreMemoryTool(store, "alice"), StoreMemoryTool(store, "bob")
    alice.call({"command": "create", "path": "/memories/secret.md",
                "file_text": "alice's passphrase is tangerine"})
    store.archive_turn("alice", "sess_a", 1, [{"role": "user", "content": "tangerine talk"}])
    for command in (
        {"command": "view", "path": "/memories/secret.md"},
        {"command": "str_replace", "path": "/memories/secret.md", "old_str": "tangerine",
         "new_str": "x"},
        {"command": "insert", "path": "/memories/secret.md", "insert_line": 0,
         "insert_text": "x"},
        {"command": "delete", "path": "/memories/secret.md"},
        {"command": "rename", "old_path": "/memories/secret.md", "new_path": "/memories/m.md"},
    ):
        with pytest.raises(ToolError):
            bob.call(command)
    assert "tangerine" not in bob.call({"command": "view", "path": "/memories"})
    assert search(store, "bob", {"query": "tangerine"}).startswith("No memory matches")
    assert store.export("bob") == {"user": "bob", "memories": [], "archived_turns": [],
                                   "agent_sessions": [], "blobs": {}}
    # bob may use the same path for his own file; alice's is untouched.
    bob.call({"command": "create", "path": "/memories/secret.md", "file_text": "bob's"})
    assert store.forget("bob") == 1
    assert store.read("alice", "/memories/secret.md").content.endswith("tangerine")
    assert [h.tier for h in store.search("alice", "tangerine")] == ["memory", "archive"]


# ---- the memory tool ----------------------------------------------------------------------

TRAVERSALS = [
    "/memories/../etc/passwd", "/memories/a/../../etc", "..", "../memories/x", "/etc/passwd",
    "/", "memories/x", "/memoriesX/y", "/memories/%2e%2e/etc", "/memories/%2E%2E%2Fetc",
    "/memories/..%2fetc", "/memories/a\\..\\..\\etc", "/memories\\..\\etc", "/memories/a\x00b",
    "/memories/./x", "/memories//x", "/memories/\uff0e\uff0e/etc", "/memories/a\uff0fb",
    "/memories/~/x", "/memories/a\nb", "/memories/ ../x", "//memories/x",
    "/memories/" + "a/" * 40 + "x", "/memories/" + "n" * 300, "/proc/self/environ",
    "file:///etc/passwd", "/memories/link -> /etc/passwd/..",
]


def test_memory_tool_refuses_every_traversal_attempt(url):
    store = open_store(url)
    tool = StoreMemoryTool(store, "alice")
    tool.call({"command": "create", "path": "/memories/ok.md", "file_text": "fine"})
    before = rows(store, "SELECT user_id, path, content FROM memories")
    for bad in TRAVERSALS:
        for command in (
            {"command": "view", "path": bad},
            {"command": "create", "path": bad, "file_text": "pwned"},
            {"command": "str_replace", "path": bad, "old_str": "a", "new_str": "b"},
            {"command": "insert", "path": bad, "insert_line": 0, "insert_text": "pwned"},
            {"command": "delete", "path": bad},
            {"command": "rename", "old_path": bad, "new_path": "/memories/moved.md"},
            {"command": "rename", "old_path": "/memories/ok.md", "new_path": bad},
        ):
            with pytest.raises(ToolError) as info:
                tool.call(command)
            assert "refused memory path" in str(info.value.content), (bad, command)
    # Nothing was written, moved or deleted, and no host file was read.
    assert rows(store, "SELECT user_id, path, content FROM memories") == before
    # The root itself cannot be deleted or renamed; the knowledge base cannot be written.
    for command in ({"command": "delete", "path": "/memories"},
                    {"command": "rename", "old_path": "/memories", "new_path": "/memories/x"},
                    {"command": "create", "path": "/memories/knowledge/faq/x.md",
                     "file_text": "forged"}):
        with pytest.raises(ToolError):
            tool.call(command)
    for malformed in ({"command": "view"}, {"command": "create", "path": "/memories/x"},
                      {"command": "chmod", "path": "/memories/ok.md"}, "view /memories",
                      {"command": "view", "path": 7}):
        with pytest.raises(ToolError):
            tool.call(malformed)
    assert rows(store, "SELECT user_id, path, content FROM memories") == before


def test_memory_tool_commands(url):
    store = open_store(url)
    tool = StoreMemoryTool(store, "alice")
    assert tool.to_dict() == {"type": "memory_20250818", "name": "memory"}
    tool.call({"command": "create", "path": "/memories/proj/todo.md", "file_text": "a\nb\n"})
    with pytest.raises(ToolError, match="already exists"):
        tool.call({"command": "create", "path": "/memories/proj/todo.md", "file_text": "x"})
    with pytest.raises(ToolError, match="is a file"):
        tool.call({"command": "create", "path": "/memories/proj/todo.md/x", "file_text": "x"})
    tool.call({"command": "str_replace", "path": "/memories/proj/todo.md", "old_str": "b",
               "new_str": "B"})
    tool.call({"command": "insert", "path": "/memories/proj/todo.md", "insert_line": 1,
               "insert_text": "between"})
    assert store.read("alice", "/memories/proj/todo.md").content == "a\nbetween\nB\n"
    with pytest.raises(ToolError, match="exactly once"):
        tool.call({"command": "str_replace", "path": "/memories/proj/todo.md", "old_str": "e",
                   "new_str": "x"})
    shown = tool.call({"command": "view", "path": "/memories/proj/todo.md",
                       "view_range": [2, 3]})
    assert shown.splitlines()[1:] == ["     2\tbetween", "     3\tB"]
    assert "/memories/proj/todo.md" in tool.call({"command": "view", "path": "/memories/proj"})
    tool.call({"command": "rename", "old_path": "/memories/proj", "new_path": "/memories/done"})
    assert [e.path for e in store.entries("alice")] == ["/memories/done/todo.md"]
    with pytest.raises(ToolError, match="inside itself"):
        tool.call({"command": "rename", "old_path": "/memories/done",
                   "new_path": "/memories/done/sub"})
    tool.call({"command": "delete", "path": "/memories/done"})
    assert store.entries("alice") == []
    with pytest.raises(ToolError, match="at most 10"):
        store2 = open_store(url, max_entry_chars=10)
        StoreMemoryTool(store2, "alice").call(
            {"command": "create", "path": "/memories/big", "file_text": "x" * 11})


# ---- long-term: the knowledge base --------------------------------------------------------

def test_knowledge_refresh_is_a_new_version_switched_atomically(url, tmp_path):
    clock = Clock()
    src = tmp_path / "kb"
    (src / "policies").mkdir(parents=True)
    (src / "policies" / "refunds.md").write_text("Refunds within thirty days.")
    (src / "faq.md").write_text("Shipping takes five days.")
    (src / ".hidden").write_text("not loaded")
    (src / "escape.md").symlink_to("/etc/hostname")
    source = KnowledgeSource(namespace="support", directory=src)
    store = open_store(url, clock, refresh_interval_hours=24, sources=(source,))
    assert store.refresh_due() == ["support"] and store.knowledge_version("support") == 1
    assert [e.path for e in store.list_knowledge()] == [
        "/memories/knowledge/support/faq.md", "/memories/knowledge/support/policies/refunds.md"]
    (src / "policies" / "refunds.md").write_text("Refunds within sixty days.")
    (src / "faq.md").unlink()
    clock.now += 23 * 3600
    assert store.refresh_due() == []  # not due yet: still version 1
    assert "thirty" in store.read_knowledge("/memories/knowledge/support/policies/refunds.md")
    clock.now += 3601
    assert store.refresh_due() == ["support"] and store.knowledge_version("support") == 2
    assert "sixty" in store.read_knowledge("/memories/knowledge/support/policies/refunds.md")
    with pytest.raises(MemoryPathError):
        store.read_knowledge("/memories/knowledge/support/faq.md")
    # Only the current version is kept; searches see only it, for every user.
    assert rows(store, "SELECT DISTINCT version FROM knowledge") == [(2,)]
    assert [h.ref for h in store.search("anyone", "refunds days")] == [
        "/memories/knowledge/support/policies/refunds.md"]
    assert store.search("anyone", "thirty") == []
    # The model sees it read-only under /memories/knowledge.
    tool = StoreMemoryTool(store, "anyone")
    listing = tool.call({"command": "view", "path": "/memories/knowledge"})
    assert listing.splitlines()[1:] == ["26\t/memories/knowledge/support/policies/refunds.md"]
    assert "sixty" in tool.call({"command": "view",
                                 "path": "/memories/knowledge/support/policies/refunds.md"})
    with pytest.raises(ToolError, match="read-only"):
        tool.call({"command": "delete", "path": "/memories/knowledge/support"})


def test_odd_file_names_in_a_knowledge_source_do_not_stop_agents(url, tmp_path, caplog):
    """A decomposed name (macOS writes `café` as `cafe` + U+0301) is loaded under its NFC
    name; names no memory path can hold are skipped with a warning naming each; a source whose
    directory is gone is logged. None of it keeps an agent from starting."""
    import logging
    import unicodedata

    from cellblock.agent import Agent

    src = tmp_path / "kb"
    src.mkdir()
    decomposed = unicodedata.normalize("NFD", "café.md")
    assert decomposed != "café.md"
    (src / decomposed).write_text("Espresso at nine.")
    (src / "bad\nname.md").write_text("a newline in the name")
    (src / "\uff46ullwidth.md").write_text("fullwidth f")
    (src / "ok.md").write_text("fine")
    gone = KnowledgeSource(namespace="gone", directory=tmp_path / "missing")
    store = open_store(url, Clock(), sources=(KnowledgeSource(namespace="kb", directory=src),
                                              gone))
    with caplog.at_level(logging.WARNING, logger="cellblock.memory"):
        result = Agent(model="offline", memory=store, user_id="alice").run(
            "print the first 5 prime numbers")
    assert result.stop_reason == "end_turn", result.error
    assert [e.path for e in store.list_knowledge()] == [
        "/memories/knowledge/kb/café.md", "/memories/knowledge/kb/ok.md"]
    assert store.read_knowledge("/memories/knowledge/kb/café.md") == "Espresso at nine."
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'bad\\nname.md'" in w and "control characters" in w for w in warnings)
    assert any("'\uff46ullwidth.md'" in w for w in warnings)
    assert any("knowledge source gone not refreshed" in w for w in warnings)
    assert store.knowledge_version("gone") is None


def test_knowledge_switch_is_atomic_for_a_concurrent_reader(url):
    """A reader in another connection sees a whole version, never a mix, while refreshes run."""
    import threading

    writer, reader = open_store(url), open_store(url)
    docs = {f"d{i}.md": "v0" for i in range(50)}
    writer.refresh_knowledge("ns", docs)
    stop = threading.Event()
    seen: list[set[str]] = []

    def read_loop() -> None:
        while not stop.is_set():
            with reader.db.transaction() as tx:
                got = tx.rows("SELECT k.content FROM knowledge k JOIN knowledge_versions v ON "
                              "v.namespace = k.namespace AND v.version = k.version")
            seen.append({r[0] for r in got} | {f"n={len(got)}"})

    t = threading.Thread(target=read_loop)
    t.start()
    for v in range(1, 15):
        writer.refresh_knowledge("ns", {p: f"v{v}" for p in docs})
    stop.set()
    t.join()
    assert seen and all(len(s) == 2 and "n=50" in s for s in seen)


# ---- short-term: archived turns ----------------------------------------------------------

def test_turns_leaving_the_context_are_archived_and_searchable(url, monkeypatch):
    from fake_anthropic import FakeAnthropic, message, text, tool_use

    from cellblock.agent import Agent

    words = ["alpha", "bravo", "charlie", "delta"]
    script = [message(tool_use("run_shell", {"command": f"echo primes {w}"}))
              for w in words] + [message(text("done"))]
    store = open_store(url)
    with FakeAnthropic(script) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        result = Agent(model="claude-sonnet-4-6", memory=store, user_id="alice",
                       memory_turns=2).run("count")
    assert result.stop_reason == "end_turn" and result.session_id
    # 5 turns, 2 kept in context: 3 archived, each an assistant message and its results.
    assert [len(m["messages"]) for m in server.requests] == [1, 3, 5, 5, 5]
    archived = store.archived_turns("alice", result.session_id)
    assert [t for t, _ in archived] == [1, 1, 2, 2]
    assert archived[0][1]["content"][0]["input"] == {"command": "echo primes alpha"}
    # The call and its output (the tool result) both match.
    hits = store.search("alice", "bravo")
    assert [h.ref for h in hits if h.tier == "archive"] == [f"{result.session_id}#2"] * 2
    assert store.search("alice", "delta") == []  # still in context, not archived
    assert store.search("bob", "primes") == []
    # The archive is bounded too: the oldest messages go first.
    capped = open_store(url, max_archived_messages=3)
    capped.archive_turn("alice", "sess_more", 1, [{"role": "user", "content": "echo"}])
    assert [(t, m["role"]) for t, m in capped.archived_turns("alice", result.session_id)] == [
        (2, "assistant"), (2, "user")]
    assert len(capped.archived_turns("alice", "sess_more")) == 1
    # The model reached memory through the memory tool and the search tool.
    names = [t.get("name") for t in server.requests[0]["tools"]]
    assert names[-2:] == ["memory", "memory_search"]
    assert server.requests[0]["tools"][-2] == {"type": "memory_20250818", "name": "memory"}


# ---- checkpoints --------------------------------------------------------------------------

def test_checkpoints_are_pruned_with_their_blobs(url):
    store = open_store(url)
    cps = store.checkpoints
    lease = cps.start("alice", "task")
    config = CheckpointConfig(max_checkpoints=3)
    shared = os.urandom(1000)
    for i in range(8):
        files = {"shared.bin": shared, "dir": None, f"step{i}.txt": f"step {i}".encode()}
        cps.save(lease, {"i": i}, files, config=config)
    kept = cps.kept("alice", lease.session_id)
    assert [c.state["i"] for c in kept] == [5, 6, 7] and [c.seq for c in kept] == [6, 7, 8]
    # Blobs: the shared file once, plus one per kept step file; nothing unreferenced.
    assert cps.storage() == {"checkpoints": 3, "files": 9, "blobs": 4,
                             "blob_bytes": 1000 + 3 * len(b"step 5")}
    latest = cps.latest("alice", lease.session_id)
    assert {f.path: f.kind for f in latest.files} == {"shared.bin": "file", "dir": "dir",
                                                      "step7.txt": "file"}
    assert cps.blob("alice", next(f.hash for f in latest.files if f.path == "shared.bin")) == shared


def test_a_stale_process_cannot_write_over_a_newer_checkpoint(url):
    first, second = open_store(url), open_store(url)  # two processes' connections
    old = first.checkpoints.start("alice", "task")
    first.checkpoints.save(old, {"by": "old"}, {})
    new = second.checkpoints.take_over("alice", old.session_id)
    assert new.generation == old.generation + 1
    second.checkpoints.save(new, {"by": "new"}, {"f": b"x"})
    with pytest.raises(StaleCheckpoint):
        first.checkpoints.save(old, {"by": "old, late"}, {"f": b"late"})
    latest = first.checkpoints.latest("alice", old.session_id)
    assert latest.state == {"by": "new"} and latest.generation == new.generation
    assert isinstance(StaleCheckpoint("x"), cellblock.CellblockError)


def test_a_prune_never_deletes_a_blob_another_session_is_saving(request):
    """PostgreSQL, two machines: session B finds blob X stored and will reference it; before B
    commits, session A prunes its last reference to X. A must leave X (B holds it), and B's
    checkpoint must restore. Interleaved exactly: B is held inside its transaction right after
    it looked up its blobs, while A saves and prunes."""
    import threading

    from cellblock.memory import checkpoint

    url = request.getfixturevalue("pg").new_database()
    a_store, b_store = open_store(url), open_store(url)
    x, y = b"shared content X" * 100, b"content Y" * 100
    a = a_store.checkpoints.start("alice", "a")
    b = b_store.checkpoints.start("bob", "b")
    one = CheckpointConfig(max_checkpoints=1)
    a_store.checkpoints.save(a, {"n": 1}, {"f": x}, config=one)  # X stored, referenced by A
    looked_up, go_on = threading.Event(), threading.Event()
    original = checkpoint._existing
    saver = {}

    def held(tx, hashes, lock=""):
        found = original(tx, hashes, lock)
        if threading.current_thread() is saver.get("b"):
            looked_up.set()
            assert go_on.wait(60)
        return found

    checkpoint._existing = held
    errors = []

    def save_b():
        try:
            b_store.checkpoints.save(b, {"n": 1}, {"g": x}, config=one)
        except Exception as e:  # reported below
            errors.append(e)

    try:
        saver["b"] = threading.Thread(target=save_b)
        saver["b"].start()
        assert looked_up.wait(60)
        # A's next checkpoint drops its only reference to X and prunes: X is B's now.
        a_store.checkpoints.save(a, {"n": 2}, {"f": y}, config=one)
        go_on.set()
        saver["b"].join(60)
    finally:
        go_on.set()
        checkpoint._existing = original
    assert not errors, errors
    latest = b_store.checkpoints.latest("bob", b.session_id)
    assert b_store.checkpoints.blob("bob", latest.files[0].hash) == x
    # A's prune left nothing unreferenced behind and nothing referenced is missing.
    assert rows(a_store, "SELECT count(*) FROM blobs") == [(2,)]
    assert rows(a_store, "SELECT count(*) FROM checkpoint_files f WHERE NOT EXISTS "
                         "(SELECT 1 FROM blobs b WHERE b.hash = f.hash)") == [(0,)]
    # X unreferenced at last: the next prune deletes it.
    b_store.checkpoints.save(b, {"n": 2}, {"g": y}, config=one)
    assert rows(a_store, "SELECT count(*) FROM blobs") == [(1,)]


def test_concurrent_sessions_sharing_blobs_never_lose_one(request):
    """PostgreSQL, four connections saving at once, each keeping one checkpoint whose files
    swap between the same few shared contents: every save succeeds (no deadlock, no foreign
    key error) and every kept checkpoint restores."""
    import threading

    url = request.getfixturevalue("pg").new_database()
    shared = [f"shared {i}".encode() * 200 for i in range(3)]
    one = CheckpointConfig(max_checkpoints=1)
    stores = [open_store(url) for _ in range(4)]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        store = stores[n]
        lease = store.checkpoints.start(f"user{n}", "t")
        try:
            for i in range(60):
                files = {"a": shared[(i + n) % 3], "b": shared[(i + 2 * n) % 3]}
                store.checkpoints.save(lease, {"i": i}, files, config=one)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for n, store in enumerate(stores):
        latest = store.checkpoints.latest(f"user{n}")
        assert latest.state == {"i": 59}
        for f in latest.files:
            assert f.hash is not None and store.checkpoints.blob(f"user{n}", f.hash) in shared
    assert rows(stores[0], "SELECT count(*) FROM checkpoint_files f WHERE NOT EXISTS "
                           "(SELECT 1 FROM blobs b WHERE b.hash = f.hash)") == [(0,)]


def test_checkpoint_files_reference_existing_blobs(url):
    """The foreign key: a checkpoint file naming a blob that does not exist is refused."""
    store = open_store(url)
    lease = store.checkpoints.start("alice", "t")
    cid = store.checkpoints.save(lease, {}, {"f": b"x"})
    with pytest.raises(MemoryStoreError):
        with store.db.transaction() as tx:
            tx.run("INSERT INTO checkpoint_files (checkpoint_id, path, kind, hash) "
                   "VALUES (?, 'g', 'file', 'no-such-blob')", (cid,))
    with pytest.raises(MemoryStoreError):
        with store.db.transaction() as tx:
            tx.run("DELETE FROM blobs")


def test_checkpoints_are_scoped_forgotten_exported_and_expired(url):
    import base64

    from cellblock.memory import CheckpointNotFound

    clock = Clock()
    store = open_store(url, clock, ttl_days=90, finished_session_ttl_days=7)
    cps = store.checkpoints
    shared, private = b"shared by both users", b"alice only"
    alice = cps.start("alice", "a task")
    cps.save(alice, {"n": 1}, {"s": shared, "p": private, "d": None})
    store.checkpoints.journal(alice, "toolu_1", "started")
    bob = cps.start("bob", "b task")
    cps.save(bob, {"n": 1}, {"s": shared})
    cid = cps.latest("alice").id
    # Scoped: bob reaches none of alice's checkpoints, blobs or sessions by any route.
    for call in (lambda: cps.get("bob", cid), lambda: cps.latest("bob", alice.session_id),
                 lambda: cps.resolve("bob", cid), lambda: cps.blob("bob", digest(private)),
                 lambda: cps.take_over("bob", alice.session_id)):
        with pytest.raises(CheckpointNotFound):
            call()
    assert cps.kept("bob", alice.session_id) == []
    assert [s.id for s in cps.sessions("bob")] == [bob.session_id]
    assert cps.blob("bob", digest(shared)) == shared  # his own checkpoint references it
    # Export: sessions with their kept checkpoints, and the blobs they reference.
    exported = store.export("alice")
    assert [s["id"] for s in exported["agent_sessions"]] == [alice.session_id]
    assert exported["agent_sessions"][0]["checkpoints"][0]["state"] == {"n": 1}
    assert {h: base64.b64decode(v) for h, v in exported["blobs"].items()} == {
        digest(shared): shared, digest(private): private}
    json.dumps(exported)  # JSON-ready
    # Forget: alice's sessions, checkpoints, journal and the blobs only she used go.
    assert store.forget("alice") == 1
    assert cps.sessions("alice") == [] and store.export("alice")["blobs"] == {}
    assert rows(store, "SELECT count(*) FROM tool_calls") == [(0,)]
    assert sorted(r[0] for r in rows(store, "SELECT hash FROM blobs")) == [digest(shared)]
    assert cps.latest("bob").state == {"n": 1}
    # Retention: a finished session goes 7 days after it finished; an unfinished (resumable)
    # one after ttl_days untouched.
    done = cps.start("carol", "done")
    cps.save(done, {"result": {}}, {"r": b"result file"}, status="finished")
    clock.now += 6 * DAY
    assert store.sweep() == 0
    clock.now += 1 * DAY + 1
    assert store.sweep() == 1 and cps.sessions("carol") == []
    assert digest(b"result file") not in {r[0] for r in rows(store, "SELECT hash FROM blobs")}
    assert [s.id for s in cps.sessions("bob")] == [bob.session_id]  # running, 7 days idle
    clock.now += 83 * DAY
    assert store.sweep() == 1 and cps.sessions("bob") == []
    assert rows(store, "SELECT count(*) FROM blobs") == [(0,)]
    assert rows(store, "SELECT count(*) FROM checkpoint_files") == [(0,)]


def test_resuming_a_finished_session_leaves_it_finished(tmp_path):
    from cellblock.agent import Agent

    store = open_store(f"sqlite://{tmp_path / 'm.db'}")
    result = Agent(model="offline", memory=store, user_id="alice").run(
        "print the first 5 prime numbers")
    before = store.checkpoints.sessions("alice")[0]
    assert before.status == "finished"
    again = Agent(model="offline", memory=store, user_id="alice").resume(result.session_id)
    assert again.final_text == result.final_text
    after = store.checkpoints.sessions("alice")[0]
    assert after.status == "finished" and after.checkpoints == before.checkpoints
    assert after.generation == before.generation + 1  # still fenced: a stale run is refused


def test_1000_checkpoints_of_a_busy_session_keep_storage_bounded(tmp_path):
    db = tmp_path / "busy.db"
    store = open_store(f"sqlite://{db}")
    cps = store.checkpoints
    lease = cps.start("alice", "busy")
    config = CheckpointConfig(max_checkpoints=10, compact_every=20)
    stable = {f"lib/m{i}.py": os.urandom(2000) for i in range(20)}
    sizes = []
    for i in range(1000):
        # Every step rewrites a log and a 20 kB output, and creates a new file each time.
        files: dict[str, bytes | None] = {**stable, "lib": None,
                                          "log.txt": f"step {i}\n".encode() * 50,
                                          "out.bin": os.urandom(20_000),
                                          f"new/{i}.txt": f"{i:04d}".encode() * 25, "new": None}
        cps.save(lease, {"step": i, "messages": ["x" * 500] * 10}, files, config=config)
        if i % 100 == 57:  # between two compactions: the WAL holds 18 checkpoints
            sizes.append(db.stat().st_size + Path(f"{db}-wal").stat().st_size)
    storage = cps.storage()
    assert storage["checkpoints"] == 10
    # 20 stable files + 10 kept * (log, out, new file) blobs.
    assert storage["blobs"] == 20 + 10 * 3
    assert storage["blob_bytes"] < 20 * 2000 + 10 * (20_000 + 50 * 10 + 100)
    # The file (database + WAL) stops growing: the last sizes are no bigger than the early
    # ones and all stay under ~2.5x the live data (WAL truncated, free pages returned).
    live = storage["blob_bytes"] + 10 * 6000
    assert max(sizes) < 2.5 * live + (4 << 20), sizes
    assert sizes[-1] <= max(sizes[:3]) * 1.2, sizes


def test_workspace_snapshot_and_restore_through_the_sandbox_api():
    with cellblock.Sandbox() as a, cellblock.Sandbox() as b:
        a.run_shell("mkdir -p /workspace/d/empty && echo one > /workspace/d/f.txt && "
                    "printf '\\0\\1' > /workspace/bin && ln -s /etc/passwd /workspace/link")
        snap = snapshot_workspace(a)
        assert snap == {"bin": b"\0\1", "d": None, "d/empty": None, "d/f.txt": b"one\n"}
        store = open_store("sqlite://:memory:")
        lease = store.checkpoints.start("u", "t")
        cid = store.checkpoints.save(lease, {}, snap)
        b.write_file("stale.txt", "left from before")
        restore_workspace(b, store.checkpoints.get("u", cid), store.checkpoints, "u")
        assert snapshot_workspace(b) == snap


def test_checkpoint_reasons_interval_and_user_scoped_resume(tmp_path):
    from cellblock.agent import Agent
    from cellblock.memory import CheckpointNotFound

    db = tmp_path / "private" / "m.db"
    store = open_store(f"sqlite://{db}")
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    assert oct(db.parent.stat().st_mode & 0o777) == "0o700"
    agent = Agent(model="offline", memory=store, user_id="alice",
                  checkpoints=CheckpointConfig(interval_seconds=1e-6, max_checkpoints=100))
    result = agent.run("print the first 25 prime numbers")
    reasons = [c.reason for c in store.checkpoints.kept("alice", result.session_id)]
    assert reasons[0] == "start" and reasons[-1] == "finished"
    assert "interval" in reasons and reasons.count("tool_call") == len(result.tool_calls)
    # bob cannot resume (or even find) alice's session.
    bob = Agent(model="offline", memory=store, user_id="bob")
    for ref in ("latest", result.session_id,
                store.checkpoints.latest("alice", result.session_id).id):
        with pytest.raises(CheckpointNotFound):
            bob.resume(ref)
    assert Agent(model="offline", memory=store, user_id="alice").resume(
        result.session_id).final_text == result.final_text


def test_another_uid_cannot_read_the_memory_file(tmp_path):
    """The store holds users' memories and workspaces: uid 65534 tries to read it and fails."""
    data = tmp_path / "data"
    store = open_store(f"sqlite://{data / 'cellblock' / 'memory.db'}")
    store.write("alice", "/memories/secret.md", "the vault code is 8412")
    os.chmod(tmp_path, 0o755)
    os.chmod(data, 0o755)  # even with every parent directory open to all
    db = data / "cellblock" / "memory.db"
    probe = ("import sqlite3, sys\n"
             "for p in sys.argv[1:]:\n"
             "    try:\n"
             "        print(p.rsplit('/', 1)[1], open(p, 'rb').read(1))\n"
             "    except OSError as e:\n"
             "        print(p.rsplit('/', 1)[1], type(e).__name__)\n")
    targets = [str(db), f"{db}-wal", str(db.parent / "x")]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                "/usr/bin/python3", "-c", probe, *targets]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.split("\n")[:2] == ["memory.db PermissionError",
                                               "memory.db-wal PermissionError"], out.stdout
    assert oct(db.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_bad_urls_and_users_are_typed_errors(tmp_path):
    with pytest.raises(MemoryStoreError, match="unsupported"):
        MemoryStore("mysql://x")
    with pytest.raises(MemoryStoreError):
        MemoryStore("postgresql://nobody@/nodb?host=/nonexistent-socket-dir")
    store = open_store(f"sqlite://{tmp_path / 'm.db'}")
    for bad in ("", "a\nb", "x" * 300):
        with pytest.raises(MemoryStoreError):
            store.write(bad, "/memories/x", "y")


# ---- CLI ----------------------------------------------------------------------------------

def test_memory_cli(tmp_path):
    url = f"sqlite://{tmp_path / 'm.db'}"
    store = open_store(url)
    store.write("alice", "/memories/prefs.md", "alice likes green tea\n")
    store.write("bob", "/memories/prefs.md", "bob likes coffee\n")
    alices = store.checkpoints.start("alice", "alice's task").session_id
    store.checkpoints.start("bob", "bob's task")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CELLBLOCK_USER": "alice"}
        return subprocess.run([sys.executable, "-m", "cellblock.cli", "memory", "--db", url,
                               *args], capture_output=True, text=True, env=env, timeout=60,
                              check=False)

    ls = cli("ls")
    assert ls.returncode == 0 and ls.stdout.split()[-1] == "/memories/prefs.md"
    assert cli("show", "/memories/prefs.md").stdout == "alice likes green tea\n"
    assert "coffee" not in cli("search", "likes").stdout
    assert "[memory] /memories/prefs.md" in cli("search", "green").stdout
    exported = json.loads(cli("export").stdout)
    assert [m["path"] for m in exported["memories"]] == ["/memories/prefs.md"]
    bad = cli("show", "/memories/../../etc/passwd")
    assert bad.returncode == 2 and bad.stderr.startswith("cellblock: error: MemoryPathError:")
    sessions = cli("sessions").stdout.splitlines()
    assert len(sessions) == 1 and sessions[0].startswith(alices + "  running")
    assert cli("forget", "/memories/prefs.md").returncode == 0
    assert cli("ls").stdout == ""
    assert "coffee" in cli("--user", "bob", "show", "/memories/prefs.md").stdout


_HAMMER = """
import sys, threading, time
from cellblock.memory import CheckpointConfig, MemoryStore
url, proc, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
errors = []
def work(t):
    user = f"p{proc}t{t}"
    try:
        for i in range(ROUNDS):
            # A new connection each round, opened while this process's other threads are
            # inside transactions on theirs.
            with MemoryStore(url) as store:
                if i == 0:
                    lease = store.checkpoints.start(user, "hammer", session_id=f"sess_{user}")
                store.write(user, f"/memories/f{i}.md", f"{user} {i}", create=True)
                store.checkpoints.save(lease, {"i": i}, {"n": str(i).encode()},
                                       config=CheckpointConfig(max_checkpoints=2))
                assert store.read(user, f"/memories/f{i}.md").content == f"{user} {i}"
    except BaseException as e:
        errors.append(f"{user}: {type(e).__name__}: {e}")
while time.time() < start:
    time.sleep(0.001)
threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\\n".join(errors), file=sys.stderr)
sys.exit(1 if errors else 0)
"""


def test_sqlite_store_hammered_by_processes_and_threads_loses_nothing(tmp_path):
    """Four processes of three threads each open a new SQLite store (one file, created by
    whichever comes first) and reopen it every round, writing entries and checkpoints: every
    call succeeds (no "database is locked", no I/O or corruption error: a connection opened in
    one thread never drops the locks of another's transaction) and every write is kept."""
    import time

    url = f"sqlite://{tmp_path / 'memory.db'}"
    procs, threads, rounds = 4, 3, 8
    code = _HAMMER.replace("ROUNDS", str(rounds)).replace("THREADS", str(threads))
    start = time.time() + 2.0  # every process imported and waiting: they open at once
    children = [subprocess.Popen([sys.executable, "-c", code, url, str(p), str(start)],
                                 stderr=subprocess.PIPE, text=True) for p in range(procs)]
    failures = []
    for child in children:
        try:
            _, err = child.communicate(timeout=300)
        finally:
            child.kill()
        if child.returncode != 0:
            failures.append(err)
    assert not failures, failures
    assert (tmp_path / "memory.db").stat().st_mode & 0o777 == 0o600
    store = open_store(url)
    assert rows(store, "PRAGMA integrity_check") == [("ok",)]
    for p in range(procs):
        for t in range(threads):
            user = f"p{p}t{t}"
            assert [e.path for e in store.entries(user)] == sorted(
                f"/memories/f{i}.md" for i in range(rounds))
            for i in range(rounds):
                assert store.read(user, f"/memories/f{i}.md").content == f"{user} {i}"
            assert store.checkpoints.latest(user).state == {"i": rounds - 1}
            session = store.checkpoints.sessions(user)[0]
            assert session.checkpoints == 2


_HOLD = """
import sys
from cellblock.memory import MemoryStore
url, mode = sys.argv[1], sys.argv[2]
store = MemoryStore(url)
if mode == "read":
    with store.db.read() as tx:
        print(tx.rows("SELECT count(*) FROM memories")[0][0], flush=True)
        sys.stdin.readline()  # paused with its read snapshot open
else:
    with store.db.transaction() as tx:
        tx.run("INSERT INTO meta (key, value) VALUES ('held', 'x')")
        print("writing", flush=True)
        sys.stdin.readline()  # paused holding the write lock
"""


@contextlib.contextmanager
def _paused(url: str, mode: str) -> Iterator[str]:
    """Another process paused inside a read() or a write transaction; yields its first line."""
    child = subprocess.Popen([sys.executable, "-c", _HOLD, url, mode], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    try:
        yield child.stdout.readline().strip()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


def test_a_paused_reader_never_blocks_a_writer(tmp_path, monkeypatch):
    """A process paused with a read transaction open holds no write lock: a writer that may
    not wait at all (busy timeout 0: "database is locked" at the first conflict) writes
    entries and checkpoints and takes a session over meanwhile; the reader's snapshot was
    taken before them."""
    url = f"sqlite://{tmp_path / 'memory.db'}"
    monkeypatch.setattr(_db, "BUSY_TIMEOUT_MS", 0)
    writer = open_store(url)
    writer.write("alice", "/memories/a.md", "before")
    with _paused(url, "read") as seen:
        assert seen == "1"
        writer.write("alice", "/memories/b.md", "during")
        lease = writer.checkpoints.start("alice", "task")
        writer.checkpoints.save(lease, {"n": 1}, {"f": b"x"})
        lease = writer.checkpoints.take_over("alice", lease.session_id)
        writer.checkpoints.save(lease, {"n": 2}, {"f": b"y"})
        assert writer.read("alice", "/memories/b.md").content == "during"
    assert writer.checkpoints.latest("alice").state == {"n": 2}


def test_pure_reads_take_no_write_lock(tmp_path, monkeypatch):
    """While another process holds the write lock (its transaction open, uncommitted), every
    pure read of the store succeeds without waiting (busy timeout 0) and sees the last
    committed state; a write still refuses at once rather than interleaving."""
    url = f"sqlite://{tmp_path / 'memory.db'}"
    monkeypatch.setattr(_db, "BUSY_TIMEOUT_MS", 0)
    store = open_store(url)
    store.write("alice", "/memories/a.md", "alice likes green tea")
    store.archive_turn("alice", "s1", 1, [{"role": "user", "content": "hello"}])
    store.refresh_knowledge("kb", {"doc.md": "espresso"})
    lease = store.checkpoints.start("alice", "task")
    cid = store.checkpoints.save(lease, {"n": 1}, {"f": b"x"})
    with _paused(url, "write") as seen:
        assert seen == "writing"
        assert store.kind("alice", "/memories/a.md") == "file"
        assert [e.path for e in store.entries("alice")] == ["/memories/a.md"]
        assert [h.ref for h in store.search("alice", "green")] == ["/memories/a.md"]
        assert store.archived_turns("alice", "s1")[0][0] == 1
        assert store.knowledge_version("kb") == 1
        assert store.read_knowledge("/memories/knowledge/kb/doc.md") == "espresso"
        assert len(store.list_knowledge()) == 1
        assert store.refresh_due([KnowledgeSource(namespace="kb", directory=tmp_path)]) == []
        assert store.checkpoints.get("alice", cid).state == {"n": 1}
        assert store.checkpoints.latest("alice").id == cid
        assert [c.id for c in store.checkpoints.kept("alice", lease.session_id)] == [cid]
        assert store.checkpoints.sessions("alice")[0].checkpoints == 1
        assert store.checkpoints.blob("alice", digest(b"x")) == b"x"
        assert store.checkpoints.storage()["checkpoints"] == 1
        assert store.export("alice")["memories"][0]["path"] == "/memories/a.md"
        with store.db.read() as tx:
            assert tx.rows("SELECT value FROM meta WHERE key = 'held'") == []
        with pytest.raises(MemoryStoreError, match="locked"):
            store.write("alice", "/memories/b.md", "blocked")
    assert rows(store, "SELECT value FROM meta WHERE key = 'held'") == [("x",)]


def test_a_read_transaction_refuses_writes(url):
    """Nothing writes through read(): a write statement fails (and is undone), a write
    transaction opened inside it is refused (it could not take the write lock without
    failing on a stale snapshot), and the connection writes normally afterwards."""
    store = open_store(url)
    with pytest.raises(MemoryStoreError), store.db.read() as tx:
        tx.run("INSERT INTO meta (key, value) VALUES ('k', 'v')")
    assert rows(store, "SELECT value FROM meta WHERE key = 'k'") == []
    with pytest.raises(MemoryStoreError, match="inside read"), store.db.read():
        store.write("alice", "/memories/a.md", "x")
    store.write("alice", "/memories/a.md", "y")
    assert [e.path for e in store.entries("alice")] == ["/memories/a.md"]
    with store.db.transaction() as tx, store.db.read() as inner:  # reads in the write
        tx.run("INSERT INTO meta (key, value) VALUES ('k', 'v')")
        assert inner.rows("SELECT value FROM meta WHERE key = 'k'") == [("v",)]
