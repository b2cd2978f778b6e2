"""Generation backends: one interface (:class:`SteeringBackend`), two engines.

* ``hf`` (default, the correctness reference): :class:`dat.steer.SteeredLM`, plain
  transformers on any device.
* ``vllm``: :class:`dat.backends.vllm_lm.VLLMSteeredLM`, the same model with generation done
  by vLLM from prompt embeddings; states, losses, templating and the insertion of action
  tokens stay with the transformers model (docs/actions.md, docs/scaling.md).

>>> lm = make_lm("default", backend="vllm")      # needs vLLM installed (see docs/scaling.md)
"""

from __future__ import annotations

import dataclasses

import torch

from dat.backends.base import (
    BACKENDS,
    VLLM_INSTALL,
    SteeringBackend,
    check_backend,
    check_prompt_embeds,
    require_vllm,
)
from dat.errors import DatError


def make_lm(model: str = "default", backend: str = "hf", device: str = "auto",
            dtype: str = "auto", precision: str = "exact", **kwargs) -> SteeringBackend:
    """Load ``model`` with the chosen generation backend (``hf`` or ``vllm``) and precision
    (``exact`` or ``fast``, see :mod:`dat.precision`).

    Extra keyword arguments go to the backend's ``from_pretrained`` (for ``vllm``:
    ``engine_kwargs`` for ``vllm.LLM``, e.g. ``{"gpu_memory_utilization": 0.5}``)."""
    check_backend(backend)
    if backend == "hf":
        from dat.steer import SteeredLM

        return SteeredLM.from_pretrained(model, device=device, dtype=dtype, precision=precision,
                                         **kwargs)
    from dat.backends.vllm_lm import VLLMSteeredLM
    from dat.models import resolve_device
    from dat.precision import choose

    choice = choose(precision, resolve_device(device))
    if choice.int8_linear:  # vLLM has its own kernels; int8 needs a quantised checkpoint there
        raise DatError(f"--backend vllm: --precision {precision} means int8 linear layers here, "
                       "which only the hf backend runs; use exact or bf16.")
    if precision != "exact" and dtype == "auto":
        dtype = "bfloat16" if choice.dtype == torch.bfloat16 else "float16"
    lm = VLLMSteeredLM.from_pretrained(model, device=device, dtype=dtype, **kwargs)
    lm.precision = dataclasses.replace(choice, packed_linear=False)  # vLLM runs its own kernels
    return lm


__all__ = ["BACKENDS", "VLLM_INSTALL", "SteeringBackend", "check_backend", "check_prompt_embeds",
           "make_lm", "require_vllm"]
