"""Acceptance 2: math_accuracy on a table of answers, and proof that model text never reaches eval."""

import builtins
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from dsalign.rewards import extract_answer, math_accuracy
from dsalign.rewards.isolated import TIMED_OUT, IsolatedScorer

# (completion, gold, expected reward)
CASES = [
    # fractions and equivalent forms
    (r"So the answer is \boxed{\frac{1}{2}}.", "1/2", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    # LaTeX shorthand without braces (math-verify's malformed_operators / nits normalization)
    (r"\boxed{\frac12}", "1/2", 1.0),
    (r"\boxed{\dfrac34}", "0.75", 1.0),
    (r"\boxed{\sqrt2}", r"\sqrt{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", r"\frac12", 1.0),
    (r"\boxed{\dfrac{2}{4}}", r"\tfrac{1}{2}", 1.0),
    (r"\boxed{1/3}", r"\frac{1}{3}", 1.0),
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    (r"\boxed{\pi}", r"\pi", 1.0),
    (r"\boxed{3.14}", r"\pi", 0.0),
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{\{2, 1\}}", r"\{1, 2\}", 1.0),
    (r"\boxed{-7}", "-7", 1.0),
    (r"\boxed{7}", "-7", 0.0),
    (r"\boxed{1,000}", "1000", 1.0),
    # LaTeX wrappers, units, text
    (r"The area is \boxed{12\text{ cm}^2}", "12", 1.0),
    (r"\boxed{12 \text{ cm}}", "12", 1.0),
    (r"\boxed{\$5}", "5", 1.0),
    (r"\boxed{\left(\frac{3}{4}\right)}", "0.75", 1.0),
    # "answer is" and last-number fallbacks
    ("The answer is 42.", "42", 1.0),
    ("Therefore, the final answer is $\\frac{3}{4}$.", "0.75", 1.0),
    ("Answer: 17", "17", 1.0),
    ("3 apples plus 4 apples make 7 apples", "7", 1.0),
    ("3 apples plus 4 apples make 8 apples", "7", 0.0),
    # reasoning handling
    (r"<think>maybe 5</think> The answer is \boxed{6}", "6", 1.0),
    (r"<think>the answer is \boxed{6}</think> I now think \boxed{5}", "6", 0.0),
    (r"<think>I keep thinking about \boxed{6}", "6", 0.0),  # cut off before answering
    # no answer
    ("I don't know.", "6", 0.0),
    ("", "6", 0.0),
    (r"\boxed{}", "6", 0.0),
    (r"\boxed{6", "6", 0.0),  # unclosed box: cut off mid-answer; the 6 inside must not count
    # gold from a full solution column, and unusable gold
    (r"\boxed{9}", r"We compute 3^2 and get \boxed{9}.", 1.0),
    (r"\boxed{9}", "", None),
    (r"\boxed{9}", None, None),
    # adversarial strings: must not be executed, must not score
    (r"\boxed{__import__('os').system('touch /tmp/pwned')}", "0", 0.0),
    ("The answer is __import__('os').getcwd()", "0", 0.0),
    (r"\boxed{eval('1+1')}", "2", 0.0),
    (r"\boxed{exec(\"import os\")}", "2", 0.0),
    # answers sympy would take unbounded time on: compared in the killable child process
    (r"\boxed{10^{10^{10}}}", "5", 0.0),
    (r"\boxed{99999!}", "5", 0.0),
    (r"\boxed{5!}", "120", 1.0),
    (r"\boxed{\binom{5}{2}}", "10", 1.0),
    # markdown emphasis is not part of the answer; Python's ** is a power
    ("The answer is **42**.", "42", 1.0),
    ("**Answer:** 42", "42", 1.0),
    ("So it is *7*", "7", 1.0),
    (r"\boxed{2**10}", "1024", 1.0),
    (r"\boxed{2 * 3}", "6", 1.0),
    ("\\boxed{" + "1+" * 400 + "1}", "401", 0.0),  # over the answer length cap
]


@pytest.mark.parametrize(("completion", "gold", "expected"), CASES)
def test_math_accuracy_table(completion, gold, expected):
    assert math_accuracy(["q"], [completion], answer=[gold]) == [expected]


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_conversational_completion_and_solution_column():
    completions = [[{"role": "assistant", "content": r"\boxed{\frac{1}{3}}"}]]
    assert math_accuracy([[{"role": "user", "content": "q"}]], completions, solution=[r"\frac{1}{3}"]) == [1.0]


def test_missing_gold_column_names_the_columns():
    with pytest.raises(ValueError, match=r"'answer' or 'solution'.*\['tests'\]"):
        math_accuracy(["q"], ["1"], tests=["x"])


def test_model_text_never_reaches_eval(monkeypatch, tmp_path):
    """Every eval/exec while scoring the adversarial rows fails the test (sympy's parse_expr goes through eval)."""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args[0] if args else "")
        raise AssertionError(f"eval/exec called on {args[:1]!r}")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    rows = [c for c in CASES if "import" in c[0] or "eval" in c[0] or "exec" in c[0]]
    for completion, gold, expected in rows:
        assert math_accuracy(["q"], [completion], answer=[gold]) == [expected]
    assert calls == []


