"""The harness, kept apart from the service: nothing here runs in a worker.

- server.py: the sandbox, an HTTP server that speaks Runware's protocol (for the demo, the
  tests and the benchmarks; `enhance-worker sandbox`);
- protocol.py: what the sandbox knows of each task type (its checks and its answers);
- services.py: starting a private redis-server, a Sentinel group, the sandbox and real
  `celery -A workers worker` processes.
"""

from workers.sandbox.server import Sandbox, SandboxConfig

__all__ = ["Sandbox", "SandboxConfig"]
