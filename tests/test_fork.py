"""`Sandbox.fork()`: a new, separately isolated session with a copy of the workspace and of the
stateful Python kernel's globals. Each test runs as root and as uid 65534 (`caller`)."""

from __future__ import annotations

import uuid
from pathlib import Path

from conftest import Caller

#: A session with room for the tests' files and state.
OPEN = 'Sandbox(disk="256m", memory="1g")'


def test_fork_carries_variables_functions_classes_and_files(caller: Caller) -> None:
    caller.run(f"""
        with {OPEN} as sb:
            sb.run_shell("mkdir -p d/e && printf hi > d/e/f && chmod 640 d/e/f && chmod 750 d"
                         " && ln -s /etc/passwd host-link && ln -s ../x d/rel && mkfifo pipe"
                         " && head -c 3000000 /dev/urandom > big && sha256sum big > big.sum")
            r = sb.run_python('''
import os, hashlib
x = 41
blob = os.urandom(10_000_000)
digest = hashlib.sha256(blob).hexdigest()
items = [1, "two", {{"three": 3.0}}]
alias = items
def add(y, z=1):
    return x + y + z
def counter():
    n = 0
    def step():
        nonlocal n
        n += 1
        return n
    return step
tick = counter()
tick()
class Point:
    scale = 10
    def __init__(self, a):
        self.a = a
    def scaled(self):
        return add(self.a * self.scale)
p = Point(2)
square = lambda v: v * v
import abc, dataclasses, json as js
@dataclasses.dataclass
class Pair:
    a: int
    b: int = 2
class Slotted:
    __slots__ = ("s",)
    def __init__(self):
        self.s = 5
class Shape(abc.ABC):
    @abc.abstractmethod
    def area(self): ...
    @staticmethod
    def unit():
        return "cm"
    @property
    def name(self):
        return type(self).__name__
class Square(Shape):
    def area(self):
        return 4
def fact(n):
    return 1 if n == 0 else n * fact(n - 1)
pair, slotted, sq, show = Pair(1), Slotted(), Square(), display
''', stateful=True)
            assert r.exit_code == 0, r.stderr
            with sb.fork() as fk:
                rep = fk.fork_report
                assert rep is not None and rep.state and rep.skipped_names == {{}}, rep
                assert rep.files == 3 and rep.symlinks == 2 and rep.dirs == 2, rep
                assert rep.skipped_files == ["/workspace/pipe (a fifo)"], rep
                got = fk.run_python(
                    "import hashlib\\n"
                    "(x, add(1), tick(), p.scaled(), type(p).__name__, square(7), len(blob),"
                    " hashlib.sha256(blob).hexdigest() == digest, alias is items, items)",
                    stateful=True)
                assert got.exit_code == 0, got.stderr
                assert got.value == ("(41, 43, 2, 61, 'Point', 49, 10000000, True, True, "
                                     "[1, 'two', {{'three': 3.0}}])"), got.value
                more = fk.run_python(
                    "(dataclasses.replace(pair, b=7), dataclasses.asdict(pair), js.dumps([1]),"
                    " slotted.s, sq.area(), sq.unit(), sq.name, isinstance(sq, Shape),"
                    " fact(5), show is display)", stateful=True)
                assert more.value == ("(Pair(a=1, b=7), {{'a': 1, 'b': 2}}, '[1]', 5, 4, 'cm', "
                                      "'Square', True, 120, True)"), (more.value, more.stderr)
                # The function's globals are the fork's own: a new x is seen by add.
                assert fk.run_python("x = 100\\nadd(0)", stateful=True).value == "101"
                sh = fk.run_shell("cat d/e/f; stat -c '%a %F' d d/e/f host-link;"
                                  " readlink host-link d/rel; sha256sum -c big.sum")
                assert sh.exit_code == 0, sh.stderr
                assert sh.stdout.split("\\n") == [
                    "hi750 directory", "640 regular file", "777 symbolic link",
                    "/etc/passwd", "../x", "big: OK", ""], sh.stdout
    """)


def test_fork_and_parent_change_independently(caller: Caller) -> None:
    caller.run(f"""
        with {OPEN} as sb:
            sb.write_file("shared.txt", "original")
            sb.run_python("x = 1\\nlog = ['parent']", stateful=True)
            with sb.fork() as fk:
                # The fork changes: the parent does not see it.
                fk.write_file("shared.txt", "fork")
                fk.write_file("fork-only.txt", "f")
                fk.run_python("x = 2\\nlog.append('fork')\\nnew = 1", stateful=True)
                assert sb.read_file("shared.txt") == b"original"
                assert [e.name for e in sb.list_dir("/workspace")] == ["shared.txt"]
                v = sb.run_python("(x, log, 'new' in globals())", stateful=True).value
                assert v == "(1, ['parent'], False)", v
                # The parent changes: the fork does not see it.
                sb.write_file("shared.txt", "parent")
                sb.write_file("parent-only.txt", "p")
                sb.run_python("x = 3\\nlog.append('parent again')", stateful=True)
                assert fk.read_file("shared.txt") == b"fork"
                names = [e.name for e in fk.list_dir("/workspace")]
                assert names == ["fork-only.txt", "shared.txt"], names
                v = fk.run_python("(x, log)", stateful=True).value
                assert v == "(2, ['parent', 'fork'])", v
    """)


