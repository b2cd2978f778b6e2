"""An API model as the steered agent (the paper's GPT-4 row): any OpenAI-compatible endpoint
writes the steered agent's turns, with the setting's own system prompt; the partner and the
judge stay what the evaluation uses."""

from __future__ import annotations

from pathlib import Path

from dat.api import APIClient, APIError, parse_api_spec
from dat.baseline_folder import Baseline
from dat.errors import DatError
from dat.prompting import PromptPolicy


def make_api_baseline(setting, out: str | Path, speaker: str, *, check: bool = True) -> Baseline:
    """Write a baseline folder whose steered agent is the endpoint ``speaker``
    (``api:URL#model``). With ``check``, the endpoint must answer ``GET /models`` first.
    The spec is stored as given: a key is named by ``key_env``, never written."""
    if not isinstance(speaker, str) or not speaker.startswith("api:"):
        raise DatError(f"--speaker must be an 'api:URL#model' spec, got {speaker!r}.")
    config = parse_api_spec(speaker)
    if check:
        try:
            with APIClient(config) as client:
                listed = client.models()
        except APIError as exc:
            raise DatError(f"--speaker {config.base_url}: the endpoint did not answer "
                           f"GET /models ({exc}).") from None
        if listed and config.model not in listed:
            raise DatError(f"--speaker: {config.base_url} serves {listed}, not {config.model!r}.")
    ids = [s.id for s in setting.scenarios("all")]
    made = Baseline("api", setting.name, None, PromptPolicy(speaker=speaker),
                    f"API model ({config.model})", [],
                    {}, {"speaker": speaker},  # its cost is per turn: counted by the evaluation
                    {"scenarios_available": len(ids)})
    made.write(out)
    return made


__all__ = ["make_api_baseline"]
