"""Acceptance 3: hostile programs are contained or denied, return within their limit, and leave nothing behind."""

import os
import shutil
import socket
import tempfile
import time

import pytest
from dsalign.rewards import sandbox
from dsalign.rewards.sandbox import SandboxLimits, SandboxSupport, SandboxUnavailable, run_many, run_python

# Tight limits: the test machine is shared. Every run also has a wall clock.
LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=2.0, memory_mb=256, max_processes=8, file_size_mb=8, tmpfs_mb=16)
SLACK_S = 3.0  # process start-up and teardown on a loaded 2-core machine

needs_namespaces = pytest.mark.skipif(
    not sandbox.sandbox_support().namespaces, reason=f"no namespaces here: {sandbox.sandbox_support().reason}"
)


def leftover_sandbox_processes() -> list[int]:
    """Processes owned by any throwaway sandbox uid."""
    return sandbox._pids_of_uid_range(*sandbox.THROWAWAY_UIDS)


def run(code: str, limits: SandboxLimits = LIMITS):
    start = time.monotonic()
    result = run_python(code, limits)
    assert time.monotonic() - start < limits.wall_seconds + SLACK_S, "the call outlived its time limit"
    assert leftover_sandbox_processes() == [], "sandboxed processes survived the run"
    return result


@needs_namespaces
def test_infinite_loop_is_stopped_by_cpu_limit():
    result = run("while True:\n    pass")
    assert not result.ok and result.returncode in (-24, -9)  # SIGXCPU at the soft limit, SIGKILL at the hard one


@needs_namespaces
def test_sleeping_forever_is_stopped_by_wall_clock():
    result = run("import time\ntime.sleep(3600)")
    assert result.timed_out and result.returncode < 0


@needs_namespaces
def test_fork_bomb_is_capped_and_killed():
    code = (
        "import os\ncount = 0\nwhile True:\n    try:\n        os.fork()\n        count += 1\n"
        "    except OSError:\n        print('fork refused', flush=True)\n        break\n"
        "while True:\n    pass\n"
    )
    result = run(code)
    assert "fork refused" in result.stdout  # RLIMIT_NPROC bit (as a non-root uid)
    assert not result.ok


@needs_namespaces
def test_setsid_escapees_die_with_the_sandbox():
    code = (
        "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(3600)\n"
        "print('parent exits')\n"
    )
    result = run(code)  # `run` asserts that nothing owned by the sandbox uid is left
    assert result.ok and "parent exits" in result.stdout


@needs_namespaces
def test_ten_gigabyte_allocation_fails():
    result = run("b = bytearray(10 * 1024**3)")
    assert "MemoryError" in result.stderr


@needs_namespaces
def test_one_gigabyte_file_is_refused():
    code = "f = open('big', 'wb')\nfor _ in range(1024):\n    f.write(b'x' * 1024 * 1024)\n"
    result = run(code)
    assert "File too large" in result.stderr


@needs_namespaces
def test_files_written_do_not_reach_the_host(tmp_path):
    marker = f"dsalign-sandbox-marker-{os.getpid()}"
    result = run(f"open('/tmp/{marker}', 'w').write('x')\nopen('/var/tmp/{marker}', 'w').write('x')\nprint('ok')")
    assert result.ok
    assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/var/tmp/{marker}")


@needs_namespaces
def test_filesystem_reads_world_readable_only():
    code = (
        "import os\nprint(open('/etc/hostname').read().strip() != '')\nprint(os.getcwd(), os.listdir('.'))\n"
        "try:\n    os.listdir('/root')\n    print('root readable')\nexcept PermissionError:\n    print('root denied')\n"
    )
    result = run(code)
    # Documented: world-readable host files such as /etc/hostname ARE readable; private ones are not.
    assert result.stdout.splitlines() == ["True", "/tmp/work []", "root denied"]


@needs_namespaces
def test_socket_to_localhost_fails_although_host_listens():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the host can connect
        code = f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        code += "    print('connected')\nexcept OSError as e:\n    print('denied', e.errno)\n"
        result = run(code)
    assert result.stdout.startswith("denied")


@needs_namespaces
def test_parent_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("DSALIGN_TEST_SECRET", "hunter2")
    code = (
        f"import os\nprint(os.environ.get('DSALIGN_TEST_SECRET'))\nprint(sorted(os.environ))\n"
        f"try:\n    open('/proc/{os.getpid()}/environ', 'rb').read()\n    print('read parent env')\n"
        "except OSError as e:\n    print('denied', type(e).__name__)\n"
    )
    lines = run(code).stdout.splitlines()
    assert lines[0] == "None"
    assert "DSALIGN_TEST_SECRET" not in lines[1]
    assert lines[2] == "denied PermissionError"


@needs_namespaces
def test_pool_runs_in_order_and_bounded():
    results = run_many([f"print({i} * {i})" for i in range(4)], LIMITS, max_workers=2)
    assert [r.stdout.strip() for r in results] == ["0", "1", "4", "9"]
    assert all(r.isolation == "namespaces" for r in results)


def test_refuses_without_network_isolation_unless_opted_in(monkeypatch):
    real = sandbox.sandbox_support()
    if real.python is None:
        pytest.skip(f"no sandbox interpreter: {real.reason}")
    fake = SandboxSupport(namespaces=False, drop_uid=real.drop_uid, python=real.python, reason="no netns (test)")
    monkeypatch.setattr(sandbox, "sandbox_support", lambda: fake)
    with pytest.raises(SandboxUnavailable, match=r"no netns \(test\).*allow_network=True"):
        run_python("print(1)", LIMITS)
    monkeypatch.setenv("DSALIGN_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(os.environ.get('DSALIGN_TEST_SECRET'))", LIMITS, allow_network=True)
    assert result.stdout.strip() == "None" and result.isolation == "none"


@needs_namespaces
def test_unix_socket_under_run_is_unreachable():
    """A host daemon's socket under /run (docker, dbus, postgres) is a path, not a network address: the network
    namespace does not hide it, the private tmpfs over /run does."""
    if os.geteuid() != 0 or not os.access("/run", os.W_OK):
        pytest.skip("needs root and a writable /run to plant a host socket there")
    host_dir = tempfile.mkdtemp(prefix="dsalign-test-", dir="/run")
    try:
        os.chmod(host_dir, 0o755)
        path = os.path.join(host_dir, "sock")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            os.chmod(path, 0o777)
            server.listen(8)  # room for the unaccepted host and sandbox connections: a full backlog blocks
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)  # the host can connect, and the socket is world-accessible
            paths = [path, "/var/run" + path[len("/run") :]]
            code = (
                f"import os, socket\nfor path in {paths!r}:\n    s = socket.socket(socket.AF_UNIX)\n"
                "    try:\n        s.connect(path)\n        print('connected')\n"
                "    except OSError as e:\n        print('denied', type(e).__name__)\n"
                "open('/run/lock/x', 'w').write('x')\nprint(sorted(os.listdir('/run')))\n"
            )
            result = run(code)
    finally:
        shutil.rmtree(host_dir)
    assert result.stdout.splitlines() == ["denied FileNotFoundError"] * 2 + ["['lock']"], result.stderr
