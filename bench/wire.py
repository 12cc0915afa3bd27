"""Wire format throughput: pack and unpack (with digest check) of ~64 MB in 64 float32 tensors,
in float32 and float16 on the wire (median of 5); bytes on the wire / tensor bytes for a
MiniLM-sized update.  --quick: ~16 MB, median of 3.  One JSON object on the last line.
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
from testbed.plan import Update  # noqa: E402
from testbed.wire import Message, pack, unpack, update_message  # noqa: E402

KEY = b"k" * 32


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    mb, repeats = (16, 3) if args.quick else (64, 5)
    per = mb * 2**20 // 4 // 64
    msg = Message("update", 0, "d", 1, {}, {f"t{i}": torch.randn(per) for i in range(64)})
    raw = 64 * per * 4
    figures = {}
    for name, dtype in (("float32", None), ("float16", torch.float16)):
        buf = pack(msg, KEY, dtype)
        t_pack = timed(lambda: pack(msg, KEY, dtype), repeats)
        t_unpack = timed(lambda: unpack(buf, KEY), repeats)
        figures[name] = {"pack_gb_s": round(raw / t_pack / 1e9, 3), "unpack_gb_s": round(raw / t_unpack / 1e9, 3),
                         "bytes": len(buf)}
        print(f"{name}: pack {figures[name]['pack_gb_s']} GB/s, unpack {figures[name]['unpack_gb_s']} GB/s "
              f"(of float32 tensor bytes)", file=sys.stderr)
    lora = {l: {f"{m}.{ab}": torch.zeros((8, 384) if ab == "A" else (384, 8)) for m in ("query", "value")
                for ab in "AB"} for l in range(6)}
    head = {"classifier.weight": torch.zeros(4, 384), "classifier.bias": torch.zeros(4)}
    u = Update("jetson-tx2-0", 0, lora, head, 750, dict.fromkeys(range(6), 10), 10, 0.5)
    tensors = sum(t.numel() * 4 for ts in lora.values() for t in ts.values()) + sum(t.numel() * 4 for t in head.values())
    ratio = (len(pack(update_message(u, 1), KEY)) + 8) / tensors
    print(json.dumps({"bench": "wire", "quick": args.quick, "megabytes": mb, "throughput": figures,
                      "minilm_update_wire_over_tensor_bytes": round(ratio, 4)}))


if __name__ == "__main__":
    main()
