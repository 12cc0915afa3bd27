"""`testbed deploy -i INVENTORY CONFIG`: one distributed run on the hosts of an inventory, over SSH.

Every host is connected to (host keys checked) and checked (its interpreter and the packages
an agent imports; `--bootstrap` installs missing ones into a venv) before anything starts, and
every problem is reported, one line per host.  Then each host gets a per-run directory
`{testbed_workdir}/{host}/{run name}` (mode 0700) holding the project, the run's config, the
files the config names (data, model directory, profile) and the run's secret (0600), and runs
`python -m launch.mpi` with torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT and
TESTBED_SECRET_FILE.  Each agent host is one device of the run, named after the host.  Rank 0,
the aggregator, runs here, or on the host whose testbed_role is aggregator (its run directory
is copied back).  Agents' output streams to runs/NAME/agents/HOST.log.  At the end, on Ctrl-C
or on any failure, every rank is stopped and the per-run directories are removed.

The modules, in the order a run uses them:
  preflight  connect to and check every host (interpreter, the packages an agent imports)
  hosts      a checked host (Session) and what deploy does there through launch/remote.py
  payload    what is pushed: the project, the rewritten config, the files it names, the secret
  ranks      rank 0 here or any rank on a host, behind one interface; waiting for them
  run        DeployOptions and deploy(): the steps in order, and the clean-up
"""
from launch.deploy.run import DeployOptions, deploy

__all__ = ["DeployOptions", "deploy"]
