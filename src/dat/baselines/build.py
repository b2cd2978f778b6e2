"""``dat baseline METHOD``: check the options, load what the method needs, refuse to replace
a finished baseline folder unless asked, and run the method (which resumes where an
interrupted run stopped)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dat.baseline_folder import BASELINE_FILE, METHODS, PROGRESS_DIR, Baseline
from dat.errors import DatError


@dataclass
class BaselineJob:
    method: str
    out: str
    env: str = "redteam"
    data: str | None = None
    judge: str | None = None
    model: str = "default"
    partner: str | None = None  # the defender / partner (default: the model itself)
    split: str | None = None  # None: the method's own (test for GCG, PAIR, oracle; train for best)
    limit: int | None = None  # first N scenarios of the split (GCG, PAIR)
    rounds: int | None = None
    max_new_tokens: int = 48
    batch_size: int = 32
    seed: int = 0
    overwrite: bool = False
    device: str = "auto"
    # method settings
    gcg: dict = field(default_factory=dict)  # GCGSettings fields
    pair: dict = field(default_factory=dict)  # PAIRSettings fields
    strategies: list[str] | None = None
    mode: str = "best"
    episodes: int | None = None
    speaker: str | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise DatError(f"baseline method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if self.method in ("gcg", "pair") and self.env != "redteam":
            raise DatError(f"{self.method} is a red-teaming baseline: use --env redteam "
                           "(strategy prompting and api work for every setting).")
        if self.limit is not None and self.limit < 1:
            raise DatError(f"--limit must be >= 1, got {self.limit}.")
        if self.method == "api" and not self.speaker:
            raise DatError("dat baseline api needs --speaker api:URL#model.")
        if self.method != "api" and self.speaker:
            raise DatError("--speaker is only for `dat baseline api`.")
        if self.method == "gcg" and self.partner and self.partner.startswith("api:"):
            raise DatError("GCG needs the defender's gradients, and an API defender (--partner "
                           f"{self.partner.split('#')[0]}...) gives none: run GCG against a local "
                           "model (it is then evaluated against any partner).")


def prepare_out(out: str | Path, overwrite: bool) -> Path:
    """The output folder: a finished baseline is replaced only with ``overwrite``; a folder
    with only progress files resumes; anything else in a non-empty folder is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatError(f"--out {out}: exists and is not a folder.")
    if (out / BASELINE_FILE).is_file():
        if not overwrite:
            raise DatError(f"--out {out}: holds a finished baseline ({BASELINE_FILE}); pass "
                           "--overwrite to replace it, or choose another folder.")
        (out / BASELINE_FILE).unlink()
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    elif out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in (PROGRESS_DIR, "provenance.json")]
        if foreign:
            raise DatError(f"--out {out}: not empty and not a baseline folder ({foreign[:3]}); "
                           "choose an empty or new folder.")
    return out


def build(job: BaselineJob, progress: bool = True) -> Baseline:
    """Run ``job`` and return the baseline it wrote."""
    job.validate()
    from dat.collect import make_setting
    from dat.rollout import RolloutConfig

    settings = _method_settings(job)  # bad values fail before the model loads
    out = prepare_out(job.out, job.overwrite)
    if job.method == "api":
        from dat import envs
        from dat.baselines.api_model import make_api_baseline

        setting = envs.make(job.env, data=job.data, **({"rounds": job.rounds} if job.rounds else {}))
        return make_api_baseline(setting, out, job.speaker)
    from dat.backends import make_lm

    lm = make_lm(job.model, device=job.device)
    setting = make_setting(job.env, job.data, job.judge, lm, job.rounds)
    if job.method == "strategy":
        from dat.baselines.strategy import run_strategy

        partner = None
        if job.partner:
            from dat.partners import make_partner

            partner = make_partner(job.partner, lm)
        cfg = RolloutConfig(batch_size=job.batch_size, rounds=job.rounds,
                            max_new_tokens=job.max_new_tokens, seed=job.seed)
        return run_strategy(lm, setting, out, settings, cfg, partner=partner, progress=progress)
    split = job.split or "test"
    if job.method == "gcg":
        from dat.baselines.gcg import run_gcg

        return run_gcg(lm, setting, out, settings, split=split, limit=job.limit,
                       partner=job.partner, progress=progress)
    from dat.baselines.pair import run_pair

    return run_pair(lm, setting, out, settings, split=split, limit=job.limit,
                    partner=job.partner, progress=progress)


def _method_settings(job: BaselineJob):
    if job.method == "gcg":
        from dat.baselines.gcg import GCGSettings

        s = GCGSettings(**{k: v for k, v in job.gcg.items() if v is not None}, seed=job.seed)
    elif job.method == "pair":
        from dat.baselines.pair import PAIRSettings

        fields = {"attacker": job.model, **{k: v for k, v in job.pair.items() if v is not None}}
        s = PAIRSettings(**fields, seed=job.seed)
    elif job.method == "strategy":
        from dat.baselines.strategy import StrategySettings, parse_strategies

        s = StrategySettings(parse_strategies(job.strategies), job.mode, job.split, job.episodes,
                             job.seed)
    else:
        return None
    s.validate()
    return s


__all__ = ["BaselineJob", "build", "prepare_out"]
