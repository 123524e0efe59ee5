"""``imgsvc`` / ``python -m imgsvc_client``: stylise or upscale files and folders from a shell.

    imgsvc styles
    imgsvc stylize photo.jpg --style mosaic                  # -> photo.mosaic.png beside it
    imgsvc stylize holiday/ --style candy --out stylised/ --concurrency 4
    imgsvc upscale scans/ --factor 4 --model x4_pixel --recursive

Every file becomes an async job (submitted, then polled), so a slow x8 upscale never hits the
service's synchronous timeout, and ``--concurrency`` jobs are in flight at once: enough to fill
the workers' batches without flooding the queue (a full queue answers 503, which the client
waits out with its Retry-After).

Outputs are ``<stem>.<style or model>.<ext>``, next to each input or under ``--out``; in a
folder, files already named like an output of this run are not taken as inputs again, and
existing outputs are skipped unless ``--overwrite``. Exit status: 0 all written, 1 some files
failed (each is named on stderr), 2 nothing was attempted (bad arguments, unreachable service,
unknown style or model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from imgsvc_client._core import DEFAULT_URL, Catalog, Job, RetryPolicy
from imgsvc_client.client import DEFAULT_TIMEOUT_S, AsyncClient
from imgsvc_client.errors import ImgsvcError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pbm", ".pnm"})  # fmt: skip
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
Submit = Callable[[AsyncClient, bytes, str], Awaitable[Job]]


class UsageError(Exception):
    """A problem with the command line or the plan: nothing has been sent."""


@dataclass(frozen=True)
class Task:
    source: Path
    target: Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, not {value}")
    return value


def _mix_spec(text: str) -> str:
    """``mosaic:0.7,candy:0.3`` checked for shape (the service judges names and weights)."""
    for part in text.split(","):
        name, sep, weight = part.partition(":")
        try:
            float(weight)
        except ValueError:
            sep = ""
        if not (name and sep):
            raise argparse.ArgumentTypeError(f"expected NAME:WEIGHT[,NAME:WEIGHT...], not {text!r}")
    return text


def mix_names(spec: str) -> list[str]:
    return [part.partition(":")[0] for part in spec.split(",")]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("IMGSVC_URL", DEFAULT_URL),
        help="service base URL (default: $IMGSVC_URL or %(default)s)",
    )
    common.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per HTTP request"
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("IMGSVC_API_KEY"),
        help="API key for a service that requires one (default: $IMGSVC_API_KEY)",
    )
    common.add_argument(
        "--retries", type=int, default=5, help="retries of a busy (503/429) answer (default 5)"
    )

    batch = argparse.ArgumentParser(add_help=False)
    batch.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    batch.add_argument("--out", type=Path, help="write results here (default: beside inputs)")
    batch.add_argument(
        "--concurrency", type=_positive_int, default=4, help="jobs in flight (default 4)"
    )
    batch.add_argument("--recursive", action="store_true", help="descend into subfolders")
    batch.add_argument("--overwrite", action="store_true", help="redo existing outputs")
    batch.add_argument("--format", choices=sorted(EXTENSIONS), help="output format (png)")
    batch.add_argument("--job-timeout", type=float, default=600.0, help="seconds per job")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    parser = argparse.ArgumentParser(
        prog="imgsvc", description="Style transfer and super-resolution with the image service."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    styles = commands.add_parser("styles", parents=[common], help="list styles and upscalers")
    styles.add_argument("--json", action="store_true", help="the service's full JSON")

    stylize = commands.add_parser("stylize", parents=[common, batch], help="stylise images")
    which = stylize.add_mutually_exclusive_group(required=True)
    which.add_argument("--style", help="style name (imgsvc styles)")
    which.add_argument("--mix", type=_mix_spec, help="blend, e.g. mosaic:0.7,candy:0.3")
    stylize.add_argument("--strength", type=_unit_float, help="0..1 (service default 1)")
    stylize.add_argument(
        "--keep-colors", action="store_true", default=None, help="keep the photo's colours"
    )
    stylize.add_argument("--max-side", type=_positive_int, help="shrink the result to this side")

    upscale = commands.add_parser("upscale", parents=[common, batch], help="upscale images")
    upscale.add_argument("--factor", type=int, choices=(4, 8), default=4)
    upscale.add_argument("--model", help="SR model of that factor (default x<factor>)")
    return parser


# --- planning ----------------------------------------------------------------------------------


def plan(
    inputs: Sequence[Path], tag: str, extension: str, out: Path | None, recursive: bool
) -> list[Task]:
    """Which file becomes which output. Files named on the command line are taken whatever
    their extension (the service judges them); inside folders only image files are, and not
    the outputs of an earlier run with the same tag."""
    tasks: list[Task] = []
    for given in inputs:
        if given.is_dir():
            pattern = given.rglob("*") if recursive else given.iterdir()
            for path in sorted(pattern):
                if (
                    path.is_file()
                    and path.suffix.lower() in IMAGE_SUFFIXES
                    and not path.stem.endswith(f".{tag}")
                ):
                    folder = (out / path.parent.relative_to(given)) if out else path.parent
                    tasks.append(Task(path, folder / f"{path.stem}.{tag}.{extension}"))
        elif given.is_file():
            folder = out if out else given.parent
            tasks.append(Task(given, folder / f"{given.stem}.{tag}.{extension}"))
        else:
            raise UsageError(f"no such file or folder: {given}")
    seen: dict[Path, Path] = {}
    for task in tasks:
        other = seen.setdefault(task.target.resolve(), task.source)
        if other != task.source:
            raise UsageError(f"{other} and {task.source} would both be written to {task.target}")
    return tasks


def write_atomic(path: Path, data: bytes) -> None:
    """A reader (or a rerun after Ctrl-C) never finds half an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- running ---------------------------------------------------------------------------------


