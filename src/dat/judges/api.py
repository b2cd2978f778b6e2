"""Judges behind an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, ``dat serve``).

* :class:`APISotopiaJudge`: the seven Sotopia dimensions as JSON, built, parsed and
  validated by the same functions as the local :class:`~dat.judges.llm.SotopiaJudge`
  (:func:`build_sotopia_prompt`, :func:`parse_sotopia_scores`, :func:`sotopia_reward`,
  :func:`generate_and_parse`): first attempt greedy, retries sampled, then
  ``Reward(failed=True, details={"judge_failed": True, ...})``.
* :class:`APIYesNoJudge`: the Yes/No classifier from the ``top_logprobs`` of the first
  answer token; same templates and spellings as the local
  :class:`~dat.judges.classifier.YesNoJudge`, same reward
  ``sigmoid((logit_Yes - logit_No) / T)`` (log-probabilities differ from logits by a shared
  normaliser, which cancels).

Both take an :class:`~dat.api.APIClient` (timeouts, retries, bounded concurrency, request
budget, key from a named environment variable) or a spec ``api:URL#model`` given to
:func:`dat.judges.make`::

    judges.make("api:http://127.0.0.1:8000/v1#dat", kind="yesno")
    judges.make("api:https://api.openai.com/v1?key_env=OPENAI_API_KEY#gpt-4o#sotopia")
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

from dat.api import APIClient, APIError, ChatResult, parse_api_spec
from dat.episode import Reward
from dat.errors import DatError
from dat.judges.base import KINDS, Judge, generate_and_parse, sigmoid, split_kind
from dat.judges.classifier import NO_SPELLINGS, YES_SPELLINGS, YesNoRequest, resolve_template
from dat.judges.llm import (
    SotopiaRequest,
    parse_sotopia_scores,
    sotopia_prompts,
    sotopia_reward,
)

log = logging.getLogger("dat.judges.api")

# keyword arguments of make(...) that configure the HTTP client rather than the judge
_CLIENT_KEYS = ("api_key_env", "timeout", "connect_timeout", "max_retries", "backoff",
                "max_backoff", "max_concurrency", "max_requests")


def _client(client_or_spec, **overrides) -> APIClient:
    if isinstance(client_or_spec, APIClient):
        if overrides:
            raise DatError(f"client options {sorted(overrides)} apply to a spec, not to an APIClient")
        return client_or_spec
    return APIClient(parse_api_spec(str(client_or_spec), **overrides))


class APISotopiaJudge(Judge[SotopiaRequest]):
    """Sotopia's seven dimensions from an API model, as validated JSON.

    ``json_mode`` asks the endpoint for ``response_format={"type": "json_object"}`` (OpenAI
    and vLLM support it; ``dat serve`` does not).
    """

    name = "api-sotopia"

    def __init__(self, client, retries: int = 2, max_new_tokens: int = 512,
                 retry_temperature: float = 0.7, seed: int = 0, json_mode: bool = False,
                 **client_options):
        if retries < 0:
            raise DatError(f"retries must be >= 0, got {retries}")
        self.client = _client(client, **client_options)
        self.retries = retries
        self.max_new_tokens = max_new_tokens
        self.retry_temperature = retry_temperature
        self.seed = seed
        self.json_mode = json_mode

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> APISotopiaJudge:
        return cls(spec, **kwargs)

    def close(self) -> None:
        self.client.close()

    def score(self, requests: Sequence[SotopiaRequest]) -> list[Reward]:
        prompts = sotopia_prompts(requests)
        api_errors: dict[int, list[str]] = {}

        def generate(batch: list[list[dict]], attempt: int) -> list[str]:
            extra = {"response_format": {"type": "json_object"}} if self.json_mode else {}
            results = self.client.chat_many(
                batch, return_exceptions=True, max_tokens=self.max_new_tokens,
                temperature=0.0 if attempt == 0 else self.retry_temperature,
                seed=self.seed + attempt, **extra)
            texts = []
            for prompt, res in zip(batch, results):
                if isinstance(res, ChatResult):
                    texts.append(res.text)
                else:  # the request itself failed after the client's retries
                    api_errors.setdefault(id(prompt), []).append(str(res))
                    texts.append("")
            return texts

        results = generate_and_parse(prompts, generate, parse_sotopia_scores, self.retries)
        rewards = []
        for prompt, res, req in zip(prompts, results, requests):
            reward = sotopia_reward(res, req.target, f"{self.name}:{self.client.name}")
            if id(prompt) in api_errors:
                reward.details["api_errors"] = api_errors[id(prompt)]
            rewards.append(reward)
        return rewards


class APIYesNoJudge(Judge[YesNoRequest]):
    """Yes/No classifier from the first answer token's ``top_logprobs``.

    ``logit_Yes`` is the log-sum-exp of the log-probabilities of every Yes spelling among the
    ``top_logprobs`` alternatives (likewise No). When only one of the two shows up, the
    other is bounded by the smallest listed log-probability (``details["bounded"]``); when
    neither does, the reward fails (the model did not answer Yes or No).

    ``template``: ``"auto"`` (``harmbench`` when the model name mentions it, else
    ``default``), ``"default"``, ``"harmbench"`` or a custom string with ``{generation}``.
    ``chat=False`` sends the plain filled-in template to ``/completions`` (HarmBench's
    classifier expects its own ``[INST]`` format); otherwise it is one user message.
    """

    name = "api-yesno"

    def __init__(self, client, template: str = "auto", chat: bool | None = None,
                 temperature: float = 10.0, top_logprobs: int = 20, max_generation_chars: int = 4000,
                 **client_options):
        if temperature <= 0:
            raise DatError(f"temperature must be > 0, got {temperature}")
        if not 1 <= top_logprobs <= 20:
            raise DatError(f"top_logprobs must be in 1..20 (the OpenAI limit), got {top_logprobs}")
        self.client = _client(client, **client_options)
        if template == "auto":
            template = "harmbench" if re.search(r"harmbench", self.client.config.model, re.IGNORECASE) else "default"
        (self.template, self.template_contextual, self.template_name,
         default_chat) = resolve_template(template)
        if default_chat is None:  # a custom template goes to the chat endpoint
            default_chat = True
        self.chat = default_chat if chat is None else chat
        self.temperature = float(temperature)
        self.top_logprobs = top_logprobs
        self.max_generation_chars = max_generation_chars

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> APIYesNoJudge:
        return cls(spec, **kwargs)

    def close(self) -> None:
        self.client.close()

    def prompt(self, request: YesNoRequest) -> str:
        tpl = self.template_contextual if request.context else self.template
        generation = request.generation[:self.max_generation_chars]
        return tpl.format(behavior=request.behavior, generation=generation, context=request.context or "")

    def score(self, requests: Sequence[YesNoRequest]) -> list[Reward]:
        return self.score_prompts([self.prompt(r) for r in requests])

    def score_prompts(self, prompts: Sequence[str]) -> list[Reward]:
        """Rewards for already filled-in prompts (one user message each, or plain text)."""
        if not prompts:
            return []
        params = {"return_exceptions": True, "max_tokens": 1, "temperature": 0.0}
        if self.chat:
            results = self.client.chat_many([[{"role": "user", "content": p}] for p in prompts],
                                            logprobs=True, top_logprobs=self.top_logprobs, **params)
        else:
            results = self.client.complete_many(list(prompts), logprobs=self.top_logprobs, **params)
        return [self._reward(r) for r in results]

    def _reward(self, res) -> Reward:
        base = {"judge": f"{self.name}:{self.client.name}", "template": self.template_name,
                "temperature": self.temperature}
        if isinstance(res, APIError):
            return Reward(None, {**base, "judge_failed": True, "error": str(res)}, failed=True)
        top = res.first_token_logprobs()
        if not top:
            return Reward(None, {**base, "judge_failed": True, "raw": res.text,
                                 "error": "the endpoint returned no logprobs (does it support them?)"},
                          failed=True)
        yes = [v for t, v in top.items() if t in YES_SPELLINGS]
        no = [v for t, v in top.items() if t in NO_SPELLINGS]
        if not yes and not no:
            return Reward(None, {**base, "judge_failed": True, "raw": res.text, "top_logprobs": top,
                                 "error": "neither Yes nor No among the first token's top_logprobs"},
                          failed=True)
        floor = min(top.values())
        bounded = "yes" if not yes else "no" if not no else None
        y = _logsumexp(yes) if yes else floor
        n = _logsumexp(no) if no else floor
        return Reward(sigmoid((y - n) / self.temperature),
                      {**base, "logit_yes": y, "logit_no": n, "p_yes": sigmoid(y - n),
                       "bounded": bounded, "raw": res.text},
                      success=y > n)


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


# ---------------------------------------------------------------------- factory hook
def make_api_judge(target: str, kind: str | None = None, lm=None, **kwargs) -> Judge:
    """Factory for ``dat.judges.make("api:URL#model[#kind]", kind=...)``.

    ``lm`` is ignored (the model is remote). Client options (``timeout``, ``max_retries``,
    ``max_concurrency``, ``max_requests``, ``api_key_env``, ...) and judge options may both
    be passed as keyword arguments.
    """
    url, _, model = target.partition("#")
    if "#" in model:
        model, kind = split_kind(model, kind)
    if kind not in KINDS:
        raise DatError(f"judge 'api:{target}' needs a kind: one of {', '.join(KINDS)} (pass kind=... "
                       f"or write 'api:URL#MODEL#yesno'), got {kind!r}")
    client_opts = {k: kwargs.pop(k) for k in _CLIENT_KEYS if k in kwargs}
    client = APIClient(parse_api_spec(f"{url}#{model}", **client_opts))
    cls = APIYesNoJudge if kind == "yesno" else APISotopiaJudge
    return cls(client, **kwargs)
