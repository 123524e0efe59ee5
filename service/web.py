"""The page a person tries the service with, and the style thumbnails its gallery shows.

``GET /`` is a single static page (``service/static/``: plain HTML, CSS and an ES module, no
build step) that talks to the same public API as any client: ``GET /styles``, ``POST /stylize``
or ``/upscale`` with ``?mode=async``, then ``GET /jobs/{id}`` until the image is there. Nothing
is loaded from another origin, and the Content-Security-Policy below makes the browser enforce
that, so the page works on a machine without internet access (as do ``/docs`` and ``/redoc``,
whose assets the API serves itself, ``service.app``).

``GET /styles/{style}/thumbnail`` serves ``<zoo>/thumbnails/<style>.jpg``, made by
``scripts/make_thumbnails.py``. Torch-free, like the rest of the API.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from service.catalog import ModelCatalog
from service.errors import ApiError

STATIC_DIR = Path(__file__).resolve().with_name("static")

# Same-origin only: scripts, styles, fetches. blob: (this origin's own objects) for the result
# and the photo preview, data: for the empty favicon. Framing is refused (clickjacking).
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (cheap: ETag / 304), so a deployed change is never served stale.
    "Cache-Control": "no-cache",
}
# Thumbnails change only when a style is retrained; a few minutes of caching spares the API a
# dozen requests per page view without keeping an old picture around for long.
THUMBNAIL_MAX_AGE_S = 300

router = APIRouter()


class PageStaticFiles(StaticFiles):
    """``StaticFiles`` with the page's headers on every file (the CSP covers the JS too).

    It also names its mount as the request's route, which Starlette does not do for mounts:
    the metrics middleware labels requests by route template, and without this every static
    file would be counted as ``unmatched`` together with real 404s.
    """

    mount: Mount | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.mount is not None:
            scope["route"] = self.mount
        await super().__call__(scope, receive, send)

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_PAGE_HEADERS)
        return response


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The try-it page (``service/static/index.html``)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)


@router.get(
    "/styles/{style}/thumbnail",
    response_class=FileResponse,
    summary="A photo stylised by this style (JPEG), for galleries",
    responses={
        200: {"content": {"image/jpeg": {}}},
        404: {"description": "Unknown style (`unknown_style`) or no thumbnail made for it."},
    },
)
async def style_thumbnail(
    request: Request,
    style: Annotated[str, PathParam(min_length=1, max_length=64)],
) -> FileResponse:
    catalog: ModelCatalog = request.app.state.catalog
    known = catalog.manifest().styles()
    if style not in known:
        available = sorted(known)
        raise ApiError(
            404,
            "unknown_style",
            f"no style named {style!r}; available: {', '.join(available) or 'none'}",
            styles=available,
        )
    # The name is the manifest's (a validated pattern), never the URL's: no path traversal.
    name = known[style].style
    path = catalog.thumbnail_path(name)
    if not path.is_file():
        raise ApiError(
            404,
            "thumbnail_missing",
            f"style {name!r} has no thumbnail; scripts/make_thumbnails.py makes them",
        )
    return FileResponse(
        path,
        media_type="image/jpeg",
        headers={"Cache-Control": f"public, max-age={THUMBNAIL_MAX_AGE_S}"},
    )


def install_web(app: FastAPI) -> None:
    """Add the page, its static files and the thumbnail route to ``app``."""
    app.include_router(router)
    static = PageStaticFiles(directory=STATIC_DIR)
    static.mount = Mount("/static", app=static, name="static")
    app.router.routes.append(static.mount)
