"""``Client`` (blocking) and ``AsyncClient`` (asyncio) for the image service, on httpx.

Both offer the same calls:

- ``stylize(image, style=...)`` / ``upscale(image, factor=...)``: one synchronous request; the
  service holds it open until the image is there (up to its ``REQUEST_TIMEOUT_S``, 60 s by
  default, else ``JobTimeout``). The simplest call, and the fastest for small images.
- ``submit_stylize`` / ``submit_upscale`` then ``wait(job)``: an async job (``?mode=async``),
  polled at ``GET /jobs/{id}``. For big images, slow upscales or many files at once: nothing
  stays open while the job is queued.
- ``styles()``: the service's models.

Requests answered "busy" (503 ``queue_full`` and other transient 503s, 429) are sent again
after the ``Retry-After`` the service gives (capped: ``RetryPolicy``); every other error is
raised at once as a typed exception (``imgsvc_client.errors``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Self

import httpx

from imgsvc_client._core import (
    DEFAULT_URL,
    Catalog,
    ImageInput,
    Job,
    MixInput,
    OutputFormat,
    Result,
    RetryPolicy,
    Upload,
    job_url,
    read_image,
    stylize_params,
    upscale_params,
)
from imgsvc_client.errors import JobTimeout, ServiceUnreachable, error_from_response

# Longer than the service's default REQUEST_TIMEOUT_S (60 s): a synchronous request must get
# the service's own 504 rather than time out on the client side first.
DEFAULT_TIMEOUT_S = 90.0
DEFAULT_JOB_TIMEOUT_S = 600.0
StatusCallback = Callable[[str], Any]


def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(10.0, seconds))


def _with_key(api_key: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """``api_key`` as an ``Authorization: Bearer`` header (a service with AUTH_REQUIRED wants
    one on job routes; the key is never put in a URL, where logs would keep it)."""
    if not api_key:
        return options
    headers = dict(options.get("headers") or {})
    headers["Authorization"] = f"Bearer {api_key}"
    return {**options, "headers": headers}


class _Settings:
    """Options shared by both clients."""

    def __init__(
        self,
        base_url: str,
        timeout: float,
        retry: RetryPolicy | None,
        poll_interval: float,
        max_poll_interval: float,
        job_timeout: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.job_timeout = job_timeout

    def poll_delays(self) -> Iterator[float]:
        """Poll pauses: quick at first (small images finish in a fraction of a second), then
        slower, so a long job costs the service one request a second at most."""
        delay = self.poll_interval
        while True:
            yield delay
            delay = min(delay * 1.5, self.max_poll_interval)


class Client:
    """Blocking client. Use it as a context manager, or call ``close()``.

    ``api_key`` is sent as ``Authorization: Bearer`` (for a service with ``AUTH_REQUIRED``).
    ``httpx_options`` go to ``httpx.Client`` (``headers``, ``verify``, ``event_hooks``...).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        poll_interval: float = 0.2,
        max_poll_interval: float = 1.0,
        job_timeout: float = DEFAULT_JOB_TIMEOUT_S,
        api_key: str | None = None,
        **httpx_options: Any,
    ) -> None:
        self.settings = _Settings(
            base_url, timeout, retry, poll_interval, max_poll_interval, job_timeout
        )
        self._http = httpx.Client(
            base_url=self.settings.base_url,
            timeout=_timeout(timeout),
            **_with_key(api_key, httpx_options),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls -------------------------------------------------------------------------------

    def styles(self) -> Catalog:
        return Catalog.from_json(self._request("GET", "/styles").json())

    def stylize(
        self,
        image: ImageInput,
        style: str | None = None,
        *,
        mix: MixInput | None = None,
        strength: float | None = None,
        keep_colors: bool | None = None,
        max_side: int | None = None,
        output_format: OutputFormat | None = None,
        filename: str | None = None,
    ) -> Result:
        """Stylise ``image`` (bytes, a path or a binary file) with ``style``, or with a blend
        of styles (``mix={"mosaic": 0.7, "candy": 0.3}``). Controls left at None are not sent."""
        params = stylize_params(
            style, mix=mix, strength=strength, keep_colors=keep_colors,
            max_side=max_side, output_format=output_format,
        )  # fmt: skip
        return Result.from_response(self._post("/stylize", params, read_image(image, filename)))

    def upscale(
        self,
        image: ImageInput,
        factor: int = 4,
        *,
        model: str | None = None,
        output_format: OutputFormat | None = None,
        filename: str | None = None,
    ) -> Result:
        """Upscale ``image`` x4 or x8; ``model`` picks another SR model of that factor."""
        params = upscale_params(factor, model=model, output_format=output_format)
        return Result.from_response(self._post("/upscale", params, read_image(image, filename)))

    def submit_stylize(
        self,
        image: ImageInput,
        style: str | None = None,
        *,
        mix: MixInput | None = None,
        strength: float | None = None,
        keep_colors: bool | None = None,
        max_side: int | None = None,
        output_format: OutputFormat | None = None,
        filename: str | None = None,
    ) -> Job:
        """Queue a stylise job and return at once; ``wait(job)`` gets the image."""
        params = stylize_params(
            style, mix=mix, strength=strength, keep_colors=keep_colors,
            max_side=max_side, output_format=output_format, mode="async",
        )  # fmt: skip
        return Job.from_response(self._post("/stylize", params, read_image(image, filename)))

    def submit_upscale(
        self,
        image: ImageInput,
        factor: int = 4,
        *,
        model: str | None = None,
        output_format: OutputFormat | None = None,
        filename: str | None = None,
    ) -> Job:
        params = upscale_params(factor, model=model, output_format=output_format, mode="async")
        return Job.from_response(self._post("/upscale", params, read_image(image, filename)))

    def wait(
        self,
        job: Job | str,
        *,
        timeout: float | None = None,
        on_status: StatusCallback | None = None,
    ) -> Result:
        """Poll an async job until its image is there. ``on_status`` gets ``queued`` /
        ``running`` on every poll that finds it pending. ``JobTimeout`` after ``timeout``
        seconds (default ``job_timeout``); the job itself is not cancelled by that."""
        job_id, url = job_url(job)
        limit = timeout if timeout is not None else self.settings.job_timeout
        deadline = time.monotonic() + limit
        for delay in self.settings.poll_delays():
            response = self._request("GET", url)
            if response.status_code != 202:
                return Result.from_response(response)
            if on_status is not None:
                on_status(str(response.json().get("status", "queued")))
            if time.monotonic() + delay > deadline:
                raise _wait_timeout(job_id, limit)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - poll_delays never ends

    # --- transport -----------------------------------------------------------------------------

    def _post(self, path: str, params: dict[str, str], upload: Upload) -> httpx.Response:
        return self._request("POST", path, params=params, upload=upload)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        upload: Upload | None = None,
    ) -> httpx.Response:
        attempt = 0
        while True:
            files = upload.files() if upload is not None else None
            try:
                response = self._http.request(method, path, params=params, files=files)
            except httpx.TransportError as exc:
                delay = self.settings.retry.next_delay(attempt, method, error=exc)
                if delay is None:
                    raise _unreachable(self.settings.base_url, exc) from exc
            else:
                if response.is_success:
                    return response
                delay = self.settings.retry.next_delay(attempt, method, response=response)
                if delay is None:
                    raise error_from_response(response, attempts=attempt + 1)
            attempt += 1
            time.sleep(delay)


