"""``python -m service``: the API alone (uvicorn) on ``HOST``:``PORT`` from the settings.

The container's command, and what ``python -m service.launch`` starts next to Redis and a worker.
"""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.settings import ApiSettings


def main() -> None:
    settings = ApiSettings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        # Behind compose / a load balancer the client address comes from X-Forwarded-For.
        proxy_headers=True,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )


if __name__ == "__main__":
    main()
