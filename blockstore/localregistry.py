"""A CNCF distribution registry on loopback, for the demo and local trials.

It runs Debian's ``docker-registry`` with a config written here: listening
on 127.0.0.1 only, storing blobs in a directory of the caller's. ``stop()``
and ``start()`` keep the port and the storage, so the same registry can be
taken down and brought back. The process gets SIGTERM if its parent dies,
even by SIGKILL, so nothing is left listening behind an interrupted run.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from blockstore.errors import MissingDependency, RegistryUnreachable
from blockstore.parentdeath import dies_with_parent


class LocalRegistry:
    """One ``docker-registry serve`` process on 127.0.0.1 and a free port.

    ``settings`` are merged into the config, one level deep (``http``,
    ``storage``) and set whole otherwise (``auth``, ``proxy``).
    """

    def __init__(self, workdir: Path, *, settings: dict | None = None, scheme: str = "http"):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "registry.log"
        self.config_path = workdir / "registry.yml"
        self._process: subprocess.Popen | None = None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{scheme}://{self.host}"
        config: dict = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.data_dir)}},
            "http": {"addr": self.host},
        }
        for key, value in (settings or {}).items():
            if isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        self.config = config

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            return
        binary = shutil.which("docker-registry")
        if binary is None:
            raise MissingDependency("docker-registry is not installed (Debian: docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=dies_with_parent(signal.SIGTERM),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RegistryUnreachable(f"the local registry exited:\n{self.log_tail()}")
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

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
