"""The `testbed` command."""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from testbed import __version__
from testbed.core.config import TASKS, ExperimentConfig, load_config
from testbed.core.errors import TestbedError
from testbed.core.hub import check_model_name


class Terminated(KeyboardInterrupt):
    """SIGTERM, which stops a command as Ctrl-C does (with exit status 143 instead of 130)."""


def main(argv: list[str] | None = None) -> int:
    # The bundled model and local files need no hub: offline unless told otherwise, a name that
    # is not cached fails at once, with one line, instead of after a minute of retries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, terminate)
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except TestbedError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("testbed: interrupted", file=sys.stderr)
        return stop_status(exc)


def terminate(signum: int, frame: object) -> None:
    raise Terminated


def stop_status(exc: KeyboardInterrupt) -> int:
    return 143 if isinstance(exc, Terminated) else 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed", description="Federated LoRA fine-tuning testbed.")
    p.add_argument("--version", action="version", version=f"testbed {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one experiment from a YAML config")
    run.add_argument("config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.lr=1e-3 (repeatable)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--out", help="run directory (default: runs/<config name>-<time>); refused if it holds "
                                     "a run, unless --force")
    where.add_argument("--resume", metavar="DIR",
                       help="continue the run in DIR after its last complete round (same config; rounds may grow; "
                            "--launcher mpi: unless devices keep personal layers)")
    run.add_argument("--force", action="store_true", help="--out: replace the run the directory holds")
    run.add_argument("--quiet", action="store_true", help="no progress bar or final table")
    run.add_argument("--launcher", choices=("inprocess", "mpi"), default="inprocess",
                     help="inprocess (default): every device in this process; mpi: mpirun with N agent ranks")
    run.add_argument("--agents", type=int, default=0, metavar="N",
                     help="agent ranks for --launcher mpi (default: one per device)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="check a config, its data and devices (and an inventory); train nothing")
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
    check.add_argument("-i", "--inventory", help="also check the config deployed on this inventory's hosts")
    check.set_defaults(func=cmd_check)
    init = sub.add_parser("init", help="write a commented starting config")
    init.add_argument("--data", metavar="FILE", help="train on this file (CSV, TSV, TXT, JSON, JSONL or Parquet); "
                                                    "default: the generated synthetic task")
    init.add_argument("--test", metavar="FILE", help="test on this file (default: the --data file itself)")
    init.add_argument("--text", action="append", metavar="COLUMN",
                      help="--data's text column (repeatable; default: text)")
    init.add_argument("--label", metavar="COLUMN", help="--data's label column (default: label)")
    init.add_argument("--out", default="experiment.yaml", metavar="FILE", help="default: experiment.yaml")
    init.set_defaults(func=cmd_init)
    prof = sub.add_parser("profile", help="measure this device: per-layer seconds and memory for a model")
    prof.add_argument("--model", default="minilm", help="model name or path (default: minilm)")
    prof.add_argument("--seq-len", type=int, default=64)
    prof.add_argument("--batch", type=int, default=16)
    prof.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    prof.add_argument("--ranks", default="2,8,16", help="LoRA ranks to time, comma-separated")
    prof.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu, cuda, cuda:N or mps")
    prof.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast precision")
    prof.add_argument("--task", default="classification", choices=TASKS,
                      help="the head a step runs: a classification head, or a causal LM's own "
                           "(default: classification)")
    prof.add_argument("--out", help="write the profile here (.yaml or .json); default: print it")
    prof.set_defaults(func=cmd_profile)
    comp = sub.add_parser("compare", help="run a study (strategies x seeds x device mixes x splits), then report")
    comp.add_argument("study", help="study file (YAML)")
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key in every cell, e.g. --set rounds=2 (repeatable)")
    comp.add_argument("--out", help="study directory (default: the study's `out`, else runs/<study name>)")
    comp.set_defaults(func=cmd_compare)
    rep = sub.add_parser("report", help="report.md and PNG plots comparing finished runs")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding them")
    rep.add_argument("--out", help="where report.md and the plots go (default: the RUN_DIRs' common directory)")
    rep.add_argument("--baseline", default="fedlora", help="method the others are compared with (default: fedlora)")
    rep.set_defaults(func=cmd_report)
    hf = sub.add_parser("hostfile", help="print an Open MPI hostfile for an inventory (aggregator first)")
    hf.add_argument("-i", "--inventory", required=True, help="inventory: YAML, INI, or ansible-inventory --list JSON")
    hf.set_defaults(func=cmd_hostfile)
    dep = sub.add_parser("deploy", help="run an experiment on the hosts of an inventory, over SSH")
    dep.add_argument("config")
    dep.add_argument("-i", "--inventory", required=True, help="inventory: YAML, INI, or ansible-inventory --list JSON")
    dep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (repeatable)")
    where = dep.add_mutually_exclusive_group()
    where.add_argument("--out", help="run directory here (default: runs/<config name>-<time>); its name names the "
                                     "hosts' run directories")
    where.add_argument("--resume", metavar="DIR", help="continue the deployed run in DIR after its last complete "
                                                       "round (stopping and replacing what is left of it on the hosts)")
    dep.add_argument("--force", action="store_true", help="--out: replace the run the directory holds")
    dep.add_argument("--known-hosts", metavar="FILE",
                     help="host keys to verify against (default: each host's testbed_known_hosts, else "
                          "~/.ssh/known_hosts)")
    dep.add_argument("--accept-new-host-keys", action="store_true",
                     help="trust hosts whose key is not in known_hosts yet and add it (a changed key is still refused)")
    dep.add_argument("--bootstrap", action="store_true",
                     help="install missing packages with pip into a venv in each host's workdir")
    dep.add_argument("--check", action="store_true", help="connect to and check every host, then stop")
    dep.set_defaults(func=cmd_deploy)
    lab = sub.add_parser("lab", help="the emulated lab: each inventory host a network namespace, sshd and cgroup here")
    actions = lab.add_subparsers(required=True, metavar="ACTION")
    for action, text in (("up", "build the lab an inventory describes (root)"),
                         ("down", "remove everything the lab made (root)"),
                         ("status", "show what of the lab exists")):
        a = actions.add_parser(action, help=text)
        a.add_argument("-i", "--inventory", required=action == "up", help="the lab's inventory")
        a.add_argument("--name", help="lab name (default: the inventory's file name without suffix)")
        a.add_argument("--dir", help="lab directory (default: .lab/NAME)")
        a.set_defaults(func=cmd_lab, action=action)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    check_model_name(cfg.model.name)  # before torch even loads
    if args.force and not args.out:
        raise TestbedError("--force goes with --out DIR: it replaces the run in DIR")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.resume or args.out or Path("runs") / f"{Path(args.config).stem}-{stamp}")
    try:
        code = run_mpi(args, cfg, out) if args.launcher == "mpi" else run_here(args, cfg, out)
    except KeyboardInterrupt as exc:
        print(f"testbed: {stopped(args, cfg, out)}", file=sys.stderr)
        return stop_status(exc)
    if code == 0:
        print(f"testbed: results in {out}", file=sys.stderr)
    return code


