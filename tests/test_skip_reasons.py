"""Every skipped test says why, and what to set or install to run it.

Runs pytest in a subprocess, without `CHAT_TEST_DATABASE_URL` and `CHAT_TEST_REDIS_URL`, on the
scale tests of two contract suites. They skip three ways: from a sync fixture (the store suite),
from an async fixture run by pytest-trio (the bus suite's `start_node`), and from an async test
body (the bus suite's two-process chat-order test). The outage tests are left out: they start
a throwaway redis-server when one is installed, which takes time instead of skipping.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Final

from scale_support import DATABASE_URL_ENV, REDIS_URL_ENV

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
SKIP_LINE: Final = re.compile(r"^SKIPPED \[\d+\] (?P<where>\S+?):(?P<line>\d+): ?(?P<reason>.*)$")
RUN_TIMEOUT_S: Final = 120.0


def test_skips_without_the_service_urls_name_what_to_set() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHAT_TEST_")}
    files = ["tests/test_store_contract.py", "tests/test_bus_contract.py"]
    select = ["-m", "scale", "-k", "not outage and not stalled"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files, *select],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    skips = [match for line in output.splitlines() if (match := SKIP_LINE.match(line))]
    assert skips, output
    for skip in skips:
        line = skip.group(0)
        assert skip["reason"] not in ("", "Skipped"), f"a skip without its reason: {line}"
        assert DATABASE_URL_ENV in skip["reason"] or REDIS_URL_ENV in skip["reason"], line
        # Reported at the test, not inside pytest or pytest-trio.
        assert skip["where"].startswith("tests/test_"), line
    reasons = {skip["reason"] for skip in skips}
    assert any(REDIS_URL_ENV in reason for reason in reasons), output
    assert any(DATABASE_URL_ENV in reason for reason in reasons), output
    # The async-fixture and async-body skips of the bus suite are among them.
    assert any(skip["where"] == "tests/test_bus_contract.py" for skip in skips), output
