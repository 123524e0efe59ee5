"""``python -m bench forward``: ms per image of the nets, naive fp32 eager vs faster paths.

The reference is what a plain re-implementation runs: ``net.eval()`` under ``torch.no_grad()``,
fp32, default (NCHW) memory format, no compilation. Every other variant is timed on the same
net, input and machine in the same run, so the ratios are meaningful even on a busy machine
whose absolute numbers are not. ``worker`` is the serving fast path exactly as ``worker.engine``
runs it; the others are ablations (precision, memory format, torch.compile).

Speed does not depend on the weights, so without trained models in the zoo the nets are built
untrained from their default configs; PSNR vs fp32 is then measured on untrained nets too (and
says so in the report).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import machine_info, markdown_table, plot_bars, write_json, write_markdown

if TYPE_CHECKING:
    import torch
    from torch import nn

# The paper's Table 1 (style net, batch 1, GTX Titan X, 2015): seconds at 256/512/1024 px.
PAPER_STYLE_S = {256: 0.015, 512: 0.05, 1024: 0.21}

# Dense peak TFLOP/s by (device-name fragment, precision); first match wins. "tf32" is what
# cuDNN convolutions use for fp32 tensors by default (torch.backends.cudnn.allow_tf32).
CUDA_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 366.0, "fp16": 366.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
    ("T4", {"fp32": 8.1, "tf32": 8.1, "bf16": 65.0, "fp16": 65.0}),
]

NET_NAMES = ("style", "sr_x4", "sr_x8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nets", default=",".join(NET_NAMES), help="style,sr_x4,sr_x8")
    parser.add_argument("--sizes", default="256,512,1024", help="OUTPUT sizes in px (square)")
    parser.add_argument("--batches", default="", help="batch sizes (default: 1,4 CPU; 1,8,32 CUDA)")
    parser.add_argument(
        "--variants",
        default="auto",
        help="comma-separated: fp32 (reference), worker, bf16, bf16_cl, fp16, fp16_cl, "
        "fp32_compile, fp16_compile, bf16_compile. auto = fp32,worker,bf16 on CPU; "
        "fp32,fp16,fp32_compile,fp16_compile,worker on CUDA",
    )
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median kept)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument(
        "--max-batch-pixels",
        type=float,
        default=0,
        help="skip configs whose batch x out_px^2 exceeds this (default 4.2M on CPU, 40M CUDA)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--zoo", default=None, help="zoo folder to take trained models from")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny nets (8 channels, 1 residual) for smoke tests"
    )
    parser.add_argument("--quick", action="store_true", help="256 px, batch 1 and 2, 2 reps")
    parser.add_argument("--name", default="forward", help="file stem of the report files")
    parser.add_argument("--no-plot", action="store_true", help="JSON and Markdown only")


@dataclass
class NetUnderTest:
    name: str
    factor: int  # 1 for the style net
    net: nn.Module
    weights: str  # "zoo:<model>" or "untrained"


@dataclass
class Variant:
    """One way of running a net: how to prepare it once and how to call it."""

    name: str
    precision: str  # fp32 / tf32 / bf16 / fp16: which peak to compare against
    prepare: Callable[[nn.Module, torch.device], Callable[[torch.Tensor], Any]]
    note: str = ""


@dataclass
class ForwardConfig:
    nets: Sequence[str] = NET_NAMES
    sizes: Sequence[int] = (256, 512, 1024)
    batches: Sequence[int] = ()
    variants: Sequence[str] = ("auto",)
    reps: int = 5
    warmup: int = 2
    max_batch_pixels: float = 0
    device: str = "auto"
    zoo: str | None = None
    tiny: bool = False
    threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_nets(names: Sequence[str], zoo: str | None, tiny: bool) -> list[NetUnderTest]:
    """Trained zoo models when present (style: the first style model; sr_x4/sr_x8: ``x4``/``x8``),
    else untrained nets from the default configs."""
    from model_zoo.config import SRNetConfig, StyleNetConfig
    from model_zoo.nets import build_net

    entries: dict[str, Any] = {}
    if not tiny:
        with contextlib.suppress(Exception):
            from model_zoo.registry import list_models

            for entry in list_models(zoo):
                entries.setdefault(entry.kind if entry.kind == "style" else entry.name, entry)
    out = []
    for name in names:
        if name == "style":
            key, factor = "style", 1
            cfg: Any = StyleNetConfig(base_channels=8, num_residual=1) if tiny else StyleNetConfig()
        elif name in ("sr_x4", "sr_x8"):
            factor = int(name[-1])
            key = f"x{factor}"
            cfg = (
                SRNetConfig(factor=factor, channels=8, num_residual=1)  # type: ignore[arg-type]
                if tiny
                else SRNetConfig(factor=factor)  # type: ignore[arg-type]
            )
        else:
            raise ValueError(f"unknown net {name!r}; choose from {', '.join(NET_NAMES)}")
        net, weights = None, "untrained"
        if key in entries:
            with contextlib.suppress(Exception):
                from model_zoo.registry import load_model

                net, entry = load_model(entries[key].name, root=zoo)
                weights = f"zoo:{entry.name}"
        if net is None:
            net = build_net(cfg).eval()
        out.append(NetUnderTest(name=name, factor=factor, net=net, weights=weights))
    return out


# --- variants ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    """Set only ``cudnn.benchmark`` (``cudnn.flags`` would also reset enabled/TF32)."""
    import torch

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _plain(net: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch

    net = copy.deepcopy(net).to(device).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        # naive means PyTorch's defaults: no cuDNN autotuning, even though the worker's Engine
        # (created in the same process) switches it on globally
        with torch.no_grad(), _cudnn_benchmark(False):
            return net(x)

    return run


def _autocast(precision: str, channels_last: bool, compile_: bool = False) -> Callable[..., Any]:
    def prepare(net: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        import torch

        from model_zoo.hardware import autocast

        model = copy.deepcopy(net).to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        fn: Callable[[torch.Tensor], torch.Tensor] = model
        if compile_:
            fn = torch.compile(model)

        def run(x: torch.Tensor) -> torch.Tensor:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with (
                torch.inference_mode(),
                autocast(device, precision),
                _cudnn_benchmark(True),
            ):
                return fn(x)

        return run

    return prepare


def _compiled_fp32(net: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch

    model = torch.compile(copy.deepcopy(net).to(device).eval())

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), _cudnn_benchmark(True):
            return model(x)

    return run


def _worker(net: nn.Module, device: torch.device) -> Callable[[torch.Tensor], Any]:
    from bench.fastpath import worker_forward

    return worker_forward(net, device)


def variant_table(device: torch.device) -> dict[str, Variant]:
    import torch

    fp32 = "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"
    return {
        "fp32": Variant("fp32", fp32, _plain, "naive eager: no_grad, NCHW fp32, no cuDNN autotune"),
        "bf16": Variant("bf16", "bf16", _autocast("bf16", False), "autocast bf16"),
        "bf16_cl": Variant(
            "bf16_cl", "bf16", _autocast("bf16", True), "autocast bf16 + channels_last"
        ),
        "fp16": Variant("fp16", "fp16", _autocast("fp16", False), "autocast fp16"),
        "fp16_cl": Variant(
            "fp16_cl", "fp16", _autocast("fp16", True), "autocast fp16 + channels_last"
        ),
        "fp32_compile": Variant("fp32_compile", fp32, _compiled_fp32, "torch.compile fp32"),
        "fp16_compile": Variant(
            "fp16_compile", "fp16", _autocast("fp16", True, True), "compile + fp16 + cl"
        ),
        "bf16_compile": Variant(
            "bf16_compile", "bf16", _autocast("bf16", True, True), "compile + bf16 + cl"
        ),
        "worker": Variant(
            "worker",
            _worker_precision(device),
            _worker,
            "worker.engine.Engine.run on uint8 images (PRECISION=auto, channels_last, "
            "ragged batching; includes uint8<->float and crop)",
        ),
    }


def _worker_precision(device: torch.device) -> str:
    """What the worker's PRECISION=auto picks here (for the peak to compare against)."""
    from model_zoo.hardware import resolve_compute

    return resolve_compute(device, "auto").precision