def test_fork_cannot_see_or_signal_the_parents_processes(caller: Caller) -> None:
    caller.run(f"""
        with {OPEN} as sb:
            sb.run_python("y = 1", stateful=True)
            proc = sb.start(["sleep", "4177"])
            pid = sb.run_shell("pgrep -x sleep").stdout.split()
            assert len(pid) == 1, pid
            with sb.fork() as fk:
                # Namespaces of its own (pid namespaces are per call, in every session).
                ns = "for n in mnt net ipc uts cgroup user; do readlink /proc/self/ns/$n; done"
                mine, theirs = fk.run_shell(ns).stdout.split(), sb.run_shell(ns).stdout.split()
                assert len(mine) == 6 and not set(mine) & set(theirs), (mine, theirs)
                seen = fk.run_shell(
                    "for p in /proc/[0-9]*; do tr '\\\\0' ' ' < $p/cmdline; echo; done")
                assert "4177" not in seen.stdout, seen.stdout
                # Signal the parent's sleep by its pid, then everything the fork may signal.
                fk.run_shell(f"kill -KILL {{pid[0]}}; kill -KILL -1; true")
                # ... and from the fork's kernel, by the parent's host pid.
                r = fk.run_python(
                    f"import os\\ndef k():\\n    try:\\n        os.kill({{proc.pid}}, 9)\\n"
                    f"        return 'sent'\\n    except ProcessLookupError:\\n"
                    f"        return 'no such process'\\nk()", stateful=True)
                assert r.value == "'no such process'", (r.value, r.stderr)
                time.sleep(0.5)
                assert proc.running, proc.result
                after = sb.run_python("y", stateful=True)
                assert after.value == "1" and not after.kernel_restarted, after
            proc.kill()
    """)


def test_closing_one_leaves_the_other_working(caller: Caller) -> None:
    caller.run(f"""
        parent = {OPEN}
        parent.write_file("a.txt", "A")
        parent.run_python("v = 'kept'", stateful=True)
        first = parent.fork()
        parent.close()
        assert first.is_open
        assert first.read_file("a.txt") == b"A"
        assert first.run_python("v", stateful=True).value == "'kept'"
        # A fork of a fork, then the first fork closed: the second goes on.
        second = first.fork()
        first.close()
        assert second.run_python("v + '!'", stateful=True).value == "'kept!'"
        assert second.run_shell("cat a.txt").stdout == "A"
        second.close()
    """)


def test_fork_of_a_stateless_session_copies_the_workspace_only(caller: Caller) -> None:
    caller.run(f"""
        with {OPEN} as sb:
            sb.write_file("notes/n.txt", "n")
            assert sb.run_python("z = 1").exit_code == 0  # stateless: nothing to carry
            with sb.fork() as fk:
                assert fk.fork_report.state is False and fk.fork_report.files == 1
                assert fk.read_file("notes/n.txt") == b"n"
                r = fk.run_python("'z' in globals()", stateful=True)
                assert r.value == "False" and not r.kernel_restarted, r
    """)


def test_names_that_cannot_be_carried_are_reported(caller: Caller) -> None:
    caller.run(f"""
        with {OPEN} as sb:
            r = sb.run_python('''
import socket, threading
class Refuses:
    def __reduce__(self):
        raise RuntimeError("not me")
bad = Refuses()
fh = open("/workspace/f", "w")
sock = socket.socket()
gen = (i for i in range(3))
lock = threading.Lock()
import enum
class Color(enum.Enum):
    RED = 1
good = [bad is not None]
''', stateful=True)
            assert r.exit_code == 0, r.stderr
            with sb.fork() as fk:
                skipped = fk.fork_report.skipped_names
                assert sorted(skipped) == ["Color", "bad", "fh", "gen", "lock", "sock"], skipped
                assert "RuntimeError: not me" in skipped["bad"], skipped
                got = fk.run_python("(good, 'bad' in globals(), Refuses.__name__)",
                                    stateful=True)
                assert got.value == "([True], False, 'Refuses')", got.value
            # The parent's objects are untouched.
            assert sb.run_python("fh.closed, gen is not None", stateful=True).value == \\
                "(False, True)"
    """)


