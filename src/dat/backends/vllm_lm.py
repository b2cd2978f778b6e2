"""The vLLM backend: generation by vLLM from prompt embeddings, everything else by transformers.

:class:`VLLMSteeredLM` is a :class:`dat.steer.SteeredLM` whose :meth:`~VLLMSteeredLM.decode`
sends each row's input embeddings (built by the same ``make_batch`` as the ``hf`` backend) to
``vllm.LLM.generate`` as ``{"prompt_embeds": tensor}``; states and losses stay with the
transformers model. How it fits together: docs/actions.md ("Backends").
"""

from __future__ import annotations

import logging
import os

import torch

from dat.backends.base import check_prompt_embeds, require_vllm
from dat.decoding import Batch, OnStep, StepLogprobs, trim_replies
from dat.errors import DatError
from dat.models import load_model, resolve_source
from dat.steer import SteeredLM

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB of KV cache on CPU unless VLLM_CPU_KVCACHE_SPACE says more


class VLLMSteeredLM(SteeredLM):
    """A :class:`SteeredLM` whose generation runs on a vLLM engine.

    ``engine`` is a ``vllm.LLM`` started with ``enable_prompt_embeds=True`` on the same weights
    and dtype as ``model`` (use :meth:`from_pretrained`)."""

    def __init__(self, model, tokenizer, engine, name: str | None = None,
                 max_context: int | None = None, truncation: str = "error"):
        super().__init__(model, tokenizer, name=name, max_context=max_context, truncation=truncation)
        self.engine = engine
        cfg = engine.llm_engine.model_config
        # the width vLLM expects of prompt embeddings (= hidden size for decoder-only LMs)
        self.engine_hidden_size = int(getattr(cfg, "get_inputs_embeds_size", cfg.get_hidden_size)())
        self.engine_dtype = cfg.dtype
        self.engine_max_len = int(cfg.max_model_len)
        if not getattr(cfg, "enable_prompt_embeds", False):
            raise DatError("The vLLM engine was started without enable_prompt_embeds=True; "
                           "dat steers vLLM through prompt embeddings.")
        if self.engine_hidden_size != self.hidden_size:
            raise DatError(f"The vLLM engine's hidden size {self.engine_hidden_size} differs from "
                           f"the transformers model's {self.hidden_size}: not the same model.")
        if self.engine_dtype != self.dtype:
            raise DatError(f"The vLLM engine runs in {self.engine_dtype} but the transformers model "
                           f"in {self.dtype}; load both with the same dtype.")
        self.max_context = min(self.max_context, self.engine_max_len)
        self.supports_prefix_cache = False  # vLLM has its own prefix cache

    @classmethod
    def from_pretrained(cls, name_or_path: str = "default", device: str = "auto",
                        dtype: str = "auto", max_context: int | None = None,
                        truncation: str = "error", engine_kwargs: dict | None = None,
                        ) -> VLLMSteeredLM:
        """Load the transformers model (states, losses, embeddings) and a vLLM engine on the
        same folder, in the same dtype. ``engine_kwargs`` go to ``vllm.LLM`` (e.g.
        ``gpu_memory_utilization``, ``tensor_parallel_size``, ``enable_prefix_caching``)."""
        vllm = require_vllm()
        source, display = resolve_source(name_or_path)  # GGUF / default: a safetensors folder
        model, tokenizer, _ = load_model(source, device=device, dtype=dtype)
        source = vllm_folder(source)
        torch_dtype = model.get_input_embeddings().weight.dtype
        kw = {"model": source, "tokenizer": source, "enable_prompt_embeds": True, "seed": 0,
              "dtype": str(torch_dtype).removeprefix("torch."), "enable_prefix_caching": True}
        if max_context:
            kw["max_model_len"] = int(max_context)
        if model.device.type == "cuda":
            # the transformers copy of the weights lives on the same GPU
            kw["gpu_memory_utilization"] = 0.6
        elif model.device.type == "cpu":
            # torch.compile makes start-up much longer for no measured gain (bench_vllm)
            kw["enforce_eager"] = True
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                # vLLM's CPU build otherwise reserves gpu_memory_utilization (0.92) of the RAM
                kw["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        kw.update(engine_kwargs or {})
        try:
            engine = vllm.LLM(**kw)
        except Exception as exc:  # vLLM's errors come from deep inside its engine start-up
            raise DatError(f"vLLM could not start on {display} ({type(exc).__name__}: {exc}). "
                           f"Settings: {kw}") from exc
        return cls(model, tokenizer, engine, name=display, max_context=max_context,
                   truncation=truncation)

    # ------------------------------------------------------------------ decoding
    def prompt_embeds(self, batch: Batch) -> list[torch.Tensor]:
        """Each row's input embeddings without its left padding: ``[seq, hidden]`` on the CPU."""
        if batch.cache is not None:
            raise DatError("The vLLM backend takes no prefix caches (vLLM caches prefixes itself).")
        if batch.residual is not None:
            raise DatError("The vLLM backend steers through prompt embeddings only, so it cannot "
                           "apply residual-stream actions; use --backend hf for residual agents.")
        rows = []
        for i in range(batch.inputs_embeds.shape[0]):
            keep = batch.attention_mask[i].bool()
            rows.append(batch.inputs_embeds[i][keep].detach().cpu().contiguous())
        return rows

    def generate_from_embeds(self, embeds: list[torch.Tensor], max_new_tokens: int,
                             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0,
                             logprobs: int | None = None, ignore_eos: bool = False) -> list:
        """Validate ``embeds`` (one ``[seq, hidden]`` tensor per row) and run them through
        vLLM; returns vLLM's ``RequestOutput`` list, in order."""
        check_prompt_embeds(embeds, self.engine_hidden_size, self.engine_dtype, self.engine_max_len)
        from vllm import SamplingParams

        params = [SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=None if (seed is None or temperature == 0) else int(seed) + i,
            stop_token_ids=[] if ignore_eos else list(self.eos_token_ids), ignore_eos=ignore_eos,
            logprobs=logprobs, detokenize=False, skip_special_tokens=True,
        ) for i in range(len(embeds))]
        prompts = [{"prompt_embeds": e} for e in embeds]
        return self.engine.generate(prompts, params, use_tqdm=False)

    def decode(self, batch: Batch, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = 0, *, top_logprobs: int | None = None,
               on_step: OnStep | None = None,
               ignore_eos: bool = False) -> tuple[list[list[int]], list[bool]]:
        """Same contract as :meth:`SteeredLM.decode`, decoded by vLLM. ``on_step`` is replayed
        per step after vLLM has finished (rows it finishes are cut there; no streaming)."""
        outs = self.generate_from_embeds(self.prompt_embeds(batch), max_new_tokens, temperature,
                                         top_p, seed, top_logprobs, ignore_eos)
        stop_set = set() if ignore_eos else set(self.eos_token_ids)
        rows, row_lps = [], []
        for o in outs:
            c = o.outputs[0]
            toks = [int(t) for t in c.token_ids][:max_new_tokens]
            if (c.finish_reason == "stop" and not (toks and toks[-1] in stop_set)
                    and len(toks) < max_new_tokens):
                # vLLM may leave the stop token out; put it back as the hf backend keeps it
                toks.append(int(c.stop_reason) if isinstance(c.stop_reason, int) else self.eos_token_ids[0])
            rows.append(toks)
            row_lps.append(c.logprobs)
        B = len(rows)
        ended = [False] * B  # no more tokens for this row: stopped, cut, or vLLM's last token
        cut: list[int | None] = [None] * B
        tokens: list[list[int]] = [[] for _ in range(B)]
        for step in range(max(len(r) for r in rows)):
            nxt = [self.pad_token_id if ended[i] or step >= len(rows[i]) else rows[i][step]
                   for i in range(B)]
            for i in range(B):
                tokens[i].append(nxt[i])
                ended[i] = ended[i] or nxt[i] in stop_set
            if on_step is not None:
                lps = None if top_logprobs is None else _step_logprobs(row_lps, nxt, step, top_logprobs)
                for i in on_step(step, nxt, lps) or ():
                    if not ended[i]:
                        cut[i], ended[i] = step + 1, True
            ended = [e or step + 1 >= len(r) for e, r in zip(ended, rows)]
            if all(ended):
                break
        batch.tokens = tokens
        return trim_replies(rows, cut, stop_set)