def run_here(args: argparse.Namespace, cfg: ExperimentConfig, out: Path) -> int:
    from testbed.experiments.run import run_inprocess

    run_inprocess(cfg, out, args.quiet, resume=bool(args.resume), force=args.force)
    return 0


def run_mpi(args: argparse.Namespace, cfg: ExperimentConfig, out: Path) -> int:
    """The run directory and the data are checked here, before mpirun starts; rank 0 then holds
    the directory for the run."""
    from launch.cmdline import mpirun_command
    from testbed.experiments.setup import check_inputs
    from testbed.server.rundir import RunDir

    check_inputs(cfg)
    with RunDir.take(out, cfg, bool(args.resume), args.force):
        if args.resume:  # refused before mpirun starts, if agents would lack what they held
            from testbed.comm.distributed import check_resumable
            from testbed.server.checkpoint import load_checkpoint

            check_resumable(load_checkpoint(out).transport)
    print(f"testbed: run directory {out}", file=sys.stderr)
    agents = args.agents or sum(d.count for d in cfg.devices.values())
    cmd = mpirun_command(args.config, args.set, out, agents, resume=bool(args.resume), force=args.force)
    print("testbed: " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached mpirun too; SIGTERM only this process: pass it on
        proc.terminate()
        proc.wait()
        raise


def stopped(args: argparse.Namespace, cfg: ExperimentConfig, out: Path) -> str:
    """What a stopped run says: how far it got (as the progress bar counts), and the command
    that continues it."""
    command = ["testbed", "run", args.config, *set_options(args.set)]
    if args.launcher == "mpi":
        command += ["--launcher", "mpi"] + (["--agents", str(args.agents)] if args.agents else [])
    if not (out / "checkpoint.pt").is_file():
        command += ["--out", str(out), "--force"]
        return f"stopped before a round ended; start again with: {shlex.join(command)}"
    from testbed.server.checkpoint import load_checkpoint

    done = load_checkpoint(out).round + 1
    return f"stopped after round {done} of {cfg.rounds}; continue with: {shlex.join(command + ['--resume', str(out)])}"


def set_options(sets: list[str]) -> list[str]:
    """`--set K=V` options as they were given, for a command line to repeat."""
    return [word for item in sets for word in ("--set", item)]


def cmd_check(args: argparse.Namespace) -> int:
    from testbed.experiments.setup import check_inputs

    cfg = load_config(args.config, args.set)
    where = args.config
    if args.inventory:
        from launch.deploy.payload import run_config
        from launch.inventory import load_inventory
        from testbed.core.config import from_dict

        agents = [h for h in load_inventory(args.inventory) if h.role == "agent"]
        where = f"{args.config} on {args.inventory}"
        cfg = from_dict(run_config(cfg, agents), where)
    inputs = check_inputs(cfg)
    splits = inputs.splits
    sizes = sorted(len(s.train) + len(s.val) for s in inputs.shards.values())
    classes = collections.Counter(d.device_class for d in inputs.devices.values())
    print(f"{where}: ready (checked without loading the model; nothing was trained)\n"
          f"  strategy  {cfg.strategy.name}, {cfg.rounds} rounds\n"
          f"  model     {cfg.model.name}\n"
          f"  devices   {len(inputs.devices)}: {', '.join(f'{n} {c}' for c, n in classes.items())}\n"
          f"  data      {len(splits.train.labels)} training rows ({sizes[0]} to {sizes[-1]} per device), "
          f"{len(splits.test.labels)} test rows, {splits.num_labels} labels"
          + (f" ({', '.join(splits.label_names)})" if splits.label_names else ""))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from testbed.experiments.starter import starter_config

    if args.data is None and (args.test or args.text or args.label):
        raise TestbedError("init: --test, --text and --label describe a --data file; name it")
    path = Path(args.out)
    if path.exists():
        raise TestbedError(f"{path} exists already; pick another --out")
    path.write_text(starter_config(args.out, args.data or "", args.test or "", args.text or ["text"],
                                   args.label or "label"))
    print(f"testbed: wrote {path}; check it with `testbed check {path}`, run it with `testbed run {path}`",
          file=sys.stderr)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from testbed.core.config import LoraConfig, ModelConfig
    from testbed.measure.cores import cpu_load
    from testbed.measure.profiler import profile_device
    from testbed.model.info import model_info
    from testbed.model.load import load_backbone
    from testbed.model.placement import model_placement, place

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ranks = tuple(int(r) for r in args.ranks.split(","))
    except ValueError:
        raise TestbedError(f"--ranks: expected comma-separated integers, got {args.ranks!r}") from None
    lora = LoraConfig(rank=max(ranks), alpha=2.0 * max(ranks))
    load = cpu_load()
    if load.oversubscribed(torch.get_num_threads()):  # threads sharing a core wait: every size costs alike
        print(f"testbed: warning: other processes keep {load.others:.1f} threads runnable on the {load.cores} CPUs: "
              "the profile (and the fit of its step's terms) will be a loaded machine's; profile a quiet one",
              file=sys.stderr)
    placement = model_placement(args.device, args.precision, ("--device", "--precision"))
    bb = load_backbone(ModelConfig(name=args.model, max_length=args.seq_len, lora=lora), 4, seed=0, task=args.task)
    bb.placement = placement
    place(bb.model, bb.head_params(), placement.device, torch.float32)
    start = time.perf_counter()
    profile = profile_device(bb, args.model, model_info(bb), lora, args.batch, args.seq_len, ranks)
    print(f"testbed: profiled {args.model} on {profile.device} ({profile.precision}) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.out:
        profile.save(Path(args.out))
        print(f"testbed: wrote {args.out}", file=sys.stderr)
    else:
        print(json.dumps(dataclasses.asdict(profile), indent=1))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from testbed.experiments.report import write_report
    from testbed.experiments.study import load_study, run_study

    study = load_study(args.study, args.set, args.out)
    try:
        runs = run_study(study)
    except KeyboardInterrupt as exc:
        command = ["testbed", "compare", args.study, *set_options(args.set), "--out", str(study.out)]
        print(f"testbed: stopped; finished runs are kept, and the same command continues: {shlex.join(command)}",
              file=sys.stderr)
        return stop_status(exc)
    path = write_report(runs, study.out, study.baseline, f"Study {Path(args.study).stem}")
    print(f"testbed: wrote {path}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from testbed.experiments.report import write_report
    from testbed.experiments.runs import find_runs

    runs = find_runs(args.runs)
    out = Path(args.out) if args.out else Path(os.path.commonpath([Path(r).resolve() for r in args.runs]))
    path = write_report(runs, out, args.baseline)
    print(f"testbed: wrote {path} ({len(runs)} runs)", file=sys.stderr)
    return 0


def cmd_hostfile(args: argparse.Namespace) -> int:
    from launch.inventory import hostfile, load_inventory

    print(hostfile(load_inventory(args.inventory)), end="")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from launch.deploy import DeployOptions, deploy

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.resume or args.out or Path("runs") / f"{Path(args.config).stem}-{stamp}")
    if not (args.resume or args.check):  # an existing run is refused (or removed) before any host is touched
        from testbed.server.rundir import RunDir

        RunDir.take(out, load_config(args.config, args.set), force=args.force).release()
    known = Path(args.known_hosts).expanduser() if args.known_hosts else None
    return deploy(DeployOptions(args.inventory, args.config, out, known, args.set, args.accept_new_host_keys,
                                args.bootstrap, args.check, resume=bool(args.resume)))


def cmd_lab(args: argparse.Namespace) -> int:
    from launch import lab

    if args.action == "up":
        state = lab.up(lab.lab_spec(args.inventory, args.name, args.dir))
        print(lab.status_table(state), end="")
        print(f"testbed: lab {state.name} is up; `testbed lab down --dir {state.dir}` removes it", file=sys.stderr)
        return 0
    if not (args.inventory or args.name or args.dir):
        raise TestbedError(f"lab {args.action}: name the lab with -i INVENTORY, --name or --dir")
    directory = lab.lab_dir(args.name or Path(args.inventory or ".").stem, args.dir)
    state = lab.load_state(directory)
    if state is None:
        print(f"testbed: no lab in {directory}", file=sys.stderr)
        return 0
    if args.action == "status":
        print(lab.status_table(state), end="")
        return 0
    lab.check_machine("down")
    done = lab.down(state)
    print(f"testbed: lab {state.name} down: ended {done.processes} processes, removed {done.namespaces} "
          f"namespaces, {done.cgroups} cgroups and {state.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
