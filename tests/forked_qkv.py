"""`qkv` commands for the tests without paying PyTorch's import each time (~1.3 s of the ~2 s a short
command takes; the suite runs ~80 of them).

A server process imports torch and qkv's command line once, then forks a child for each command: the
child is a process of its own, with the caller's standard input, output and error (passed over a
Unix socket), arguments, environment and folder, and runs `python -m qkv` as that would. The caller is
this file run as a script (`python forked_qkv.py SOCKET ARGS...`, which imports no torch): it relays
the signals it gets to the child and exits as the child did, so `subprocess.run` sees what it would
have seen of `python -m qkv`. An environment that changes what an import does (ATEN_CPU_CAPABILITY,
OMP_NUM_THREADS, ...) cannot be forked from a server that imported with another: then, or without a
server, the caller runs `python -m qkv` itself."""

import contextlib
import json
import os
import select
import signal
import socket
import sys
import traceback

# The variables that may differ between the server's environment and a command's: read when a
# command runs, not when torch or qkv is imported (kernels.py reads QKV_FAST_KERNELS on import).
# Inductor writes the last two into the environment of a test process once it has compiled there
# (its cache folder, and an address it sets again before each load), and reads them when it uses them.
RUN_TIME_VARIABLES = (
    "PYTEST_CURRENT_TEST", "COLUMNS", "LINES", "_", "PWD", "OLDPWD", "SHLVL",
    "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
)  # fmt: skip
RUN_TIME_PREFIX = "QKV_"
IMPORT_TIME_VARIABLES = ("QKV_FAST_KERNELS",)


def forkable(server_env: dict[str, str], env: dict[str, str]) -> bool:
    """Whether a command with `env` can be forked from a server that started with `server_env`."""
    for name in server_env.keys() | env.keys():
        if server_env.get(name) == env.get(name) or name in RUN_TIME_VARIABLES:
            continue
        if name.startswith(RUN_TIME_PREFIX) and name not in IMPORT_TIME_VARIABLES:
            continue
        return False
    return True


# -- the caller ------------------------------------------------------------------------------------


def call(socket_path: str, args: list[str]) -> None:
    """Run `qkv ARGS` in a child of the server at `socket_path`, or as `python -m qkv` where it
    cannot; exit as the command did."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(socket_path)
    except OSError:
        run_here(args)
    request = {"args": args, "env": dict(os.environ), "cwd": os.getcwd()}
    socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    replies = connection.makefile("r")
    started = json.loads(replies.readline())
    if "pid" not in started:
        connection.close()
        run_here(args)
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(number, lambda number, _: os.kill(started["pid"], number))
    status = int(json.loads(replies.readline())["status"])
    if os.WIFSIGNALED(status):  # end by the same signal, as the command's process did
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    sys.exit(os.waitstatus_to_exitcode(status))


def run_here(args: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-m", "qkv", *args])


# -- the server ------------------------------------------------------------------------------------


def serve(socket_path: str) -> None:
    import torch  # noqa: F401  what every command imports first, and the cost saved

    import qkv.cli  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(8)
    server_env = dict(os.environ)
    print("ready", flush=True)
    while True:
        connection, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        request = json.loads(message.split(b"\n", 1)[0])
        if len(fds) != 3 or not forkable(server_env, request["env"]):
            differ = sorted(k for k in server_env.keys() | request["env"].keys()
                            if server_env.get(k) != request["env"].get(k))  # fmt: skip
            print(f"refused {request['args'][:1]}: {differ}", file=sys.stderr, flush=True)
            connection.sendall(b'{"refused": true}\n')
        else:
            pid = os.fork()
            if pid == 0:
                listener.close()
                connection.close()
                try:
                    run_command(request, fds)  # never returns
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
            connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            status = wait_for(pid, connection)
            connection.sendall(json.dumps({"status": status}).encode() + b"\n")
        for fd in fds:
            os.close(fd)
        connection.close()


def wait_for(pid: int, connection: socket.socket) -> int:
    """The child's wait status; a caller that went away (killed at its timeout) takes the child
    with it."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        readable, _, _ = select.select([connection], [], [], 0.02)
        if readable and not connection.recv(1, socket.MSG_PEEK):
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]


def run_command(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python -m qkv ARGS` in the caller's folder and environment, on
    its standard streams; exit as the interpreter would."""
    import runpy
    import threading

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdin = sys.__stdin__ = standard_stream(0, sys.stdin)
    sys.stdout = sys.__stdout__ = standard_stream(1, sys.stdout)
    sys.stderr = sys.__stderr__ = standard_stream(2, sys.stderr)
    sys.path[0] = request["cwd"]  # as `python -m` puts it
    sys.argv = ["-m", *request["args"]]  # runpy puts the module's path first
    code: object = 0
    try:
        runpy.run_module("qkv", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit.code
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    # What the interpreter does as it ends: wait for threads, run atexit, flush the streams.
    threading._shutdown()  # type: ignore[attr-defined]
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(
            OSError, ValueError
        ):  # a reader that went away: Python says nothing
            stream.flush()
    os._exit(code)


def standard_stream(fd: int, like):
    """sys.stdin, stdout or stderr on `fd` as the interpreter makes them at start: as `like` (its
    encoding, errors, and whether buffered: PYTHONUNBUFFERED), newline "\\n", line-buffered on a
    terminal, and stderr always."""
    import io

    writing = fd != 0
    raw = io.FileIO(fd, "wb" if writing else "rb", closefd=False)
    buffered = hasattr(like.buffer, "raw")
    raw.name = (like.buffer.raw if buffered else like.buffer).name  # '<stdin>', '<stdout>', ...
    if writing and not buffered:
        binary = raw
    else:
        binary = io.BufferedWriter(raw) if writing else io.BufferedReader(raw)
    return io.TextIOWrapper(
        binary,
        encoding=like.encoding,
        errors=like.errors,
        newline="\n",
        line_buffering=buffered and (os.isatty(fd) or fd == 2),
        write_through=not buffered,
    )


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        call(sys.argv[1], sys.argv[2:])
