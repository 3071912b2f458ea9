"""The code sandbox: right, wrong, looping, memory-hungry, escaping and forking programs each end
with a clean status, nothing is written outside, and no process they start survives."""
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from distillm2_jax.protocols import sandbox
from distillm2_jax.protocols.sandbox import Limits, run_program, run_programs

# Generous timeouts where the program must end by itself: CI's two cores are busy compiling.
FAST = Limits(timeout=20.0, memory_mb=256)
ISOLATIONS = ["auto", "none"] if sandbox.namespaces_available() else ["none"]


def _processes_with(marker: str) -> list[int]:
    """Pids whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_statuses_of_typical_programs():
    programs = {
        "passed": "def f(x):\n    return x + 1\nassert f(1) == 2\n",
        "failed": "def f(x):\n    return x\nassert f(1) == 2, 'f(1) should be 2'\n",
        "error": "def f(:\n    pass\n",
        "error ": "raise ValueError('boom')\n",
        "memory": "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n",
        "memory ": "x = bytearray(10 ** 10)\n",
    }
    outcomes = run_programs(list(programs.values()), FAST, workers=3)   # side by side: independent
    assert [o.status for o in outcomes] == [k.strip() for k in programs]
    assert "f(1) should be 2" in outcomes[1].detail and "SyntaxError" in outcomes[2].detail
    assert "ValueError: boom" in outcomes[3].detail


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    out = run_program("while True:\n    pass\n", Limits(timeout=1.0))
    assert out.status == "timeout"
    assert 1.0 <= time.monotonic() - start < 10.0


def test_early_exits_do_not_count_as_passing():
    assert run_program("import os\nos._exit(0)\nassert False\n", FAST).status == "error"
    out = run_program("import sys\nsys.exit(0)\n", FAST)
    assert out.status == "error" and "SystemExit" in out.detail


def test_no_write_outside_the_sandbox(tmp_path):
    targets = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt", tmp_path / "d"]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    program = "\n".join([
        "import os, shutil",
        "open('inside.txt', 'w').write('ok')      # its own directory is writable",
        "assert open('inside.txt').read() == 'ok'",
        "tries = 0",
        f"for attempt in (lambda: open({str(targets[0])!r}, 'w').write('x'),",
        f"                lambda: os.close(os.open({str(targets[1])!r}, os.O_WRONLY | os.O_CREAT)),",
        f"                lambda: os.rename('inside.txt', {str(targets[2])!r}),",
        f"                lambda: os.mkdir({str(targets[3])!r}),",
        f"                lambda: os.remove({str(victim)!r}),",
        f"                lambda: os.symlink({str(victim)!r}, 'link'),",
        f"                lambda: open({str(victim)!r}, 'a').write('x')):",
        "    try:",
        "        attempt()",
        "    except PermissionError:",
        "        tries += 1",
        "assert tries == 7, tries",
    ])
    out = run_program(program, FAST)
    assert out.status == "passed", out.detail
    assert not any(t.exists() for t in targets)
    assert victim.read_text() == "keep"


def test_home_tmpdir_and_cwd_are_the_sandbox_and_stdin_is_closed():
    program = ("import os, sys, tempfile\ncwd = os.getcwd()\n"
               "assert os.environ['HOME'] == cwd and tempfile.gettempdir() == cwd, (cwd, os.environ['HOME'])\n"
               "assert sys.stdin.read() == ''\n")
    out = run_program(program, FAST)
    assert out.status == "passed", out.detail


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_fork_loop_is_contained(isolation):
    out = run_program("import os\nwhile True:\n    os.fork()\n", Limits(timeout=20.0, isolation=isolation))
    assert out.status == "error" and "os.fork" in out.detail


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_process_survives_even_without_the_audit_hook(isolation):
    """The OS layers alone (namespaces, else the process group and the environment marker): the
    program's children leave its process group and session, and still all die with it."""
    marker = uuid.uuid4().hex
    program = (f"import os, sys, time\nfor _ in range(8):\n    if os.fork() == 0:\n        os.setsid()\n"
               f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
               "time.sleep(60)\n")
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        out=run_program(program, Limits(timeout=8.0, isolation=isolation, audit_hook=False))))
    runner.start()
    seen = 0
    deadline = time.monotonic() + 7.5
    while time.monotonic() < deadline and seen < 8:   # they really ran
        time.sleep(0.1)
        seen = max(seen, len(_processes_with(marker)))
    runner.join()
    assert seen == 8
    assert result["out"].status == "timeout"
    time.sleep(0.2)
    assert _processes_with(marker) == []


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    program = (f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
               "s.sendall(b'hello')\n")
    try:
        out = run_program(program, FAST)
        with pytest.raises(OSError):   # nobody came
            server.accept()
    finally:
        server.close()
    assert out.status == "error"


def test_the_evaluator_survives_everything():
    """After all of the above in one batch, this process and its working directory are intact."""
    cwd, pid = os.getcwd(), os.getpid()
    outs = run_programs(["import os\nos.kill(os.getppid(), 9)\n", "import signal, os\nos.killpg(0, 9)\n",
                         "import os\nos.chdir('/')\nos.remove('/etc/hostname')\n"], FAST, workers=3)
    assert os.getcwd() == cwd and os.getpid() == pid
    assert [o.status for o in outs] == ["error"] * 3
    assert all("PermissionError" in o.detail for o in outs)
