"""Answer comparison in a child process that can be killed, for answers whose CAS work has no bound.

sympy evaluates integer powers, factorials and binomials eagerly: ``10^{9999 \\cdot 9999}`` or ``(10^{9})!`` makes
CPython compute a number with hundreds of millions of digits inside one C call that holds the GIL. In the training
process that freezes every thread, the trainer's included, and no timeout can fire (a thread cannot be stopped and
``signal.alarm`` is only checked between bytecodes). So ``math_accuracy`` sends every answer that has a power, a
factorial, a binomial, a sum/product/integral or a limit here: one long-lived ``python -m
dsalign.rewards.isolated`` child per process scores one pair at a time and is killed, and restarted on the next
call, when a pair overruns its wall clock. Plain answers (``42``, ``\\frac{3}{4}``, ``x+1``) stay in process.

The protocol is one JSON object per line each way: ``{"predicted", "gold"}`` in, ``{"score"}`` or ``{"error"}`` out,
on a private copy of the child's stdout (anything a library prints goes to stderr instead).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time

TIMED_OUT = object()
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine


class IsolatedScorer:
    """A lazily started child that runs :func:`dsalign.rewards.accuracy.compare_answers`; thread-safe (one pair at
    a time). :meth:`score` returns the child's score, or :data:`TIMED_OUT` after killing a child that overran."""

    def __init__(self, timeout_s: float = 20.0) -> None:
        self.timeout_s = timeout_s
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self._kill_at_exit)

    def score(self, predicted: str, gold: str) -> float | None | object:
        with self._lock:
            request = json.dumps({"predicted": predicted, "gold": gold}).encode() + b"\n"
            try:
                proc = self._send(request)
            except BrokenPipeError:  # the child died since the last call (killed from outside): start another
                self._kill()
                proc = self._send(request)
            line = _read_line(proc.stdout.fileno(), time.monotonic() + self.timeout_s)
            if line is None:  # overran (or died): kill it so the next call starts a fresh one
                self._kill()
                return TIMED_OUT
            reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"answer comparison failed in the isolated scorer: {reply['error']}")
        return reply["score"]

    def _send(self, request: bytes) -> subprocess.Popen:
        proc = self._start()
        proc.stdin.write(request)
        proc.stdin.flush()
        return proc

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _kill_at_exit(self) -> None:
        """At interpreter exit, without the lock: an abandoned reward thread may hold it while it waits on the child
        (up to ``timeout_s``). A child busy in a long computation would not notice its stdin closing, so it is killed
        rather than left to finish."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _start(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:
            self._kill()
        # the child must import the same dsalign and math-verify as this process, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), _PARENT_ENV: str(os.getpid())}
        self._proc = _SPAWNER.popen(
            [sys.executable, "-m", "dsalign.rewards.isolated"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C on the terminal is for the trainer, not for this child
        )
        self.restarts += 1
        # the child says when it has imported sympy and warmed up (about a second), so that the per-pair clock
        # measures comparisons, not start-up
        ready = _read_line(self._proc.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT_S)
        if ready is None or json.loads(ready) != {"ready": True}:
            self._kill()
            raise RuntimeError(f"the isolated answer scorer did not start within {STARTUP_TIMEOUT_S} s "
                               f"(got {ready!r}); its stderr is this process's")  # fmt: skip
        return self._proc

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._proc = None


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One line from ``fd`` by the deadline, or ``None`` (time is up, or the child closed its end)."""
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)


_PARENT_ENV = "DSALIGN_ISOLATED_PARENT_PID"


class _Spawner:
    """Starts the children from one long-lived thread.

    A child asks Linux to SIGKILL it when its parent dies (``PR_SET_PDEATHSIG``), so that a trainer killed with
    SIGKILL (a Ray actor's end, OOM) does not leave a child computing a huge number for hours. The kernel sends that
    signal when the *thread* that forked the child ends, and reward threads come and go; so every child is forked
    from this one daemon thread, which ends only with the process.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # first use, or a fork of this process
                self._requests = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._serve, name="dsalign-scorer-spawner", daemon=True)
                self._thread.start()
            requests = self._requests
        box: dict = {}
        done = threading.Event()
        requests.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _serve(self) -> None:
        requests = self._requests
        while True:
            args, kwargs, box, done = requests.get()
            try:
                box["proc"] = subprocess.Popen(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
                box["error"] = e
            finally:
                done.set()


_SPAWNER = _Spawner()


def _die_with_parent() -> None:
    """In the child (Linux): be SIGKILLed when the parent dies, and exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere a child whose parent was SIGKILLed ends only when its current comparison does
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    parent = os.environ.get(_PARENT_ENV)
    if parent is not None and os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


_SCORER: IsolatedScorer | None = None
_SCORER_LOCK = threading.Lock()


def shared_scorer() -> IsolatedScorer:
    """The process-wide scorer (one child per process, started on first use)."""
    global _SCORER
    with _SCORER_LOCK:
        if _SCORER is None:
            _SCORER = IsolatedScorer()
        return _SCORER


def _serve() -> None:
    """The child's loop. It runs in its main thread, so math-verify's own ``signal.alarm`` timeouts work here too."""
    _die_with_parent()
    from dsalign.rewards.accuracy import compare_answers

    protocol = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # a stray print must not corrupt the protocol
    compare_answers("2^{10}", "1024")  # imports math-verify and sympy's LaTeX parser before saying ready
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"score": compare_answers(request["predicted"], request["gold"])}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it there
            reply = {"error": f"{type(e).__name__}: {e}"}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    _serve()
