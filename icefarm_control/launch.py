"""Start `icefarm-control serve` as a child process (the demo and the benchmarks use this)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def start_control_process(
    database_url: str, log_path: Path, *extra: str, timeout: float = 30
) -> tuple[subprocess.Popen[bytes], str]:
    """Serve on a free loopback port with JSON logs in `log_path`; return the process and its
    address once it reports serving (RuntimeError naming the log if it does not)."""
    command = [
        str(Path(sys.executable).parent / "icefarm-control"),
        "serve", "--listen", "127.0.0.1:0", "--database", database_url, "--log-format", "json",
        *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "control serving":
                return process, f"127.0.0.1:{record['port']}"
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the control did not start; see {log_path}")
