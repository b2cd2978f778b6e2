"""Generation backends: one interface (:class:`SteeringBackend`), two engines.

* ``hf`` (default, the correctness reference): :class:`dat.steer.SteeredLM`, plain
  transformers on any device.
* ``vllm``: :class:`dat.backends.vllm_lm.VLLMSteeredLM`, the same model with generation done
  by vLLM from prompt embeddings; states, losses, templating and the insertion of action
  tokens stay with the transformers model (docs/actions.md, docs/scaling.md).

>>> lm = make_lm("default", backend="vllm")      # needs vLLM installed (see docs/scaling.md)
"""

from __future__ import annotations

from dat.backends.base import (
    BACKENDS,
    VLLM_INSTALL,
    SteeringBackend,
    check_backend,
    check_prompt_embeds,
    require_vllm,
)


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

    if precision == "fast" and dtype == "auto":
        dtype = "bfloat16"  # vLLM's own kernels; int8 needs a quantised checkpoint there
    return VLLMSteeredLM.from_pretrained(model, device=device, dtype=dtype, **kwargs)


__all__ = ["BACKENDS", "VLLM_INSTALL", "SteeringBackend", "check_backend", "check_prompt_embeds",
           "make_lm", "require_vllm"]
