"""Messages over torch.distributed point-to-point: a length prefix (one int64), then the bytes."""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from testbed.comm.wire import WireError

LENGTH_PREFIX = 8  # bytes: the int64 sent before each message
MAX_MESSAGE = 1 << 31  # bytes; anything longer is refused before allocating it

def send_bytes(buf: memoryview, dst: int) -> int:
    """Send one message to `dst`; the bytes it took on the stream."""
    dist.send(torch.tensor([len(buf)], dtype=torch.int64), dst)
    dist.send(torch.frombuffer(buf, dtype=torch.uint8), dst)
    return LENGTH_PREFIX + len(buf)

def recv_bytes(src: int, wait_s: float = 0.0) -> memoryview:
    """The next message from `src`; `wait_s`: how long its start may take (0: the process
    group's timeout)."""
    n = torch.empty(1, dtype=torch.int64)
    if wait_s:
        dist.irecv(n, src).wait(timedelta(seconds=wait_s))
    else:
        dist.recv(n, src)
    size = int(n.item())
    if not 0 < size <= MAX_MESSAGE:
        raise WireError(f"length prefix {size} from rank {src} is out of range")
    buf = torch.empty(size, dtype=torch.uint8)
    dist.recv(buf, src)
    return memoryview(buf.numpy()).cast("B")
