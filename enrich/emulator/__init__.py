"""An API-compatible emulator of Parallel's Task API, for demos, tests and benchmarks.

It is a real HTTP server on loopback speaking the real paths, shapes, status codes and SSE
framing (parallel-task-api.md section 11), answering from a knowledge table instead of the
web. Modules: `validate` (request rules), `knowledge` (answers, processor-dependent quality),
`core` (runs, groups, time, limits, ledger; no I/O), `app` (the ASGI app: routing, auth,
faults, identity headers), `streams` (the SSE endpoints), `behaviours` (the switchable
`--behaviours`: cut streams, snapshots, eventual consistency, shuffled ids, SSE framing
variety, basis variety, connection trouble, failed/cancelled endings), `server` (uvicorn
runner, in a thread or as `enrich emulator`).
"""

from enrich.emulator.core import EmulatorConfig
from enrich.emulator.server import EmulatorServer

__all__ = ["EmulatorConfig", "EmulatorServer"]
