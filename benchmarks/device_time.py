"""Device time of one call, free of the host's launch path: for the kernel table and the tile sweep.

`triton.testing.do_bench` records CUDA events around each call after flushing L2, and the flush
(a 256 MB memset) hides the host's launch path only while that path is shorter than the flush.
Ours is not always: a Triton launcher's checks and dispatch cost tens of microseconds a launch on
the GPU machines' CPUs, and a launch option that adds launches (split-K's reduce, a separate
LayerNorm or statistics kernel) adds that much again, so do_bench timed those options at the
host's pace (on the H200, 2026-11-27, every split-K launch of the fused LN+QKV took 70-75 us
whatever the model size). Here each call is captured once into a CUDA graph and replayed: the
host's path runs at capture, never in the timing, as in the engine's decode steps, which replay
graphs. One graph replays `calls` x (flush, call), another `calls` x flush alone, interleaved;
a call's time is the median difference over `calls`.

The flush reads a 256 MB buffer (a sum) where do_bench writes one (a memset): a memset leaves
L2 full of dirty lines, whose write-back the timed call would pay for as it streams its own
data in (up to 50 MB: about 12 us at 4 TB/s, an estimate, not measured). In a decode step the kernel before
mostly read weights, so clean lines are the truer start.
"""
from __future__ import annotations

import statistics

import torch

FLUSH_BYTES = 256 << 20   # as do_bench: well past the L2 of any current GPU (H100 / H200: 50 MB)
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush_buffer() -> torch.Tensor:
    device = torch.device("cuda", torch.cuda.current_device())
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.zeros(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[device]


def _capture(step, calls: int) -> torch.cuda.CUDAGraph:
    # a first run on a side stream, as torch asks before capturing (lazy initialisation, workspaces)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def graph_us(fn, calls: int = 10, replays: int = 9) -> float:
    """Median device time of one call of `fn` with L2 flushed before it, in microseconds, from
    CUDA graph replays (module docstring). Raises where `fn` cannot be captured: it
    synchronises, or reads a device value on the host."""
    buffer = _flush_buffer()

    def flush():
        buffer.sum()

    def flushed_call():
        flush()
        fn()
    stream = torch.cuda.current_stream()
    try:
        with_calls = _capture(flushed_call, calls)
        flush_only = _capture(flush, calls)
    finally:
        # torch.cuda.graph leaves its capture stream current where the capture fails (its exit
        # raises before restoring the stream): every later launch would run on that stream
        torch.cuda.set_stream(stream)
    _replay_ms(with_calls), _replay_ms(flush_only)   # warm: the first replay uploads the graph
    differences = [_replay_ms(with_calls) - _replay_ms(flush_only) for _ in range(replays)]
    del with_calls, flush_only
    return max(0.0, statistics.median(differences) / calls * 1e3)


def try_graph_us(fn, **options) -> float | None:
    """graph_us, or None off CUDA and where `fn` cannot be captured."""
    if not torch.cuda.is_available():
        return None
    try:
        return graph_us(fn, **options)
    except Exception:   # a launcher that synchronises or reads the device on the host
        torch.cuda.synchronize()
        return None


COPY_BYTES = 1 << 30


def timed_us(fn, **options) -> tuple[float, str]:
    """(device time of one call of `fn` in microseconds, how it was timed): "graph" from
    graph_us (`options` go to it), or where `fn` cannot be captured "events", do_bench's
    median of CUDA events around each call (which charges a host path longer than its flush)."""
    us = try_graph_us(fn, **options)
    if us is not None:
        return us, "graph"
    import triton.testing
    return triton.testing.do_bench(fn, warmup=3, rep=15, return_mode="median") * 1e3, "events"


def device_us(fn) -> float:
    """timed_us's time, with fewer calls a replay (a copy of a gigabyte takes half a millisecond)."""
    return timed_us(fn, calls=3, replays=5)[0]


def copy_gbps(device: str = "cuda", nbytes: int = COPY_BYTES, time_us=device_us) -> float:
    """The device's copy bandwidth in GB/s, bytes read plus bytes written (as the kernels' bytes
    count both): the faster of two copies of `nbytes`, each timed as the kernels are (device_us).

    One is torch's `copy_`, which a CUDA graph captures as a memcpy node: timed that way it gave
    2724 GB/s on the H200 of 2026-11-27 evening, where kernels and their peers on the same card
    moved up to about 4 TB/s (the morning's do_bench of the same copy on another H200: 4256). The
    other is an elementwise kernel on the SMs (x + 0 into another buffer), as our kernels move
    bytes. The faster is the ceiling, so that no fraction of it is flattered by a slow copy."""
    fastest = _fastest_copy_us(device, nbytes, time_us)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()     # the two buffers went with the call above
    return 2 * nbytes / fastest / 1e3


def _fastest_copy_us(device: str, nbytes: int, time_us) -> float:
    src = torch.randn(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    return min(time_us(lambda: dst.copy_(src)), time_us(lambda: torch.add(src, 0, out=dst)))
