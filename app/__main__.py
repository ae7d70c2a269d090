"""`python -m app`: serve with uvicorn, draining requests in flight on SIGTERM (settings from `WBC_*`)."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Sequence
from types import FrameType


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `--host`/`--port` (defaults from the settings) and serve until stopped."""
    import uvicorn

    from app.api.server import server_options
    from app.api.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m app", description="Serve the WBC segmenter.")
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    # uvicorn drains on SIGTERM, puts back the handler it found and raises the signal again: with this
    # one instead of the default, a graceful stop exits 0 rather than "killed by SIGTERM" (143).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    # The app logs every request itself, with its id, so uvicorn's access log would only repeat it.
    uvicorn.run("app.api.main:create_app", factory=True, host=args.host, port=args.port, access_log=False,
                log_level=settings.log_level.lower(), **server_options(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
