"""cellblock's warm-runtime server. It runs INSIDE a session's sandbox, as the session's
long-lived call (`python3 -c <this file> SOCKET`); the host never imports it.

The zygote pre-imports the stdlib, listens on a unix socket, and keeps one spare relay forked
ahead of time, its worker already waiting, so that a call costs no fork:

    zygote (pristine; forks the next spare when one takes a connection)
      '- relay (one per connection; child subreaper; frames the worker's output to the host)
           '- worker (runs the code: a fork of the pristine zygote, or node exec'd)

Connection kinds (first frame "h", JSON {"kind": ...}):
  python       one request, run in a fresh fork (nothing survives the call)
  python-kernel  one persistent Python worker; requests share its globals
  node         one node worker, a fresh vm context per request (the host sends it one)
  node-kernel  one persistent node worker; requests share one vm context

Frames both ways: 1 type byte, 4-byte big-endian length, payload. Host to relay: "h" hello,
"r" request (JSON), "g" go, "e" a cell's call ended, "x" reap and sweep. Relay to host: "k"
kernel ready, "f" (carrying the worker's pidfd, stdout and stderr read ends and seccomp
listener as SCM_RIGHTS), "d" the worker's result (JSON: value, error, rich outputs, a cell's
exit_code), "z" swept.
The host supervises each call itself (rust/core/src/warm.rs): it reads the worker's exit status
from the kernel before telling the relay to reap it, measures CPU and memory in a cgroup of the
call, answers the worker's seccomp listener, and pumps the output. Nothing the relay or the
worker says is a fact of the report. Closing the connection cancels: the relay kills its worker
and every descendant, then exits.

The zygote and everything forked from it are not dumpable: no call can ptrace, read or write
the memory (/proc/<pid>/mem) or open the fds of the zygote, of a relay or of another call.
What exec makes dumpable again (a node worker, a call's subprocess) is out of reach of other
calls through Landlock: each worker is in a domain of its own (`own_domain`).
"""

import ast
import atexit
import base64
import builtins
import contextlib
import ctypes
import errno
import gc
import importlib
import io
import json
import linecache
import os
import platform
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    # In the sandbox, display_py.py's source runs first in this module (see zygote_source).
    from cellblock.runtimes.display_py import CURRENT, display
    from cellblock.runtimes.state_py import state_load, state_save

#: The stdlib a typical snippet uses, imported once here so every fork starts with it.
WARM_MODULES = (
    "bisect", "collections", "copy", "csv", "dataclasses", "datetime", "decimal", "enum",
    "fractions", "functools", "hashlib", "heapq", "itertools", "math", "pathlib", "random", "re",
    "statistics", "string", "subprocess", "tempfile", "textwrap", "typing", "uuid",
)
for _name in WARM_MODULES:
    importlib.import_module(_name)

# What the worker runs after the user's code must survive monkey-patching: it keeps these.
_len, _dumps, _loads = len, json.dumps, json.loads
_write, _read, _exit = os.write, os.read, os._exit

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 8
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(platform.machine(), -1)
# Landlock's numbers are the same on every architecture.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11
CHUNK = 65536
#: JSON-encoded sizes of a result's value and error: with the outputs' budget (display_py.py)
#: the result frame stays under the host's 4 MiB, or the whole result is lost.
VALUE_CAP = 1 << 20
ERROR_CAP = 512 << 10
CUT = "\n[... cut: the text was too large for the result ...]\n"
LIBC = ctypes.CDLL(None, use_errno=True)


# ---- framing -------------------------------------------------------------------------------

def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + _len(payload).to_bytes(4, "big") + payload


