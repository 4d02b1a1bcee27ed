"""Opt-in test switch: run every CPU Engine with async scheduling on emulated decode graphs.

    OPT_FAST_TEST_ASYNC=1 pytest tests/test_engine.py -x -q        # async_scheduling + emulated graphs
    OPT_FAST_TEST_ASYNC=graphs pytest tests/test_engine.py -x -q   # control: emulated graphs, no async

Unset (or "0"/""), nothing changes. With it set, `Engine.__init__` is wrapped for the whole
session (module-scoped fixtures build engines before any function-scoped fixture runs), so
engines built through `LLM` and `AsyncEngine` are covered too:
- mode "1": `async_scheduling` is forced True (a non-bool value is left for validation to reject);
- every engine on CPU with one rank and without `enforce_eager` gets emulated decode graphs
  (`LazyEmulatedGraphs`; the host staging buffers are poisoned, as in test_async_scheduling.py).
Modules in `EXEMPT` choose async scheduling themselves and are left alone.

Each test's engines, Engine.step calls and steps launched ahead (those a step call leaves in
flight) are counted; the terminal summary lists them per file, and the tests whose engines
stepped but launched nothing ahead. OPT_FAST_TEST_ASYNC_REPORT=path also writes them as JSON.
Run it in one process, as above (not through `make test`, whose pytest-xdist workers would keep
the counts to themselves).
"""
from __future__ import annotations

import collections
import functools
import json
import os

MODE = os.environ.get("OPT_FAST_TEST_ASYNC", "").strip().lower()
ENABLED = MODE not in ("", "0", "false", "no", "off")
FORCE_ASYNC = ENABLED and MODE != "graphs"
EXEMPT = ("test_async_scheduling.py",)

# nodeid -> Counter(engines, steps, launch_ahead)
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_current = {"nodeid": "<collection>"}


def _exempt() -> bool:
    return any(_current["nodeid"].split("::")[0].endswith(name) for name in EXEMPT)


def _lazy_graphs_class():
    from opt_testing import EmulatedGraphs

    class _LazyReplay:
        """A capture emulated on first use: the first replay's outputs become the static ones,
        later replays run the step again into them (as opt_testing._Replay does)."""

        def __init__(self, graphs, size):
            self.graphs, self.size = graphs, size

        def replay(self):
            fresh = self.graphs._step(self.size)
            static = self.graphs.outputs.get(self.size)
            if static is None:
                self.graphs.outputs[self.size] = fresh
            else:
                for old, new in zip(static or (), fresh or ()):
                    old.copy_(new)

    class LazyEmulatedGraphs(EmulatedGraphs):
        """EmulatedGraphs without the up-front step per batch size (35 eager steps for the
        default max_num_seqs=256, ~0.7 s per engine): each size's outputs appear at its first replay."""

        def _capture(self, size, pool):
            return _LazyReplay(self, size), None, None

        def __init__(self, runner):
            super().__init__(runner)
            self.outputs = {}

        def _step(self, size):
            # Tests that patch `model.compute_logits` (on the instance) with a one-argument
            # function: the graph step passes `out=`, so adapt it (a real capture would not
            # see the patch at all; here the patched model is what both paths run).
            patched = self.model.__dict__.get("compute_logits")
            if patched is not None and not getattr(patched, "_takes_out", False):
                def compute_logits(hidden, out=None, _patched=patched):
                    logits = _patched(hidden)
                    return logits if out is None else out.copy_(logits)
                compute_logits._takes_out = True
                self.model.compute_logits = compute_logits
            return super()._step(size)

    return LazyEmulatedGraphs


def install() -> None:
    """Wrap Engine.__init__ and Engine.step (for the session)."""
    if not ENABLED:
        return
    from opt_fast.engine.engine import Engine
    graphs_class = _lazy_graphs_class()
    original_init, original_step = Engine.__init__, Engine.step

    @functools.wraps(original_init)
    def __init__(self, model, **kwargs):
        exempt = _exempt()
        if FORCE_ASYNC and not exempt and kwargs.get("async_scheduling", False) is False:
            kwargs["async_scheduling"] = True
        original_init(self, model, **kwargs)
        runner = self.runner
        if (not exempt and runner.device.type == "cpu" and runner.graphs is None and runner.tp is None
                and not self.cfg.enforce_eager):
            runner.graphs = graphs_class(runner)
            runner.graphs.host_i64.fill_(3)       # poisoned: a row the staging forgets shows
            runner.graphs.host_i32.fill_(min(5, runner.num_kv_blocks - 1))   # a block that exists
            runner.graphs.host_f32.fill_(2.5)
        COUNTS[_current["nodeid"]]["engines"] += 1

    @functools.wraps(original_step)
    def step(self):
        counts = COUNTS[_current["nodeid"]]
        counts["steps"] += 1
        outputs = original_step(self)
        # Read off the engine rather than by wrapping ModelRunner.launch_ahead: tests that stub
        # the runner (test_prefix_caching's shadowed model) replace launch_ahead on the instance.
        counts["launch_ahead"] += self._ahead is not None
        return outputs

    Engine.__init__, Engine.step = __init__, step


def set_current(nodeid: str) -> None:
    _current["nodeid"] = nodeid


def summary(write_line) -> None:
    if not ENABLED:
        return
    write_line(f"OPT_FAST_TEST_ASYNC={MODE}: Engine.step calls / steps launched ahead, per file")
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for nodeid, c in COUNTS.items():
        per_file[nodeid.split("::")[0]].update(c)
    for name, c in sorted(per_file.items()):
        write_line(f"  {name}: engines {c['engines']}, steps {c['steps']}, launched ahead {c['launch_ahead']}")
    idle = [n for n, c in COUNTS.items() if c["steps"] and not c["launch_ahead"]]
    ahead = [n for n, c in COUNTS.items() if c["launch_ahead"]]
    write_line(f"  tests that launched ahead: {len(ahead)}; stepped without launching ahead: {len(idle)}")
    path = os.environ.get("OPT_FAST_TEST_ASYNC_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({n: dict(c) for n, c in COUNTS.items()}, f, indent=1)
