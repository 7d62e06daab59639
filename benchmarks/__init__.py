"""Benchmark suite of the WebSocket Handler.

`python -m benchmarks [--quick] [--scenarios a,b,...] [--out DIR]` starts the handler (and the
yardstick relays) as pinned subprocesses, drives them with a load generator pinned to another
core, and writes results.json, results.md and PNG plots (default: benchmarks/results/).
`--compare GIT_REF` also measures a server from a temporary worktree of GIT_REF, runs
interleaved, and reports the ratios current / baseline (`benchmarks.compare`). Every scenario
runs through one skeleton (`benchmarks.harness`). `benchmarks.cli.run()` does the same from
Python; the smoke test uses it with tiny sizes.
"""

from __future__ import annotations
