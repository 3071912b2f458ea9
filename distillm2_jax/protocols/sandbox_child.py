"""The process a candidate program runs in (`protocols.sandbox` starts it; standard library only).

Run as `python -I -B sandbox_child.py DIR CPU_S MEMORY_BYTES FSIZE_BYTES RESULT_FD HOOK` with the
result nonce on stdin (HOOK 0 leaves the audit hook out: only to test the other layers). Before
the candidate's first line it: reads the nonce and replaces stdin with /dev/null; sets the
resource limits (CPU seconds, address space, file size, processes, open files, no core dumps);
installs an audit hook (which Python code cannot remove) that refuses writes outside DIR,
process creation, signals to other processes, sockets and ctypes. It then
runs DIR/program.py and writes one JSON line `{"nonce", "status", "detail"}` to RESULT_FD:
status `passed`, `failed` (AssertionError), `memory` (MemoryError) or `error` (anything else,
SystemExit included: a program that exits early has not passed its tests).

The nonce makes an early `os._exit(0)` count as an error rather than a pass; a program written
to forge the result can still read it from this process's memory. This guards against mistakes
and accidents, not against an attacker (docs/evaluation.md, "Code").
"""
import json
import os
import resource
import signal
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Audit events refused outright (PermissionError; ImportError for ctypes, so that libraries that
# import it optionally carry on without it).
_DENIED = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "os.startfile", "os.symlink", "os.link", "os.chown", "os.lchown",
    "os.chroot", "os.setuid", "os.setgid", "pty.spawn",
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr",
    "resource.setrlimit", "resource.prlimit",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.addressof",
}
# Events whose first argument is a path that is modified (the second too, for renames).
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.truncate", "os.utime",
                "os.chflags", "os.lchflags", "os.lchmod", "os.mkfifo", "os.mknod", "shutil.rmtree"}
_TWO_PATH_EVENTS = {"os.rename", "shutil.move", "shutil.copyfile", "shutil.copytree"}


def _inside(root: str, path) -> bool:
    if isinstance(path, int):   # an open file descriptor: its file was checked when opened
        return True
    try:
        full = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return full == root or full.startswith(root + os.sep)


def _guard(root: str):
    me = os.getpid()

    def hook(event, args):
        if event in _DENIED:
            if event.startswith("ctypes"):
                raise ImportError(f"sandbox: {event} is not allowed")
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (list(args) + [None, None, 0])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writes and not _inside(root, path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in _PATH_EVENTS:
            if args and not _inside(root, args[0]):
                raise PermissionError(f"sandbox: {event} on {args[0]!r} outside the sandbox directory")
        elif event in _TWO_PATH_EVENTS:
            if not all(_inside(root, a) for a in args[:2]):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory")
        elif event == "os.killpg" or (event == "os.kill" and (not args or args[0] != me)):
            raise PermissionError(f"sandbox: {event} of another process")
    return hook


def _limits(cpu_s: int, memory: int, fsize: int) -> None:
    for limit, value in ((resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)), (resource.RLIMIT_AS, (memory, memory)),
                         (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_NPROC, (1, 1))):
        try:
            resource.setrlimit(limit, value)
        except (ValueError, OSError):   # e.g. a hard limit already lower: keep the lower one
            pass


def main() -> None:
    root, cpu_s, memory, fsize, result_fd, hook = sys.argv[1], *map(int, sys.argv[2:7])
    root = os.path.realpath(root)
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
        source = f.read()
    os.chdir(root)
    sys.path.insert(0, root)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # an oversized write raises instead of killing
    out = os.fdopen(result_fd, "w")
    _limits(cpu_s, memory, fsize)
    if hook:
        sys.addaudithook(_guard(root))
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
        status, detail = "passed", ""
    except AssertionError as err:
        status, detail = "failed", f"AssertionError: {err}"[:300]
    except MemoryError:
        namespace.clear()
        status, detail = "memory", "MemoryError"
    except BaseException as err:  # noqa: BLE001 (SystemExit and KeyboardInterrupt are failures too)
        namespace.clear()
        status, detail = "error", f"{type(err).__name__}: {err}"[:300]
    try:
        out.write(json.dumps({"nonce": nonce, "status": status, "detail": detail}) + "\n")
        out.flush()
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
