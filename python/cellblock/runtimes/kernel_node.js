'use strict';
// cellblock's warm Node worker. It runs INSIDE a session's sandbox, started by the relay of
// zygote_py.py as `node -e <this file> -- stateless|stateful`; the host never runs it.
//
// Requests arrive on fd 3 and results leave on fd 4, as frames (1 type byte, 4-byte big-endian
// length, payload): "r" request JSON {code, env, cwd} in, "k" ready and "r" result JSON
// {exit_code, value, error} out. stdout/stderr are pipes the host's supervisor reads.
//
// stateless: every request runs in a fresh vm context (fresh globals and builtins; the
// process, its module cache and its environment are restored or shared). stateful: one
// context for the worker's life, so declarations survive between requests.
// A request ends when its code has run, the promise it evaluates to (if any) has settled, and
// the timers it started have fired or been cleared.

const fs = require('fs');
const path = require('path');
const util = require('util');
const vm = require('vm');
const { createRequire } = require('module');

const mode = process.argv[process.argv.length - 1];
const REQ_FD = 3;
const RES_FD = 4;
// Sizes of a result's value and error as they travel (JSON, UTF-8): the result frame must
// stay under the host's 4 MiB, or the whole result is lost.
const VALUE_CAP = 1 << 20;
const ERROR_CAP = 512 << 10;
const CUT = '\n[... cut: the text was too large for the result ...]\n';

/** [text cut to at most cap bytes as it travels (its start, and end with bothEnds: a stack's
 *  first line names the error), whether it was cut]. */
function fit(text, cap, bothEnds) {
  const size = (t) => Buffer.byteLength(JSON.stringify(t));
  if (text.length <= cap / 6 || size(text) <= cap) return [text, false];
  for (let n = cap; ; n >>= 1) {
    const half = n >> 1;
    const cut = bothEnds ? text.slice(0, half) + CUT + text.slice(text.length - half)
      : text.slice(0, n);
    if (size(cut) <= cap || n === 0) return [cut, true];
  }
}

function frame(kind, payload) {
  const body = Buffer.from(payload);
  const head = Buffer.alloc(5);
  head.write(kind, 0, 'latin1');
  head.writeUInt32BE(body.length, 1);
  return Buffer.concat([head, body]);
}

function send(kind, obj) {
  const data = frame(kind, obj === undefined ? '' : JSON.stringify(obj));
  let off = 0;
  while (off < data.length) off += fs.writeSync(RES_FD, data, off);
}

/** Thrown by the context's process.exit(): ends the request, not the worker. */
class ExitRequest {
  constructor(code) { this.code = code; }
}

/** One request's bookkeeping: its timers and how it ended. */
class Call {
  constructor() {
    this.timers = new Map();
    this.settled = false;
    this.error = null;
    this.exitCode = null;
    this.value = null;
    this.truncated = false;
    this.done = null;
    this.finished = new Promise((resolve) => { this.done = resolve; });
  }

  fail(err) {
    if (err instanceof ExitRequest) {
      if (this.exitCode === null) this.exitCode = err.code;
      this.clearTimers();
    } else if (this.error === null) {
      this.error = err;
    }
    this.check();
  }

  clearTimers() {
    for (const [handle, clear] of this.timers) clear(handle);
    this.timers.clear();
  }

  check() {
    if (this.settled && (this.timers.size === 0 || this.exitCode !== null)) this.done();
  }

  /** Timer functions whose callbacks are tracked (and whose errors end up in the result). */
  timerApi() {
    const call = this;
    const wrap = (fn, handleOf, once) => function (...args) {
      try {
        fn.apply(this, args);
      } catch (err) {
        call.fail(err);
      } finally {
        if (once) call.timers.delete(handleOf());
        call.check();
      }
    };
    const track = (set, clear, once) => (fn, ...rest) => {
      let handle = null;
      handle = set(typeof fn === 'function' ? wrap(fn, () => handle, once) : fn, ...rest);
      call.timers.set(handle, clear);
      return handle;
    };
    const untrack = (clear) => (handle) => {
      call.timers.delete(handle);
      clear(handle);
      call.check();
    };
    return {
      setTimeout: track(setTimeout, clearTimeout, true),
      setInterval: track(setInterval, clearInterval, false),
      setImmediate: track(setImmediate, clearImmediate, true),
      clearTimeout: untrack(clearTimeout),
      clearInterval: untrack(clearInterval),
      clearImmediate: untrack(clearImmediate),
    };
  }
}

