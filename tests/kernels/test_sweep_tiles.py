"""benchmarks/sweep_tiles.py in its smoke mode (tiny shapes, two or three launch configurations per
kernel; the Triton interpreter on CPU): the report it writes, and that a candidate which fails
to launch or to match the torch peer is reported and skipped while the sweep goes on. And the
launchers' defaults against the last full sweep: at every shape it timed, the default launch is
one it timed, and the fastest or close to it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kernel_testing import record_launches, sweep_script
from opt_fast.kernels import attention, paged_decode
from opt_fast.kernels import gemm_config as gc
from opt_fast.kernels import layernorm_linear as ll

ROOT = Path(__file__).resolve().parents[2]
# The sweeps the launch defaults were set from (their comments quote them), oldest first, with the
# kernels each set (None: all): a later sweep's shape replaces an earlier one's. Both cards are
# sm_90 with 132 SMs, what _new_default assumes. And how far a default may trail the fastest
# launch timed at a shape: one sweep does not tell apart launches ~5% apart (the H100 and the
# H200 ranked 64x64x4x2 and 64x32x4x3 at opt-1.3b b64 L128 in opposite orders, 2.5% and 4.5%).
# A third field names shapes a sweep no longer sets: prefill at b8 L1024, where a batch's K/V
# (67-168 MB) outgrows L2 and the grid then started every head of a query block at once, so each
# wave re-read them from memory. Those times tracked each card's copy bandwidth more than the
# tiles (the afternoon H200's copy ran 36% below the morning one's, and its fastest tiles there
# were others). The grid now runs heads in groups that fit L2 (attention._head_group), an order
# no sweep has timed: until one does, no sweep binds those four shapes.
_L2_BOUND = ("b8 L1024",)
SM90_SWEEPS = [(ROOT / "benchmarks" / "results" / "2026-11-26-h100" / "sweep.json", None, _L2_BOUND),
               (ROOT / "benchmarks" / "results" / "2026-11-27-h200" / "sweep.json", ("prefill",), _L2_BOUND),
               (ROOT / "benchmarks" / "results" / "2026-11-27-h200-sweep" / "sweep.json", ("prefill", "ln_qkv"),
                _L2_BOUND)]
SWEEP_CARDS = ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
SLACK = 1.05


@pytest.fixture
def sweep():
    return sweep_script()


def test_smoke_sweep_writes_a_report_per_kernel(sweep, tmp_path):
    sweep.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["kernel"] for r in report["cases"]] == ["decode", "prefill", "ln_qkv"]
    for r in report["cases"]:
        # prefill also times its default with one head group, the persistent kernel, the TMA twin
        # of its small tile, the same with
        # q in shared memory and a register cap, and a warp-specialised tile (off-GPU the sweep
        # assumes sm_90), ln_qkv a split-K launch after its own LayerNorm launch
        # (normalize_first), one with overlap, and cuBLAS's GEMM after our LayerNorm launch
        assert len(r["candidates"]) == {"decode": 2, "prefill": 7, "ln_qkv": 6}[r["kernel"]], r
        assert not any(c["error"] for c in r["candidates"]), r
        assert r["best_us"] == min(c["us"] for c in r["candidates"])
        assert r["speedup_vs_peer"] == pytest.approx(r["peer_us"] / r["best_us"], rel=1e-2)
        assert r["default_resolved"] and r["best_label"]
    # LN+QKV times the torch pair's launches alone, and ours
    [ln_qkv] = [r for r in report["cases"] if r["kernel"] == "ln_qkv"]
    assert set(ln_qkv["peer_parts_us"]) == {"layer_norm", "linear", "our layer_norm", "our linear"}
    assert all(us > 0 for us in ln_qkv["peer_parts_us"].values()), ln_qkv["peer_parts_us"]
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


def test_a_launch_that_failed_in_the_parallel_compile_is_not_run_again(sweep, monkeypatch):
    """A worker's failed launch comes back keyed by kernel, compile group and resolved launch;
    the measuring phase reports it with that error and never launches it (one that broke the
    CUDA context would break every later measurement), and still measures the others."""
    family = sweep.FAMILIES["decode"]
    bad = dict(block_n=16, num_warps=2, num_stages=2, num_splits=2)
    monkeypatch.setattr(family, "candidates", lambda case, smoke: [{}, bad])
    real_ours, launched = family.ours, []

    def ours(x, config):
        fn = real_ours(x, config)

        def call():
            launched.append(sweep._label(config))
            if config == bad or config == family.resolve(case, bad):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return fn()
        return call
    monkeypatch.setattr(family, "ours", ours)
    [case] = family.cases(smoke=True)
    failures = [f for task in sweep.compile_tasks([family], smoke=True) for f in sweep._compile_task(task)]
    assert [key for key, _ in failures] == [sweep.failure_key(family, case, bad)]
    assert "illegal memory access" in failures[0][1]
    launched.clear()
    result = sweep.sweep_case(family, case, deadline=float("inf"), smoke=True, copy_bw=0.0, failed=dict(failures))
    rows = {row["label"]: row for row in result["candidates"]}
    assert rows[sweep._label(bad)]["error"].startswith("in the parallel compile: RuntimeError")
    assert rows["default"]["us"] is not None
    assert sweep._label(bad) not in launched and "default" in launched


def test_ungrouped_prefill_candidate_runs_one_head_group(sweep, monkeypatch):
    """The prefill candidate `ungrouped` launches the default tiles with every head in one group
    (the grid's order before head groups) where the default's grid groups them; the L2 size
    the launcher reads is its own again after the call."""
    family = sweep.FAMILIES["prefill"]
    [case] = family.cases(smoke=True)
    x = family.inputs(case)
    small_l2 = lambda device: 1024   # noqa: E731  (no head's keys fit: one head a group)
    monkeypatch.setattr(attention, "l2_bytes", small_l2)
    launches = record_launches(monkeypatch, attention, "_prefill_attention_kernel")
    grouped = family.ours(x, {})()
    ungrouped = family.ours(x, dict(ungrouped=True))()
    [(_, grid_grouped, _, _), (_, grid_ungrouped, _, _)] = launches
    heads = case["heads"]
    assert grid_grouped[0] == 1 and grid_grouped[2] == heads and grid_ungrouped[::2] == (heads, 1)
    assert torch.equal(grouped, ungrouped) and attention.l2_bytes is small_l2


def test_chunked_ln_candidate_runs_the_chunked_layernorm(sweep, monkeypatch):
    """The LN+QKV candidate `chunked_ln` runs its launch with the LayerNorm launch in chunks (the
    form before whole rows), where the same launch without it holds each row whole; same
    results, and the launchers' width limit is its own again after the call. At 64 tokens it is
    a candidate, and it resolves to the default launch it changes."""
    family = sweep.FAMILIES["ln_qkv"]
    case = dict(model="tiny", hidden=64, tokens=20)
    x = family.inputs(case)
    launches = record_launches(monkeypatch, ll, "_layer_norm_kernel")
    first = dict(config=(32, 32, 32, 4, 2, 1, False, True))   # normalize_first: the LayerNorm launch
    whole = family.ours(x, first)()
    chunked = family.ours(x, dict(first, chunked_ln=True))()
    assert [kwargs["ONE_TILE"] for _, _, _, kwargs in launches] == [True, False]
    assert torch.equal(whole, chunked) and gc._LN_ROW_TILE_MAX == 8192 and gc._ln_blocks(64).one_tile
    sixty_four = dict(model="opt-6.7b", hidden=4096, tokens=64)
    assert dict(chunked_ln=True) in family.candidates(sixty_four, smoke=False)
    assert family.resolve(sixty_four, dict(chunked_ln=True)) == dict(family.resolve(sixty_four, {}), chunked_ln=True)


def test_fc1_cases_time_the_default_with_relu_against_the_torch_pair(sweep):
    """The LN+QKV family's fc1 cases: 4 x hidden outputs and the ReLU on both sides, the default
    launch (resolved at fc1's width), and at 64 rows also our LayerNorm launch before cuBLAS's
    GEMM (as at the QKV shapes there); its own compile group (the ReLU variant)."""
    family = sweep.FAMILIES["ln_qkv"]
    fc1 = [c for c in family.cases(smoke=False) if c.get("fc1")]
    assert family.cases(smoke=False)[:len(fc1)] == fc1   # first: their spare time goes to the QKV shapes
    assert {(c["model"], c["tokens"]) for c in fc1} == {(m, t) for m in family.HIDDEN for t in (1, 64)}
    cublas = dict(config=sweep._launch(64, 64, 128, 4, 3, cublas=True))
    # and with the LayerNorm launch prefetching cuBLAS's weight
    prefetching = dict(config=sweep._launch(64, 64, 128, 4, 3, overlap=True, cublas=True))
    assert family.candidates(fc1[0], smoke=False) == [{}] and fc1[0]["tokens"] == 1
    case = fc1[-1]
    assert family.case_name(case) == "opt-13b tokens=64 fc1"
    assert family.candidates(case, smoke=False) == [{}, cublas, prefetching]
    qkv_64 = dict(model="opt-13b", hidden=5120, tokens=64)
    assert cublas in family.candidates(qkv_64, smoke=False) and prefetching in family.candidates(qkv_64, smoke=False)
    assert ll.GemmLaunch(*cublas["config"]).cublas and family.resolve(qkv_64, cublas) == cublas
    launch = ll.default_launch(64, 4 * 5120, 5120, sweep.DTYPE, sweep.SMS, has_ln=True)
    assert family.resolve(case, {})["config"] == sweep._trimmed(tuple(launch), tuple(ll.GemmLaunch(*launch[:5])), 5)
    assert family.compile_group(case) != family.compile_group(dict(case, fc1=False))
    tiny = dict(model="tiny", hidden=48, tokens=3, fc1=True)
    x = family.inputs(tiny)
    assert x["w"].shape == (192, 48) and x["relu"]
    out, ref = family.ours(x, dict(config=(16, 32, 32, 4, 2)))(), family.peer(x)()
    assert out.shape == (3, 192) and (ref >= 0).all() and (ref == 0).any()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert family.bytes_moved(tiny) == (192 * 48 + 192 + 2 * 48 + 3 * 48 + 3 * 192) * sweep.DTYPE.itemsize


def test_budget_skips_what_does_not_fit(sweep):
    """An exhausted budget measures the peer of each shape and skips every candidate."""
    report = sweep.run([sweep.FAMILIES["ln_qkv"]], budget=1e-9, jobs=0, smoke=True, log=lambda line: None)
    [case] = report["cases"]
    assert case["candidates"] == [] and case["skipped"] == 6 and "best_us" not in case


def _parse_label(label: str) -> dict:
    """A resolved launch as the sweep prints it ("num_splits=1 block_n=32", "tiles=64x64x4x2",
    "config=16x128x128x4x3x2xFalsexTrue")."""
    def value(text: str):
        return {"True": True, "False": False}[text] if text in ("True", "False") else int(text)
    return {key: tuple(map(value, text.split("x"))) if "x" in text else value(text)
            for key, text in (item.split("=") for item in label.split())}


def _canonical(kernel: str, config: dict) -> tuple:
    """A launch in one form whatever its spelling: prefill tiles and LN+QKV configs with every
    option written out (a sweep writes only the fields it sets)."""
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    if kernel == "prefill":
        config["tiles"] = tuple(attention.Tiles(*config["tiles"]))
    elif kernel == "ln_qkv":
        launch = ll.GemmLaunch(*config["config"])
        # normalize_first takes no statistics launch: stats_kernel beside it changes nothing
        config["config"] = tuple(launch._replace(stats_kernel=False) if launch.normalize_first else launch)
    return tuple(sorted(config.items()))


def _new_default(case: dict) -> tuple:
    """The launch today's defaults make at a sweep shape (fp16, block_size 16, an H100: 132 SMs,
    sm_90)."""
    c, fp16 = case["shape"], torch.float16
    if case["kernel"] == "decode":
        max_tokens = -(-c["context"] // 16) * 16
        config = paged_decode.default_config(c["batch"], c["heads"], c["head_dim"], fp16, max_tokens, sms=132)._asdict()
    elif case["kernel"] == "prefill":
        # the sweep's prefill shapes have no cached context, and its launches say so
        config = dict(tiles=attention.default_tiles(c["head_dim"], fp16, c["batch"] * c["length"], c["batch"], 90,
                                                    context_free=True))
    else:
        out = (4 if c.get("fc1") else 3) * c["hidden"]   # fc1 cases: 4 x hidden outputs
        config = dict(config=ll.default_launch(c["tokens"], out, c["hidden"], fp16, 132, has_ln=True))
    return _canonical(case["kernel"], config)


def _timed_launches(case: dict) -> dict:
    """Every launch timed at a shape, fully resolved, with its time: a decode candidate without
    num_splits ran at the split count of the default of the day."""
    then = _parse_label(case["default_resolved"])
    timed = {}
    for cand in case["candidates"]:
        if cand["us"] is None:
            continue
        config = cand["config"]
        # the grid's order before head groups, the LayerNorm launch before whole rows: a default
        # launch runs neither
        if config.get("ungrouped") or config.get("chunked_ln"):
            continue
        config = {**then, **config} if case["kernel"] == "decode" else config or then
        launch = _canonical(case["kernel"], config)
        timed[launch] = min(cand["us"], timed.get(launch, float("inf")))
    return timed


def _latest_cases() -> list[dict]:
    cases = {}
    for path, kernels, skipped in SM90_SWEEPS:
        report = json.loads(path.read_text())
        assert report["meta"]["device"] in SWEEP_CARDS and report["meta"]["dtype"] == "float16"
        cases.update({(case["kernel"], case["case"]): case for case in report["cases"]
                      if (kernels is None or case["kernel"] in kernels)
                      and not any(name in case["case"] for name in skipped)})
    return list(cases.values())


def test_defaults_are_the_fastest_launches_the_sm90_sweeps_timed():
    cases = _latest_cases()
    slow = []
    for case in cases:
        launch = _new_default(case)
        timed = _timed_launches(case)
        assert launch in timed, f"{case['kernel']} {case['case']}: default {launch} was not timed"
        if timed[launch] > SLACK * case["best_us"]:
            slow.append(f"{case['kernel']} {case['case']}: {timed[launch]} us, best {case['best_us']}")
    assert not slow, slow
    assert len(cases) == 30   # 13 decode, 8 prefill, 9 LN+QKV shapes


def test_sweep_labels_parse_to_their_launch():
    """The label reader the defaults test relies on, on the spellings the sweep writes."""
    assert _parse_label("tiles=64x64x4x2") == dict(tiles=(64, 64, 4, 2))
    assert _parse_label("num_splits=1 block_n=32") == dict(num_splits=1, block_n=32)
    assert _parse_label("config=16x128x128x4x3x2xFalsexTrue") == dict(config=(16, 128, 128, 4, 3, 2, False, True))
    assert _canonical("ln_qkv", dict(config=[16, 128, 128, 4, 3])) == \
        _canonical("ln_qkv", dict(config=(16, 128, 128, 4, 3, 1, False, False)))
    assert _canonical("prefill", dict(tiles=(64, 64, 4, 2))) == _canonical("prefill", dict(tiles=(64, 64, 4, 2, False, True)))
    assert _canonical("prefill", dict(tiles=(64, 64, 4, 2))) != _canonical("prefill", dict(tiles=(64, 64, 4, 2, True)))
