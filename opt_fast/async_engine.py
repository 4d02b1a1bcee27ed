"""AsyncEngine: the Engine behind asyncio, for servers that stream many requests at once.

```python
aeng = AsyncEngine("facebook/opt-1.3b")             # or AsyncEngine.from_engine(engine)
async for out in aeng.generate("Hello, my dog is", SamplingParams(max_tokens=64)):
    print(out.outputs[0].text)                       # the text so far; out.finished on the last
```

One engine-loop task per event loop calls `Engine.step()` while any request is unfinished and
sleeps on an event otherwise. Every Engine call (add, abort, step) runs on one worker thread, so
calls are serialised (Engine is not thread-safe) and the event loop keeps running while the model
computes: an add or abort waits at most for the step in progress and is applied between steps.

A client that stops iterating (breaks out, is cancelled, closes the generator) aborts its
request, which frees its KV blocks. Bad input raises ValueError to that client alone. An
exception from `Engine.step()` leaves the engine's state unknown, so the wrapper is then dead:
every waiting client and every later `generate` raises EngineDeadError (the step's exception as
its cause); build a new engine to go on.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .engine.engine import Engine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """`Engine.step()` raised; this AsyncEngine accepts no more work (the cause is chained)."""


class _Stream:
    """A request's newest output, not yet read. A cumulative output carries the whole text so
    far, so a slow reader may skip intermediate states (memory stays bounded) but never the
    final one; delta outputs (output_kind "delta") that arrive before the reader takes them are
    merged into one."""
    __slots__ = ("latest", "error", "ready", "delta")

    def __init__(self, delta: bool = False):
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.ready = asyncio.Event()
        self.delta = delta

    def put(self, out: RequestOutput) -> None:
        if self.delta and self.ready.is_set():      # the reader has not taken the previous one
            out = _merged(self.latest, out)
        self.latest = out
        self.ready.set()


def _merged(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta output holding what `earlier` and then `later` (deltas of one request) hold."""
    completions = [dataclasses.replace(b, text=a.text + b.text, token_ids=a.token_ids + b.token_ids,
                                       logprobs=None if a.logprobs is None else a.logprobs + b.logprobs)
                   for a, b in zip(earlier.outputs, later.outputs)]
    # the prompt's logprobs come in a request's first delta only
    prompt_logprobs = earlier.prompt_logprobs if later.prompt_logprobs is None else later.prompt_logprobs
    return dataclasses.replace(later, outputs=completions, prompt_logprobs=prompt_logprobs)


class AsyncEngine:
    """asyncio front end of `opt_fast.Engine` (DESIGN.md §3).

    `AsyncEngine(model, **engine_kwargs)` builds the Engine (same arguments as `LLM`; loading
    blocks, so build it before serving); `AsyncEngine.from_engine(engine)` wraps an existing one,
    which nothing else may use meanwhile. An AsyncEngine serves one event loop at a time.
    """

    def __init__(self, model: str | Path, **engine_kwargs):
        self._setup(Engine(model, **engine_kwargs))

    @classmethod
    def from_engine(cls, engine: Engine) -> AsyncEngine:
        """Wrap an already built Engine."""
        if not isinstance(engine, Engine):
            raise ValueError(f"engine must be an opt_fast.Engine, got {type(engine).__name__}")
        self = cls.__new__(cls)
        self._setup(engine)
        return self

    def _setup(self, engine: Engine) -> None:
        # Clients stream text so far: an engine taken from an LLM (final outputs only) switches.
        engine.stream_outputs = True
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opt_fast-engine")
        self._streams: dict[str, _Stream] = {}     # touched on the event loop only
        self._owned: dict[str, _Stream] = {}        # touched on the worker thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def dead(self) -> bool:
        """True once `Engine.step()` has raised: every later `generate` raises EngineDeadError."""
        return self._error is not None

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its RequestOutput after each step that advances it (text
        so far, or only what is new with `params.output_kind="delta"`), the last with
        `finished=True`. ValueError for bad input (this request only); EngineDeadError if the
        engine failed. Stopping the iteration aborts the request."""
        self._raise_if_dead()
        self._start_loop()
        if request_id is None:
            request_id = f"async-{uuid.uuid4().hex}"    # random, so no caller-chosen name clashes
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str, got {type(request_id).__name__} {request_id!r:.80}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(params, SamplingParams):
            params = dataclasses.replace(params)    # the output kind streamed is the one the engine gets
        stream = self._streams[request_id] = _Stream(getattr(params, "output_kind", None) == "delta")
        finished = False
        try:
            await self._in_worker(self._add, request_id, stream, prompt, params)
            self._wakeup.set()
            while not finished:
                await stream.ready.wait()
                stream.ready.clear()
                if stream.error is not None:
                    raise EngineDeadError(f"engine step failed: {stream.error!r}") from stream.error
                finished = stream.latest.finished
                yield stream.latest
        finally:
            del self._streams[request_id]
            if not finished and not self.dead:
                # Not awaited: this also runs when the generator is closed or garbage-collected.
                # FIFO on the worker: it follows the add, even one still in flight.
                self._executor.submit(self._abort, request_id, stream)

    async def close(self) -> None:
        """Stop serving and free the engine (its memory, its tensor-parallel workers) once the
        step in flight is done. Requests still streaming end with EngineDeadError, as does every
        later `generate`."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        await self._in_worker(self.engine.close)     # the engine's thread: after the step in flight
        self._executor.shutdown()
        self._fail(RuntimeError("the AsyncEngine was closed"))

    # ---- the worker thread: every Engine call happens here -----------------------------------
    def _add(self, request_id: str, stream: _Stream, prompt, params) -> None:
        self.engine.add_request(request_id, prompt, params)
        self._owned[request_id] = stream

    def _abort(self, request_id: str, stream: _Stream) -> None:
        # Only requests this wrapper added: a failed add must not abort a namesake.
        if self._owned.get(request_id) is stream:
            del self._owned[request_id]
            self.engine.abort_request(request_id)

    def _step(self) -> tuple[list[tuple[_Stream | None, RequestOutput]], bool]:
        # Each output goes to the stream that added its request, not to a namesake added later.
        routed = []
        for out in self.engine.step():
            routed.append((self._owned.get(out.request_id), out))
            if out.finished:
                self._owned.pop(out.request_id, None)
        return routed, self.engine.has_unfinished_requests()

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    # ---- the engine loop (event loop side) ---------------------------------------------------
    def _start_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and not self._loop_task.done():
            return
        if self._loop is not None and self._loop is not loop and self._streams:
            raise RuntimeError("this AsyncEngine is serving requests on another event loop")
        if self._loop_task is not None and not self._loop_task.done() and not self._loop.is_closed():
            # the idle loop task of the loop served before: cancelled when that loop runs again
            self._loop.call_soon_threadsafe(self._loop_task.cancel)
        self._loop, self._wakeup = loop, asyncio.Event()
        self._loop_task = loop.create_task(self._run(), name="opt_fast AsyncEngine loop")

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()     # before stepping: an add during the steps sets it again
            busy = True
            while busy:
                try:
                    outputs, busy = await self._in_worker(self._step)
                except Exception as err:     # whatever failed, the engine's state is now unknown
                    self._fail(err)
                    return
                for stream, out in outputs:
                    if stream is not None and self._streams.get(out.request_id) is stream:
                        stream.put(out)

    def _fail(self, err: BaseException) -> None:
        self._error = err
        for stream in self._streams.values():
            if stream.latest is not None and stream.latest.finished:
                continue                # finished before the failure: its client gets its result
            stream.error = err
            stream.ready.set()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine step failed earlier: {self._error!r}") from self._error
