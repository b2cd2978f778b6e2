"""``dat quickstart``: the whole DAT pipeline on the embedded default model and ``taboo``.

1. collect an unsteered corpus on the train topics;
2. self-clone it (planner + learned up-mapping; a baseline, and the starting agent with
   ``start="self-clone"``);
3. collect an exploration buffer: by default ``explore_directions`` random directions through
   the PCA up-mapping, each held for whole episodes and tried on many topics
   (``start="pca"``); or Gaussian noise around the self-clone (``start="self-clone"``);
4. train the planner with TD3+BC (from scratch on the PCA up-mapping, or from the self-clone);
5. evaluate unsteered vs self-clone vs DAT on the held-out test topics (paired).

Every step writes into its own sub-folder of ``--out`` and resumes when run again, so an
interrupted quickstart picks up where it stopped. The choices below (episodes, noise, α,
learning rates) are documented in ``docs/quickstart.md`` with the measurements behind them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from dat.errors import DatError

console = Console()


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    model: str = "default"
    device: str = "auto"
    backend: str = "hf"  # generation backend: hf | vllm (see dat.backends)
    rounds: int = 3
    max_new_tokens: int = 32
    batch_size: int = 32
    eval_batch_size: int = 64  # all 57 test topics in one lock-step batch
    corpus_episodes: int = 64
    explore_episodes: int = 256
    explore_directions: int = 16  # start="pca": K held directions, each on explore_episodes / K topics
    eval_episodes: int | None = None  # None: one per held-out test topic
    action_dim: int = 64
    action: str = "residual"  # "residual" | "tokens" (the paper's prefix tokens) — docs/quickstart.md
    layer: int = 15  # residual: decoder layer (of 30) whose output gets the action vector
    residual_scale: float = 0.15  # residual: vector norm / the layer's median residual norm
    residual_positions: str = "reply"
    end_at_sentence: bool = True  # replies cut at max_new_tokens end at their last full sentence
    n_tokens: int = 2
    position: str = "prefix"
    act_norm: float = 1.0
    noise: float = 0.5  # start="self-clone": exploration sigma around the self-clone's action
    start: str = "pca"  # "pca" (from scratch) | "self-clone" — see docs/quickstart.md
    clone_epochs: int = 1
    clone_examples: int = 128  # utterances the self-clone trains on (a seeded subset)
    clone_lr: float = 3e-4
    td3bc: dict = field(default_factory=lambda: {"alpha": 2.5, "epochs": 30, "actor_lr": 3e-4,
                                                 "critic_lr": 3e-4, "batch_size": 256})
    seed: int = 0
    tiny: bool = False

    def shrink(self) -> QuickstartConfig:
        """A few episodes and tokens: the pipeline end to end in minutes (for tests)."""
        self.rounds, self.max_new_tokens, self.batch_size = 1, 8, 4
        self.corpus_episodes, self.explore_episodes, self.eval_episodes = 6, 8, 4
        self.eval_batch_size, self.explore_directions = 4, 4
        self.action_dim, self.clone_epochs, self.clone_examples = 16, 1, 16
        self.td3bc = {**self.td3bc, "epochs": 2, "batch_size": 4}
        return self


def quickstart(cfg: QuickstartConfig) -> dict:
    from dat.backends import check_backend, make_lm
    from dat.clone import CloneConfig, clone
    from dat.collect import CollectConfig, collect, make_setting
    from dat.evaluate import AgentSpec, evaluate, format_table
    from dat.rollout import RolloutConfig
    from dat.td3bc import TD3BCConfig, train_from_buffer

    if cfg.tiny:
        cfg.shrink()
    check_backend(cfg.backend)
    if cfg.start not in ("pca", "self-clone"):
        raise DatError(f"start must be 'pca' or 'self-clone', got {cfg.start!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart.json").write_text(json.dumps(asdict(cfg), indent=2))
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def step(name: str):
        console.rule(f"[bold]{name}")
        times[name] = time.perf_counter()

    def done(name: str):
        times[name] = time.perf_counter() - times[name]

    lm = make_lm(cfg.model, backend=cfg.backend, device=cfg.device)
    setting = make_setting("taboo", None, None, lm, cfg.rounds)
    common = dict(model=cfg.model, rounds=cfg.rounds, max_new_tokens=cfg.max_new_tokens,
                  batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                  end_at_sentence=cfg.end_at_sentence)
    action = dict(action=cfg.action, layer=cfg.layer, residual_scale=cfg.residual_scale,
                  residual_positions=cfg.residual_positions)

    step("1. unsteered corpus")
    corpus = out / "corpus"
    collect(CollectConfig(out=str(corpus), episodes=cfg.corpus_episodes, **common), lm=lm, setting=setting)
    done("1. unsteered corpus")

    step("2. self-clone")
    clone_dir = out / "self-clone"
    ccfg = CloneConfig(action_dim=cfg.action_dim, n_tokens=cfg.n_tokens, position=cfg.position,
                       act_norm=cfg.act_norm, epochs=cfg.clone_epochs, lr=cfg.clone_lr, seed=cfg.seed,
                       max_examples=cfg.clone_examples, fidelity_examples=64,
                       fidelity_generate=8 if cfg.tiny else 16,
                       fidelity_max_new_tokens=cfg.max_new_tokens, fidelity_reference=False,
                       **action)
    cloned = clone(lm, corpus, clone_dir, ccfg)
    done("2. self-clone")

    step("3. exploration buffer")
    explore = out / "explore"
    if cfg.start == "pca":  # random directions through the PCA up-mapping, no planner
        policy = {"up_mapping": "pca", "explore_directions": cfg.explore_directions,
                  "action_dim": cfg.action_dim, "n_tokens": cfg.n_tokens,
                  "act_norm": cfg.act_norm, **action,
                  "position": cfg.position if cfg.action == "tokens" else None}
    else:  # Gaussian noise around the self-clone's actions
        policy = {"planner": str(clone_dir), "noise": cfg.noise}
    collect(CollectConfig(out=str(explore), episodes=cfg.explore_episodes, **policy, **common),
            lm=lm, setting=setting)
    done("3. exploration buffer")

    step("4. TD3+BC")
    dat_dir = out / "dat"
    tcfg = TD3BCConfig(**{**cfg.td3bc, "seed": cfg.seed, "log_dir": str(dat_dir / "logs"),
                          "act_norm": cfg.act_norm, "position": cfg.position})
    if cfg.start == "pca":  # the fixed up-mapping the exploration used (saved in its folder)
        init, up = None, None
    else:
        from dat.agent import Agent

        init = str(clone_dir)
        up = Agent.load(clone_dir, lm=lm).up
    train_from_buffer(explore, dat_dir, tcfg, init=init, up_mapping=up)
    done("4. TD3+BC")

    step("5. evaluation on held-out test topics")
    agents = {"unsteered": AgentSpec(), "self-clone": AgentSpec.from_dir(clone_dir),
              "DAT": AgentSpec.from_dir(dat_dir)}
    rcfg = RolloutConfig(batch_size=cfg.eval_batch_size, rounds=cfg.rounds, max_new_tokens=cfg.max_new_tokens,
                         seed=cfg.seed, end_at_sentence=cfg.end_at_sentence)
    results = evaluate(lm, setting, agents, cfg.eval_episodes, split="test", seed=cfg.seed,
                       config=rcfg, out_dir=out / "report")
    done("5. evaluation on held-out test topics")

    results["quickstart"] = {"config": asdict(cfg), "seconds": times,
                             "total_seconds": time.perf_counter() - t_all,
                             "clone_fidelity": getattr(cloned, "fidelity", None)}
    (out / "report" / "quickstart.json").write_text(json.dumps(results["quickstart"], indent=2, default=str))
    print(format_table(results))
    console.print(f"report: {out / 'report' / 'results.md'}  samples: {out / 'report' / 'samples.html'}")
    return results
