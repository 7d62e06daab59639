"""Helpers shared by the browser and Tk client tests: a handler in a subprocess, Debian packages
the tests need, and an X display.

The server runs as a real `python -m handler` process because these tests drive it from outside
trio (Playwright's sync API, Tk's main loop) and because one test restarts it on the same port.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
ARTIFACTS: Final = REPO_ROOT / "test-artifacts"
DOCS: Final = REPO_ROOT / "docs"
START_TIMEOUT_S: Final = 20.0
JWT_SECRET: Final = "client-tests-secret-0123456789abcdef"


def load_test_client() -> ModuleType:
    """Import the repository's `test_client.py`, a script at the root rather than a package."""
    if "test_client" in sys.modules:
        return sys.modules["test_client"]
    spec = importlib.util.spec_from_file_location("test_client", REPO_ROOT / "test_client.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_client"] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A port the kernel just handed out; the server binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_debian_packages(binary: str, *packages: str) -> str | None:
    """Install `packages` with apt-get when `binary` is missing; returns why not, or None.

    Tests call this from a session fixture and skip with the returned reason: a machine without
    root or without the Debian archive cannot run them, every other machine can.
    """
    if shutil.which(binary) or Path(binary).exists():
        return None
    if shutil.which("apt-get") is None:
        return f"{binary} is missing and apt-get is not available to install {' '.join(packages)}"
    reason = _apt_get_install(packages)
    if reason is not None:
        return reason
    if shutil.which(binary) or Path(binary).exists():
        return None
    return f"installed {' '.join(packages)} but {binary} is still missing"


def ensure_tkinter() -> str | None:
    """Make `import tkinter` work; returns why it cannot, or None.

    Debian and Ubuntu ship Tk for their own Python separately, as `python3-tk`: for that Python
    (or a venv made from it) it is installed like the other packages the client tests need.
    Any other Python without Tk was built without it, and only the reason is returned.
    """
    try:
        importlib.import_module("tkinter")
    except ImportError as error:
        problem = f"{type(error).__name__}: {error}"
    else:
        return None
    hint = "the Tk client tests need Tk for Python (Debian/Ubuntu: apt-get install python3-tk)"
    if sys.base_prefix != "/usr" or shutil.which("apt-get") is None:
        return f"{hint}; this Python has none ({problem})"
    reason = _apt_get_install(("python3-tk",))
    if reason is not None:
        return f"{hint}; {reason}"
    importlib.invalidate_caches()
    try:
        importlib.import_module("tkinter")
    except ImportError as error:
        return f"installed python3-tk but tkinter still fails to import: {error}"
    return None


def _apt_get_install(packages: tuple[str, ...]) -> str | None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            return f"could not install {' '.join(packages)}: {' '.join(tail) or 'apt-get failed'}"
    return None


class HandlerProcess:
    """`python -m handler` on a fixed port with its own SQLite file; can be killed and restarted."""

    def __init__(self, workdir: Path, *, extra: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "config.json"
        self._config: dict[str, Any] = {
            "handler_url": f"127.0.0.1:{self.port}",
            "storage": {"backend": "sqlite", "path": str(workdir / "chat.db")},
            "auth": {"jwt_secret": JWT_SECRET, "dev_tokens": True},
            **(extra or {}),
        }
        self._write_config()
        self.log_path = workdir / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps(self._config), encoding="utf-8")

    def use_secret(self, jwt_secret: str) -> None:
        """Sign with another secret from the next `start()` on: every earlier token is invalid,
        as after a real deployment rotated its secret."""
        self._config["auth"] = {**self._config["auth"], "jwt_secret": jwt_secret}
        self._write_config()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("CHAT_JWT_SECRET", None)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "handler", "--config", str(self.config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        # A subprocess has no task_status to report readiness: poll /healthz briefly instead.
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"the handler exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the handler did not become ready:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown; what was acknowledged must survive it."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: the graceful shutdown."""
        self._end(signal.SIGTERM)

    def _end(self, signum: int) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def dev_token(self, user_id: str) -> str:
        request = urllib.request.Request(
            f"{self.url}/auth/dev-token",
            data=json.dumps({"user_id": user_id}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(json.load(response)["token"])


def save_screenshot(png: bytes, name: str, *, docs: bool = False) -> Path:
    """Keep a screenshot in test-artifacts/; with UPDATE_SCREENSHOTS=1, refresh the one in docs/.

    docs/ changes only on request, so a test run leaves the work tree clean.
    """
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(png)
    if docs and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        (DOCS / name).write_bytes(png)
    return path


class Xvfb:
    """A private X server. `-displayfd` lets Xvfb pick a free display and tell us which;
    `-fbdir` keeps its screen in an XWD file, which `screenshot()` turns into a PNG."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self._fbdir = Path(tempfile.mkdtemp(prefix="xvfb-"))
        self._process: subprocess.Popen[bytes] | None = None
        self.display = ""

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        self._process = subprocess.Popen(
            [
                "Xvfb",
                "-displayfd",
                str(write_fd),
                "-screen",
                "0",
                f"{self.width}x{self.height}x24",
                "-fbdir",
                str(self._fbdir),
                "-nolisten",
                "tcp",
            ],
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            number = pipe.readline().strip()
        if not number:
            self.stop()
            raise RuntimeError("Xvfb did not report a display")
        self.display = f":{number}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
        shutil.rmtree(self._fbdir, ignore_errors=True)

    def screenshot(self) -> bytes:
        return xwd_to_png((self._fbdir / "Xvfb_screen0").read_bytes())


def xwd_to_png(xwd: bytes) -> bytes:
    """Convert Xvfb's 24-bit ZPixmap XWD screen dump to PNG, with the standard library only."""
    fields = struct.unpack(">25I", xwd[:100])
    header_size, width, height = fields[0], fields[4], fields[5]
    byte_order, bits_per_pixel, bytes_per_line, ncolors = (
        fields[7],
        fields[11],
        fields[12],
        fields[19],
    )
    if bits_per_pixel != 32:
        raise ValueError(f"expected 32 bits per pixel, got {bits_per_pixel}")
    pixels = xwd[header_size + ncolors * 12 :]
    # LSBFirst stores a pixel as B, G, R, pad; MSBFirst as pad, R, G, B.
    red, green, blue = (2, 1, 0) if byte_order == 0 else (1, 2, 3)
    rows = bytearray()
    for y in range(height):
        row = pixels[y * bytes_per_line : y * bytes_per_line + width * 4]
        rgb_row = bytearray(width * 3)
        rgb_row[0::3], rgb_row[1::3], rgb_row[2::3] = row[red::4], row[green::4], row[blue::4]
        rows += b"\x00" + rgb_row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + chunk(b"IEND", b"")
    )
