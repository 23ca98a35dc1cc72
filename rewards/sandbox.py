"""Run untrusted Python (model-written code) in a separate, resource-limited, network-less process.

Layers, outermost first (see docs/REWARDS.md for the full table of what is and is not isolated):

1. ``subprocess`` with ``start_new_session=True`` and a ``preexec_fn`` that sets rlimits (CPU seconds, address
   space, file size, process count, open files) and lowers the priority, so the limits bind every process the code
   starts. A wall clock in the parent kills the whole process group with ``os.killpg`` on timeout.
2. Linux namespaces via ``unshare``: a new network namespace (only a downed loopback, so no IP socket reaches
   anything, nor an abstract unix socket), a PID namespace (when its first process dies the kernel kills every
   process left in it, even ones that left our process group with ``setsid``), a mount namespace with fresh
   size-capped tmpfs over the world-writable directories (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``) so
   nothing written survives the run, and over ``/run`` (and a real ``/var/run``): unix sockets are files, which a
   network namespace does not hide, and that is where host daemons (docker, dbus, databases) keep theirs. A
   world-accessible socket elsewhere on the host filesystem stays reachable. Plus IPC and UTS namespaces.
3. A throwaway unprivileged uid (when we run as root): ``RLIMIT_NPROC`` is not enforced for root, so without
   dropping privileges a fork bomb would be bounded by nothing but the wall clock. A random high uid also means
   the code owns no file on the host and can only read what is world-readable.

If namespaces are unavailable, :func:`run_python` refuses with :class:`SandboxUnavailable` unless the caller opts
in with ``allow_network=True`` (rlimits, wall clock, scrubbed env and the uid drop still apply).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Inside the namespaces this runs as root (pid 1): mount private tmpfs over every world-writable directory and over
# /run, where host daemons keep their unix sockets (a fresh /run hides the host's /run/lock mount too, so it is
# recreated world-writable inside), make the working directory, then run the code as the throwaway uid. It does
# not `exec` the code so that pid 1 stays a root process the code cannot signal; pid 1's exit tears the namespace
# down. Arguments arrive as $1.. only.
_NAMESPACE_SCRIPT = r"""
set -e
uid="$1"; tmpfs_kb="$2"; shift 2
for d in /tmp /var/tmp /dev/shm; do
  if [ -d "$d" ]; then mount -t tmpfs -o "size=${tmpfs_kb}k,mode=1777,nosuid,nodev" tmpfs "$d"; fi
done
for d in /run /var/run; do
  if [ -d "$d" ] && [ ! -L "$d" ]; then mount -t tmpfs -o "size=${tmpfs_kb}k,mode=755,nosuid,nodev" tmpfs "$d"; fi
done
if [ -d /run ]; then mkdir -m 1777 /run/lock; fi
mkdir -m 700 /tmp/work
if [ "$uid" != "-" ]; then chown "$uid:$uid" /tmp/work; fi
cd /tmp/work
set +e
if [ "$uid" = "-" ]; then "$@"; else setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs -- "$@"; fi
exit $?
"""

THROWAWAY_UIDS = (1_500_000_000, 2_000_000_000)  # no real account lives here
_SCRUBBED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. Defaults suit unit-test-sized solutions; raise them for heavier benchmarks.

    ``max_processes`` is the process count of the throwaway uid (threads count too); ``memory_mb`` caps each
    process's address space, so the worst case is roughly ``max_processes * memory_mb``.
    """

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 512
    file_size_mb: int = 16
    max_processes: int = 16
    max_open_files: int = 64
    tmpfs_mb: int = 64
    max_output_bytes: int = 64 * 1024
    nice: int = 10


@dataclass(frozen=True)
class SandboxResult:
    """What a run did. ``returncode`` < 0 means killed by that signal (e.g. -9 on the wall clock)."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float
    isolation: str  # "namespaces" or "none"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class SandboxSupport:
    """What this machine allows, found by actually running a probe (see :func:`sandbox_support`)."""

    namespaces: bool
    drop_uid: bool
    python: str | None
    reason: str


def run_python(
    code: str,
    limits: SandboxLimits | None = None,
    *,
    allow_network: bool = False,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` with ``python -I`` in the sandbox and return its exit status and (truncated) output.

    The program text goes in on stdin (``python -`` reads it all before running), so no file outside the private
    tmpfs is needed and the code cannot be read back from the host. ``allow_network=True`` is the explicit opt-in
    to run even where no network namespace can be made; ``python`` overrides the probed interpreter.

    >>> run_python("print(6 * 7)").stdout
    '42\\n'
    """
    limits = limits or SandboxLimits()
    support = sandbox_support()
    if not support.namespaces and not allow_network:
        raise SandboxUnavailable(
            "cannot isolate the network for sandboxed code on this machine "
            f"({support.reason}); refusing to run it. Pass allow_network=True to run without network isolation."
        )
    interpreter = python or support.python
    if interpreter is None:
        raise SandboxUnavailable(f"no Python interpreter runs inside the sandbox: {support.reason}")
    uid = _throwaway_uid() if support.drop_uid else None
    with tempfile.TemporaryDirectory(prefix="dsalign-sandbox-") as host_dir:
        return _run(code, limits, interpreter, uid, support.namespaces, host_dir)


def run_many(
    codes: Sequence[str],
    limits: SandboxLimits | None = None,
    *,
    max_workers: int = 2,
    allow_network: bool = False,
) -> list[SandboxResult]:
    """:func:`run_python` over many programs with at most ``max_workers`` running at once, results in order."""
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda code: run_python(code, limits, allow_network=allow_network), codes))


