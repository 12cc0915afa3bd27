"""The device side: turns a Plan and the LoRA it needs into an Update.

The agent is the same object under every transport; only how its inputs arrive
and its Update leaves differs.  Before it trains, it makes resident exactly the layers (and
blocks) its plan runs: on a backbone with a layer store (a dist agent) pruned layers are then
not in memory at all.  Peak RSS is measured per round, and the energy the host's power sensors
count where it has them (testbed.measure.power).
"""
from __future__ import annotations

import random
import time
import zlib

import torch

from testbed.agent.trainer import train_plan
from testbed.core.config import ExperimentConfig
from testbed.core.errors import OutOfMemory
from testbed.core.plan import (HeadState, Job, LayerProbe, LoraState, Plan,
                               Report, Update)
from testbed.data import Shard, Tokens
from testbed.measure.evaluate import evaluate
from testbed.measure.memory import (MIB, device_out_of_memory, peak_cuda_mb,
                                    peak_cuda_reserved_mb, peak_rss_mb,
                                    reset_peak_cuda, reset_peak_rss)
from testbed.measure.power import find_meter
from testbed.measure.probe import probe_layers
from testbed.model.backbone import Backbone
from testbed.model.info import model_info
from testbed.model.lora import init_lora
from testbed.model.placement import moved
from testbed.model.residency import hold


class Agent:
    def __init__(self, device: str, cfg: ExperimentConfig, bb: Backbone, tokens: Tokens, shard: Shard,
                 budget_mb: float = 0.0):
        self.device = device
        self.budget_mb = budget_mb  # training memory budget; exceeding it fails the round (OutOfMemory)
        self.cfg = cfg
        self.bb = bb
        self.tokens = tokens
        self.shard = shard
        self.personal: LoraState = {}  # layers whose LoRA stays here (PTLS)
        self.meter = find_meter()  # None where the host has no power sensors we can read

    def run(self, round: int, job: Job) -> Update:
        """The round's work, metered where the host has power sensors.  The device running out of
        memory for real (CUDA) fails the round as OutOfMemory, as the counted budget does."""
        device = self.bb.placement.device
        reset_peak_cuda(device)
        if self.meter:
            self.meter.start()
        failed = ""
        try:
            update = self._run(round, job)
        except torch.OutOfMemoryError as exc:
            failed = str(exc).splitlines()[0]
        finally:
            joules = self.meter.stop() if self.meter else None
        if failed:  # out of the except block, the failed round's tensors are freed
            raise device_out_of_memory(device, failed)
        update.report.measured_energy_j = joules
        return update

    def _run(self, round: int, job: Job) -> Update:
        reset_peak_rss()
        plan, device = job.plan, self.bb.placement.device
        # The round's one copy onto the device; every pass below reads these.
        lora, head = moved({**job.lora, **self._personal_layers(plan)}, job.head, device)
        seed = zlib.crc32(f"{self.cfg.seed}/{self.device}/{round}".encode())
        probe, probe_mb, probe_s = self._probe(plan, lora, head, seed)
        hold(self.bb, plan.resident(self.bb.num_layers), plan.blocks)
        start = time.perf_counter()
        before = self._validate(plan, lora, head)
        val_s = time.perf_counter() - start
        res = train_plan(self.bb, plan, lora, head, self.tokens, self.shard.train,
                         self.cfg.model.lora, self.cfg.train, seed, self.budget_mb)
        start = time.perf_counter()
        after = self._validate(plan, res.lora, res.head)
        val_s += time.perf_counter() - start
        shared = set(plan.shared(self.bb.num_layers))
        cpu = torch.device("cpu")  # what leaves the round (its update, the personal layers a checkpoint saves)
        self.personal.update(moved({l: t for l, t in res.lora.items() if l in plan.personal}, {}, cpu)[0])
        report = Report(compute_s=probe_s + val_s + res.compute_s, step_s=res.step_s,
                        peak_train_mem_mb=max(res.footprint_mb, probe_mb), peak_rss_mb=peak_rss_mb(),
                        peak_cuda_mb=peak_cuda_mb(device), peak_cuda_reserved_mb=peak_cuda_reserved_mb(device),
                        val_accuracy_before=before["accuracy"], val_accuracy=after["accuracy"],
                        val_loss_before=before["loss"], val_loss=after["loss"])
        lora, head = moved({l: t for l, t in res.lora.items() if l in shared}, res.head, cpu)
        return Update(device=self.device, round=round, lora=lora, head=head,
                      samples=len(self.shard.train), active_steps=res.active_steps,
                      steps=plan.local_steps, loss=res.loss, report=report, probe=probe)

    def _probe(self, plan: Plan, lora: LoraState, head: HeadState,
               seed: int) -> tuple[LayerProbe | None, float, float]:
        """When the plan asks: the whole model (every layer resident for the while) probed on
        rows of this device's own data, with the LoRA the device holds; the MiB it held (over
        the memory budget, the round fails as training's would) and the seconds it took."""
        if not plan.probe_rows:
            return None, 0.0, 0.0
        start = time.perf_counter()
        rows = random.Random(seed).sample(self.shard.train, min(plan.probe_rows, len(self.shard.train)))
        hold(self.bb, list(range(self.bb.num_layers)))
        probe, held = probe_layers(self.bb, lora, head, self.tokens.take(sorted(rows)), self.cfg.model.lora,
                                   plan.probe_blocks)
        if self.budget_mb and held / MIB > self.budget_mb:
            raise OutOfMemory(f"the probe needs {held / MIB:.1f} MiB, the budget is {self.budget_mb:g} MiB")
        return probe, held / MIB, time.perf_counter() - start

    def _validate(self, plan: Plan, lora: LoraState, head: HeadState) -> dict[str, float]:
        """This device's model (its layers and blocks, no dropout) on its own validation split."""
        if not plan.validate or not self.shard.val:
            return {"accuracy": 0.0, "loss": 0.0}
        metrics = evaluate(self.bb, lora, head, self.tokens, self.cfg.model.lora, self.cfg.train.eval_batch_size,
                           self.shard.val, plan.resident(self.bb.num_layers), plan.blocks)
        return {**metrics, "accuracy": metrics["accuracy"] or 0.0}  # None: free-text responses, no accuracy

    def _personal_layers(self, plan: Plan) -> LoraState:
        """This device's own factors for its personal layers, started like the global ones."""
        mine = {}
        for l in plan.personal:
            if plan.ranks.get(l, 0) <= 0:
                continue
            if l not in self.personal:
                self.personal.update(init_lora(model_info(self.bb), [l], self.cfg.model.lora.rank, self.cfg.seed))
            r = plan.ranks[l]
            mine[l] = {n: (t[:r] if n.endswith(".A") else t[:, :r]) for n, t in self.personal[l].items()}
        return mine
