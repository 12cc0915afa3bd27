"""Agents on a CUDA device: training, CUDA memory per round, a real out-of-memory, the profiler.
Marked `gpu`; skipped where this process sees no CUDA device (CI has none: README, "GPU machines")."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from testbed.agent.agent import Agent
from testbed.core.config import from_dict
from testbed.core.errors import OutOfMemory
from testbed.core.plan import Job, Plan
from testbed.experiments.run import run_inprocess
from testbed.experiments.runs import read_rows
from testbed.experiments.setup import setup
from testbed.measure.memory import discrete_gpu, join_memory, peak_mb, reset_peak
from testbed.measure.profiler import profile_device
from testbed.model.lora import get_head, init_lora
from testbed.model.tiny import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

MIB = 2**20


def half() -> str:
    """The half precision this GPU autocasts to: bf16 from Ampere on, else fp16."""
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def test_a_run_on_cuda_trains_and_reports_the_gpus_memory(tiny_bert, tmp_path):
    cfg = from_dict(tiny_config(tiny_bert, **{"model.device": "cuda", "train.precision": half()}))
    summary = run_inprocess(cfg, tmp_path, quiet=True)
    assert summary["final_accuracy"] is not None and not summary["failures"]
    for row in read_rows(tmp_path):
        for d in row["devices"]:
            assert 0 < d["peak_cuda_mb"] <= d["peak_cuda_reserved_mb"]


def test_cuda_and_cpu_train_the_same_model(tiny_bert, tmp_path):
    losses = {}
    for device in ("cpu", "cuda"):
        run_inprocess(from_dict(tiny_config(tiny_bert, rounds=1, **{"model.device": device})), tmp_path / device,
                      quiet=True)
        losses[device] = [d["loss"] for d in read_rows(tmp_path / device)[0]["devices"]]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)  # float32: kernels differ, not the model


def test_a_real_cuda_out_of_memory_fails_the_round_and_the_agent_goes_on(tiny_bert):
    cfg = from_dict(tiny_config(tiny_bert, **{"model.device": "cuda", "model.max_length": 128}))
    exp = setup(cfg)
    name = "laptop-0"
    agent = Agent(name, cfg, exp.bb, exp.data.train, exp.data.shards[name])
    lora = init_lora(exp.info, [0, 1], 4, 0)
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(free - 64 * MIB, dtype=torch.uint8, device="cuda")  # leave the run 64 MiB
    huge = Plan(ranks={0: 4, 1: 4}, local_steps=1, batch_size=4096, lr=1e-3)  # attention alone needs GiBs
    with pytest.raises(OutOfMemory, match=r"cuda ran out of memory at a peak of \d+ MiB allocated"):
        agent.run(0, Job(huge, lora, get_head(exp.bb)))
    del filler
    torch.cuda.empty_cache()
    update = agent.run(1, Job(Plan(ranks={0: 4, 1: 4}, local_steps=2, batch_size=8, lr=1e-3), lora, get_head(exp.bb)))
    assert update.report.peak_cuda_mb > 0 and all(t.device.type == "cpu" for t in update.lora[0].values())


class HostToDevice(TorchDispatchMode):
    """Counts the copies of given CPU tensors onto the GPU, by the tensor's storage."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr() for t in tensors}
        self.copies: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[1] if func is torch.ops.aten.copy_.default else args[0]
        if (func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and isinstance(src, torch.Tensor)
                and src.device.type == "cpu" and src.untyped_storage().data_ptr() in self.watched):
            key = src.untyped_storage().data_ptr()
            self.copies[key] = self.copies.get(key, 0) + 1
        return out


def test_a_round_copies_its_lora_and_head_onto_the_gpu_once(tiny_bert):
    """A plan that probes, validates twice and trains: each of the job's CPU tensors crosses once."""
    cfg = from_dict(tiny_config(tiny_bert, **{"model.device": "cuda"}))
    exp = setup(cfg)
    name = "laptop-0"
    agent = Agent(name, cfg, exp.bb, exp.data.train, exp.data.shards[name])
    lora, head = init_lora(exp.info, [0, 1], 4, 0), {n: t.cpu() for n, t in get_head(exp.bb).items()}
    plan = Plan(ranks={0: 4, 1: 4}, local_steps=2, batch_size=8, lr=1e-3, validate=True, probe_rows=8)
    tensors = [t for ts in lora.values() for t in ts.values()] + list(head.values())
    with HostToDevice(tensors) as seen:
        agent.run(0, Job(plan, lora, head))
    assert sorted(seen.copies.values()) == [1] * len(tensors)


def test_an_agent_on_a_discrete_gpu_measures_the_gpus_memory():
    device = torch.device("cuda")
    if not discrete_gpu(device):
        pytest.skip("an integrated GPU (Jetson): the host's RAM is the measure")
    memory = join_memory(device)
    assert memory.limit_mb > memory.base_mb >= 0
    reset_peak(device)
    block = torch.empty(64 * MIB, dtype=torch.uint8, device=device)
    assert peak_mb(device) >= memory.base_mb + 64
    del block


def test_the_profiler_times_the_gpu(tiny_bert):
    exp = setup(from_dict(tiny_config(tiny_bert, **{"model.device": "cuda", "train.precision": half()})))
    profile = profile_device(exp.bb, "tiny", exp.info, exp.cfg.model.lora, batch_size=8, seq_len=16, ranks=(2, 4),
                             repeats=2)
    assert profile.device.startswith("cuda") and "compute capability" in profile.device
    assert profile.precision == half()
    assert all(s > 0 for s in profile.forward_frozen_s + profile.backward_s[4])
