"""One model trained on a wall-clock budget, as fast as the device allows.

What differs from ``training.loop.train`` (the CPU trainer, unchanged) and why:

- **A budget, not an iteration count.** A lease is minutes long and its end is fixed, so a stage
  trains until its deadline (less a reserve for the checkpoint, the sample grids and the export)
  and as many iterations as fit. SIGINT / SIGTERM stop it early the same way.
- **Data resident on the device** (``training.gpu.pack``): crops and flips are drawn and gathered
  on the GPU; a DataLoader of PIL crops could not feed hundreds of steps a second.
- **No host synchronisation in a step** (``training.gpu.objective``): the loss terms are summed
  on the device and read every ``log_every`` steps; NaN is checked then.
- **On CUDA**: bf16 autocast, channels_last, the loss network stored in bf16, cuDNN autotuning,
  TF32 for the fp32 Gram products, fused Adam, and the whole step (crops, forward, backward,
  Adam) captured as **one CUDA graph** after the warm-up, which removes the per-kernel launch
  cost that bounds steps this small. If capture fails (or a replay would not draw new crops),
  the stage says why and continues eagerly: slower, never broken. ``torch.compile`` is not
  used: it compiles for about a minute per model and shape (README, "Performance"), a large
  share of a stage that is itself a few minutes long, and CUDA graphs already remove the
  overhead it would.
- **The rate decays in time, not iterations.** ``StageOptions.lr_decay_at``: at those fractions
  of the stage's training time the rate is multiplied by ``lr_decay_gamma`` (the CPU runs'
  lesson: the drop is what turns a plateau into progress, ``training.schedule``). Each rate is a
  one-element tensor on the device, overwritten in place, so a captured graph's fused Adam reads
  the new rate on its next replay. Every command of a lease decays within its own budget, so
  whatever it exports ends at the low rate; a resume starts at the base rate again (a warm
  restart).
- **FLOPs are counted once** (``torch.utils.flop_counter.FlopCounterMode`` on the first step), so
  the achieved TFLOP/s can be reported against the card's ~790 measured bf16 peak.
- **The last steps are profiled** (``torch.profiler``, kernels included on CUDA): one replay of
  the graph and one eager step, each with its wall time, the time the device was busy, and the
  ops that kept it busy, into ``profile.txt``. The first lease reached 7.4 % of the peak and
  brought back no way to tell launch overhead from slow kernels; the next one answers that.
  At the end, not the start: a profiler active before the capture could cost the graph.

On a CPU the same code runs eagerly in the task's CPU precision: that is the rehearsal.
Checkpoints, phases, lineage, the sample grids and the zoo export are the CPU trainer's own
(``training.checkpoint``, ``training.loop``), so a GPU run resumes, records and exports exactly
like a CPU run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from model_zoo import manifest
from model_zoo.hardware import Compute, hardware_description, resolve_compute
from training.averaging import WeightAverage, exported
from training.checkpoint import StopRequested, load_checkpoint, save_checkpoint
from training.gpu.objective import objective_for
from training.gpu.pack import Pack, ResidentPhotos
from training.loop import _record_phase, export, start_run, task_for, write_run_report
from training.schedule import apply_lr, budget_decay
from training.settings import TrainSettings
from training.vgg import VGG16Features

log = logging.getLogger("training.gpu")

STAGE_FILE = "stage.json"
"""Per run folder: how the last session went (speed, mode, hardware), beside the checkpoint."""
PROFILE_FILE = "profile.txt"
"""Per run folder: where the last steps' time went (module docstring); packed with the model."""
BF16_PEAK_TFLOPS = 790.0
"""Dense bf16 matrix rate measured on this workplace's GPUs (KINDS.md: 769-798 TFLOP/s on the
H200, 798 on the H100: the same Hopper die and clocks, only the memory differs)."""


@dataclass
class StageOptions:
    budget_s: float
    """Wall-clock seconds for the whole stage, setup and export included."""
    reserve_s: float = 12.0
    """Kept at the end for the checkpoint, the sample grids and the export."""
    cuda_graphs: bool = True
    tf32: bool = True
    log_every: int = 50
    """Steps between host reads of the loss terms (one history point each)."""
    checkpoint_every_s: float = 60.0
    count_flops: bool = True
    profile_s: float = 4.0
    """Kept before the reserve for profiling the last steps (0: no profile). CUPTI's start-up
    is most of it on CUDA."""
    lr_decay_at: tuple[float, ...] = ()
    """Fractions of the stage's training time from which the rate is ``lr_decay_gamma`` times
    lower once more (module docstring); empty: one rate (after the warm-up) throughout."""
    lr_decay_gamma: float = 0.3


