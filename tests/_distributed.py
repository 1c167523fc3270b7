"""Run a test function on several gloo ranks, bounded in time.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes
that join one gloo process group (file:// rendezvous in a fresh temporary
directory), calls ``fn(rank, world_size, *args)`` on each and returns the list
of their results (anything torch.save can write), rank by rank. An exception in
any rank is re-raised here as a RankFailure carrying the traceback of every
rank that failed, the earliest first (a rank whose peer died fails too, in
its collective, a moment later), after the other ranks are stopped; ranks still running after ``timeout`` seconds (a collective that
never completes) are killed and a TimeoutError is raised, so a bug never hangs
the suite. ``fn`` must be a module-level function (it is pickled by name).

Processes come from a forkserver that has imported torch and regops once, so
a run costs a fork and a rendezvous rather than a fresh interpreter each.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120.0
# A collective that waits longer than this raises in the rank instead of
# blocking it until the harness kills it.
COLLECTIVE_TIMEOUT_S = 60.0
_START_METHOD = "forkserver"

mp.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.fsdp", "regops"])


def _worker(rank: int, fn, world_size: int, directory: str, args: tuple) -> None:
    torch.set_num_threads(1)  # several ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'rendezvous')}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = fn(rank, world_size, *args)
    except BaseException:
        with open(os.path.join(directory, f"error-{rank}.txt"), "w") as file:
            file.write(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(directory, f"result-{rank}.pt"))


class RankFailure(Exception):
    """One or more ranks raised; the message holds their tracebacks."""


def _rank_failure(directory: str, world_size: int, fn) -> RankFailure | None:
    """The tracebacks the ranks wrote; None when none did (a rank died
    without a Python exception, e.g. from a signal)."""
    failures = []
    for rank in range(world_size):
        path = os.path.join(directory, f"error-{rank}.txt")
        if os.path.exists(path):
            with open(path) as file:
                when, text = file.read().split("\n", 1)
            failures.append((float(when), rank, text))
    if not failures:
        return None
    failures.sort()
    parts = [f"--- rank {rank} of {world_size} ---\n{text}" for _, rank, text in failures]
    return RankFailure(f"{fn.__name__} failed on ranks {[rank for _, rank, _ in failures]} "
                       f"(earliest first):\n" + "\n".join(parts))


def run_distributed(fn, world_size: int, *args, timeout: float = TIMEOUT_S) -> list:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each
    rank in its own process in one gloo group."""
    with tempfile.TemporaryDirectory(prefix="regops-distributed-") as directory:
        context = mp.start_processes(_worker, args=(fn, world_size, directory, args), nprocs=world_size,
                                     join=False, start_method=_START_METHOD)
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Raises as soon as one rank fails, after stopping the others.
                if context.join(timeout=max(deadline - time.monotonic(), 0.0), grace_period=5.0):
                    break
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
                failure = _rank_failure(directory, world_size, fn)
                raise (failure if failure is not None else error) from error
            if time.monotonic() >= deadline:
                running = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                for process in context.processes:
                    process.join()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s; "
                                   f"ranks {running} were still running and have been killed")
        return [torch.load(os.path.join(directory, f"result-{rank}.pt"), weights_only=False)
                for rank in range(world_size)]