class AsyncClient:
    """The same calls as ``Client``, as coroutines (``async with AsyncClient(...) as c``)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        poll_interval: float = 0.2,
        max_poll_interval: float = 1.0,
        job_timeout: float = DEFAULT_JOB_TIMEOUT_S,
        api_key: str | None = None,
        **httpx_options: Any,
    ) -> None:
        self.settings = _Settings(
            base_url, timeout, retry, poll_interval, max_poll_interval, job_timeout
        )
        self._http = httpx.AsyncClient(
            base_url=self.settings.base_url,
            timeout=_timeout(timeout),
            **_with_key(api_key, httpx_options),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def styles(self) -> Catalog:
        return Catalog.from_json((await self._request("GET", "/styles")).json())

    async def stylize(
        self,
        image: ImageInput,
        style: str | None = None,
        *,
        mix: MixInput | None = None,
        strength: float | None = None,
        keep_colors: bool | None = None,
        max_side: int | None = None,
        output_format: OutputFormat | None = None,
        filename: str | None = None,
    ) -> Result:
        params = stylize_params(
            style, mix=mix, strength=strength, keep_colors=keep_colors,
            max_side=max_side, output_format=output_format,
        )  # fmt: skip
        upload = read_image(image, filename)
        return Result.from_response(await self._post("/stylize", params, upload))

    async def upscale(
        self,
        image: ImageInput,
        factor: int = 4,
        *,
        model: str | None = None,
        output_format: OutputFormat | None = None,
        filename: str | None = None,
    ) -> Result:
        params = upscale_params(factor, model=model, output_format=output_format)
        upload = read_image(image, filename)
        return Result.from_response(await self._post("/upscale", params, upload))

    async def submit_stylize(
        self,
        image: ImageInput,
        style: str | None = None,
        *,
        mix: MixInput | None = None,
        strength: float | None = None,
        keep_colors: bool | None = None,
        max_side: int | None = None,
        output_format: OutputFormat | None = None,
        filename: str | None = None,
    ) -> Job:
        params = stylize_params(
            style, mix=mix, strength=strength, keep_colors=keep_colors,
            max_side=max_side, output_format=output_format, mode="async",
        )  # fmt: skip
        upload = read_image(image, filename)
        return Job.from_response(await self._post("/stylize", params, upload))

    async def submit_upscale(
        self,
        image: ImageInput,
        factor: int = 4,
        *,
        model: str | None = None,
        output_format: OutputFormat | None = None,
        filename: str | None = None,
    ) -> Job:
        params = upscale_params(factor, model=model, output_format=output_format, mode="async")
        upload = read_image(image, filename)
        return Job.from_response(await self._post("/upscale", params, upload))

    async def wait(
        self,
        job: Job | str,
        *,
        timeout: float | None = None,
        on_status: Callable[[str], Awaitable[Any] | Any] | None = None,
    ) -> Result:
        job_id, url = job_url(job)
        limit = timeout if timeout is not None else self.settings.job_timeout
        deadline = time.monotonic() + limit
        for delay in self.settings.poll_delays():
            response = await self._request("GET", url)
            if response.status_code != 202:
                return Result.from_response(response)
            if on_status is not None:
                outcome = on_status(str(response.json().get("status", "queued")))
                if asyncio.iscoroutine(outcome):
                    await outcome
            if time.monotonic() + delay > deadline:
                raise _wait_timeout(job_id, limit)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - poll_delays never ends

    async def _post(self, path: str, params: dict[str, str], upload: Upload) -> httpx.Response:
        return await self._request("POST", path, params=params, upload=upload)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        upload: Upload | None = None,
    ) -> httpx.Response:
        attempt = 0
        while True:
            files = upload.files() if upload is not None else None
            try:
                response = await self._http.request(method, path, params=params, files=files)
            except httpx.TransportError as exc:
                delay = self.settings.retry.next_delay(attempt, method, error=exc)
                if delay is None:
                    raise _unreachable(self.settings.base_url, exc) from exc
            else:
                if response.is_success:
                    return response
                delay = self.settings.retry.next_delay(attempt, method, response=response)
                if delay is None:
                    raise error_from_response(response, attempts=attempt + 1)
            attempt += 1
            await asyncio.sleep(delay)


def _unreachable(base_url: str, exc: httpx.TransportError) -> ServiceUnreachable:
    return ServiceUnreachable(f"no answer from {base_url}: {exc or type(exc).__name__}")


def _wait_timeout(job_id: str, seconds: float) -> JobTimeout:
    return JobTimeout(
        None,
        "wait_timeout",
        f"job {job_id} not finished after {seconds:g} s (it may still finish: wait again)",
        body={"job_id": job_id},
    )