def test_extract_answer_priorities():
    assert extract_answer(r"answer is 3, so \boxed{4}") == "4"
    assert extract_answer("The answer is 3. Then 5 more.") == "3"
    assert extract_answer("no digits here") is None


def test_unbounded_comparison_is_killed_and_the_scorer_recovers():
    """A comparison that overruns its wall clock kills the child (it cannot block this process: sympy's bignum work
    holds the GIL) and the next comparison starts a fresh one."""
    scorer = IsolatedScorer(timeout_s=0.5)
    try:
        start = time.monotonic()
        assert scorer.score(r"10^{9999 \cdot 9999}", "7") is TIMED_OUT
        assert time.monotonic() - start < 5
        assert scorer.score("2^{10}", "1024") == 1.0
        assert scorer.restarts == 2
    finally:
        scorer.close()


def test_slow_answers_do_not_stall_other_threads():
    """While a huge power is being compared, this process's other threads (the trainer's) keep running."""
    beats, done = [], threading.Event()

    def heartbeat():
        while not done.is_set():
            beats.append(time.monotonic())
            time.sleep(0.01)

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    start = time.monotonic()
    assert math_accuracy(["q"], [r"\boxed{10^{9999 \cdot 9999}}"], answer=["7"]) == [0.0]
    elapsed = time.monotonic() - start
    done.set()
    thread.join()
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert max(gaps) < 0.5, f"a thread stalled for {max(gaps):.2f} s during a {elapsed:.1f} s comparison"


def test_exit_kills_a_busy_child_without_waiting_for_its_lock():
    """At interpreter exit an abandoned reward thread may still hold the scorer's lock while it waits on a long
    comparison: the exit hook kills the child at once instead of blocking (or leaving it computing)."""
    scorer = IsolatedScorer(timeout_s=30)
    assert scorer.score("2^{3}", "8") == 1.0  # the child is up
    results = []
    busy = threading.Thread(target=lambda: results.append(scorer.score(r"10^{9999 \cdot 9999}", "7")), daemon=True)
    busy.start()
    time.sleep(0.5)  # the busy thread holds the lock, waiting on the child
    proc = scorer._proc
    start = time.monotonic()
    scorer._kill_at_exit()
    assert proc.wait(timeout=5) != 0 and time.monotonic() - start < 5
    busy.join(timeout=10)
    assert results == [TIMED_OUT]  # its wait ended with the child
    scorer.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_dies_with_a_sigkilled_parent(tmp_path):
    """A trainer killed with SIGKILL (a Ray actor's end, the OOM killer) runs no exit hook; its scorer child, busy in a
    computation that holds the GIL, must still not outlive it. The child is started from a thread that has ended by
    the time the parent dies (the kernel's parent-death signal follows the forking thread, so the scorer forks from
    a long-lived thread of its own)."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import threading\n"
        "from dsalign.rewards.isolated import IsolatedScorer\n"
        "scorer = IsolatedScorer(timeout_s=600)\n"
        "starter = threading.Thread(target=lambda: scorer.score('2^{3}', '8'))\n"
        "starter.start(); starter.join()  # the thread that asked for the child is gone\n"
        "print(scorer._proc.pid, flush=True)\n"
        "scorer.score(r'10^{9999 \\cdot 9999}', '7')  # the child computes for a very long time\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = -1
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.5)  # the child is inside the huge power now, until math-verify's own 3 s timeout
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 1.0  # well before that timeout would end the comparison anyway
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), "the scorer child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_outlives_the_thread_that_started_it():
    """The parent-death signal must follow the process, not the reward thread that first asked for a score."""
    scorer = IsolatedScorer(timeout_s=30)
    try:
        starter = threading.Thread(target=lambda: scorer.score("2^{3}", "8"))
        starter.start()
        starter.join()
        proc = scorer._proc
        time.sleep(0.5)
        assert proc.poll() is None, f"the child died with its starting thread (exit {proc.returncode})"
        assert scorer.score("2^{10}", "1024") == 1.0 and scorer.restarts == 1
    finally:
        scorer.close()


def _alive(pid: int) -> bool:
    """A live process, not a zombie (an orphan waits for init to reap it, or for nobody in a container without one)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