@dataclass
class StageReport:
    """What a stage did; written to ``stage.json`` and into the campaign's summary."""

    name: str
    task: str
    device: str = ""
    hardware: str = ""
    precision: str = ""
    batch_size: int = 0
    image_size: int = 0
    start_iteration: int = 0
    iteration: int = 0
    steps: int = 0
    setup_s: float = 0.0
    train_s: float = 0.0
    wall_s: float = 0.0
    timed_steps: int = 0
    it_per_s: float = 0.0
    images_per_s: float = 0.0
    flops_per_step: float = 0.0
    tflops: float = 0.0
    peak_fraction: float = 0.0
    peak_memory_gib: float = 0.0
    """The most GPU memory the stage's tensors held at once (torch's allocator, the pack's
    resident photos included; 0 on a CPU): the H200 has 139 GiB, the H100 the tool may lend
    instead 78, and this says whether a stage's batch fits the smaller card."""
    device_memory_gib: float = 0.0
    mode: str = "eager"
    graph_error: str = ""
    profile: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per profiled step ("graph", "eager"): ``wall_ms`` (profiler on) and ``device_ms``, the
    time kernels ran (CUDA; 0 on a CPU). ``device_ms`` far below the step's time at full speed
    means launch-bound; close to it, the kernels themselves (``profile.txt`` names them)."""
    lr_decays: list[dict[str, float]] = field(default_factory=list)
    """Each budget decay taken: the iteration it applied from and the base rate from there."""
    stopped_by: str = ""
    final_losses: dict[str, float] = field(default_factory=dict)
    exported: bool = False
    sha256: str = ""
    error: str = ""

    def line(self) -> str:
        """One summary line (what the campaign prints per model)."""
        return (
            f"{self.name:<12} {self.iteration:>8} its ({self.steps} now, batch {self.batch_size}, "
            f"{self.image_size} px) {self.it_per_s:8.1f} it/s {self.images_per_s:9.1f} img/s "
            f"{self.tflops:7.3g} TFLOP/s ({100 * self.peak_fraction:.1f}% of "
            f"{BF16_PEAK_TFLOPS:.0f}) {self.mode}"
            + "".join(f"; lr {d['lr']:.2g} from it {d['iteration']:.0f}" for d in self.lr_decays)
            + "".join(
                f"; {kind} step {p['wall_ms']:.1f} ms, device busy {p['device_ms']:.1f} ms"
                for kind, p in self.profile.items()
            )
            + (
                f"; memory {self.peak_memory_gib:.1f} of {self.device_memory_gib:.0f} GiB"
                if self.device_memory_gib
                else ""
            )
            + (f" ERROR {self.error}" if self.error else "")
        )


def _autocast(compute: Compute) -> AbstractContextManager[Any]:
    """Autocast without its weight-cast cache: a CUDA graph must redo the casts every replay
    (the cache would hand the graph tensors freed after capture)."""
    if compute.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if compute.precision == "bf16" else torch.float16
    return torch.autocast(compute.device.type, dtype=dtype, cache_enabled=False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_stage(run_dir: Path, report: StageReport) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STAGE_FILE).write_text(json.dumps(asdict(report), indent=1) + "\n")


def read_stage(run_dir: Path) -> StageReport | None:
    path = run_dir / STAGE_FILE
    return StageReport(**json.loads(path.read_text())) if path.exists() else None


def train_stage(
    settings: TrainSettings,
    pack: Pack,
    options: StageOptions,
    photos: ResidentPhotos | None = None,
    vgg_state: dict[str, torch.Tensor] | None = None,
) -> StageReport:
    """Train (or resume) one model until its budget is spent, then export it into the zoo.

    ``budget_s`` 0 trains nothing: it exports the run's checkpoint (how the campaign recovers a
    stage whose process was killed). ``photos`` / ``vgg_state`` let stages share what the pack
    decoded once.
    """
    if settings.lr_milestones:  # a budget has no iteration count: it decays in time instead
        raise ValueError(
            f"{settings.name}: --lr-milestones is for the iteration-bound trainer "
            "(a budget-bound stage decays in time: StageOptions.lr_decay_at)"
        )
    started = time.monotonic()
    deadline = started + options.budget_s
    report = StageReport(settings.name, settings.task)
    task = task_for(settings)
    compute = resolve_compute(settings.device, settings.precision, cuda_precision="bf16")
    device = compute.device
    cuda = device.type == "cuda"
    previous = read_stage(Path(settings.run_dir) / settings.name)
    report.device, report.precision = str(device), compute.precision
    report.hardware = hardware_description(device)
    if previous is not None and options.budget_s <= 0:  # export only: it trained elsewhere
        report.hardware, report.precision = previous.hardware, previous.precision
    report.batch_size, report.image_size = settings.batch_size, settings.image_size
    if cuda:
        torch.backends.cudnn.benchmark = True
        # TF32 for fp32 matmuls: the Gram products (fp32 by design, training.losses) run on
        # tensor cores with fp32 range; their rounding (~1e-3) is far below the style loss's
        # own noise between batches.
        torch.backends.cuda.matmul.allow_tf32 = options.tf32
        torch.backends.cudnn.allow_tf32 = options.tf32
        torch.cuda.reset_peak_memory_stats(device)  # stages share a process: each its own peak
        report.device_memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30

    torch.manual_seed(settings.seed)
    net, state, checkpoint, resuming = start_run(task, device)
    run_dir = checkpoint.parent
    vgg = None
    if task.needs_vgg:
        vgg = VGG16Features(
            layers=task.vgg_layers, state_dict=vgg_state or pack.vgg_state_dict()
        ).to(device, memory_format=torch.channels_last)
        if compute.precision != "fp32":
            vgg = vgg.to({"bf16": torch.bfloat16, "fp16": torch.float16}[compute.precision])
    task.prepare(vgg, device)
    groups = task.param_groups(net)
    params = [p for group in groups for p in group["params"]]
    # Fused Adam on CUDA, capturable so the graph can hold the optimizer step too; each rate a
    # tensor on the device (module docstring: how a decay reaches the graph's replays).
    extra: dict[str, Any] = {"fused": True, "capturable": True} if cuda else {}
    optimizer = torch.optim.Adam(
        [
            group | {"lr": torch.tensor(settings.lr * group["lr_scale"], device=device)}
            for group in groups
        ],
        lr=settings.lr,
        **extra,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=compute.precision == "fp16")
    average = WeightAverage(net, settings.ema_decay) if settings.ema_decay else None
    kept = average.model if average is not None else None  # what checkpoints store of it
    if resuming:
        state = load_checkpoint(checkpoint, net, optimizer, kept)
        log.info("%s: resumed at iteration %d", settings.name, state.iteration)
    if average is not None:
        average.start_from(net)
    if options.budget_s > 0:  # an export that trains nothing is no phase
        decay_plan = (
            {"lr_decay_at": list(options.lr_decay_at), "lr_decay_gamma": options.lr_decay_gamma}
            if options.lr_decay_at
            else {}
        )
        _record_phase(task, state, decay_plan)
    report.start_iteration = report.iteration = state.iteration
    photos = photos if photos is not None else pack.photos(device)
    sample_photos = pack.sample_images()
    torch.manual_seed(settings.seed + state.iteration)  # a resumed run draws new crops
    sampler = photos.sampler(settings.image_size, settings.batch_size)
    objective = objective_for(task, settings.batch_size, device)
    sums = torch.zeros(1 + len(objective.names), device=device)

    def body() -> None:
        """One step with no host reads: crops, loss, backward, Adam, the running sums."""
        batch = sampler()
        with _autocast(compute):
            terms = objective(net, batch)
        loss = torch.stack([t.float() for t in terms]).sum()
        scaler.scale(loss).backward()
        if settings.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if average is not None:
            average.update()  # no host read: the graph holds it too
        sums.add_(torch.stack([loss.detach(), *[t.detach().float() for t in terms]]))

    decay = 1.0
    """The budget decay's factor on the rate so far (``StageOptions.lr_decay_at``)."""

    def eager_step() -> None:
        state.lr = apply_lr(optimizer, settings, state.iteration, decay)  # replays keep it
        optimizer.zero_grad(set_to_none=True)
        body()

    def decay_due() -> None:
        """Lower the rate once the next decay's share of the training time has passed: written
        into the rate tensors, so the graph's next replay and the next eager step use it."""
        nonlocal decay
        fraction = (time.monotonic() - train_started) / window if window > 0 else 1.0
        due = budget_decay(fraction, options.lr_decay_at, options.lr_decay_gamma)
        if due < decay:
            decay = due
            state.lr = apply_lr(optimizer, settings, state.iteration, decay)
            report.lr_decays.append({"iteration": state.iteration, "lr": state.lr})

    pending = 0
    last_checkpoint = time.monotonic()
    timed: dict[str, float] = {}
    """Where the timed (steady-state) part began: iteration and time."""

    def count() -> None:
        report.steps = state.iteration - report.start_iteration
        report.iteration = state.iteration

    def measure() -> None:
        """The report's counts, memory and speed so far (call after a synchronisation)."""
        count()
        if cuda:
            report.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        if not timed:
            return
        report.timed_steps = int(state.iteration - timed["iteration"])
        report.train_s = time.monotonic() - timed["time"]
        if report.timed_steps and report.train_s > 0:
            report.it_per_s = report.timed_steps / report.train_s
            report.images_per_s = report.it_per_s * settings.batch_size
            report.tflops = report.flops_per_step * report.it_per_s / 1e12
            report.peak_fraction = report.tflops / BF16_PEAK_TFLOPS

    def checkpoint_now() -> None:
        """Checkpoint and stage.json (with the speed so far): what a killed stage leaves."""
        nonlocal last_checkpoint
        flush()
        measure()
        save_checkpoint(checkpoint, net, optimizer, state, elapsed(), kept)
        write_stage(run_dir, report)
        last_checkpoint = time.monotonic()

    def after_steps(count: int) -> None:
        """Count steps; every ``log_every`` read the sums (one sync) into the history."""
        state.iteration += count
        pending_add(count)
        if time.monotonic() - last_checkpoint >= options.checkpoint_every_s:
            checkpoint_now()

    def pending_add(count: int) -> None:
        nonlocal pending
        pending += count
        if pending >= options.log_every:
            flush()

    def flush() -> None:
        nonlocal pending
        if not pending:
            return
        values = (sums / pending).tolist()
        sums.zero_()
        pending = 0
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"loss became {values[0]} by iteration {state.iteration}")
        point = {"iteration": state.iteration, "total": values[0]}
        state.history.append(point | dict(zip(objective.names, values[1:], strict=True)))

    def elapsed() -> float:
        return state.elapsed_s + time.monotonic() - started

    train_deadline = deadline - options.reserve_s
    profiling = options.profile_s > 0 and options.budget_s > 0
    loop_deadline = train_deadline - (options.profile_s if profiling else 0.0)
    report.setup_s = time.monotonic() - started
    train_started = time.monotonic()
    window = loop_deadline - train_started  # the training time the decay's fractions divide
    stop_reason = "budget"
    with StopRequested() as stop:

        def running() -> bool:
            nonlocal stop_reason
            if stop.requested:
                stop_reason = "signal"
            elif state.iteration >= settings.iterations:
                stop_reason = "iterations"
            elif options.budget_s > 0 and state.iteration == report.start_iteration:
                return True  # one step at least: a stage with a budget trains something
            elif time.monotonic() >= loop_deadline:
                stop_reason = "budget"
            else:
                return True
            return False

        # Warm-up, eagerly: the lr ramp, cuDNN's autotuning, and the FLOP count (first step).
        warm = max(3, settings.warmup - state.iteration)
        graph: torch.cuda.CUDAGraph | None = None
        while running() and warm > 0:
            if options.count_flops and not report.flops_per_step:
                with FlopCounterMode(display=False) as counter:
                    eager_step()
                report.flops_per_step = float(counter.get_total_flops())
            else:
                eager_step()
            after_steps(1)
            warm -= 1
        if running() and cuda and options.cuda_graphs and not scaler.is_enabled():
            graph, report.graph_error, steps = _capture(body, optimizer, sampler, device)
            after_steps(steps)
        report.mode = "cuda-graph" if graph is not None else "eager"
        if running():
            checkpoint_now()  # warmed up (and captured): a kill from here on loses little
            _synchronize(device)
            timed.update(iteration=state.iteration, time=time.monotonic())
        step: Callable[[], None] = graph.replay if graph is not None else eager_step
        while running():
            if options.lr_decay_at:
                decay_due()
            step()
            after_steps(1)
        _synchronize(device)
        measure()  # the speed of the timed loop, before the profiled steps
        if profiling and stop_reason == "budget" and not stop.requested:
            # The graph first: the eager step makes new gradient tensors, which a later replay
            # would not see. After it no replay follows.
            steps = {"graph": graph.replay} if graph is not None else {}
            report.profile = _profile(steps | {"eager": eager_step}, device, run_dir)
            after_steps(len(report.profile))
            count()  # trained, but not in the speed (the profiler slows them)
        flush()
    report.stopped_by = stop_reason if report.steps or options.budget_s > 0 else "export-only"
    del graph
    if report.lr_decays:  # where this command's decays fell, with its phase
        state.phases[-1]["lr_decayed_at"] = [int(d["iteration"]) for d in report.lr_decays]
    wall = elapsed()
    if not report.steps and state.iteration == 0:
        raise RuntimeError(f"{settings.name}: nothing trained (no checkpoint, no budget)")
    save_checkpoint(checkpoint, net, optimizer, state, wall, kept)
    shipped = exported(net, average)
    write_run_report(task, shipped, sample_photos, state.history, run_dir, device)
    entry = export(task, shipped, state, compute, wall, photos, interrupted=stop.requested)  # type: ignore[arg-type]
    report.exported, report.sha256 = True, entry.sha256
    report.final_losses = dict(entry.final_losses)
    report.wall_s = time.monotonic() - started
    if options.budget_s <= 0 and previous is not None:  # keep how the training itself went
        report = replace(
            previous,
            iteration=state.iteration,
            exported=True,
            sha256=entry.sha256,
            final_losses=report.final_losses,
            stopped_by="killed; exported from its last checkpoint",
        )
    _describe(settings, pack, report)
    write_stage(run_dir, report)
    return report