let current = null;
process.on('uncaughtException', (err) => { if (current) current.fail(err); });
process.on('unhandledRejection', (err) => { if (current) current.fail(err); });

/** `process` as the code sees it: exit() ends the request instead of the worker. */
const requestProcess = new Proxy(process, {
  get(target, key) {
    if (key === 'exit') return (code) => { throw new ExitRequest(code === undefined ? 0 : code); };
    const v = Reflect.get(target, key, target);
    return typeof v === 'function' ? v.bind(target) : v;
  },
});

function makeContext(call) {
  const cwd = process.cwd();
  const module = { exports: {} };
  const sandbox = {
    console, process: requestProcess, Buffer, URL, URLSearchParams, TextEncoder, TextDecoder,
    AbortController, AbortSignal, Event, EventTarget, queueMicrotask, structuredClone, atob, btoa,
    performance, fetch: globalThis.fetch,
    require: createRequire(path.join(cwd, '[eval]')), module, exports: module.exports,
    __filename: path.join(cwd, '[eval]'), __dirname: cwd,
  };
  const context = vm.createContext(sandbox);
  vm.runInContext('globalThis.global = globalThis;', context);
  setTimers(context, call);
  return context;
}

function setTimers(context, call) {
  Object.assign(context, call.timerApi());
}

function formatError(err) {
  if (err && typeof err === 'object' && typeof err.stack === 'string') return err.stack;
  return 'Uncaught ' + util.inspect(err);
}

let persistent = null;
let cells = 0;

async function runRequest(req) {
  if (req.cwd) {
    try {
      process.chdir(req.cwd);
    } catch (err) {
      // The host raises this as an error naming the path; the code never ran. Only the
      // errno goes out (libuv's is negated): the host words the message.
      send('r', {
        exit_code: 127, value: null, error: null, call: req.call,
        cwd_errno: Math.abs(Number(err.errno) | 0),
      });
      return;
    }
  }
  const call = new Call();
  current = call;
  const savedEnv = mode === 'stateless' ? { ...process.env } : null;
  Object.assign(process.env, req.env || {});
  let context;
  if (mode === 'stateful') {
    if (persistent === null) persistent = makeContext(call);
    context = persistent;
    setTimers(context, call);
  } else {
    context = makeContext(call);
  }
  cells += 1;
  try {
    const filename = mode === 'stateful' ? `[cell ${cells}]` : '[eval]';
    const script = new vm.Script(req.code || '', { filename });
    let result = script.runInContext(context, { displayErrors: true });
    if (result && typeof result.then === 'function') result = await result;
    if (result !== undefined) {
      [call.value, call.truncated] = fit(util.inspect(result), VALUE_CAP, false);
    }
  } catch (err) {
    call.fail(err);
  }
  call.settled = true;
  call.check();
  await call.finished;
  current = null;
  call.clearTimers();
  if (savedEnv) {
    for (const k of Object.keys(process.env)) if (!(k in savedEnv)) delete process.env[k];
    Object.assign(process.env, savedEnv);
  }
  let error = null;
  let exitCode = call.exitCode === null ? 0 : Number(call.exitCode) || 0;
  if (call.error !== null && call.exitCode === null) {
    error = formatError(call.error);
    process.stderr.write(error + '\n');
    exitCode = 1;
    call.value = null;
    [error, call.truncated] = fit(error, ERROR_CAP, true);
  }
  send('r', {
    exit_code: exitCode, value: call.value, error, truncated: call.truncated, call: req.call,
  });
}

// Requests, one at a time, in arrival order.
let pending = Buffer.alloc(0);
let queue = Promise.resolve();
const input = fs.createReadStream(null, { fd: REQ_FD });
input.on('data', (chunk) => {
  pending = Buffer.concat([pending, chunk]);
  while (pending.length >= 5) {
    const n = pending.readUInt32BE(1);
    if (pending.length < 5 + n) break;
    const body = pending.subarray(5, 5 + n).toString();
    pending = pending.subarray(5 + n);
    queue = queue.then(() => runRequest(JSON.parse(body)));
  }
});
input.on('end', () => process.exit(0));
// A first context while idle takes the compile and inline-cache misses off the first request.
vm.runInContext('[1, 2].map((x) => x + 1)', makeContext(new Call()), { filename: '[warmup]' });
util.inspect({ warm: [1] });
send('k');
