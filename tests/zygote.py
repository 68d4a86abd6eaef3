"""A fork server for the suite's ``python -m stackgan_dist ARGS`` processes (conftest.run_cli).

Every such process spends ~1.9 s of its ~2.9 s importing torch, torch._dynamo (which torch.optim pulls in),
numpy and the package, and the suite starts a few hundred of them on two cores. The server imports all that
once per pytest worker; each command is then a real child process forked from it, which becomes
``python -m stackgan_dist ARGS`` exactly as a fresh interpreter runs it (``runpy``, same argv, environment,
working directory, stdin /dev/null, stdout/stderr pipes, normal interpreter exit with atexit and flushing),
with its own pid, exit status and signals.

What a fork cannot reproduce is what an interpreter reads from its environment while importing. So run_cli
forks only when the command runs in the repository with OMP_NUM_THREADS=1 and its environment differs from
the server's only in variables read at run time (STACKGAN_*, the launcher's RANK/WORLD_SIZE/MASTER_*,
SLURM_*); anything else (another PYTHONPATH, thread count, cwd, a DS_*/TORCH_* variable) starts a fresh
interpreter as before. STACKGAN_TEST_NO_ZYGOTE=1 turns the server off for a whole run. Commands whose
start-up itself is under test (signals during start-up, launchers, torchrun workers) never come here: they
use conftest.start / torchrun.
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile

SERVER = r'''
import json, os, select, socket, sys
path = sys.argv[1]
import torch, torch._dynamo  # noqa: E401,F401 -- the imports every command pays
import numpy, PIL.Image  # noqa: E401,F401
import stackgan_dist.cli, stackgan_dist.train, stackgan_dist.inference  # noqa: E401,F401
import stackgan_dist.data.prepare.prepare_cli, stackgan_dist.evaluation.run_eval  # noqa: E401,F401
threads = len(os.listdir("/proc/self/task"))
if threads != 1:  # a fork copies one thread: a server with more could hand a child a held lock
    print(f"not forking: the server has {threads} threads after its imports", flush=True)
    sys.exit(1)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(8)
print("ready", flush=True)


def serve():
    while True:
        ready, _, _ = select.select([srv, sys.stdin], [], [])
        if sys.stdin in ready:  # the pytest worker closed our stdin (or died): done
            sys.exit(0)
        conn, _ = srv.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
        while not msg.endswith(b"\n"):
            msg += conn.recv(1 << 22)
        pid = os.fork()
        if pid == 0:
            srv.close()
            return conn, json.loads(msg), fds
        for fd in fds:
            os.close(fd)
        conn.sendall(b"%d\n" % pid)
        _, status = os.waitpid(pid, 0)
        conn.sendall(b"%d\n" % status)
        conn.close()


conn, req, fds = serve()
# the child: from here on `python -m stackgan_dist ARGS`, as a fresh interpreter would run it
conn.close()
for target, fd in enumerate(fds):
    os.dup2(fd, target)
for fd in fds:
    if fd > 2:
        os.close(fd)
os.chdir(req["cwd"])
os.environ.clear()
os.environ.update(req["env"])
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.argv = ["-m", *req["args"]]
del conn, req, fds, path
import runpy  # noqa: E402
runpy.run_module("stackgan_dist", run_name="__main__", alter_sys=True)
'''

# variables a command reads only when it runs (never while importing): a fork may hand these over
RUNTIME_PREFIXES = ("STACKGAN_", "SLURM_", "PYTEST_")
RUNTIME_KEYS = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID"}


def _translate(data: bytes) -> str:
    """What ``subprocess.run(..., text=True)`` makes of a stream."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


class Zygote:
    def __init__(self, py: str, cwd: str):
        self.cwd = cwd
        self.env = dict(os.environ, OMP_NUM_THREADS="1")
        self.dir = tempfile.mkdtemp(prefix="stackgan-zygote-")
        self.path = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen([py, "-c", SERVER, self.path], cwd=cwd, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        self.ok = line == "ready"
        if not self.ok:
            sys.stderr.write(f"tests/zygote.py: no fork server ({line or 'it exited'}); fresh interpreters\n")
            self.close()
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the server exits on EOF
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass

    def accepts(self, env: dict, cwd: str) -> bool:
        if not self.ok or self.proc.poll() is not None or os.path.realpath(cwd) != os.path.realpath(self.cwd):
            return False
        if env.get("OMP_NUM_THREADS") != "1":
            return False
        for k in set(env) | set(self.env):
            if env.get(k) != self.env.get(k) and not (k.startswith(RUNTIME_PREFIXES) or k in RUNTIME_KEYS):
                return False
        return True

    def run(self, args: list[str], env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
        """``python -m stackgan_dist ARGS`` as a child of the server; the same result subprocess.run gives."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
            msg = json.dumps({"args": args, "env": env, "cwd": cwd}).encode() + b"\n"
            socket.send_fds(s, [msg], [devnull, out_w, err_w])
        finally:
            for fd in (devnull, out_w, err_w):
                os.close(fd)
        chunks = {out_r: [], err_r: []}
        reply = b""
        pid = None
        sel = selectors.DefaultSelector()
        for fd in (out_r, err_r):
            sel.register(fd, selectors.EVENT_READ)
        sel.register(s, selectors.EVENT_READ)
        deadline = _now() + timeout
        timed_out = False
        try:
            while sel.get_map():
                left = deadline - _now()
                if left <= 0 and not timed_out:
                    timed_out = True
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)  # what subprocess.run does on its timeout
                for key, _ in sel.select(timeout=max(left, 0.1) if not timed_out else 1.0):
                    if key.fileobj is s:
                        data = s.recv(4096)
                        reply += data
                        if pid is None and b"\n" in reply:
                            pid = int(reply.split(b"\n", 1)[0])
                            if timed_out:
                                os.kill(pid, signal.SIGKILL)
                        if not data:
                            sel.unregister(s)
                    else:
                        data = os.read(key.fileobj, 1 << 16)
                        if data:
                            chunks[key.fileobj].append(data)
                        else:
                            sel.unregister(key.fileobj)
        finally:
            sel.close()
            s.close()
            os.close(out_r)
            os.close(err_r)
        lines = reply.split(b"\n")
        if len(lines) < 3:
            raise RuntimeError(f"the fork server lost the command {args} (reply {reply!r})")
        rc = os.waitstatus_to_exitcode(int(lines[1]))
        stdout, stderr = (_translate(b"".join(chunks[fd])) for fd in (out_r, err_r))
        cmd = [sys.executable, "-m", "stackgan_dist", *args]
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, rc, stdout, stderr)


def _now() -> float:
    import time

    return time.monotonic()


_ZYGOTE: Zygote | None = None


def zygote(py: str, cwd: str) -> Zygote | None:
    """This pytest worker's server, started on first use; None where STACKGAN_TEST_NO_ZYGOTE=1."""
    global _ZYGOTE
    if os.environ.get("STACKGAN_TEST_NO_ZYGOTE", "") not in ("", "0"):
        return None
    if _ZYGOTE is None:
        _ZYGOTE = Zygote(py, cwd)
    return _ZYGOTE
