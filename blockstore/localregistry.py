"""A CNCF distribution registry on loopback, for the demo and local trials.

It runs Debian's ``docker-registry`` with a config written here: listening
on 127.0.0.1 only, storing blobs in a directory of the caller's.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

from blockstore.errors import MissingDependency, RegistryUnreachable


class LocalRegistry:
    """One ``docker-registry serve`` process on 127.0.0.1 and a free port."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log_path = workdir / "registry.log"
        self._process: subprocess.Popen | None = None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise MissingDependency("docker-registry is not installed (Debian: docker-registry)")
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")}},
            "http": {"addr": self.host},
        }
        config_path = self.workdir / "registry.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RegistryUnreachable(f"the local registry exited; see {self.log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RegistryUnreachable(f"the local registry did not listen in {timeout}s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None