@functools.lru_cache(maxsize=1)
def sandbox_support() -> SandboxSupport:
    """Probe once per process which isolation works here, by running a tiny program the way real runs go.

    Checked at runtime rather than assumed: containers often ship ``unshare`` but forbid namespaces, and the
    interpreter that runs this process may sit in a directory (e.g. ``/root``) the throwaway uid cannot read.
    """
    drop_uid = os.geteuid() == 0 and shutil.which("setpriv") is not None
    candidates = list(dict.fromkeys(p for p in (sys.executable, shutil.which("python3"), "/usr/bin/python3") if p))
    probe = "import socket, sys; print(sys.version_info[0])"
    reasons = []
    for namespaces in (True, False):
        if namespaces and shutil.which("unshare") is None:
            reasons.append("no `unshare` binary")
            continue
        for interpreter in candidates:
            uid = _throwaway_uid() if drop_uid else None
            with tempfile.TemporaryDirectory(prefix="dsalign-probe-") as host_dir:
                result = _run(probe, SandboxLimits(wall_seconds=10), interpreter, uid, namespaces, host_dir)
            if result.ok and result.stdout.strip() == "3":
                reason = "ok" if namespaces else "; ".join(reasons)
                return SandboxSupport(namespaces, drop_uid, interpreter, reason)
            reasons.append(
                f"{'namespaced' if namespaces else 'plain'} run of {interpreter} failed "
                f"(rc={result.returncode}): {result.stderr.strip()[-200:]}"
            )
    return SandboxSupport(False, drop_uid, None, "; ".join(reasons))


def _run(
    code: str, limits: SandboxLimits, interpreter: str, uid: int | None, namespaces: bool, host_dir: str
) -> SandboxResult:
    """One run. ``host_dir`` (private to us) holds the output files, plus the working directory without namespaces."""
    program = [interpreter, "-I", "-"]
    if namespaces:
        cmd = _namespace_command(program, uid, limits)
        cwd = host_dir
    else:
        cwd = os.path.join(host_dir, "work")
        os.mkdir(cwd, 0o700)
        if uid is not None:
            os.chown(cwd, uid, uid)
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
        cmd = program if uid is None else drop + program
    out_path, err_path = os.path.join(host_dir, "stdout"), os.path.join(host_dir, "stderr")
    start = time.monotonic()
    # Output goes to files, not pipes: RLIMIT_FSIZE then caps it, and the parent never buffers unbounded output.
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=dict(_SCRUBBED_ENV),
            start_new_session=True,
            preexec_fn=functools.partial(_limit_child, limits),
            close_fds=True,
        )
        timed_out = _feed_and_wait(proc, code.encode(), limits.wall_seconds)
    if uid is not None:
        # Without a PID namespace, children that called setsid() escaped the process group; with one, the kernel
        # kills them asynchronously. Either way, wait here until nothing owned by the throwaway uid is left.
        _kill_uid(uid)
    elapsed = time.monotonic() - start
    returncode = proc.returncode
    if namespaces and returncode > 128:
        returncode = 128 - returncode  # the shell reports "killed by signal N" as 128+N; use Popen's -N convention
    return SandboxResult(
        returncode=returncode,
        stdout=_read_head(out_path, limits.max_output_bytes),
        stderr=_read_head(err_path, limits.max_output_bytes),
        timed_out=timed_out,
        wall_seconds=elapsed,
        isolation="namespaces" if namespaces else "none",
    )


def _namespace_command(program: list[str], uid: int | None, limits: SandboxLimits) -> list[str]:
    user = [] if uid is not None else ["--user", "--map-root-user"]  # non-root: a user namespace gives us "root"
    return [
        "unshare",
        *user,
        "--net",
        "--pid",
        "--fork",
        "--kill-child=SIGKILL",
        "--mount",
        "--propagation=private",
        "--ipc",
        "--uts",
        "--",
        "/bin/sh",
        "-c",
        _NAMESPACE_SCRIPT,
        "sandbox",
        str(uid) if uid is not None else "-",
        str(limits.tmpfs_mb * 1024),
        *program,
    ]


def _limit_child(limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec: limits are inherited by everything the code starts."""
    mb = 1024 * 1024
    for which, value in (
        (resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1)),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_AS, (limits.memory_mb * mb,) * 2),
        (resource.RLIMIT_FSIZE, (limits.file_size_mb * mb,) * 2),
        (resource.RLIMIT_NPROC, (limits.max_processes,) * 2),
        (resource.RLIMIT_NOFILE, (limits.max_open_files,) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(which, value)
    os.nice(limits.nice)


def _feed_and_wait(proc: subprocess.Popen, data: bytes, wall_seconds: float) -> bool:
    """Send the program, wait for exit; on the wall clock kill the whole group. Returns whether it timed out."""
    try:
        proc.communicate(data, timeout=wall_seconds)
        return False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers the code left in the group after the main one exited


def _kill_uid(uid: int, rounds: int = 50) -> None:
    """Kill every process owned by ``uid`` (a throwaway uid, so nothing else owns one) until none is left."""
    for _ in range(rounds):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _pids_of_uid(uid: int) -> list[int]:
    return _pids_of_uid_range(uid, uid + 1)


def _pids_of_uid_range(low: int, high: int) -> list[int]:
    """Pids whose owner uid is in ``[low, high)``, read from ``/proc``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if low <= os.stat(f"/proc/{entry}").st_uid < high:
                    pids.append(int(entry))
    return pids


def _throwaway_uid() -> int:
    """A random uid far above any real account, so per-uid limits and kills touch only this run."""
    return random.SystemRandom().randrange(*THROWAWAY_UIDS)


def _read_head(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")
