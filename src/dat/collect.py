"""``dat collect``: run episodes of a setting and store them as an offline buffer.

Without a planner this writes the self-clone corpus (the unsteered agent's dialogues); with
``--planner DIR --noise σ`` it writes the exploration buffer for TD3+BC; with
``--up-mapping pca`` and no planner, random actions of norm ``act_norm``.

The run is resumable: episode ``i`` always gets the same scenario (a seeded order over the
split), finished episodes are committed shard by shard, and a re-run of the same command
skips what is already on disk. A folder written with other settings is refused.

By default the buffer leaves out each episode's terminal state ``s_T`` (TD targets never use
it: the last step is done), which also saves the final state pass of every episode;
``terminal_states=True`` (``--terminal-states``) stores it, as buffers written before this
option did. Resuming such an older folder needs ``--terminal-states``.

``--ray`` (:mod:`dat.distributed`) spreads the episodes over Ray workers, each with a
:class:`Collector` writing its own shards into the same folder: the same content as one
process, and either kind of run resumes the other's folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dat.agent import ActionSpace, Agent, setting_prompts
from dat.buffer import BufferWriter, EpisodeRecord
from dat.errors import DatError
from dat.planner import UP_MAPPING_DIR
from dat.provenance import derived
from dat.rollout import Rollout, RolloutConfig, RolloutEpisode, Throughput, episode_jobs
from dat.steer import position_name

# Keys of the settings that may differ when a run is resumed (the folder itself may be moved).
VOLATILE = ("settings.out", "settings.episodes", "settings.batch_size", "settings.device",
            "settings.progress", "settings.allow_judge_failures")


@dataclass
class CollectConfig:
    out: str
    env: str = "taboo"
    data: str | None = None
    model: str = "default"
    partner: str | None = None  # None: the steered model itself (one copy in memory)
    judge: str | None = None  # None: the setting's default judge
    planner: str | None = None  # folder from `dat clone` / `dat train`
    up_mapping: str | None = None  # "pca" or a folder; default: the planner's own
    action_dim: int = 64  # PCA up-mapping only
    n_tokens: int = 2  # PCA up-mapping only
    action: str = "tokens"  # PCA up-mapping only: "tokens" | "residual" (dat.agent.ActionSpace)
    layer: int = 15  # residual: decoder layer whose output gets the action vector
    residual_scale: float = 0.15  # residual: vector norm / the layer's median residual norm
    residual_positions: str = "reply"  # residual: "reply" | "all"
    act_norm: float | None = None
    position: str | None = None
    noise: float = 0.0
    explore_directions: int = 0  # K > 0: K noise draws, each held for whole episodes (rollout doc)
    episodes: int = 64
    batch_size: int = 32
    rounds: int | None = None
    max_new_tokens: int = 48
    temperature: float = 0.0
    split: str = "train"
    scenarios: int | None = None  # N: only the first N scenarios of the split's seeded order
    seed: int = 0
    device: str = "auto"
    precision: str = "exact"  # "fast": bf16 / int8 where the hardware has it (dat.precision)
    progress: bool = True
    terminal_states: bool = False  # also store each episode's final state s_T (T + 1 rows)
    end_at_sentence: bool = False  # cut-off replies end at their last complete sentence
    allow_judge_failures: bool = False  # go on when the first judged batch fails entirely
    include_contextual: bool = False  # redteam: keep HarmBench's contextual behaviours too


def load_policy(lm, planner: str | None, up_mapping: str | None,
                space: ActionSpace | None = None, seed: int = 0, prompts=None) -> Agent | None:
    """The agent of CLI-style specs: ``planner`` (a folder) and/or ``up_mapping`` ("pca" for
    the fixed one of ``space``, or a folder); None when both are None (unsteered).
    ``prompts``: what a residual PCA is measured on (see :func:`dat.agent.setting_prompts`)."""
    from dat.planner import UpMapping

    space = space or ActionSpace()
    agent = Agent.load(planner, lm) if planner else None
    if agent is not None and space.kind != agent.kind and space.kind != ActionSpace.kind:
        raise DatError(f"{planner} holds an agent with {agent.kind} actions, but "
                       f"--action {space.kind} was given.")
    up = None
    if up_mapping == "pca":
        if agent is not None:  # the planner's own action size and kind
            space = replace(space, kind=agent.kind, action_dim=agent.action_dim,
                            n_tokens=agent.up.config.n_tokens, act_norm=agent.act_norm)
        up = space.pca(lm, prompts, seed=seed)
    elif up_mapping:
        up = UpMapping.from_pretrained(up_mapping, hidden_size=lm.hidden_size)
    if up is not None:
        agent = Agent(up, agent.planner if agent is not None else None,
                      position=None if up.kind == "residual" else space.position)
    return agent.to(lm.device) if agent is not None else None


def action_space(cfg: CollectConfig) -> ActionSpace:
    return ActionSpace(kind=cfg.action, action_dim=cfg.action_dim, act_norm=cfg.act_norm or 1.0,
                       n_tokens=cfg.n_tokens, position=cfg.position or "prefix", layer=cfg.layer,
                       scale=cfg.residual_scale, residual_positions=cfg.residual_positions)


def check_collect_values(cfg: CollectConfig) -> None:
    """Clear errors for values that would run but mean nothing (before anything is written)."""
    import math

    if cfg.rounds is not None and cfg.rounds < 1:
        raise DatError(f"--rounds must be >= 1, got {cfg.rounds}.")
    if cfg.max_new_tokens < 1:
        raise DatError(f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}.")
    if cfg.act_norm is not None and not (math.isfinite(cfg.act_norm) and cfg.act_norm > 0):
        raise DatError(f"--act-norm must be a finite number > 0, got {cfg.act_norm}.")
    if not (math.isfinite(cfg.noise) and cfg.noise >= 0):
        raise DatError(f"--noise must be a finite number >= 0, got {cfg.noise}.")
    if cfg.explore_directions < 0:
        raise DatError(f"--explore-directions must be >= 0, got {cfg.explore_directions}.")
    if cfg.scenarios is not None and cfg.scenarios < 1:
        raise DatError(f"--scenarios must be >= 1, got {cfg.scenarios}.")
    if cfg.temperature < 0:
        raise DatError(f"--temperature must be >= 0, got {cfg.temperature}.")
    action_space(cfg).validate()


def make_setting(env: str, data: str | None, judge: str | None, lm, rounds: int | None = None,
                 **options):
    """The setting ``env`` (``options``: its own fields, e.g. taboo's ``reward_mode``); a local
    ``hf:`` judge shares the already-loaded model ``lm``."""
    import inspect

    from dat import envs

    kwargs = dict(options)
    if judge:
        kwargs["judge"] = judge
    if rounds:
        kwargs["rounds"] = rounds
    if env in envs.REGISTRY and "lm" in inspect.signature(envs.REGISTRY[env]).parameters:
        kwargs["lm"] = lm
    return envs.make(env, data=data, **kwargs)


def to_record(r: RolloutEpisode) -> EpisodeRecord:
    import numpy as np

    T = r.actions.shape[0]
    rewards = [np.nan if v is None else v for v in r.rewards]
    return EpisodeRecord(r.episode.episode_id, r.episode.scenario.id, r.states, r.actions,
                         rewards, [t == T - 1 for t in range(T)], r.episode, r.judge_failed)


class Collector:
    """A collection run set up once: the model, the setting, the policy and the buffer writer
    (which checks the folder's settings and writes ``meta.json``).

    ``pending(ids)`` gives the ``(episode_id, scenario)`` jobs of ``ids`` not yet on disk and
    ``run(jobs)`` collects them into the buffer. :func:`collect` is one ``run`` over all
    pending episodes; each worker of a distributed run (:mod:`dat.distributed`) holds one
    Collector and runs many small lists of episode ids into the same folder."""

    def __init__(self, cfg: CollectConfig, lm=None, setting=None, partner=None):
        from dat.steer import SteeredLM

        if cfg.episodes < 1 or cfg.batch_size < 1:
            raise DatError("--episodes and --batch-size must be at least 1.")
        self.cfg = cfg
        self.lm = lm = lm or SteeredLM.from_pretrained(cfg.model, device=cfg.device,
                                                           precision=cfg.precision)
        if cfg.precision != "exact" and lm.precision is not None:
            print(lm.precision.describe())
        options = {"contextual": "include"} if cfg.include_contextual else {}
        self.setting = setting = setting or make_setting(cfg.env, cfg.data, cfg.judge, lm,
                                                         cfg.rounds, **options)
        if hasattr(setting, "summary"):  # e.g. redteam: which rows it kept and skipped
            print(setting.summary())
        if partner is None and cfg.partner:
            from dat.partners import make_partner

            partner = make_partner(cfg.partner, lm=lm)
        self.partner = partner
        check_collect_values(cfg)
        space = action_space(cfg)
        prompts = (setting_prompts(setting, "train")
                   if cfg.up_mapping == "pca" and space.kind == "residual" else None)
        self.agent = agent = load_policy(lm, cfg.planner, cfg.up_mapping, space, cfg.seed, prompts)
        up = agent.up if agent is not None else None
        self.rollout_config = RolloutConfig(
            batch_size=cfg.batch_size, rounds=cfg.rounds, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, noise=cfg.noise, act_norm=cfg.act_norm,
            explore_directions=cfg.explore_directions,
            position=cfg.position, seed=cfg.seed, terminal_states=cfg.terminal_states,
            end_at_sentence=cfg.end_at_sentence, allow_judge_failures=cfg.allow_judge_failures)
        rollout = self.rollout()
        settings = asdict(cfg)
        # the layout is the top-level key below (checked with its own message; buffers written
        # before the option have no such setting)
        del settings["terminal_states"]
        meta = {
            "kind": "corpus" if up is None else "exploration",
            "settings": settings,
            "env": setting.name,
            "model": lm.name,
            "hidden_size": lm.hidden_size,
            "action_dim": rollout.action_dim,
            "n_tokens": up.config.n_tokens if up is not None else 0,
            "position": position_name(rollout.position),
            "action": agent.describe() if agent is not None else None,
            "act_norm": rollout.act_norm,
            "rounds": rollout.rounds,
            "reward_timing": setting.reward_timing,
            "split": cfg.split,
            "scenario_ids": sorted({s.id for s in setting.scenarios(cfg.split)}),
            "terminal_states": cfg.terminal_states,
        }
        self.writer = BufferWriter(cfg.out, meta, volatile=VOLATILE)
        # what eval's split check reads: the split collected from, and a planner's own data
        derived("buffer", meta["scenario_ids"], [cfg.planner], setting=setting.name,
                model=lm.name).write(cfg.out)
        if agent is not None and cfg.up_mapping and not (Path(cfg.out) / UP_MAPPING_DIR).is_dir():
            # the fixed up-mapping the actions went through: `dat train` uses it by default
            agent.up.save_pretrained(Path(cfg.out) / UP_MAPPING_DIR)
        self.generated_tokens = 0

    def rollout(self) -> Rollout:
        return Rollout(self.lm, self.setting, partner=self.partner, agent=self.agent,
                       config=self.rollout_config)

    def pending(self, episode_ids=None) -> list:
        """The jobs of ``episode_ids`` (default: ``0 .. episodes - 1``) that are not in the
        folder yet, in id order. Shards written by other writers since the last call count."""
        done = self.writer.refresh()
        wanted = set(range(self.cfg.episodes)) if episode_ids is None else set(map(int, episode_ids))
        # episode i always gets the same scenario, whatever the number of episodes
        jobs = episode_jobs(self.setting, max(wanted, default=-1) + 1, self.cfg.split, self.cfg.seed,
                            scenarios=self.cfg.scenarios)
        return [j for j in jobs if j[0] in wanted and j[0] not in done]

    def run(self, jobs, on_done=None, rollout: Rollout | None = None) -> dict:
        """Collect ``jobs`` into the buffer (a shard per group of finished episodes);
        ``on_done(finished, stats)`` after each shard. Returns the stats of this call."""
        stats = {"episodes": 0, "reward_sum": 0.0, "rewarded": 0, "failed": 0,
                 "generated_tokens": 0, "episode_ids": []}
        rollout = rollout or self.rollout()

        def done(finished: list[RolloutEpisode]) -> None:
            self.writer.write([to_record(r) for r in finished])
            for r in finished:
                stats["episodes"] += 1
                stats["episode_ids"].append(r.episode.episode_id)
                if r.judge_failed:
                    stats["failed"] += 1
                else:
                    stats["reward_sum"] += r.total_reward
                    stats["rewarded"] += 1
            stats["generated_tokens"] = rollout.generated_tokens
            if on_done is not None:
                on_done(finished, stats)

        before = rollout.generated_tokens
        if jobs:
            rollout.run(jobs, on_done=done)
        stats["generated_tokens"] = rollout.generated_tokens - before
        self.generated_tokens += stats["generated_tokens"]
        return stats


def collect(cfg: CollectConfig, lm=None, setting=None, partner=None) -> dict:
    """Run the collection described by ``cfg``; returns a summary dict."""
    run = Collector(cfg, lm, setting, partner)
    done_ids = run.writer.completed_episode_ids()
    jobs = run.pending()
    rollout = run.rollout()
    speed = Throughput()

    with Progress(TextColumn("[bold]collect"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                  disable=not cfg.progress) as bar:
        task = bar.add_task("collect", total=cfg.episodes, completed=cfg.episodes - len(jobs), info="")

        def on_done(finished: list[RolloutEpisode], stats: dict) -> None:
            mean = stats["reward_sum"] / max(stats["rewarded"], 1)
            bar.update(task, advance=len(finished),
                       info=f"{speed.rate(rollout.generated_tokens):.0f} tok/s  mean reward {mean:.3f}"
                            + (f"  judge failed {stats['failed']}" if stats["failed"] else ""))

        stats = run.run(jobs, on_done=on_done, rollout=rollout)
    return {
        "out": str(Path(cfg.out)),
        "episodes_run": stats["episodes"],
        "episodes_skipped": len(done_ids),
        "mean_reward": stats["reward_sum"] / max(stats["rewarded"], 1),
        "judge_failed": stats["failed"],
        "generated_tokens": rollout.generated_tokens,
        "tokens_per_s": speed.rate(rollout.generated_tokens),
    }