def test_hostile_state_gives_a_typed_error_and_is_never_unpickled_on_the_host(
    caller: Caller,
) -> None:
    probe = f"/tmp/cellblock-fork-probe-{uuid.uuid4().hex}"
    caller.run(f"""
        probe = sys.argv[1]
        with {OPEN} as sb:
            # An object that runs a command when unpickled: it runs in the fork, never here.
            sb.run_python(f'''
import os
class Marks:
    def __reduce__(self):
        return (os.system, ("touch {{probe}}",))
m = Marks()
''', stateful=True)
            with sb.fork() as fk:
                assert not os.path.exists(probe), "unpickled on the host"
                assert fk.run_shell(f"test -e {{probe}}").exit_code == 0
                assert sb.run_shell(f"test -e {{probe}}").exit_code == 1
            # An object whose unpickling fails in the fork: ForkError, the parent goes on.
            sb.run_python('''
class Broken:
    def __reduce__(self):
        return (int, ("not a number",))
m = Broken()
''', stateful=True)
            with raises(cellblock.ForkError) as e:
                sb.fork()
            assert "could not load" in str(e.value) and "ValueError" in str(e.value), e.value
            # Code of the parent replaces the state file while it is written: garbage, then
            # a symlink out of the scratch mounts, then a fifo.
            for swap in ("open(p, 'wb').write(os.urandom(5000))",
                         "os.symlink('/etc/passwd', p)", "os.mkfifo(p)"):
                sb.run_python(f'''
import glob, os
class Swaps:
    def __reduce__(self):
        for p in glob.glob("/tmp/.cellblock/fork-*.state"):
            os.unlink(p)
            {{swap}}
        return (str, ("fine",))
m = Swaps()
''', stateful=True)
                with raises(cellblock.ForkError) as e:
                    sb.fork()
                assert "state" in str(e.value), e.value
            assert sb.run_python("type(m).__name__", stateful=True).value == "'Swaps'"
    """, probe)
    assert not Path(probe).exists()


def test_the_forks_disk_limit_applies(caller: Caller) -> None:
    caller.run("""
        with Sandbox(disk="24m", memory="1g") as sb:
            sb.run_shell("head -c 10000000 /dev/zero > ten")
            # The state travels through the scratch space: 10 MB of files + 16 MB of state
            # do not fit 24 MB.
            sb.run_python("blob = bytes(16_000_000)", stateful=True)
            with raises(cellblock.ForkError) as e:
                sb.fork()
            assert "saved" in str(e.value) and "No space" in str(e.value), e.value
            sb.run_python("del blob", stateful=True)
            with sb.fork() as fk:
                assert fk.fork_report.bytes == 10_000_000
                # The fork's own limit holds after the copy too.
                r = fk.run_shell("head -c 20000000 /dev/zero > more")
                assert r.exit_code != 0 and "No space" in r.stderr, r
            assert sb.run_shell("ls").stdout == "ten\\n"
            # No state file is left behind in the parent's scratch space.
            assert sb.run_shell("ls -a /tmp/.cellblock").stdout.count("fork-") == 0
    """)


def test_a_prepared_fork_is_a_fresh_session_with_the_state_of_the_fork_time(
    caller: Caller,
) -> None:
    caller.run(f"""
        with {OPEN} as sb:
            sb.run_python("x = 'before'", stateful=True)
            sb.prepare_fork()
            sb.prepare_fork()  # one at a time: the second does nothing
            # What changes after prepare_fork and before fork is what the fork gets.
            sb.run_python("x = 'after'", stateful=True)
            sb.write_file("late.txt", "late")
            with sb.fork() as fk:
                assert fk.run_python("x", stateful=True).value == "'after'"
                assert fk.read_file("late.txt") == b"late"
                # The spare ran nothing before: only the parent's files are there.
                assert [e.name for e in fk.list_dir("/workspace")] == ["late.txt"]
                fk.run_python("x = 'fork'", stateful=True)
                assert sb.run_python("x", stateful=True).value == "'after'"
        # Closing the parent closes a spare no fork took.
        sb = {OPEN}
        sb.prepare_fork()
        spare = sb._spare
        spare.thread.join()
        child = spare.child
        assert child is not None and child.is_open
        sb.close()
        assert not child.is_open
    """)


def test_unreadable_entries_are_reported_not_copied(caller: Caller) -> None:
    caller.run(f"""
        with {OPEN} as sb:
            r = sb.run_shell("printf s > closed && chmod 000 closed && mkdir -p locked/in"
                             " && printf x > locked/in/f && chmod 000 locked && printf o > open")
            assert r.exit_code == 0, r.stderr
            with sb.fork() as fk:
                skipped = fk.fork_report.skipped_files
                assert sorted(skipped) == ["/workspace/closed (not readable)",
                                   "/workspace/locked (not readable)"], skipped
                assert [e.name for e in fk.list_dir("/workspace")] == ["open"]
                assert fk.read_file("open") == b"o"
    """)
