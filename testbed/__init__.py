"""A testbed for federated parameter-efficient fine-tuning (LoRA) on heterogeneous edge devices."""

__version__ = "0.1.0"  # setup.cfg reads it from here
