"""Start `xorserve serve` as a child process on free ports and stop it cleanly: for the demo, runners and tests.

    with ServerProcess.start("models") as server:
        ... server.url ...   # "127.0.0.1:PORT", ready to answer

Readiness is the server's own `READY grpc=HOST:PORT metrics=HOST:PORT startup_s=S` line on stdout,
not a sleep; its `NOT_READY ...` line (a model failed to load) fails the start at once. Stopping sends
SIGTERM (the server drains and exits 0) and waits. The server also gets SIGTERM if the process that
started it dies without stopping it (Linux's parent-death signal), so no server outlives its runner.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from serving.lifetime import die_with_parent

_READY = re.compile(r"^READY grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+) startup_s=(?P<startup>[0-9.]+|unknown)")
_NOT_READY = re.compile(r"^NOT_READY ")


class ServerStartError(RuntimeError):
    """The server exited or stayed silent before printing its READY line."""


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    metrics_url: str
    startup_s: float
    output: deque = field(default_factory=lambda: deque(maxlen=200))

    @classmethod
    def start(
        cls,
        model_repository: str | Path,
        extra_args: list[str] | None = None,
        timeout_s: float = 60.0,
        cpus: str | None = None,
        host: str = "127.0.0.1",
    ) -> ServerProcess:
        """Start the server on free ports and return once it is ready (or raise ServerStartError)."""
        command = [sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(model_repository)]
        command += ["--host", host, "--port", "0", "--metrics-port", "0", *(extra_args or [])]
        if cpus is not None:
            command = ["taskset", "-c", cpus, *command]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,  # in the child before exec: SIGTERM when this process dies
        )
        output: deque = deque(maxlen=200)
        ready: dict[str, str] = {}
        seen = threading.Event()

        def pump() -> None:
            # Reads the child's output for its whole life, so its pipe never fills and blocks it.
            for line in process.stdout:
                output.append(line.rstrip("\n"))
                if not seen.is_set():
                    match = _READY.match(line)
                    if match:
                        ready.update(match.groupdict())
                    if match or _NOT_READY.match(line):
                        seen.set()
            seen.set()

        threading.Thread(target=pump, name="server-output", daemon=True).start()
        try:
            started = seen.wait(timeout_s) and bool(ready)
        except BaseException:  # e.g. SIGTERM or Ctrl-C while waiting: the caller never gets the handle
            process.kill()
            process.wait()
            raise
        if not started:
            process.kill()
            process.wait()
            tail = "\n".join(list(output)[-20:])
            raise ServerStartError(f"xorserve serve did not become ready:\n{tail}")
        startup = float(ready["startup"]) if ready["startup"] != "unknown" else float("nan")
        return cls(process, ready["grpc"], ready["metrics"], startup, output)

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM, wait for the drain; SIGKILL if it outlives `timeout_s`. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
