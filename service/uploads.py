"""Reading the uploaded image out of a request: multipart field ``image`` or a raw body.

The body is read under a byte cap before anything parses it, so an oversized upload costs at
most the cap in memory; multipart is then parsed from the capped bytes.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from service.errors import ApiError

# Room for the multipart envelope (boundaries, part headers) on top of the image byte limit.
MULTIPART_OVERHEAD = 64 * 1024


async def read_image_body(request: Request, limit: int) -> bytes:
    """The uploaded image bytes, from a multipart field ``image`` or a raw body.

    The body is read under a byte cap (``Content-Length`` is checked first, chunked uploads are
    counted as they arrive), so an oversized upload is refused without buffering it whole.
    """
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    multipart = media == "multipart/form-data"
    raw = media.startswith("image/") or media == "application/octet-stream"
    if media and not (multipart or raw):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the image as multipart/form-data field 'image' or as a raw image/* body, "
            f"not {media}",
        )
    cap = limit + (MULTIPART_OVERHEAD if multipart else 0)
    too_large = ApiError(413, "upload_too_large", f"uploads are limited to {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    if not multipart:
        return body
    return await _multipart_image(request, body, limit, too_large)


async def _multipart_image(request: Request, body: bytes, limit: int, too_large: ApiError) -> bytes:
    if not body:
        raise ApiError(400, "empty_body", "the request carried no image (empty body)")

    async def replay() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    # Parse the already-capped body: Request(...) over a replayed receive, public API only.
    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form(max_files=4, max_fields=16)
    except (MultiPartException, StarletteHTTPException, ValueError) as exc:
        detail = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc)
        raise ApiError(
            400, "malformed_multipart", f"cannot parse the multipart body: {detail}"
        ) from exc
    try:
        upload = form.get("image")
        if upload is None:
            raise ApiError(
                400,
                "missing_image_field",
                "multipart body has no field named 'image'",
                fields=sorted(set(form.keys())),
            )
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "image_field_not_a_file", "field 'image' must be a file upload")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > limit:
        raise too_large
    return data