def graph_ignores_rate_changes(device: torch.device) -> str:
    """Why a captured fused-Adam step would not follow a rate written after capture ("" when it
    does): one tiny graph replayed at rate 0 (nothing may move) and at rate 0.1 (all must).
    Run once before a campaign decays under graphs: torch documents tensor rates for fused
    capturable Adam, but a card, driver or torch build that drops them would otherwise train
    its whole schedule at the first rate and report a decay that never happened."""
    try:
        param = torch.nn.Parameter(torch.ones(64, device=device))
        rate = torch.tensor(0.1, device=device)
        optimizer = torch.optim.Adam(
            [{"params": [param], "lr": rate}], lr=0.1, fused=True, capturable=True
        )
        param.grad = torch.ones_like(param)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                optimizer.step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            optimizer.step()
        before = param.detach().clone()
        rate.fill_(0.0)
        graph.replay()
        torch.cuda.synchronize(device)
        if not torch.equal(param.detach(), before):
            return "a replay at rate 0 still moved the weights"
        rate.fill_(0.1)
        graph.replay()
        torch.cuda.synchronize(device)
        if torch.equal(param.detach(), before):
            return "a replay at rate 0.1 did not move the weights"
        return ""
    except Exception as exc:  # any failure here means: keep the graph, skip the decay
        try:  # a capture that failed midway leaves the CUDA generator unusable (see there)
            _reset_cuda_rng(device)
        except Exception:
            log.exception("resetting the CUDA generator after the rate check failed")
        return f"{type(exc).__name__}: {exc}"[:300]


