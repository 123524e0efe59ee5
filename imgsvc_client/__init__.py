"""Python client of the image service: ``Client`` (blocking), ``AsyncClient`` (asyncio) and the
``imgsvc`` command line (``python -m imgsvc_client``).

    from imgsvc_client import Client

    with Client("http://127.0.0.1:8000") as client:
        client.stylize("photo.jpg", style="mosaic").save("photo.mosaic.png")
        client.upscale("small.png", factor=4).save("small.x4.png")

Depends on httpx only (tqdm for the command line's progress bar), not on the service's code.
"""

from imgsvc_client._core import Catalog, Job, ModelInfo, Result, RetryPolicy
from imgsvc_client.client import AsyncClient, Client
from imgsvc_client.errors import (
    AuthenticationError,
    ImageTooLarge,
    ImgsvcError,
    InvalidImage,
    InvalidRequest,
    JobFailed,
    JobTimeout,
    NotFound,
    QueueFull,
    RateLimited,
    ServerError,
    ServiceError,
    ServiceUnavailable,
    ServiceUnreachable,
    UnknownJob,
    UnknownModel,
    UnknownStyle,
    UnsupportedImage,
)

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Catalog",
    "Client",
    "ImageTooLarge",
    "ImgsvcError",
    "InvalidImage",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "JobTimeout",
    "ModelInfo",
    "NotFound",
    "QueueFull",
    "RateLimited",
    "Result",
    "RetryPolicy",
    "ServerError",
    "ServiceError",
    "ServiceUnavailable",
    "ServiceUnreachable",
    "UnknownJob",
    "UnknownModel",
    "UnknownStyle",
    "UnsupportedImage",
]
