"""The benchmarks that start the real service (redis-server, API, worker) on tiny nets: they
must bring the stack up, drive it, report every request, and stop everything they started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main

from .conftest import NO_TILED_COST_PROBE

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def no_tiled_cost_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's workers inherit the environment; the tiled cost probe measures nothing
    these benchmarks report."""
    for key, value in NO_TILED_COST_PROBE.items():
        monkeypatch.setenv(key, value)


def test_batching_compares_max_batch_1_with_dynamic(tmp_path: Path) -> None:
    rc = bench_main(
        ["batching", "--tiny", "--size", "32", "--mixed-sizes", "24,32,40x24",
         "--concurrency", "3", "--requests", "6", "--warmup", "1", "--max-batch", "4",
         "--worker-env", "TORCH_THREADS=1", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "batching.json").read_text())
    single = data["results"]["max_batch=1"]
    dynamic = data["results"]["dynamic(max_batch=4)"]
    for phase in (single, dynamic):
        for workload in ("same-size", "mixed-size"):
            (level,) = phase[workload]
            assert level["requests"] == 6 and level["ok"] == 6, level["errors"]
            assert level["server_ms"]["compute"] > 0  # Server-Timing came through
    # the worker really ran with MAX_BATCH=1: every image alone (X-Batch-Size header)
    assert single["same-size"][0]["batch_size_header"] == 1.0
    assert 1.0 <= dynamic["same-size"][0]["batch_size_header"] <= 3.0
    assert len(data["comparisons"]) == 2
    assert {c["workload"] for c in data["comparisons"]} == {"same-size", "mixed-size"}
    assert "| stylize style=mosaic 32x32 | 3 |" in (tmp_path / "batching.md").read_text()
    assert (tmp_path / "batching.png").stat().st_size > 0


def test_e2e_and_spawned_load(tmp_path: Path) -> None:
    rc = bench_main(
        ["e2e", "--tiny", "--size", "32", "--requests", "3", "--warmup", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["e2e"]["ok"] == 3
    assert e2e["bare"]["forward_ms"] > 0 and e2e["bare"]["encode_ms"] > 0
    assert e2e["e2e_p50_over_bare"] > 0
    rc = bench_main(
        ["load", "--spawn", "--tiny", "--endpoint", "upscale", "--factor", "4",
         "--sizes", "16", "--concurrency", "2", "--requests", "4", "--warmup", "0",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    load = json.loads((tmp_path / "load.json").read_text())
    (level,) = load["levels"]
    assert level["ok"] == 4 and level["errors"] == {}
    # every 16 px upload came back as a 4x upscaled PNG
    assert [tuple(s["out_size"]) for s in load["samples"]["0"]] == [(64, 64)] * 4


def test_worker_bench_scales_worker_processes(tmp_path: Path) -> None:
    """``bench worker --workers 1,2``: the scaling run behind the README's capacity table
    starts that many worker processes per configuration and reports each; ``--batch-window
    fixed,adaptive`` compares the two windows in the same run."""
    rc = bench_main(
        ["worker", "--tiny", "--sizes", "32", "--concurrency", "2", "--requests", "4",
         "--warmup", "1", "--max-batch", "2", "--workers", "1,2",
         "--batch-window", "fixed,adaptive",
         "--worker-env", "TORCH_THREADS=1", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    results = json.loads((tmp_path / "worker.json").read_text())["results"]
    assert list(results) == [
        f"max_batch=2 window={w} workers={n}" for w in ("fixed", "adaptive") for n in (1, 2)
    ]
    for (level,) in results.values():
        assert level["requests"] == 4 and level["ok"] == 4, level["errors"]
    md = (tmp_path / "worker.md").read_text()
    assert "| max_batch=2 window=adaptive workers=2 | 2 | 4 | 4 |" in md
    with pytest.raises(SystemExit, match="--batch-window"):
        bench_main(["worker", "--tiny", "--batch-window", "sometimes", "--out", str(tmp_path)])


def test_the_benches_serve_the_zoos_net_for_a_multi_style_slot(tmp_path: Path) -> None:
    """``mosaic`` is a slot of the shipped multi-style net, not a net of its own; the benches
    took that for a zoo without it and timed untrained full-width nets instead of the served
    one. A style the zoo lacks, or ``tiny``, still gets untrained nets."""
    from bench.stack import make_bench_zoo
    from model_zoo.manifest import read_manifest, zoo_dir

    shipped = zoo_dir(None)
    assert "mosaic" not in read_manifest(shipped).names()  # a slot, not a net
    assert make_bench_zoo(tmp_path / "a", style="mosaic") == (shipped, "trained zoo models")
    folder, note = make_bench_zoo(tmp_path / "b", style="no_such_style")
    assert folder == tmp_path / "b" and "untrained" in note
    assert set(read_manifest(folder).names()) == {"no_such_style", "x4", "x8"}
    # The e2e bench's bare forward pass runs the slot too (it asked the engine for 'mosaic').
    from bench.e2e import bare_cost

    bare = bare_cost(shipped, "mosaic", 32, reps=1, warmup=0)
    assert bare["forward_ms"] > 0 and bare["precision"] in {"fp32", "bf16"}


def test_the_worker_bench_queues_the_slot_the_api_would(tmp_path: Path) -> None:
    """Without ``--tiny`` on the shipped zoo (as the GPU lease's serving check runs it), the
    worker bench's jobs name the multi-style net and carry the slot's weight row; a job naming
    'mosaic' itself would fail in the worker (no such net)."""
    rc = bench_main(
        ["worker", "--sizes", "32", "--concurrency", "1", "--requests", "2", "--warmup", "0",
         "--max-batch", "2", "--worker-env", "TORCH_THREADS=1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "worker.json").read_text())
    assert report["zoo"] == "trained zoo models"
    ((level,),) = report["results"].values()
    assert level["ok"] == 2, level["errors"]


def test_the_startup_bench_times_a_job_queued_before_the_worker(tmp_path: Path) -> None:
    """``bench startup``: the worker's first heartbeat, the queued job's result and the end of
    its cost probes, in seconds from its start; the job is answered before the probes end or
    at the latest with them (it is read before the first probe)."""
    rc = bench_main(
        ["startup", "--tiny", "--size", "24", "--worker-env", "TORCH_THREADS=1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "startup.json").read_text())
    (run,) = result["runs"]
    assert 0 < run["heartbeat_s"] <= run["answered_s"] <= run["measured_s"]
    assert "| 1 |" in (tmp_path / "startup.md").read_text()
