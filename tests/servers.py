"""An ASGI app served by uvicorn in a thread on a free port, for tests that need real HTTP."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn


@contextmanager
def uvicorn_in_thread(app: Any, *, name: str = "uvicorn") -> Iterator[tuple[str, uvicorn.Server]]:
    """Yields (base URL, server); stops the server on exit."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"the {name} server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def ctrl_c_default() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: a shell that starts the test
    run in the background (``cmd &``) leaves SIGINT ignored, which the child would inherit, and
    Python then installs no KeyboardInterrupt handler. Restore the default so Ctrl-C works."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
