"""Two gloo processes on localhost for the multi-process tests: ``spawn(fn, *args)``
runs ``fn(rank, *args)`` on ranks 0 and 1 and fails the test with the worker's
own traceback."""
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cellkern.train.layouts import shutdown

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, fn, errfile, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        shutdown()   # destroy the group and collect it now (see cellkern.train.layouts.shutdown)


def spawn(fn, *args) -> None:
    """``fn(rank, *args)`` on WORLD gloo processes (``fn`` importable by name)."""
    with tempfile.TemporaryDirectory() as d:
        err = os.path.join(d, "err")
        try:
            mp.spawn(_worker, args=(free_port(), fn, err, args), nprocs=WORLD, join=True)
        except Exception as e:  # show the worker's own traceback
            msgs = [open(os.path.join(d, f)).read() for f in sorted(os.listdir(d))]
            pytest.fail("worker failed:\n" + "\n".join(msgs) if msgs else str(e))
