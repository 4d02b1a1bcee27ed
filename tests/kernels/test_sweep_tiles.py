"""benchmarks/sweep_tiles.py in its smoke mode (tiny shapes, two launch configurations per
kernel; the Triton interpreter on CPU): the report it writes, and that a candidate which fails
to launch or to match the torch peer is reported and skipped while the sweep goes on."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sweep_tiles.py"


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
        assert len(r["candidates"]) == 2 and not any(c["error"] for c in r["candidates"]), r
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
    assert case["candidates"] == [] and case["skipped"] == 2 and "best_us" not in case