def _capture(
    body: Callable[[], None],
    optimizer: torch.optim.Optimizer,
    sampler: Any,
    device: torch.device,
) -> tuple[torch.cuda.CUDAGraph | None, str, int]:
    """Capture one whole step as a CUDA graph (PyTorch's whole-network recipe: warm up on a
    side stream, grads None at capture so each replay *writes* them). Returns the graph (None
    on failure), why it failed, and how many steps the warm-up trained."""
    steps = 0
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                optimizer.zero_grad(set_to_none=True)
                body()
                steps += 1
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            body()
        graph.replay()
        first = sampler.last.clone()
        graph.replay()
        steps += 2
        torch.cuda.synchronize(device)
        if torch.equal(first, sampler.last):
            return None, "two replays drew the same photos (graph RNG not advancing)", steps
        return graph, "", steps
    except Exception as exc:  # any failure: continue eagerly, never lose the stage
        log.warning("CUDA graph capture failed, continuing eagerly: %r", exc)
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        _reset_cuda_rng(device)
        return None, repr(exc)[:500], steps


def _profile(
    steps: dict[str, Callable[[], None]], device: torch.device, run_dir: Path
) -> dict[str, dict[str, float]]:
    """Run each step once under ``torch.profiler``; write their op tables into ``profile.txt``
    and return each one's wall and device-busy milliseconds. Never fails the stage: a profiler
    that cannot start (CUPTI refused in a container) leaves a note instead of numbers."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    results: dict[str, dict[str, float]] = {}
    text: list[str] = []
    for kind, step in steps.items():
        try:
            _synchronize(device)
            with profile(activities=activities) as profiler:
                started = time.perf_counter()
                step()
                _synchronize(device)
                wall = time.perf_counter() - started
            averages = profiler.key_averages()
            # The kernels' own rows (an op's row repeats the time of the kernels it launched).
            busy_us = sum(
                event.self_device_time_total
                for event in averages
                if event.device_type == DeviceType.CUDA
                and not getattr(event, "is_user_annotation", False)
            )
            results[kind] = {"wall_ms": 1e3 * wall, "device_ms": busy_us / 1e3}
            text += [
                f"== {kind} step: {1e3 * wall:.2f} ms wall (profiler on), device busy "
                f"{busy_us / 1e3:.2f} ms",
                averages.table(sort_by=sort, row_limit=25),
            ]
        except Exception as exc:  # a profile is a diagnosis, never worth a stage
            log.warning("profiling the %s step failed: %r", kind, exc)
            text.append(f"== {kind} step: profiler failed: {exc!r}")
    (run_dir / PROFILE_FILE).write_text("\n".join(text) + "\n")
    return results


def _reset_cuda_rng(device: torch.device) -> None:
    """Give the default CUDA generator a fresh state after a failed capture.

    A capture that fails inside ``torch.cuda.graph`` never runs the generator's capture
    epilogue, so its state keeps the offsets it counted during the capture and every later
    random draw, eager ones included, raises "Offset increment outside graph capture
    encountered unexpectedly": the 2026-12-04 lease lost all five stages so. Swapping in a
    new state object (``graphsafe_set_state``, the API CUDA graphs use to give each graph a
    generator state) clears it; seeded off the old seed so the crops do not repeat. A trial
    draw proves the generator works before the eager loop relies on it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    fresh = torch.Generator(device=device)
    fresh.manual_seed(generator.initial_seed() + 1)
    generator.graphsafe_set_state(fresh.graphsafe_get_state())
    torch.randint(2, (1,), device=device)
    torch.cuda.synchronize(device)


def _describe(settings: TrainSettings, pack: Pack, report: StageReport) -> None:
    """Name the pack's sources in the exported entry (not the pack's copies), and record the
    training hardware when this was an export-only pass on another device."""
    folder = manifest.zoo_dir(settings.zoo)
    stored = manifest.read_manifest(folder)
    entry = stored.get(settings.name)
    by_copy = {str(pack.style_path(name)): pack.style_source(name) for name in pack.style_names}
    training = dict(entry.training)
    if "style_images" in training:
        training["style_images"] = [
            f"{name}={by_copy.get(path, path)}"
            for name, _, path in (item.partition("=") for item in training["style_images"])
        ]
    if training.get("style_image") in by_copy:
        training["style_image"] = by_copy[training["style_image"]]
    training["precision"] = report.precision
    # Trained to a wall-clock budget: the iteration count asked for was "as many as fit".
    training["iterations"] = report.iteration
    training["schedule"] = "wall-clock budget (training.gpu)"
    for slot in entry.styles:
        slot.style_image = by_copy.get(slot.style_image, slot.style_image)
    entry.training = training
    entry.hardware = report.hardware
    entry.data = {**entry.data, "root": pack.train_source, "pack": pack.describe()}
    manifest.write_manifest(stored, folder)