def default_variants(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fp32", "fp16", "fp32_compile", "fp16_compile", "worker"]
    from model_zoo.hardware import cpu_has_native_bf16

    # Emulated bf16 (no native instructions) is ~50x slower than fp32: not worth a run.
    return ["fp32", "worker", "bf16"] if cpu_has_native_bf16() else ["fp32", "worker"]


# --- measurement ------------------------------------------------------------------------------


def _as_tensor(y: Any) -> tuple[torch.Tensor, bool]:
    """A variant's output as B x 3 x H x W float on the CPU, and whether it was 8-bit."""
    if isinstance(y, list):
        from bench.fastpath import outputs_to_tensor

        return outputs_to_tensor(y), True
    return y.detach().float().cpu(), False


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255.0).round().div(255.0)


def time_interleaved(
    fns: dict[str, Callable[[torch.Tensor], Any]],
    x: torch.Tensor,
    *,
    reps: int,
    warmup: int,
    device: torch.device,
    skipped: list[str],
    where: str,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per call of every variant, taken in turns (A B C, B C A, ...) rather than all of
    A then all of B: on a shared machine the load drifts over seconds, and turns spread that
    drift over all variants instead of biasing the ratios. Also each variant's output for one
    image (for PSNR). A variant that raises is dropped and noted in ``skipped``."""
    live = dict(fns)
    times: dict[str, list[float]] = {name: [] for name in live}
    outputs: dict[str, Any] = {}
    for name, fn in list(live.items()):
        try:
            for _ in range(max(0, warmup)):
                fn(x)
            outputs[name] = fn(x[:1])
            _sync(device)
        except Exception as exc:
            skipped.append(f"{where}/{name}: {exc!r}"[:300])
            del live[name], times[name]
    order = list(live)
    for rep in range(max(1, reps)):
        turn = order[rep % len(order) :] + order[: rep % len(order)] if order else []
        for name in turn:
            start = time.perf_counter()
            live[name](x)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times, outputs


def psnr(reference: torch.Tensor, other: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of ``other`` against ``reference`` (both in [0, peak]); inf when identical."""
    import torch

    mse = torch.mean((reference.float().cpu() - other.float().cpu()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def conv_flops(net: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward (convolutions etc., as FlopCounterMode counts), on the meta device so
    counting a 1024 px net costs nothing."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(net).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(shape, device="meta"))
    return int(counter.get_total_flops())


def cuda_peak_tflops(device: torch.device, precision: str) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return "", None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in CUDA_PEAK_TFLOPS:
        if fragment in name:
            return name, peaks.get(precision)
    return name, None


def _inputs(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    import torch

    from bench.images import synthetic_array

    array = synthetic_array(width, height, seed=7)
    one = torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)
    return one.unsqueeze(0).repeat(batch, 1, 1, 1).to(device)


def iter_configs(
    nets: Sequence[NetUnderTest], sizes: Sequence[int], batches: Sequence[int], max_px: float
) -> Iterator[tuple[NetUnderTest, int, int, int]]:
    for nut in nets:
        for out_px in sizes:
            in_px = out_px // nut.factor
            # the 9x9 reflection-padded first conv needs more than 4 px per side
            if in_px <= 4 or in_px * nut.factor != out_px:
                continue
            for batch in batches:
                if max_px and batch * out_px * out_px > max_px:
                    continue
                yield nut, out_px, in_px, batch


def run_forward(
    cfg: ForwardConfig,
    progress: bool = True,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every configuration, every variant. ``checkpoint`` gets the result so far after each
    configuration, so a run cut short by a time limit still leaves its finished rows."""
    import torch

    device = _device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    batches = list(cfg.batches) or ([1, 8, 32] if device.type == "cuda" else [1, 4])
    max_px = cfg.max_batch_pixels or (40e6 if device.type == "cuda" else 4.2e6)
    table = variant_table(device)
    names = list(cfg.variants)
    if names == ["auto"]:
        names = default_variants(device)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(table)}")
    if "fp32" not in names:
        names.insert(0, "fp32")  # every ratio is against the reference
    nets = build_nets(cfg.nets, cfg.zoo, cfg.tiny)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def summary() -> dict[str, Any]:
        return {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "variants": {n: table[n].note for n in names},
            "rows": list(rows),
            "skipped": list(skipped),
        }

    for nut in nets:
        prepared: dict[str, Callable[[torch.Tensor], Any]] = {}
        for vname in names:
            try:
                prepared[vname] = table[vname].prepare(nut.net, device)
            except Exception as exc:  # a variant this machine cannot run (e.g. no compiler)
                skipped.append(f"{nut.name}/{vname}: {type(exc).__name__}: {exc}")
        for _, out_px, in_px, batch in iter_configs([nut], cfg.sizes, batches, max_px):
            x = _inputs(batch, in_px, in_px, device)
            flops_per_image = conv_flops(nut.net, (1, 3, in_px, in_px))
            reference: torch.Tensor | None = None
            ref_ms = math.nan
            where = f"{nut.name}/{out_px}px/b{batch}"
            all_times, outputs = time_interleaved(
                prepared, x, reps=cfg.reps, warmup=cfg.warmup, device=device,
                skipped=skipped, where=where,
            )  # fmt: skip
            for vname in prepared:
                if vname not in all_times:
                    continue
                times, y = all_times[vname], outputs[vname]
                ms_batch = statistics.median(times) * 1000.0
                ms_image = ms_batch / batch
                y_t, quantized = _as_tensor(y)
                if vname == "fp32":
                    reference, ref_ms = y_t, ms_image
                quality = max_err = math.nan
                if reference is not None:
                    # a uint8 result is compared with the reference rounded the same way, so
                    # the PSNR measures the fast path, not the 8-bit output format
                    ref = _quantize(reference) if quantized else reference
                    quality = psnr(ref, y_t)
                    max_err = (ref - y_t).abs().max().item() * 255.0
                gpu, peak = cuda_peak_tflops(device, table[vname].precision)
                tflops = flops_per_image / (ms_image / 1000.0) / 1e12
                row = {
                    "net": nut.name,
                    "weights": nut.weights,
                    "out_px": out_px,
                    "in_px": in_px,
                    "batch": batch,
                    "variant": vname,
                    "precision": table[vname].precision,
                    "ms_per_batch": ms_batch,
                    "ms_per_image": ms_image,
                    "ms_per_image_min": min(times) * 1000.0 / batch,
                    "images_per_s": 1000.0 / ms_image,
                    "speedup_vs_fp32": ref_ms / ms_image,
                    "psnr_vs_fp32_db": quality,
                    "max_abs_err_255": max_err,
                    "gflop_per_image": flops_per_image / 1e9,
                    "achieved_tflops": tflops,
                    "peak_tflops": peak,
                    "pct_of_peak": 100.0 * tflops / peak if peak else None,
                    "device_name": gpu or None,
                }
                if nut.name == "style" and batch == 1 and out_px in PAPER_STYLE_S:
                    row["paper_titanx_ms"] = PAPER_STYLE_S[out_px] * 1000.0
                rows.append(row)
                if progress:
                    print(
                        f"[forward] {nut.name:6} {out_px:5}px b{batch:<3} {vname:13} "
                        f"{ms_image:9.2f} ms/img  x{row['speedup_vs_fp32']:.2f}  "
                        f"psnr {quality:.1f} dB",
                        flush=True,
                    )
            if checkpoint is not None:
                checkpoint(summary())
        del prepared
    return summary()


def forward_markdown(result: dict[str, Any]) -> str:
    headers = [
        "net", "out px", "batch", "variant", "ms/img", "min ms/img", "img/s", "x vs fp32",
        "PSNR dB", "max err /255", "GFLOP/img", "TFLOP/s", "% peak",
    ]  # fmt: skip
    rows = [
        [
            r["net"], r["out_px"], r["batch"], r["variant"], r["ms_per_image"],
            r["ms_per_image_min"], r["images_per_s"], r["speedup_vs_fp32"], r["psnr_vs_fp32_db"],
            r["max_abs_err_255"], r["gflop_per_image"], r["achieved_tflops"], r["pct_of_peak"],
        ]
        for r in result["rows"]
    ]  # fmt: skip
    digits = [0, 0, 0, 0, 2, 2, 2, 2, 1, 2, 2, 3, 1]
    text = markdown_table(headers, rows, digits)
    weights = sorted({r["weights"] for r in result["rows"]})
    text += f"\nWeights: {', '.join(weights)}. Variants: " + "; ".join(
        f"`{k}` = {v}" for k, v in result["variants"].items()
    )
    paper = [r for r in result["rows"] if "paper_titanx_ms" in r and r["variant"] == "fp32"]
    if paper:
        text += "\n\nPaper (style net, batch 1, GTX Titan X 2015): " + ", ".join(
            f"{r['out_px']} px {r['paper_titanx_ms']:.0f} ms" for r in paper
        )
    if result["skipped"]:
        text += "\n\nSkipped: " + "; ".join(result["skipped"])
    return text + "\n"


def write_forward_report(
    result: dict[str, Any], out_dir: Path, name: str, plot: bool = True
) -> dict[str, Path]:
    meta = machine_info()
    meta["device"] = result.get("device_name") or result["device"]
    paths = {
        "json": write_json(
            out_dir / f"{name}.json", {"benchmark": "forward", "meta": meta, **result}
        )
    }
    paths["md"] = write_markdown(
        out_dir / f"{name}.md", "Forward pass: ms per image", forward_markdown(result), meta
    )
    rows = result["rows"]
    if rows and plot:
        labels = sorted(
            {(r["net"], r["out_px"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1], k[2])
        )
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        lookup = {(r["net"], r["out_px"], r["batch"], r["variant"]): r for r in rows}
        series = {
            v: [lookup.get((*lab, v), {}).get("ms_per_image", math.nan) for lab in labels]
            for v in variants
        }
        paths["png"] = plot_bars(
            [f"{n} {p}px b{b}" for n, p, b in labels],
            series,
            out_dir / f"{name}.png",
            title=f"forward pass ({meta['device']})",
            ylabel="ms per image (log)",
            log=True,
        )
    return paths


def config_from_args(args: argparse.Namespace) -> ForwardConfig:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    reps, warmup = args.reps, args.warmup
    if args.quick:
        if args.sizes == "256,512,1024":
            sizes = [256]
        batches = batches or [1, 2]
        reps, warmup = min(reps, 2), min(warmup, 1)
    return ForwardConfig(
        nets=[n.strip() for n in args.nets.split(",") if n.strip()],
        sizes=sizes,
        batches=batches,
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        reps=reps,
        warmup=warmup,
        max_batch_pixels=args.max_batch_pixels,
        device=args.device,
        zoo=args.zoo,
        tiny=args.tiny,
        threads=args.threads,
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)

    def checkpoint(partial: dict[str, Any]) -> None:
        write_forward_report(partial, out, args.name, plot=False)

    result = run_forward(config_from_args(args), checkpoint=checkpoint)
    paths = write_forward_report(result, out, args.name, plot=not args.no_plot)
    for kind, path in paths.items():
        print(f"[forward] wrote {kind}: {path}")
    return result
