"""``dat quickstart``: the whole DAT pipeline on the embedded default model and an embedded
setting (default ``openup``: get the partner talking about its own interest).

1. exploration buffer: ``explore_directions`` random directions through the fixed PCA
   up-mapping of the chosen action kind (default: residual-stream actions after layer 15),
   each held for whole episodes and tried on many of ``explore_scenarios`` train topics;
2. TD3+BC: one planner across those topics (from scratch on the PCA up-mapping);
3. optionally ``iterations - 1`` more rounds of iterated DAT: explore around the last planner
   (``explore_directions`` Gaussian perturbations of scale ``iterate_noise``, each held for
   whole episodes on several topics, so the critic can rank them), train again from it on
   those new episodes;
4. evaluation on the held-out test topics: unsteered vs DAT, paired;
5. the paper's input-embedding prefix tokens as a second DAT, on the same test episodes
   (``compare_tokens``);
6. the paper's protocol (``per_scenario``): one planner per explored topic, trained and
   evaluated on the same topics, paired with the unsteered agent there;
7. (``self_clone``) the unsteered corpus and the self-clone, as one more baseline.

Every step writes into its own sub-folder of ``--out`` and resumes when run again, so an
interrupted quickstart picks up where it stopped. The choices (action kind, layer, scale,
episodes, alpha, learning rates) are in ``docs/quickstart.md`` with the measurements behind
them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from dat.errors import DatError

console = Console()

EMBEDDED_SETTINGS = ("taboo", "openup")


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    model: str = "default"
    device: str = "auto"
    backend: str = "hf"  # generation backend: hf | vllm (see dat.backends)
    precision: str = "exact"  # "fast": bf16 / int8 where the hardware has it (dat.precision)
    rounds: int = 3
    max_new_tokens: int = 32
    batch_size: int = 32
    eval_batch_size: int = 64  # all 57 test topics in one lock-step batch
    explore_episodes: int = 256
    explore_directions: int = 16  # K held directions, each on explore_episodes / K topics
    explore_scenarios: int = 63  # N train topics (N coprime to K: a topic sees distinct directions)
    eval_episodes: int | None = None  # None: one per held-out test topic
    action: str = "residual"  # "residual" | "tokens" (the paper's prefix tokens)
    action_dim: int = 64
    layer: int = 15  # residual: decoder layer (of 30) whose output gets the action vector
    residual_scale: float = 0.15  # residual: vector norm / the layer's median residual norm
    residual_positions: str = "reply"
    n_tokens: int = 2  # tokens
    position: str = "prefix"  # tokens
    act_norm: float = 1.0
    end_at_sentence: bool = True  # replies cut at max_new_tokens end at their last full sentence
    setting: str = "openup"  # an embedded setting: "openup" | "taboo" (docs/settings.md)
    reward: str = "gain"  # taboo's reward_mode: "gain" | "similarity" (docs/settings.md)
    # BC toward the critic's best explored direction, a light Q term (docs/quickstart.md)
    td3bc: dict = field(default_factory=lambda: {"alpha": 0.02, "epochs": 300, "actor_lr": 1e-3,
                                                 "critic_lr": 3e-4, "batch_size": 256,
                                                 "bc_target": "best"})
    iterations: int = 1  # > 1: iterated DAT (explore around the planner, train again)
    iterate_noise: float = 0.5  # exploration sigma around the planner in later iterations
    iterate_episodes: int = 128
    compare_tokens: bool = True  # also the paper's prefix-token DAT on the same test episodes
    tokens_explore_episodes: int = 128
    per_scenario: bool = True  # also the paper's protocol: a planner per topic, tested on it
    per_scenario_eval: int = 32  # explored topics the per-scenario planners are evaluated on
    per_scenario_alpha: float = 0.0  # the reference implementation's default (pure TD3)
    per_scenario_epochs: int = 30  # a topic has ~12 transitions: one update per epoch
    self_clone: bool = False  # also the unsteered corpus and the self-clone baseline
    corpus_episodes: int = 64
    clone_epochs: int = 1
    clone_examples: int = 128  # utterances the self-clone trains on (a seeded subset)
    clone_lr: float = 3e-4
    seed: int = 0
    tiny: bool = False

    def shrink(self) -> QuickstartConfig:
        """A few episodes and tokens: the pipeline end to end in minutes (for tests)."""
        self.rounds, self.max_new_tokens, self.batch_size = 1, 8, 4
        self.corpus_episodes, self.explore_episodes, self.eval_episodes = 6, 8, 4
        self.eval_batch_size, self.explore_directions, self.explore_scenarios = 4, 4, 3
        self.tokens_explore_episodes, self.iterate_episodes, self.per_scenario_eval = 8, 4, 2
        self.action_dim, self.clone_epochs, self.clone_examples = 16, 1, 16
        self.td3bc = {**self.td3bc, "epochs": 2, "batch_size": 4}
        self.self_clone, self.iterations = True, 2  # every step runs, each action kind included
        return self

    def validate(self) -> None:
        if self.setting not in EMBEDDED_SETTINGS:
            raise DatError(f"quickstart: setting must be one of {EMBEDDED_SETTINGS} (the settings "
                           f"that need no data), got {self.setting!r}.")
        self.action_space(self.action).validate()
        for name in ("rounds", "max_new_tokens", "batch_size", "eval_batch_size",
                     "explore_episodes", "explore_directions", "explore_scenarios", "iterations",
                     "tokens_explore_episodes", "per_scenario_eval", "corpus_episodes"):
            if int(getattr(self, name)) < 1:
                raise DatError(f"quickstart: {name} must be >= 1, got {getattr(self, name)}.")
        if self.per_scenario and self.per_scenario_eval > self.explore_scenarios:
            raise DatError(f"quickstart: per_scenario_eval ({self.per_scenario_eval}) must be at "
                           f"most explore_scenarios ({self.explore_scenarios}).")

    def action_space(self, kind: str):
        from dat.agent import ActionSpace

        return ActionSpace(kind=kind, action_dim=self.action_dim, act_norm=self.act_norm,
                           n_tokens=self.n_tokens, position=self.position, layer=self.layer,
                           scale=self.residual_scale, residual_positions=self.residual_positions)

    def action_options(self, kind: str) -> dict:
        """The CollectConfig fields of a fixed up-mapping of ``kind``."""
        return {"action": kind, "action_dim": self.action_dim, "n_tokens": self.n_tokens,
                "act_norm": self.act_norm, "layer": self.layer,
                "residual_scale": self.residual_scale,
                "residual_positions": self.residual_positions,
                "position": self.position if kind == "tokens" else None}


def quickstart(cfg: QuickstartConfig) -> dict:
    from dat.agentspec import AgentSpec
    from dat.backends import check_backend, make_lm
    from dat.collect import CollectConfig, collect, make_setting
    from dat.evaluate import evaluate
    from dat.gain import format_gain_check, gain_check
    from dat.report import format_table
    from dat.rollout import RolloutConfig
    from dat.td3bc import TD3BCConfig, train_from_buffer

    if cfg.tiny:
        cfg.shrink()
    cfg.validate()
    check_backend(cfg.backend)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart.json").write_text(json.dumps(asdict(cfg), indent=2))
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def step(name: str):
        console.rule(f"[bold]{name}")
        times[name] = time.perf_counter()

    def done(name: str):
        times[name] = round(time.perf_counter() - times[name], 1)

    lm = make_lm(cfg.model, backend=cfg.backend, device=cfg.device, precision=cfg.precision)
    if cfg.precision != "exact":
        console.print(f"[dim]{lm.precision.describe()}[/]")
    options = {"reward_mode": cfg.reward} if cfg.setting == "taboo" else {}
    setting = make_setting(cfg.setting, None, None, lm, cfg.rounds, **options)
    common = dict(env=cfg.setting, model=cfg.model, rounds=cfg.rounds,
                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                  device=cfg.device, end_at_sentence=cfg.end_at_sentence, scenarios=cfg.explore_scenarios,
                  precision=cfg.precision)

    def td3(buffer: Path, dat_dir: Path, init=None, **over):
        tcfg = TD3BCConfig(**{**cfg.td3bc, "seed": cfg.seed, "log_dir": str(dat_dir / "logs"),
                              "act_norm": cfg.act_norm, "position": cfg.position, **over})
        return train_from_buffer(buffer, dat_dir, tcfg, init=init)

    def explore_and_train(kind: str, folder: str, episodes: int) -> Path:
        """Held random directions through the fixed PCA of ``kind``, then TD3+BC."""
        step(f"explore ({kind})")
        explore = out / f"explore-{folder}"
        collect(CollectConfig(out=str(explore), episodes=episodes, up_mapping="pca",
                              explore_directions=cfg.explore_directions,
                              **cfg.action_options(kind), **common), lm=lm, setting=setting)
        done(f"explore ({kind})")
        step(f"TD3+BC ({kind})")
        dat_dir = out / f"dat-{folder}"
        td3(explore, dat_dir)
        done(f"TD3+BC ({kind})")
        return explore

    # -- the main agent
    explore = explore_and_train(cfg.action, cfg.action, cfg.explore_episodes)
    dat_dir = out / f"dat-{cfg.action}"
    for it in range(2, cfg.iterations + 1):  # iterated DAT
        name = f"iteration {it}"
        step(name)
        more = out / f"explore-{cfg.action}-it{it}"
        collect(CollectConfig(out=str(more), episodes=cfg.iterate_episodes, planner=str(dat_dir),
                              noise=cfg.iterate_noise, explore_directions=cfg.explore_directions,
                              **{**common, "seed": cfg.seed + it}),
                lm=lm, setting=setting)
        previous, dat_dir = dat_dir, out / f"dat-{cfg.action}-it{it}"
        td3(more, dat_dir, init=str(previous))
        done(name)

    agents = {"unsteered": AgentSpec(), "DAT": AgentSpec.from_dir(dat_dir)}
    if cfg.iterations > 1:
        agents["DAT (1 iteration)"] = AgentSpec.from_dir(out / f"dat-{cfg.action}")
    if cfg.compare_tokens and cfg.action != "tokens":
        explore_and_train("tokens", "tokens", cfg.tokens_explore_episodes)
        agents["DAT, prefix tokens (paper)"] = AgentSpec.from_dir(out / "dat-tokens")
    if cfg.self_clone:
        agents["self-clone"] = AgentSpec.from_dir(_self_clone(cfg, lm, setting, common, out,
                                                              step, done))

    step("evaluation on held-out test topics")
    rcfg = RolloutConfig(batch_size=cfg.eval_batch_size, rounds=cfg.rounds,
                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                         end_at_sentence=cfg.end_at_sentence)
    results = evaluate(lm, setting, agents, cfg.eval_episodes, split="test", seed=cfg.seed,
                       config=rcfg, out_dir=out / "report")
    done("evaluation on held-out test topics")
    check = gain_check(results, "DAT")

    per = None
    if cfg.per_scenario:
        step("per-scenario protocol")
        per_dir = out / f"dat-{cfg.action}-per-scenario"
        td3(explore, per_dir, per_scenario=True, alpha=cfg.per_scenario_alpha,
            epochs=2 if cfg.tiny else cfg.per_scenario_epochs)
        per = evaluate(lm, setting, {"unsteered": AgentSpec(),
                                     "DAT per scenario": AgentSpec.from_dir(per_dir)},
                       cfg.per_scenario_eval, split="train", seed=cfg.seed, config=rcfg,
                       out_dir=out / "report-per-scenario")
        done("per-scenario protocol")

    summary = {"config": asdict(cfg), "seconds": times,
               "total_seconds": round(time.perf_counter() - t_all, 1), "gain_check": check}
    if per is not None:
        summary["per_scenario"] = {k: {"reward": v["reward"], "diff_vs_baseline": v["diff_vs_baseline"]}
                                   for k, v in per["agents"].items()}
    results["quickstart"] = summary
    (out / "report" / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    console.rule("[bold]held-out test topics")
    print(format_table(results))
    if per is not None:
        console.rule("[bold]per-scenario protocol (trained and tested on the same train topics)")
        print(format_table(per))
    console.rule("[bold]does DAT beat the unsteered agent on held-out topics?")
    print(format_gain_check(check))
    console.print(f"tables: {out / 'report' / 'results.md'}  samples: {out / 'report' / 'samples.html'}")
    print(f"report: {out / 'report' / 'report.html'}  (one page: open it in a browser)")
    return results


def _self_clone(cfg: QuickstartConfig, lm, setting, common: dict, out: Path, step, done) -> Path:
    """The unsteered corpus and the self-clone of the main action kind; returns its folder."""
    from dat.clone import CloneConfig, clone
    from dat.collect import CollectConfig, collect

    step("unsteered corpus")
    corpus = out / "corpus"
    collect(CollectConfig(out=str(corpus), episodes=cfg.corpus_episodes, **common), lm=lm,
            setting=setting)
    done("unsteered corpus")
    step("self-clone")
    clone_dir = out / "self-clone"
    a = cfg.action_options(cfg.action)
    ccfg = CloneConfig(action_dim=cfg.action_dim, n_tokens=cfg.n_tokens, position=cfg.position,
                       act_norm=cfg.act_norm, epochs=cfg.clone_epochs, lr=cfg.clone_lr,
                       seed=cfg.seed, max_examples=cfg.clone_examples, fidelity_examples=64,
                       fidelity_generate=8 if cfg.tiny else 16,
                       fidelity_max_new_tokens=cfg.max_new_tokens, fidelity_reference=False,
                       action=a["action"], layer=a["layer"], residual_scale=a["residual_scale"],
                       residual_positions=a["residual_positions"])
    clone(lm, corpus, clone_dir, ccfg)
    done("self-clone")
    return clone_dir