def read_exact_fd(fd: int, n: int) -> bytes | None:
    buf = b""
    while _len(buf) < n:
        chunk = _read(fd, n - _len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_frame_fd(fd: int) -> tuple[bytes, bytes] | None:
    head = read_exact_fd(fd, 5)
    if head is None:
        return None
    body = read_exact_fd(fd, int.from_bytes(head[1:], "big"))
    return None if body is None else (head[:1], body)


def write_all_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[_write(fd, view):]


def read_frame_sock(sock: socket.socket) -> tuple[bytes, bytes] | None:
    head = sock.recv(5, socket.MSG_WAITALL)
    if len(head) < 5:
        return None
    n = int.from_bytes(head[1:], "big")
    body = sock.recv(n, socket.MSG_WAITALL) if n else b""
    return None if len(body) < n else (head[:1], body)


# ---- processes -----------------------------------------------------------------------------

def ns_depth() -> int:
    """How many pid namespaces deep we are, counted from our /proc's (NSpid entries)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return len(line.split()) - 1
    return 1


def descendants(root: int, depth: int) -> list[int]:
    """Pids (in our own namespace) of every live descendant of /proc pid `root`."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            kids.setdefault(int(fields[1]), []).append(int(name))
    out: list[int]
    out, todo = [], [root]
    while todo:
        for procnum in kids.get(todo.pop(), []):
            todo.append(procnum)
            try:
                with open(f"/proc/{procnum}/status") as f:
                    nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
                out.append(int(nspid[depth - 1]))
            except (OSError, StopIteration, IndexError):
                pass
    return out


def oom_score_adj(value: int) -> None:
    """Makes this process the out-of-memory killer's earlier choice (raising needs no
    privilege)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


def subreaper() -> None:
    """Orphaned descendants become our children (and so cannot escape a sweep)."""
    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def not_dumpable() -> None:
    """No process of the sandbox (same uid, no capabilities) may ptrace us, open our
    /proc/<pid>/mem, environ or fds: inherited by every fork."""
    if LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def own_domain() -> None:
    """Puts this worker (and all it will start or exec) in a Landlock domain of its own.
    Landlock lets a process ptrace, open /proc/<pid>/mem, environ or fds of another only when
    that one is in the same domain or one nested in it: the workers of different calls, and
    the processes they start (an exec'd node or a subprocess, dumpable again after exec), can
    no longer reach each other. The ruleset restricts nothing else: it handles only the making
    of block devices, which a rule allows everywhere (the kernel's own refusal still answers).
    Without Landlock (Linux < 5.13, or not enabled) the worker goes on without: the README
    says what is then reachable."""
    attr = _RulesetAttr(LANDLOCK_ACCESS_FS_MAKE_BLOCK)
    fd = LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if fd < 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EOPNOTSUPP):
            return
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(LANDLOCK_ACCESS_FS_MAKE_BLOCK, root)
        if LIBC.syscall(SYS_LANDLOCK_ADD_RULE, fd, LANDLOCK_RULE_PATH_BENEATH,
                        ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_add_rule")
        if LIBC.syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(root)
        os.close(fd)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def own_listener(bpf: bytes, to_relay: socket.socket) -> None:
    """Installs the session's filter again, on this worker alone, with a listener of its own
    (the newest filter's listener gets this process's refusals): the host attributes every
    refused call of this worker, and of what it starts, to its call. The listener goes to
    the relay and is closed here before any code runs."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    fd = LIBC.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                      ctypes.byref(prog))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)")
    socket.send_fds(to_relay, [b"l"], [fd])
    os.close(fd)
    to_relay.close()


def has_children() -> bool:
    """Reap exited children; True if any child is still alive."""
    try:
        while True:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return True
    except ChildProcessError:
        return False


def kill_tree(me: int, depth: int) -> None:
    """Kill and reap every descendant. We are their subreaper, so while any is alive one of
    them is our child: no child, nothing left (and no need to scan /proc)."""
    while has_children():
        for p in descendants(me, depth):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)


# ---- running Python code -------------------------------------------------------------------

def user_traceback(exc: BaseException, module: types.ModuleType) -> str:
    """The traceback from the user's code down: the server's own frames left out. (They are
    told apart by their globals, not by file name: the server itself runs as "<string>".)"""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals is not module.__dict__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def fit(text: str, cap: int, both_ends: bool = False) -> tuple[str, bool]:
    """`text` cut to at most `cap` characters as it travels (JSON, non-ASCII escaped), its
    start (and end, with `both_ends`: a traceback's last line names the exception), and
    whether it was cut."""
    if _len(text) <= cap // 6 or _len(_dumps(text)) <= cap:
        return text, False
    n = cap
    while True:
        half = n // 2
        cut = text[:half] + CUT + text[_len(text) - half:] if both_ends else text[:n]
        if _len(_dumps(cut)) <= cap or n == 0:
            return cut, True
        n //= 2


def exit_code_of(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def run_code(req: dict[str, Any], module: types.ModuleType, filename: str) -> dict[str, Any]:
    """Run one request's code in `module`: (exit_code, repr of the last expression, traceback)."""
    code = req.get("code", "")
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    sys.stdin = io.TextIOWrapper(io.BytesIO(base64.b64decode(req.get("stdin") or "")))
    os.environ.update(req.get("env") or {})
    if req.get("cwd"):
        try:
            os.chdir(req["cwd"])
        except OSError as e:
            # Only the errno: the host words the message (text from here could be forged).
            return {"exit_code": 127, "value": None, "error": None, "cwd_errno": e.errno}
    value: str | None
    error: str | None
    value = error = None
    exit_code = 0
    truncated = False
    cap = req.get("max_output")
    CURRENT.reset(cap if isinstance(cap, int) else None)
    try:
        tree = ast.parse(code, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        # Running the code is the point.
        exec(compile(tree, filename, "exec"), module.__dict__)
        if last is not None:
            result = eval(compile(ast.Expression(last.value), filename, "eval"), module.__dict__)
            if result is not None:
                text = repr(result)
                value, truncated = fit(text, VALUE_CAP)
                CURRENT.add(result, plain=text)
    except SystemExit as e:
        exit_code = exit_code_of(e)
    except BaseException as e:
        error = user_traceback(e, module)
        sys.stderr.write(error)
        error, cut = fit(error, ERROR_CAP, both_ends=True)
        truncated = truncated or cut
        exit_code = 1
    try:
        CURRENT.figures()  # shown even when the code failed after drawing, as in Jupyter
    except Exception:
        pass
    flush_std()
    return {"exit_code": exit_code, "value": value, "error": error, "truncated": truncated,
            "outputs": CURRENT.result()}


def state_call(op: Any, module: types.ModuleType) -> dict[str, Any]:
    """A kernel's state saved to or loaded from a file (`Sandbox.fork`, see state_py.py)."""
    try:
        if isinstance(op, dict) and isinstance(op.get("save"), str):
            said = state_save(module, op["save"])
        elif isinstance(op, dict) and isinstance(op.get("load"), str):
            said = state_load(module, op["load"])
        else:
            raise ValueError("unknown state operation")
        exit_code = 0
    except BaseException as e:  # even a SystemExit from an object's __setstate__
        said, exit_code = {"error": f"{type(e).__name__}: {e}"[:2000]}, 1
    flush_std()
    return {"exit_code": exit_code, "value": None, "error": None, "state": said}


def fresh_main() -> types.ModuleType:
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    module.__dict__["display"] = display
    sys.modules["__main__"] = module
    sys.argv = ["-c"]
    return module


def flush_std() -> None:
    """Flush the user's streams: whatever the code left in sys.stdout/stderr, even objects of
    its own whose flush fails."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def python_worker(ctl_in: int, ctl_out: int, warmed: int | None = None) -> None:
    """Worker loop: run requests from ctl_in, report each result on ctl_out. A request with
    "once" is the worker's only one: it then shuts down as the interpreter would, kills what
    the code left running, reports, and exits with the code's status (which the host reads
    from the kernel)."""
    subreaper()
    me, depth = int(os.readlink("/proc/self")), ns_depth()
    # A first run while idle takes the copy-on-write faults off the first request's path.
    run_code(json.loads(json.dumps({"code": "pass"})), types.ModuleType("warmup"), "<warmup>")
    if warmed is not None:
        os.close(warmed)  # EOF tells the zygote this worker is ready at full speed
    module = fresh_main()
    n = 0
    while True:
        got = read_frame_fd(ctl_in)
        if got is None:
            _exit(0)
        n += 1
        req = _loads(got[1])
        if not req.get("once"):
            if "state" in req:
                result = state_call(req["state"], module)
            else:
                result = run_code(req, module, f"<cell {n}>")
            result["call"] = req.get("call")
            write_all_fd(ctl_out, frame(b"r", _dumps(result).encode()))
            continue
        result = run_code(req, module, "<string>")
        try:
            for t in threading.enumerate():
                if t is not threading.main_thread() and not t.daemon:
                    t.join()
            atexit._run_exitfuncs()
            flush_std()
            kill_tree(me, depth)
            write_all_fd(ctl_out, frame(b"r", _dumps(result).encode()))
        finally:
            # Even when the code broke what the lines above use, the exit status is right.
            _exit(result["exit_code"] & 0xFF)


# ---- the relay -----------------------------------------------------------------------------

def answers(result: bytes, call: Any) -> bool:
    """Whether a worker's result frame is the answer to request `call`."""
    try:
        got = json.loads(result)
    except ValueError:
        return False
    return isinstance(got, dict) and got.get("call") == call


class Relay:
    """One connection: owns a worker, hands its descriptors to the host for each call, reaps
    and sweeps when the host says so, enforces cancellation.

    Relays are forked ahead of time with a pristine Python worker already waiting, so a call
    costs no fork; a Node connection replaces that worker with a node process."""

    def __init__(self, inherited: tuple[int, ...], warmed: int | None, bpf: bytes) -> None:
        self.me = int(os.readlink("/proc/self"))
        self.depth = ns_depth()
        self.conn: socket.socket = None  # type: ignore[assignment]  # set by serve() before use
        self.bpf = bpf
        self.start_worker(None, inherited, warmed)
        if warmed is not None:
            os.close(warmed)

    def start_worker(self, node_argv: list[str] | None, inherited: tuple[int, ...] = (),
                     warmed: int | None = None) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        lst_r, lst_w = socket.socketpair() if self.bpf else (None, None)
        pid = os.fork()
        if pid == 0:
            try:
                for fd in (out_r, err_r, req_w, res_r, *inherited):
                    os.close(fd)
                if lst_r is not None:
                    lst_r.close()
                if self.conn is not None:
                    self.conn.close()
                oom_score_adj(1000)  # the code that uses the memory goes first, not the sandbox
                own_domain()  # before the filter, which may refuse Landlock's calls
                if lst_w is not None:
                    try:
                        own_listener(self.bpf, lst_w)
                    except OSError:
                        traceback.print_exc()
                        raise  # no code runs unfiltered: the worker dies, the call is refused
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                if node_argv:
                    os.dup2(req_r, 3)
                    os.dup2(res_w, 4)
                    os.closerange(5, 1 << 16)
                    os.execvp(node_argv[0], node_argv)
                python_worker(req_r, res_w, warmed)
            finally:
                os._exit(127)
        for fd in (out_w, err_w, req_r, res_w):
            os.close(fd)
        self.listener: int | None = None
        if lst_r is not None:
            lst_w.close()  # type: ignore[union-attr]  # lst_w is a socket whenever lst_r is
            try:
                _, fds, _, _ = socket.recv_fds(lst_r, 1, 1)
            except OSError:
                fds = []
            lst_r.close()
            self.listener = fds[0] if fds else None
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.req, self.res = req_w, res_r
        self.res_open = True
        self.streams = {out_r: b"o", err_r: b"e"}

    def replace_worker(self, node_argv: list[str]) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        for fd in (self.pidfd, self.req, self.res, *self.streams):
            os.close(fd)
        if self.listener is not None:
            os.close(self.listener)
        self.start_worker(node_argv)

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        self.conn.sendall(frame(kind, payload))

    def drop_output(self, fd: int) -> None:
        """Read and drop what one output pipe holds now (at EOF, stop watching it)."""
        if not os.read(fd, CHUNK):
            del self.streams[fd]
            os.close(fd)

    def cancel(self) -> NoReturn:
        """The host closed the connection (or spoke out of turn): end everything."""
        kill_tree(self.me, self.depth)
        os._exit(0)

    def read_result(self) -> tuple[bytes, bytes] | None:
        """The worker's next frame on its result pipe, or None at EOF (it is exiting)."""
        got = read_frame_fd(self.res)
        if got is None:
            self.res_open = False
        return got

    def worker_ended(self) -> bool:
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def start_up(self) -> bool:
        """Wait for a Node worker's "k" (its start-up output is dropped). False: it died."""
        while True:
            watch: list[socket.socket | int] = [self.conn, self.pidfd, *self.streams]
            if self.res_open:
                watch.append(self.res)
            ready = select.select(watch, [], [])[0]
            if self.conn in ready:
                self.cancel()
            for fd in ready:
                if fd in self.streams:
                    self.drop_output(fd)
            if self.res in ready:
                got = self.read_result()
                if got is not None:
                    return got[0] == b"k"
            if self.pidfd in ready:
                return False

    def hand_over(self) -> None:
        """Give the host the worker's pidfd, output pipes and listener, and wait for "g"."""
        fds = [self.pidfd, *self.streams]
        if self.listener is not None:
            fds.append(self.listener)
        socket.send_fds(self.conn, [frame(b"f", b"")], fds)
        got = read_frame_sock(self.conn)
        if got is None or got[0] != b"g":
            self.cancel()

    def follow(self, cell: bool, call: Any = None) -> bool:
        """During a call: forward the worker's result; on "x" (the host has read how the
        worker ended) reap and sweep. Returns True when a cell answered and the worker serves
        on, False once swept. A cell's result must name its call: one left over from an
        earlier call (e.g. after code wrote a result of its own) is dropped."""
        sent = False
        while True:
            watch: list[socket.socket | int] = [self.conn]
            if self.res_open and not sent:
                watch.append(self.res)
            ready = select.select(watch, [], [])[0]
            if self.res in ready:
                got = self.read_result()
                if got is not None and got[0] == b"r" and (not cell or answers(got[1], call)):
                    self.send(b"d", got[1])
                    sent = True
                    if cell:
                        return self.call_ended()
            if self.conn in ready:
                got = read_frame_sock(self.conn)
                if got is None or got[0] != b"x":
                    self.cancel()
                self.sweep(sent)
                return False

    def call_ended(self) -> bool:
        """After a cell's answer: the host reads what the cell printed, then says "e" (the
        worker serves on) or "x" (it ended meanwhile). Output is only dropped after that."""
        got = read_frame_sock(self.conn)
        if got is None or got[0] not in (b"e", b"x"):
            self.cancel()
        if got[0] == b"x":
            self.sweep(True)
            return False
        return True

    def sweep(self, sent: bool) -> None:
        """Reap the worker, kill and reap what it left, pass on a result still in the pipe."""
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        kill_tree(self.me, self.depth)
        while not sent and self.res_open:
            got = self.read_result()
            if got is not None and got[0] == b"r":
                self.send(b"d", got[1])
                sent = True
        self.send(b"z")

    def serve(self, conn: socket.socket) -> None:
        self.conn = conn
        got = read_frame_sock(conn)
        if got is None or got[0] != b"h":
            return
        hello = json.loads(got[1])
        kind = hello.get("kind", "python")
        if kind.startswith("node"):
            mode = "stateful" if kind == "node-kernel" else "stateless"
            self.replace_worker(["node", "-e", hello.get("source", ""), "--", mode])
            if not self.start_up():
                return
        if kind == "python":
            self.run_once()
        else:
            self.send(b"k")
            self.run_kernel()

    def run_once(self) -> None:
        got = read_frame_sock(self.conn)
        if got is None or got[0] != b"r" or self.worker_ended():
            return
        req = json.loads(got[1])
        req["once"] = True
        self.hand_over()
        write_all_fd(self.req, frame(b"r", json.dumps(req).encode()))
        os.close(self.req)
        self.follow(cell=False)

    def run_kernel(self) -> None:
        while True:
            got = self.wait_request()
            if got is None:
                return
            self.hand_over()
            write_all_fd(self.req, frame(b"r", got[1]))
            if not self.follow(cell=True, call=json.loads(got[1]).get("call")):
                return

    def wait_request(self) -> tuple[bytes, bytes] | None:
        """Between calls: drop stray output, wait for the next request (None: the worker
        ended, the connection closes and the host starts a new kernel)."""
        while True:
            # mypy joins a socket and an int in one list to object, not to a FileDescriptorLike
            ready = select.select(  # type: ignore[type-var]
                [self.conn, self.pidfd, *self.streams], [], [])[0]
            for fd in ready:
                if fd in self.streams:
                    self.drop_output(fd)
            if self.pidfd in ready:
                return None
            if self.conn in ready:
                got = read_frame_sock(self.conn)
                if got is None or got[0] != b"r":
                    self.cancel()
                return got


# ---- the zygote ----------------------------------------------------------------------------

def from_host(conn: socket.socket) -> bool:
    """Only the host may drive a relay: a peer outside our pid namespace has pid 0 here. (A
    process of the sandbox connecting would otherwise get a worker's descriptors.)"""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return bool(struct.unpack("3i", creds)[0] == 0)


def spare(server: socket.socket, taken_w: int, zygote_only: tuple[int, ...], bpf: bytes,
          warmed: int | None = None) -> int:
    """Fork a relay (with its worker) that waits to accept the next connection. `zygote_only`:
    fds the relay closes; `warmed`: a pipe end the worker closes once warmed up."""
    pid = os.fork()
    if pid:
        return os.pidfd_open(pid)
    try:
        for fd in zygote_only:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        subreaper()
        relay = Relay(inherited=(server.fileno(), taken_w), warmed=warmed, bpf=bpf)
        conn, _ = server.accept()
        os.write(taken_w, b"x")
        server.close()
        os.close(taken_w)
        if not from_host(conn):
            return  # type: ignore[return-value]  # the finally below exits
        conn.setblocking(True)
        try:
            relay.serve(conn)
        except (BrokenPipeError, ConnectionResetError):
            pass
        kill_tree(relay.me, relay.depth)
    finally:
        os._exit(0)


def main() -> None:
    not_dumpable()
    # matplotlib, when the code imports it, draws off-screen; its figures become PNG outputs.
    os.environ.setdefault("MPLBACKEND", "Agg")
    # ... and keeps its font cache out of the workspace (HOME), as does fontconfig (which
    # matplotlib runs through fc-list): files the agent reads there are its own.
    os.environ.setdefault("MPLCONFIGDIR", "/tmp/.cellblock/matplotlib")
    os.environ.setdefault("XDG_CACHE_HOME", "/tmp/.cellblock/cache")
    # Orphans of the sandbox come to us, never to the call's PID 1: its only child stays this
    # process, which is how the host tells the zygote from a process that binds its path.
    subreaper()
    path = sys.argv[1]
    bpf = base64.b64decode(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] else b""
    home = os.path.dirname(path)
    if os.path.islink(home) or (os.path.exists(home) and not os.path.isdir(home)):
        os.unlink(home)  # whatever code in the sandbox put there
    os.makedirs(home, mode=0o700, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(128)
    server.setblocking(True)
    inode = os.stat(path).st_ino
    oom_score_adj(500)  # before the sandbox's own processes, after the code's
    # Relays are reaped by the kernel; each relay reaps its own worker.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    taken_r, taken_w = os.pipe()
    # Forks share the zygote's pages until written: keep the collector off them.
    gc.freeze()
    warmed_r, warmed_w = os.pipe()
    waiting = spare(server, taken_w, (taken_r, warmed_r), bpf, warmed_w)
    os.close(warmed_w)
    os.read(warmed_r, 1)  # "ready" means the first call runs at full speed
    os.close(warmed_r)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    null = os.open("/dev/null", os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    while True:
        ready = select.select([taken_r, waiting], [], [], 5.0)[0]
        if taken_r in ready:
            os.read(taken_r, 1)
        if ready:
            # The spare took a connection (or died): fork the next one.
            os.close(waiting)
            waiting = spare(server, taken_w, (taken_r,), bpf)
            continue
        # A zygote whose socket was removed or replaced can never be reached again.
        try:
            if os.stat(path).st_ino != inode:
                return
        except FileNotFoundError:
            return


if __name__ == "__main__":
    main()