def _step_logprobs(row_lps: list, chosen: list[int], step: int, k: int) -> StepLogprobs:
    """One step's :class:`StepLogprobs` from vLLM's per-token ``{id: Logprob}`` dicts (rows
    already finished get 0.0 and no alternatives)."""
    picked, top_ids, top_lps = [], [], []
    for lps, tok in zip(row_lps, chosen):
        d = lps[step] if lps is not None and step < len(lps) else None
        if d is None:
            picked.append(0.0), top_ids.append([]), top_lps.append([])
            continue
        picked.append(float(d[tok].logprob) if tok in d else float("-inf"))
        best = sorted(d.items(), key=lambda kv: kv[1].rank)[:k]
        top_ids.append([int(t) for t, _ in best])
        top_lps.append([float(v.logprob) for _, v in best])
    return StepLogprobs(picked, top_ids, top_lps)


def vllm_folder(source: str) -> str:
    """A folder vLLM loads correctly for ``source``.

    Folders whose ``config.json`` ties the input and output embeddings but whose single
    ``model.safetensors`` stores the shared matrix only as ``lm_head.weight`` (as dat's GGUF
    conversion writes it) load in transformers, which ties the two, but vLLM then leaves
    ``embed_tokens`` uninitialised and generates garbage. For those, a sibling folder
    ``<source>-vllm`` is written once, with the matrix stored as ``model.embed_tokens.weight``.
    Anything else (hub ids, other folders) is returned unchanged."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(source)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return source
    config = json.loads((folder / "config.json").read_text())
    if not config.get("tie_word_embeddings", False):
        return source
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    if "model.embed_tokens.weight" in keys or "lm_head.weight" not in keys:
        return source
    target = folder.parent / f"{folder.name}-vllm"
    if (target / "model.safetensors").is_file():
        return str(target)
    from safetensors.torch import load_file, save_file

    log.info("writing %s (embeddings stored under the name vLLM loads)", target)
    tensors = load_file(str(weights))
    tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-vllm-"))
    try:
        for p in folder.iterdir():
            if p.is_file() and p.name != "model.safetensors":
                shutil.copy2(p, tmp / p.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
