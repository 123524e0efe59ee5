"""``python -m service``: the API alone on ``HOST``:``PORT`` from the settings.

The container's command, and what ``python -m service.launch`` starts next to Redis and a worker.
Logs are JSON lines (``LOG_FORMAT``), served by ``service.server`` (uvicorn with header and body
timeouts).
"""

from __future__ import annotations

import sys

from pydantic import ValidationError

from jobqueue.telemetry import configure_logging
from service.app import create_app
from service.keys import KeyFileError
from service.server import serve
from service.settings import ApiSettings


def main() -> int:
    try:
        settings = ApiSettings()
    except ValidationError as exc:
        print(f"api: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, "api")
    try:
        app = create_app(settings)
    except KeyFileError as exc:
        print(f"api: {exc}", file=sys.stderr)
        return 2
    serve(app, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
