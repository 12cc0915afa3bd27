"""Wire format throughput: pack, and unpack with its digest check, for messages of 1, 16 and 64 MB
(64 float32 tensors each; float32 and float16 on the wire; median of 5).  Real LoRA messages
are 0.3 MB (MiniLM, r=8, query/value) to about 17 MB (a 7B LLaMA, r=8, q/v); above glibc's
32 MB mmap threshold every message lands on fresh pages, whose first-touch faults cost more
than the copy.  Also bytes on the wire / tensor bytes for the MiniLM update.
--quick: 1 and 16 MB, median of 3.  One JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testbed.comm.framing import LENGTH_PREFIX  # noqa: E402
from testbed.comm.wire import (Message, pack, unpack,  # noqa: E402
                               update_message)
from testbed.core.plan import Update  # noqa: E402

KEY = b"k" * 32


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(mb: int, repeats: int) -> dict:
    per = mb * 2**20 // 4 // 64
    msg = Message("update", 0, "d", 1, {}, {f"t{i}": torch.randn(per) for i in range(64)})
    raw = 64 * per * 4
    out = {}
    for name, dtype in (("float32", None), ("float16", torch.float16)):
        buf = pack(msg, KEY, dtype)
        out[name] = {"pack_gb_s": round(raw / timed(lambda: pack(msg, KEY, dtype), repeats) / 1e9, 3),
                     "unpack_gb_s": round(raw / timed(lambda: unpack(buf, KEY), repeats) / 1e9, 3)}
        print(f"{mb:>3} MB {name}: pack {out[name]['pack_gb_s']} GB/s, unpack {out[name]['unpack_gb_s']} GB/s "
              f"(float32 tensor bytes per second)", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sizes, repeats = ([1, 16], 3) if args.quick else ([1, 16, 64], 5)
    figures = {f"{mb}MB": throughput(mb, repeats) for mb in sizes}
    lora = {l: {f"{m}.{ab}": torch.zeros((8, 384) if ab == "A" else (384, 8)) for m in ("query", "value")
                for ab in "AB"} for l in range(6)}
    head = {"classifier.weight": torch.zeros(4, 384), "classifier.bias": torch.zeros(4)}
    u = Update("jetson-tx2-0", 0, lora, head, 750, dict.fromkeys(range(6), 10), 10, 0.5)
    tensors = sum(t.numel() * 4 for ts in lora.values() for t in ts.values()) + sum(t.numel() * 4 for t in head.values())
    ratio = (LENGTH_PREFIX + len(pack(update_message(u, 1), KEY))) / tensors
    print(json.dumps({"bench": "wire", "quick": args.quick, "throughput": figures,
                      "minilm_update_wire_over_tensor_bytes": round(ratio, 4)}))


if __name__ == "__main__":
    main()
