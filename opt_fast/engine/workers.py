"""Tensor-parallel ranks: each runner's membership of the group (`TensorParallelRanks`) and, on
rank 0 (the engine's process), the processes of ranks 1..N-1 (`Workers`), each running its own
ModelRunner in lock-step with rank 0's, which sends them every call that reaches a collective.

A worker is a fresh interpreter that calls `serve(FD)`, not a multiprocessing spawn, which would
run the user's main script again in each worker. It talks to rank 0 over a socket pair. Every
call is acknowledged, so a worker's failure reaches the engine as an exception (and the worker
exits, which also ends any collective rank 0 waits in) instead of a hang.
"""
from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait

import torch

from .. import parallel

_WORKER_MAIN = "import sys; from opt_fast.engine.workers import serve; serve(int(sys.argv[1]))"
# How long close() lets a worker finish before killing it.
_EXIT_TIMEOUT_S = 30


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed or died; the engine cannot go on."""


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


class _Pickler(pickle.Pickler):
    """Sends host tensors as their bytes. (Plain pickling goes through torch.save, and the
    multiprocessing pickler moves each tensor into a new shared-memory segment: both far slower
    for the few small tensors of a step.)"""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().contiguous()
            if t.device.type != "cpu":
                raise TypeError("only host tensors go to tensor-parallel workers")
            return _tensor_from_bytes, (ctypes.string_at(t.data_ptr(), t.nbytes), t.dtype, tuple(t.shape))
        return NotImplemented


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class Workers:
    """The worker processes of ranks 1..world-1, seen from rank 0."""

    def __init__(self, world: int, store_port: int, runner_args: dict):
        self.processes: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        try:
            for rank in range(1, world):
                ours, theirs = multiprocessing.Pipe()
                # A session of its own: Ctrl-C at a terminal interrupts rank 0 alone (which may
                # catch it and go on), not the workers too.
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-c", _WORKER_MAIN, str(theirs.fileno())],
                    pass_fds=[theirs.fileno()], start_new_session=True))
                theirs.close()
                self.conns.append(ours)
                ours.send_bytes(_dumps(dict(runner_args, rank=rank, store_port=store_port)))
            self.wait()         # each has started and is about to join the group
        except BaseException:
            self.close(timeout=0)
            raise
        self._closing = False

    def send(self, method: str, *args) -> None:
        """Have every worker call `method(*args)` on its runner; `wait()` collects the replies."""
        message = _dumps((method, args))
        for conn in self.conns:
            conn.send_bytes(message)

    def _problem(self, conn: Connection) -> str | None:
        """Read the next reply of `conn`'s worker: None for an acknowledgement, else what went wrong."""
        rank = self.conns.index(conn) + 1
        try:
            status, detail = conn.recv()
        except (EOFError, OSError):
            return f"tensor-parallel worker {rank} exited (exit code {self.processes[rank - 1].poll()})"
        return None if status == "ok" else f"tensor-parallel worker {rank} failed:\n{detail}"

    def _any_exited(self) -> bool:
        return any(process.poll() is not None for process in self.processes)

    def wait(self) -> None:
        """One acknowledgement from every worker; WorkerError if one failed or died."""
        pending = list(self.conns)
        while pending:
            for conn in wait(pending):
                pending.remove(conn)
                problem = self._problem(conn)
                if problem is not None:
                    raise WorkerError(problem)

    def failure(self, timeout: float) -> str | None:
        """What a worker reported as its failure (or that it exited), if one does within
        `timeout` seconds: the cause to report when a collective on rank 0 broke."""
        for conn in wait(self.conns, timeout):
            problem = self._problem(conn)
            if problem is not None:
                return problem
        return None

    def watch(self, rendezvous, discard):
        """`rendezvous()` (rank 0's side of one with the workers), unless a worker fails first:
        then WorkerError, where rendezvous alone would wait for it until its timeout. A result
        that comes after that goes to `discard`."""
        outcome: list = []
        lock = threading.Lock()

        def attempt():
            try:
                result = (True, rendezvous())
            except BaseException as err:   # handed to the caller
                result = (False, err)
            with lock:
                outcome.append(result)
                if len(outcome) > 1 and result[0]:
                    discard(result[1])      # given up on already
        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        while True:
            thread.join(0.05)
            with lock:
                if outcome:
                    break
                # A worker that fails exits (after saying why); one that joined may already be
                # answering its next call, which must stay queued.
                if self._any_exited():
                    outcome.append((False, None))
                    break
        ok, value = outcome[0]
        if ok:
            return value
        if value is None:
            self.wait()
            raise WorkerError("a tensor-parallel worker exited while joining")
        raise value

    def watch_deaths(self, on_death) -> None:
        """From now on until `close`, call `on_death()` (from a helper thread) as soon as a
        worker exits: rank 0 may be waiting on the GPU for a collective that can never end."""
        def run():
            while not self._closing:
                if self._any_exited():
                    if not self._closing:
                        on_death()
                    return
                time.sleep(0.1)
        threading.Thread(target=run, daemon=True, name="opt_fast-tp-watchdog").start()

    def stop(self) -> None:
        """Tell every worker to leave the process group and exit (`close` waits for it)."""
        self._closing = True
        for conn in self.conns:
            try:
                conn.send_bytes(_dumps(None))
            except OSError:
                pass        # already gone

    def close(self, timeout: float = _EXIT_TIMEOUT_S) -> None:
        """Stop every worker (each leaves the process group first); kill one that has not
        within `timeout` seconds (0: one stuck in a collective that will never complete)."""
        self.stop()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []


