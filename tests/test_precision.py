"""Mixed precision and a half-precision base on the CPU: training still learns, the counted
footprint and the cost model shrink with the dtypes, and what leaves the device stays float32."""
import pytest
import torch

from testbed.agent.trainer import train_plan
from testbed.core.config import from_dict
from testbed.core.errors import TestbedError
from testbed.core.plan import Plan
from testbed.experiments.setup import check_inputs, setup
from testbed.model.lora import init_lora, lora_applied
from testbed.model.placement import Placement, check_precision, resolve_device
from testbed.model.residency import hold
from testbed.model.tiny import tiny_config


def experiment(tiny_bert, precision: str, dtype: str, devices: dict | None = None):
    """Devices whose classes have both half precisions (a TX2 has no bf16)."""
    return setup(from_dict(tiny_config(tiny_bert, **{"train.precision": precision, "model.dtype": dtype,
                                                     "devices": devices or {"laptop": 2, "orin-nano": 1}})))


def memorise(exp, rounds: int = 2) -> list:
    """Train one plan on one fixed batch of 8 rows, `rounds` times in a row, each from the last."""
    plan = Plan(ranks={0: 4, 1: 4}, local_steps=15, batch_size=8, lr=1e-2)
    lora, head = init_lora(exp.info, [0, 1], 4, 0), {n: t.clone() for n, t in exp.bb.head_params().items()}
    results = []
    for r in range(rounds):
        res = train_plan(exp.bb, plan, lora, head, exp.data.train, list(range(8)), exp.cfg.model.lora,
                         exp.cfg.train, seed=r)
        lora, head = res.lora, res.head
        results.append(res)
    return results


@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("fp16", "float16"), ("bf16", "float32")])
def test_half_precision_trains_and_what_leaves_the_device_is_float32(tiny_bert, precision, dtype):
    exp = experiment(tiny_bert, precision, dtype)
    first, second = memorise(exp)
    assert second.loss < first.loss - 0.05  # it learns the batch
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for ts in second.lora.values() for t in ts.values())
    assert all(t.dtype == torch.float32 for t in second.head.values())
    layer = exp.bb.layers[0].attention.self.query
    assert layer.weight.dtype == getattr(torch, dtype)
    with lora_applied(exp.bb, {0: 4}, exp.cfg.model.lora):  # peft keeps the adapters float32 beside the base
        assert exp.bb.layers[0].attention.self.query.lora_A["default"].weight.dtype == torch.float32


def test_an_agent_reads_its_layers_in_the_base_dtype(tiny_bert):
    exp = setup(from_dict(tiny_config(tiny_bert, **{"train.precision": "bf16", "model.dtype": "bfloat16",
                                                    "devices": {"laptop": 1}})), agent=True)

    def query(layer: int) -> torch.Tensor:
        return exp.bb.layers[layer].attention.self.query.weight

    assert query(0).is_meta and query(0).dtype == torch.bfloat16
    hold(exp.bb, [0])
    assert not query(0).is_meta and query(0).dtype == torch.bfloat16 and query(1).is_meta
    assert all(p.dtype == torch.float32 for p in exp.bb.head_params().values())


def test_bf16_shrinks_the_counted_footprint_and_the_cost_models_figure(tiny_bert):
    full, half = experiment(tiny_bert, "fp32", "float32"), experiment(tiny_bert, "bf16", "bfloat16")
    counted = {name: memorise(e, rounds=1)[0].footprint_mb for name, e in (("fp32", full), ("bf16", half))}
    assert counted["bf16"] < 0.7 * counted["fp32"]
    plan, device = Plan(ranks={0: 4, 1: 4}, batch_size=8), full.devices["laptop-0"]
    predicted = {"fp32": full.cost.peak_memory_bytes(device, plan) / 2**20,
                 "bf16": half.cost.peak_memory_bytes(device, plan) / 2**20}
    assert predicted["bf16"] < 0.7 * predicted["fp32"]
    for name in counted:
        assert predicted[name] == pytest.approx(counted[name], rel=0.1)


def test_cpu_autocast_is_checked_and_bad_devices_are_named(tiny_bert):
    cpu = torch.device("cpu")
    for precision in ("fp32", "bf16", "fp16"):
        check_precision(cpu, precision)  # torch 2.13 autocasts to both halves on the CPU
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else cpu)
    with pytest.raises(TestbedError, match=r"model.device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(TestbedError, match="model.device: cuda:1, but this process sees no CUDA device"):
            check_inputs(from_dict(tiny_config(tiny_bert, **{"model.device": "cuda:1"})))


def test_fp32_placement_changes_nothing():
    place = Placement()
    assert not place.scaler().is_enabled()
    with place.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert place.inputs(batch)["input_ids"] is batch["input_ids"]  # already on the device: not copied


def test_the_cost_model_times_each_class_in_the_runs_precision(tiny_bert):
    """A class's half-precision speedup against the reference's at the profile's precision
    (testbed/core/devices.py): an Orin's bf16 step is quicker than its fp32 one, a laptop's fp16 is
    slower; a class without the precision is refused, naming the device."""
    devices = {"laptop": 1, "orin-nano": 1}
    runs = {(p, d): experiment(tiny_bert, p, d, devices) for p, d in
            (("fp32", "float32"), ("bf16", "float32"), ("bf16", "bfloat16"), ("fp16", "float32"))}
    plan = Plan(ranks={0: 4, 1: 4}, batch_size=8)

    def step(run: tuple[str, str], device: str) -> float:
        exp = runs[run]
        return exp.cost.step_seconds(exp.devices[device], plan)

    fp32 = ("fp32", "float32")
    assert step(("bf16", "float32"), "orin-nano-0") == pytest.approx(step(fp32, "orin-nano-0") / 2.0)
    assert step(("bf16", "bfloat16"), "orin-nano-0") == step(("bf16", "float32"), "orin-nano-0")  # autocast's, either base
    assert step(("fp16", "float32"), "laptop-0") == pytest.approx(step(fp32, "laptop-0") / 0.05)
    with pytest.raises(TestbedError, match=r"devices.jetson-tx2: jetson-tx2 has no bf16 \(it has fp32, fp16\)"):
        check_inputs(from_dict(tiny_config(tiny_bert, **{"train.precision": "bf16"})))
    with pytest.raises(TestbedError, match="model.dtype: a bfloat16 base runs under a half train.precision"):
        from_dict(tiny_config(tiny_bert, **{"model.dtype": "bfloat16"}))  # fp32 inputs cannot meet half weights
