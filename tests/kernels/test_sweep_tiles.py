"""benchmarks/sweep_tiles.py in its smoke mode (tiny shapes, two or three launch configurations per
kernel; the Triton interpreter on CPU): the report it writes, and that a candidate which fails
to launch or to match the torch peer is reported and skipped while the sweep goes on. And the
launchers' defaults against the last full sweep: at every shape it timed, the default launch is
one it timed, and the fastest or close to it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from opt_fast.kernels import attention, paged_decode
from opt_fast.kernels import layernorm_linear as ll

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sweep_tiles.py"
# The sweep the launch defaults were set from (their comments quote it) and how far a default may
# trail the fastest launch timed at a shape: one sweep does not tell apart launches ~3% apart.
H100_SWEEP = ROOT / "benchmarks" / "results" / "2026-11-26-h100" / "sweep.json"
SLACK = 1.035


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_tiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_sweep_writes_a_report_per_kernel(sweep, tmp_path):
    sweep.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["kernel"] for r in report["cases"]] == ["decode", "prefill", "ln_qkv"]
    for r in report["cases"]:
        # prefill also times the TMA twin of its small tile (off-GPU the sweep assumes sm_90),
        # ln_qkv a split-K launch after its own LayerNorm launch (normalize_first)
        assert len(r["candidates"]) == (2 if r["kernel"] == "decode" else 3), r
        assert not any(c["error"] for c in r["candidates"]), r
        assert r["best_us"] == min(c["us"] for c in r["candidates"])
        assert r["speedup_vs_peer"] == pytest.approx(r["peer_us"] / r["best_us"], rel=1e-2)
        assert r["default_resolved"] and r["best_label"]
    text = (tmp_path / "sweep.md").read_text()
    for heading in ("## decode", "## prefill", "## ln_qkv", "## Every timed candidate"):
        assert heading in text


def test_failing_candidates_are_reported_not_fatal(sweep, monkeypatch):
    family = sweep.FAMILIES["decode"]
    wrong = dict(num_stages=3)
    right = dict(block_n=32)
    monkeypatch.setattr(family, "candidates", lambda case, smoke: [{}, dict(block_n=48), wrong, right])
    real_ours = family.ours

    def ours(x, config):
        fn = real_ours(x, config)
        return (lambda: torch.zeros_like(fn())) if config == wrong else fn
    monkeypatch.setattr(family, "ours", ours)
    report = sweep.run([family], budget=60, jobs=0, smoke=True, log=lambda line: None)
    [case] = report["cases"]
    rows = {c["label"]: c for c in case["candidates"]}
    assert "block_n" in rows["block_n=48"]["error"] and rows["block_n=48"]["us"] is None
    assert "max error" in rows["num_stages=3"]["error"] and rows["num_stages=3"]["us"] is None
    assert rows["block_n=32"]["us"] is not None and rows["default"]["us"] is not None
    assert case["best_us"] == min(rows["block_n=32"]["us"], rows["default"]["us"])
    assert "## Failed candidates" in sweep.markdown(report)


def test_budget_skips_what_does_not_fit(sweep):
    """An exhausted budget measures the peer of each shape and skips every candidate."""
    report = sweep.run([sweep.FAMILIES["ln_qkv"]], budget=1e-9, jobs=0, smoke=True, log=lambda line: None)
    [case] = report["cases"]
    assert case["candidates"] == [] and case["skipped"] == 3 and "best_us" not in case


def _parse_label(label: str) -> dict:
    """A resolved launch as the sweep prints it ("num_splits=1 block_n=32", "tiles=64x64x4x2")."""
    return {key: tuple(map(int, value.split("x"))) if "x" in value else int(value)
            for key, value in (item.split("=") for item in label.split())}


def _new_default(case: dict) -> dict:
    """The launch today's defaults make at a sweep shape (fp16, block_size 16, an H100: 132 SMs,
    sm_90), in the sweep's terms."""
    c, fp16 = case["shape"], torch.float16
    if case["kernel"] == "decode":
        max_tokens = -(-c["context"] // 16) * 16
        return paged_decode.default_config(c["batch"], c["heads"], c["head_dim"], fp16, max_tokens, sms=132)._asdict()
    if case["kernel"] == "prefill":
        tiles = attention.default_tiles(c["head_dim"], fp16, c["batch"] * c["length"], c["batch"], 90)
        return dict(tiles=tuple(tiles) if tiles.tma else tuple(tiles)[:4])   # the sweep's 4-tuples
    return dict(config=tuple(ll.default_config(c["tokens"], 3 * c["hidden"], fp16, 132)))


def _timed_launches(case: dict) -> dict:
    """Every launch timed at a shape, fully resolved, with its time: a decode candidate without
    num_splits ran at the split count of the default of the day."""
    then = _parse_label(case["default_resolved"])
    timed = {}
    for cand in case["candidates"]:
        if cand["us"] is None:
            continue
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in cand["config"].items()}
        config = {**then, **config} if case["kernel"] == "decode" else config or then
        launch = tuple(sorted(config.items()))
        timed[launch] = min(cand["us"], timed.get(launch, float("inf")))
    return timed


def test_defaults_are_the_fastest_launches_the_h100_sweep_timed():
    report = json.loads(H100_SWEEP.read_text())
    assert report["meta"]["device"] == "NVIDIA H100 80GB HBM3" and report["meta"]["dtype"] == "float16"
    slow = []
    for case in report["cases"]:
        launch = tuple(sorted(_new_default(case).items()))
        timed = _timed_launches(case)
        assert launch in timed, f"{case['kernel']} {case['case']}: default {launch} was not timed"
        if timed[launch] > SLACK * case["best_us"]:
            slow.append(f"{case['kernel']} {case['case']}: {timed[launch]} us, best {case['best_us']}")
    assert not slow, slow
    assert len(report["cases"]) == 34