def upscaler_name(args: argparse.Namespace, catalog: Catalog) -> str:
    """The model an upscale runs: ``--model``, else the service's default for the factor, read
    once from the catalog so the outputs' names and the model that made them cannot differ
    (the default can change on the service while a batch runs)."""
    return args.model or catalog.default_upscaler(args.factor)


def check_names(args: argparse.Namespace, catalog: Catalog) -> None:
    """Unknown names fail before any upload, with the names that exist."""
    if args.command == "stylize":
        wanted = [args.style] if args.style else mix_names(args.mix)
        unknown = [n for n in wanted if n not in catalog.style_names]
        if unknown:
            raise UsageError(
                f"unknown style {', '.join(unknown)}; available: {', '.join(catalog.style_names)}"
            )
    else:
        model = upscaler_name(args, catalog)
        names = catalog.upscaler_names(args.factor)
        if model not in names:
            raise UsageError(
                f"no x{args.factor} model {model!r}; available: {', '.join(names) or 'none'}"
            )


def submitter(args: argparse.Namespace, catalog: Catalog) -> tuple[Submit, str]:
    """The submit call for this command, and the tag its outputs are named with (the model
    that made them: an upscale without ``--model`` is named after the service's default)."""
    if args.command == "stylize":

        async def submit_style(client: AsyncClient, data: bytes, name: str) -> Job:
            return await client.submit_stylize(
                data, args.style, mix=args.mix, strength=args.strength,
                keep_colors=args.keep_colors, max_side=args.max_side,
                output_format=args.format, filename=name,
            )  # fmt: skip

        return submit_style, args.style or "+".join(mix_names(args.mix))

    model = upscaler_name(args, catalog)

    async def submit_upscale(client: AsyncClient, data: bytes, name: str) -> Job:
        return await client.submit_upscale(
            data, args.factor, model=model, output_format=args.format, filename=name
        )

    return submit_upscale, model


async def run_batch(args: argparse.Namespace, client: AsyncClient) -> int:
    catalog = await client.styles()
    check_names(args, catalog)
    submit, tag = submitter(args, catalog)
    tasks = plan(args.inputs, tag, EXTENSIONS[args.format or "png"], args.out, args.recursive)
    todo = [t for t in tasks if args.overwrite or not t.target.exists()]
    skipped = len(tasks) - len(todo)
    if not tasks:
        raise UsageError("no image files in the given folders")
    failed = 0
    semaphore = asyncio.Semaphore(args.concurrency)
    with tqdm(
        total=len(todo), unit="img", desc=f"{args.command} {tag}", disable=args.quiet,
        file=sys.stderr, dynamic_ncols=True,
    ) as bar:  # fmt: skip

        async def one(task: Task) -> None:
            nonlocal failed
            async with semaphore:
                try:
                    data = await asyncio.to_thread(task.source.read_bytes)
                    job = await submit(client, data, task.source.name)
                    result = await client.wait(job, timeout=args.job_timeout)
                    await asyncio.to_thread(write_atomic, task.target, result.content)
                except (ImgsvcError, OSError) as exc:
                    failed += 1
                    bar.write(f"error: {task.source}: {exc}", file=sys.stderr)
                finally:
                    bar.update(1)

        await asyncio.gather(*(one(task) for task in todo))
    written = len(todo) - failed
    summary = f"{written} written, {failed} failed"
    if skipped:
        summary += f", {skipped} skipped (output exists; --overwrite redoes them)"
    print(summary, file=sys.stderr)
    return 1 if failed else 0


async def run_styles(args: argparse.Namespace, client: AsyncClient) -> int:
    catalog = await client.styles()
    if args.json:
        raw = {
            "styles": [m.raw for m in catalog.styles],
            "upscalers": [m.raw for m in catalog.upscalers],
        }
        print(json.dumps(raw, indent=2))
        return 0
    print("styles:")
    for model in catalog.styles:
        print(f"  {model.name:<20} {model.description}".rstrip())
    print("upscalers:")
    for model in catalog.upscalers:
        loss = f"{model.loss} loss" if model.loss else ""
        default = f" (default for x{model.factor})" if model.default else ""
        print(f"  {model.name:<20} x{model.factor}  {loss}{default}".rstrip())
    return 0


async def run(args: argparse.Namespace) -> int:
    retry = RetryPolicy(max_retries=args.retries)
    async with AsyncClient(
        args.url, timeout=args.timeout, retry=retry, api_key=args.api_key
    ) as client:
        if args.command == "styles":
            return await run_styles(args, client)
        return await run_batch(args, client)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except UsageError as exc:
        print(f"imgsvc: {exc}", file=sys.stderr)
        return 2
    except ImgsvcError as exc:  # the service could not even list its models
        print(f"imgsvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgsvc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