class TensorParallelRanks:
    """One runner's place among the tensor-parallel ranks: the process group, and on rank 0 the
    workers it starts and drives. Stopped by `close()`, or when collected (at the latest when
    the interpreter exits)."""

    def __init__(self, rank: int, world: int, device: torch.device, store_port: int | None, runner_args: dict):
        self.workers: Workers | None = None
        if rank == 0:
            store = parallel.open_store(world)
            self.workers = Workers(world, store.port, runner_args)
            try:
                self.group = self.workers.watch(lambda: parallel.join(rank, world, store, device),
                                                discard=parallel.TensorParallelGroup.close)
            except BaseException:
                self.workers.close(timeout=0)     # they may wait in the join
                raise
            self.workers.watch_deaths(self.group.abort)
        else:
            self.group = parallel.join(rank, world, store_port, device)
        self._finalizer = weakref.finalize(self, _leave, self.workers, self.group)

    def call(self, runner, method: str, *args):
        """Rank 0: `getattr(runner, method)(*args)` here and on every worker, in lock-step;
        returns this rank's result. On a failure anywhere, raises the worker's own report when
        one has one (it says more than rank 0's broken collective: gloo's "connection closed")."""
        try:
            self.workers.send(method, *args)
            result = getattr(runner, method)(*args)
            self.workers.wait()
            return result
        except BaseException as err:
            cause = self.workers.failure(timeout=2.0)
            if cause is not None:
                raise WorkerError(cause) from err
            raise

    def close(self, failed: bool = False) -> None:
        """Stop the workers and leave the group. `failed`: after a failure some rank may wait
        forever in a collective, so workers are killed and the group aborted, not left in order."""
        if failed:
            if self.workers is not None:
                self.workers.close(timeout=0)
            self.group.abort()
        self._finalizer()


def _leave(workers: Workers | None, group: parallel.TensorParallelGroup) -> None:
    """Every rank leaves the group at once (NCCL's teardown may wait for peers), then the
    workers are waited for."""
    if workers is not None:
        workers.stop()
    group.close()
    if workers is not None:
        workers.close()


def serve(fd: int) -> None:
    """A worker's life: build its runner, then run each call rank 0 sends (over the socket `fd`)
    until told to stop."""
    from .model_runner import ModelRunner
    conn = Connection(fd)
    args = pickle.loads(conn.recv_bytes())
    conn.send(("ok", None))
    # The ranks share this machine's cores; each worker's op would otherwise spin up a thread per
    # core (rank 0, the user's process, keeps its setting).
    torch.set_num_threads(max(1, torch.get_num_threads() // args["cfg"].tensor_parallel_size))
    runner, code = None, 0
    try:
        runner = ModelRunner(**args)
        conn.send(("ok", None))
        while (message := pickle.loads(conn.recv_bytes())) is not None:
            method, call_args = message
            with runner._current_device():
                getattr(runner, method)(*call_args)
            conn.send(("ok", None))
    except EOFError:
        pass                # rank 0 is gone
    except BaseException:
        code = 1
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass            # rank 0 is gone
    finally:
        if runner is not None and code == 0:
            runner.close()      # (after a failure, exiting is the way out: leaving the group
            # in order would wait for collectives that cannot finish)
        # Leave without the interpreter's teardown: in it, torch.distributed's threads abort
        # the process now and then ("terminate called without an active exception"), after
        # the group is already gone. A worker has nothing else to save.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

