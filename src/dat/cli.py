"""The ``dat`` command. Thin: it parses options and calls the library."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Dialogue Action Tokens: steer a frozen language model toward dialogue goals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "dat[vllm]" must not read as markup
)
console = Console()

# options shared by several commands
ACTION_OPTION = typer.Option("tokens", help="Action kind of a new up-mapping: tokens (input "
                             "embeddings at --position) | residual (a vector added after --layer).")
LAYER_OPTION = typer.Option(15, help="Residual actions: decoder layer (0-based) whose output gets "
                            "the vector.")
SCALE_OPTION = typer.Option(0.15, help="Residual actions: vector norm relative to the layer's "
                            "median residual norm.")
RESIDUAL_POSITIONS_OPTION = typer.Option("reply", help="Residual actions: reply (the positions "
                                         "that predict reply tokens) | all.")
BACKEND_OPTION = typer.Option("hf", help="Generation backend: hf (transformers) | vllm "
                              "(pip install 'dat[vllm]'; see docs/scaling.md).")
NUM_WORKERS_OPTION = typer.Option(None, help="Ray workers (default: one per GPU; CPU-only: one "
                                  "per 2 CPUs).")
ADDRESS_OPTION = typer.Option(None, help="Join this Ray cluster ('auto', host:port); default: a "
                              "local Ray instance.")

DEMO_DIALOGUES = [
    [{"role": "system", "content": "You are a friendly assistant."},
     {"role": "user", "content": "What should I cook for dinner tonight?"}],
    [{"role": "system", "content": "You are a helpful travel agent."},
     {"role": "user", "content": "I have a free weekend. Any ideas?"}],
    [{"role": "system", "content": "You are a curious person chatting with a stranger."},
     {"role": "user", "content": "Hi! How has your day been?"}],
]


JUDGE_FAILURES_OPTION = typer.Option(
    False, help="Go on even when the judge fails on every episode of the first judged batch "
                "(by default the run stops there with a message naming judges that work).")


def _run(fn, out: str | None = None):
    """Turn dat's own errors (and unwritable output folders) into a one-line message and
    exit code 2. ``out`` names the folder when the OS error has no file name (a full disk
    is reported at write time, on an open file)."""
    import errno

    from dat.errors import DatError

    try:
        return fn()
    except DatError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except OSError as exc:  # a read-only or full output folder, a vanished file
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                             errno.ENOTDIR):
            raise
        where = exc.filename or out
        where = f" {where}" if where else ""
        console.print(f"[bold red]error:[/] cannot write{where}: {exc.strerror}. Check that the "
                      "output folder is a writable folder and its disk has room; rerunning "
                      "resumes.")
        raise typer.Exit(2) from None


def _write_json(path: str | None, result: dict) -> None:
    """``--json PATH``: the numbers as strict JSON (NaN as null)."""
    if path:
        import json

        from dat.fileio import finite

        Path(path).write_text(json.dumps(finite(result), indent=2) + "\n")


PRECISION_OPTION = typer.Option(
    "exact", help="exact (float32, the reference) | fast (bf16 where the CPU/GPU has it natively, "
                  "else int8 linear layers); prints what it chose.")


def _load_lm(model: str, backend: str, device: str, hf="load", precision: str = "exact"):
    """The model with the chosen generation backend (``hf=None``: leave the transformers
    backend to the caller's own loading)."""
    from dat.backends import check_backend, make_lm

    if check_backend(backend) == "hf" and hf is None:
        return None
    lm = make_lm(model, backend=backend, device=device, precision=precision)
    if precision != "exact":
        console.print(f"[dim]{lm.precision.describe()}[/]")
    return lm


def _hf_only(backend: str, option: str) -> None:
    from dat.backends import check_backend
    from dat.errors import DatError

    if check_backend(backend) != "hf":
        raise DatError(f"--backend {backend} cannot be combined with {option} yet (Ray workers "
                       "load the transformers backend); use --backend hf.")


@app.command()
def info() -> None:
    """Print versions, the device that 'auto' picks, and the default model's location."""
    import platform

    import torch
    import transformers

    from dat.models import cache_dir, default_gguf_path, resolve_device
    from dat.version import __version__

    table = Table(show_header=False, box=None)
    table.add_row("dat", __version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("device (auto)", str(resolve_device("auto")))
    table.add_row("threads", str(torch.get_num_threads()))
    try:
        table.add_row("default model", str(default_gguf_path()))
    except Exception as exc:  # show the install hint instead of failing
        table.add_row("default model", f"[red]{exc}[/]")
    table.add_row("model cache", str(cache_dir()))
    console.print(table)


@app.command()
def generate(
    model: str = typer.Option("default", help="Model: 'default', a hub id, a folder or a .gguf file."),
    position: str = typer.Option("prefix", help="Where action tokens go: prefix | infix | suffix."),
    n_actions: int = typer.Option(2, "--actions", help="Random actions to try per dialogue."),
    action_dim: int = typer.Option(64, help="Action size d' of the PCA up-mapping."),
    n_tokens: int = typer.Option(2, help="Number of action tokens L."),
    act_norm: float = typer.Option(4.0, help="L2 norm of the random actions."),
    max_new_tokens: int = typer.Option(40, help="New tokens per reply."),
    seed: int = typer.Option(0, help="Seed of the random actions."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
) -> None:
    """Show unsteered and steered replies side by side (PCA up-mapping, random actions)."""

    def go():
        import torch

        from dat import SteeredLM, UpMapping
        from dat.planner import normalize_action

        with console.status(f"Loading {model} ..."):
            lm = SteeredLM.from_pretrained(model, device=device)
            up = UpMapping.from_embedding_pca(lm, action_dim, n_tokens, act_norm=1.0).to(lm.device)
        dialogues = DEMO_DIALOGUES
        plain = lm.generate(dialogues, max_new_tokens=max_new_tokens)
        gen = torch.Generator().manual_seed(seed)
        steered = []
        for _ in range(n_actions):
            a = normalize_action(torch.randn(len(dialogues), action_dim, generator=gen), act_norm)
            steered.append(lm.generate(dialogues, actions=up(a.to(lm.device)), position=position,
                                       max_new_tokens=max_new_tokens))
        table = Table(title=f"{lm.name}: unsteered vs steered ({position}, |a| = {act_norm})",
                      show_lines=True)
        table.add_column("user", ratio=1)
        table.add_column("unsteered", ratio=2)
        for k in range(n_actions):
            table.add_column(f"random action {k + 1}", ratio=2)
        for i, d in enumerate(dialogues):
            table.add_row(d[-1]["content"], plain[i], *[s[i] for s in steered])
        console.print(table)

    _run(go)


@app.command()
def collect(
    out: str = typer.Option(..., help="Buffer folder to write (re-run the same command to resume)."),
    env: str = typer.Option("taboo", help="Setting: taboo | openup | social | redteam."),
    data: str = typer.Option(None, help="Setting data: Sotopia folder or HarmBench CSV."),
    model: str = typer.Option("default", help="Steered model: 'default', hub id, folder or .gguf."),
    partner: str = typer.Option(None, help="Partner model spec (default: the steered model itself)."),
    judge: str = typer.Option(None, help="Judge spec, e.g. embed:default, hf:PATH, api:URL#model."),
    planner: str = typer.Option(None, help="Planner folder (from dat clone / dat train)."),
    up_mapping: str = typer.Option(None, help="'pca' or an up-mapping folder (default: the planner's)."),
    noise: float = typer.Option(0.0, help="Exploration noise sigma around planner(s)."),
    explore_directions: int = typer.Option(
        0, help="K > 0: draw K noise directions and give episode e direction e mod K for all "
                "its turns (each direction is tried on many scenarios); 0: fresh noise per turn."),
    episodes: int = typer.Option(64, help="Number of episodes."),
    batch_size: int = typer.Option(32, help="Episodes run in lock-step."),
    rounds: int = typer.Option(None, help="Rounds per episode (default: the setting's)."),
    max_new_tokens: int = typer.Option(48, help="New tokens per utterance."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0 = greedy)."),
    split: str = typer.Option("train", help="Scenario split: train | test."),
    seed: int = typer.Option(0, help="Seed of the scenario order, noise and sampling."),
    act_norm: float = typer.Option(None, help="Action norm (default: the planner's)."),
    action: str = ACTION_OPTION,
    layer: int = LAYER_OPTION,
    residual_scale: float = SCALE_OPTION,
    residual_positions: str = RESIDUAL_POSITIONS_OPTION,
    action_dim: int = typer.Option(64, help="Action size d' of a new PCA up-mapping."),
    n_tokens: int = typer.Option(2, help="Tokens: number of action tokens of a new PCA up-mapping."),
    position: str = typer.Option(None, help="Tokens: prefix | infix | suffix (default: the planner's)."),
    scenarios: int = typer.Option(None, help="Use only the first N scenarios of the split's seeded "
                                  "order (each then gets about episodes / N episodes)."),
    end_at_sentence: bool = typer.Option(False, help="Replies cut off by --max-new-tokens end at "
                                         "their last complete sentence."),
    allow_judge_failures: bool = JUDGE_FAILURES_OPTION,
    include_contextual: bool = typer.Option(False, help="redteam: also keep HarmBench's "
                                            "contextual behaviours (default: skip and count "
                                            "them)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
    backend: str = BACKEND_OPTION,
    precision: str = PRECISION_OPTION,
    terminal_states: bool = typer.Option(
        False, "--terminal-states/--no-terminal-states",
        help="Also store each episode's final state s_T (not needed by TD3+BC; older buffers "
             "have it, so resuming one needs --terminal-states)."),
    use_ray: bool = typer.Option(False, "--ray", help="Spread the episodes over Ray workers "
                                 "(pip install 'dat[ray]'); same buffer content."),
    num_workers: int = NUM_WORKERS_OPTION,
    address: str = ADDRESS_OPTION,
) -> None:
    """Run episodes and store them as an offline buffer (Parquet shards, resumable)."""
    from dat.collect import CollectConfig
    from dat.collect import collect as run_collect

    cfg = CollectConfig(out=out, env=env, data=data, model=model, partner=partner, judge=judge,
                        planner=planner, up_mapping=up_mapping, noise=noise, episodes=episodes,
                        explore_directions=explore_directions, batch_size=batch_size,
                        rounds=rounds, max_new_tokens=max_new_tokens,
                        temperature=temperature, split=split, seed=seed, act_norm=act_norm,
                        device=device, terminal_states=terminal_states, action=action,
                        layer=layer, residual_scale=residual_scale,
                        residual_positions=residual_positions, action_dim=action_dim,
                        n_tokens=n_tokens, position=position, scenarios=scenarios,
                        end_at_sentence=end_at_sentence,
                        allow_judge_failures=allow_judge_failures,
                        include_contextual=include_contextual, precision=precision)
    if use_ray or num_workers or address:
        from dat.distributed import RayConfig, collect_ray

        rc = RayConfig(num_workers=num_workers, address=address)
        summary = _run(lambda: _hf_only(backend, "--ray") or collect_ray(cfg, rc), out)
    else:
        summary = _run(lambda: run_collect(cfg, lm=_load_lm(model, backend, device, hf=None,
                                                                precision=precision)), out)
    workers = (f" on {summary['workers']} Ray workers ({summary['restarts']} restarted)"
               if "workers" in summary else "")
    console.print(f"[green]done[/]: {summary['episodes_run']} episodes run, "
                  f"{summary['episodes_skipped']} already there, mean reward "
                  f"{summary['mean_reward']:.3f}, {summary['tokens_per_s']:.0f} tok/s{workers} -> {out}")


@app.command()
def serve(
    model: str = typer.Option("default", help="Model: 'default', a hub id, a folder or a .gguf file."),
    planner: str = typer.Option(None, help="Planner folder (from dat clone / dat train); none = plain."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key_env: str = typer.Option(None, help="Environment variable holding the API key (none = open)."),
    max_batch: int = typer.Option(32, help="Most requests decoded together in one batch."),
    max_wait_ms: float = typer.Option(10.0, help="How long the first request waits for others to batch with."),
    served_model_name: str = typer.Option("dat", help="Model id clients ask for ('<id>-plain' = unsteered)."),
    default_max_tokens: int = typer.Option(256, help="New tokens when a request sets no max_tokens."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    precision: str = PRECISION_OPTION,
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
    backend: str = typer.Option("hf", help="Generation backend: hf (transformers) | vllm "
                                "(pip install 'dat[vllm]'; replies are sent whole, not streamed "
                                "token by token)."),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, help="Largest request body accepted; "
                                       "larger ones get a 413."),
    batching: str = typer.Option("continuous", help="continuous (requests join the running "
                                 "decode batch at the next step) | static (a batch is decoded "
                                 "to its end before the next starts)."),
    prefix_cache: bool = typer.Option(True, help="Continuous batching: reuse the keys/values of "
                                      "prompt prefixes recent requests shared (exact)."),
) -> None:
    """Serve the model (steered by a planner, if given) over an OpenAI-compatible HTTP API."""
    from dat.serve import serve_command

    _run(lambda: serve_command(model=model, planner=planner, host=host, port=port,
                               api_key_env=api_key_env, max_batch=max_batch, max_wait_ms=max_wait_ms,
                               served_model_name=served_model_name,
                               default_max_tokens=default_max_tokens, device=device, dtype=dtype,
                               threads=threads, log_level=log_level, backend=backend,
                               max_body_bytes=max_body_bytes, precision=precision,
                               batching=batching, prefix_cache=prefix_cache))


@app.command("clone")
def clone_cmd(
    corpus: str = typer.Argument(..., help="Corpus folder written by `dat collect` (no planner)."),
    out: str = typer.Option(..., help="Folder for the self-cloned planner + up-mapping."),
    model: str = typer.Option("default", help="Steered model."),
    action_dim: int = typer.Option(64, help="Action size d'."),
    n_tokens: int = typer.Option(2, help="Number of action tokens L."),
    position: str = typer.Option("prefix", help="prefix | infix | suffix"),
    act_norm: float = typer.Option(1.0, help="L2 norm of the planner's actions."),
    action: str = ACTION_OPTION,
    layer: int = LAYER_OPTION,
    residual_scale: float = SCALE_OPTION,
    residual_positions: str = RESIDUAL_POSITIONS_OPTION,
    epochs: int = typer.Option(3, help="Passes over the corpus."),
    batch_size: int = typer.Option(8, help="Examples per forward/backward pass."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimiser step."),
    lr: float = typer.Option(3e-4, help="Planner AdamW learning rate (linear decay)."),
    overwrite: bool = typer.Option(False, help="Replace a trained agent already in --out."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
) -> None:
    """Self-clone: train planner + up-mapping to reproduce the corpus agent's utterances."""
    from dat import SteeredLM
    from dat.clone import CloneConfig, clone

    def go():
        lm = SteeredLM.from_pretrained(model, device=device)
        cfg = CloneConfig(action_dim=action_dim, n_tokens=n_tokens, position=position, act_norm=act_norm,
                          epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, seed=seed,
                          action=action, layer=layer, residual_scale=residual_scale,
                          residual_positions=residual_positions, overwrite=overwrite)
        cfg.validate()
        return clone(lm, corpus, out, cfg)

    _run(go, out)
    console.print(f"[green]saved[/] self-clone to {out} (fidelity: {out}/fidelity.json)")


@app.command("train")
def train_cmd(
    buffer: str = typer.Argument(..., help="Exploration buffer folder from `dat collect --planner`."),
    out: str = typer.Option(..., help="Folder for the trained planner."),
    init: str = typer.Option(None, help="Starting planner folder (e.g. the self-clone); default: new."),
    up_mapping: str = typer.Option(None, help="'pca' or an up-mapping folder (default: init's)."),
    model: str = typer.Option("default", help="Model (for a PCA up-mapping)."),
    alpha: float = typer.Option(2.5, help="TD3+BC alpha (0 turns the BC term off)."),
    epochs: int = typer.Option(1, help="Passes over the buffer."),
    batch_size: int = typer.Option(1024),
    actor_lr: float = typer.Option(1e-6),
    critic_lr: float = typer.Option(1e-5),
    per_scenario: bool = typer.Option(False, help="One planner per scenario."),
    bc_target: str = typer.Option("data", help="BC toward: data (each transition's own action, "
                                  "TD3+BC) | best (the critic's best of --bc-candidates data "
                                  "actions; for buffers of held random directions)."),
    bc_candidates: int = typer.Option(64, help="Data actions the 'best' BC target picks from."),
    overwrite: bool = typer.Option(False, help="Replace a trained agent already in --out."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
) -> None:
    """Offline RL (TD3+BC) on a buffer; keeps only the actor."""
    from dat.td3bc import TD3BCConfig, train_from_buffer

    def go():
        up = None
        if up_mapping:
            from dat import SteeredLM
            from dat.collect import load_policy

            lm = SteeredLM.from_pretrained(model, device="cpu")
            up = load_policy(lm, None, up_mapping).up
        elif init:
            from dat.planner import UP_MAPPING_DIR, UpMapping

            if (Path(init) / UP_MAPPING_DIR).is_dir():
                up = UpMapping.from_pretrained(Path(init) / UP_MAPPING_DIR)
        cfg = TD3BCConfig(alpha=alpha, epochs=epochs, batch_size=batch_size, actor_lr=actor_lr,
                          critic_lr=critic_lr, per_scenario=per_scenario, bc_target=bc_target,
                          bc_candidates=bc_candidates, overwrite=overwrite, seed=seed,
                          device=device)
        return train_from_buffer(buffer, out, cfg, init=init, up_mapping=up)

    res = _run(go, out)
    console.print(f"[green]saved[/] planner to {out} ({res.steps} updates, {res.seconds:.0f} s)")


@app.command("eval")
def eval_cmd(
    out: str = typer.Option(..., help="Report folder."),
    agent: list[str] = typer.Option(None, help="NAME=DIR (repeatable): a planner folder or a "
                                    "`dat baseline` folder; 'unsteered' is always run."),
    partner: list[str] = typer.Option(None, help="Partner / defender spec (repeatable: one "
                                      "evaluation per partner, in OUT/<partner>, and a partner-"
                                      "transfer table); default: the model itself."),
    env: str = typer.Option("taboo", help="Setting: taboo | openup | social | redteam."),
    data: str = typer.Option(None, help="Setting data (Sotopia folder / HarmBench CSV)."),
    judge: str = typer.Option(None, help="Judge spec."),
    model: str = typer.Option("default"),
    episodes: int = typer.Option(None, help="Episodes per agent (default: one per test scenario)."),
    scenarios: int = typer.Option(None, help="Cycle the episodes over the first N scenarios of "
                                  "the seeded order only: --episodes 16N --temperature 0.7 = "
                                  "16 samples each (the per-scenario protocol)."),
    rounds: int = typer.Option(None),
    max_new_tokens: int = typer.Option(48),
    batch_size: int = typer.Option(32),
    temperature: float = typer.Option(0.0),
    split: str = typer.Option("test"),
    allow_judge_failures: bool = JUDGE_FAILURES_OPTION,
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    backend: str = BACKEND_OPTION,
    precision: str = PRECISION_OPTION,
    use_ray: bool = typer.Option(False, "--ray", help="Run the episodes on Ray workers "
                                 "(pip install 'dat[ray]'); same results."),
    num_workers: int = NUM_WORKERS_OPTION,
    address: str = ADDRESS_OPTION,
) -> None:
    """Compare agents on held-out scenarios: rewards with CIs, paired differences, language quality."""
    from dat.agentspec import AgentSpec
    from dat.collect import make_setting
    from dat.errors import DatError
    from dat.evaluate import evaluate
    from dat.report import format_table
    from dat.rollout import RolloutConfig

    def go():
        if use_ray or num_workers or address:
            _hf_only(backend, "--ray")
            if precision != "exact":
                raise DatError("--ray evaluates in exact precision; drop --precision fast.")
        agents = {"unsteered": AgentSpec()}  # parsed first: a bad --agent fails at once
        for item in agent or []:
            name, sep, path = item.partition("=")
            if not sep:
                raise DatError(f"--agent expects NAME=PLANNER_DIR, got {item!r}")
            if name in agents:
                raise DatError(f"--agent {item!r}: the name {name!r} is taken"
                               + (" by the unsteered baseline" if name == "unsteered" else "")
                               + "; give each agent its own name.")
            agents[name] = AgentSpec.from_dir(path)
        lm = _load_lm(model, backend, device, precision=precision)
        setting = make_setting(env, data, judge, lm, rounds)
        cfg = RolloutConfig(batch_size=batch_size, rounds=rounds, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed,
                            allow_judge_failures=allow_judge_failures)
        if partner:
            if use_ray or num_workers or address:
                raise DatError("--partner cannot be combined with --ray yet.")
            from dat.evaluate import evaluate_partners

            return evaluate_partners(lm, setting, agents, partner, episodes, split=split, seed=seed,
                                     config=cfg, out_dir=out, scenarios=scenarios)
        if not (use_ray or num_workers or address):
            return evaluate(lm, setting, agents, episodes, split=split, seed=seed, config=cfg,
                            out_dir=out, scenarios=scenarios)
        from dat.distributed import RayConfig, RayPool

        with RayPool(RayConfig(num_workers=num_workers, address=address), device=device) as pool:
            runner = pool.eval_runner(model=model, env=env, data=data, judge=judge, rounds=rounds,
                                      split=split, seed=seed)
            return evaluate(lm, setting, agents, episodes, split=split, seed=seed, config=cfg,
                            out_dir=out, runner=runner, scenarios=scenarios)

    results = _run(go, out)
    if "by_partner" in results:
        from dat.report import partner_table

        for name, res in results["by_partner"].items():
            console.print(f"partner {name}:")
            print(format_table(res))
        print(partner_table(results["by_partner"]))
        console.print(f"reports: {out}/<partner>/results.md")
        return
    print(format_table(results))
    console.print(f"report: {out}/results.md")


@app.command()
def baseline(
    method: str = typer.Argument(..., help="gcg | pair | strategy | api"),
    out: str = typer.Option(..., help="Baseline folder (then: dat eval --agent NAME=OUT)."),
    env: str = typer.Option("redteam", help="Setting: taboo | openup | social | redteam."),
    data: str = typer.Option(None, help="Setting data (HarmBench CSV / Sotopia folder)."),
    judge: str = typer.Option(None, help="Judge spec (default: the setting's)."),
    model: str = typer.Option("default", help="The local model (attacker/steered agent; GCG's defender)."),
    partner: str = typer.Option(None, help="Defender / partner spec (default: the model itself)."),
    split: str = typer.Option(None, help="Scenarios to build on (default: test for gcg, pair and "
                              "--mode oracle; train for --mode best)."),
    limit: int = typer.Option(None, help="gcg, pair: only the first N behaviours of the split."),
    targets: str = typer.Option(None, help="gcg: HarmBench targets JSON {BehaviorID: target}; "
                                "default: 'Sure, here is ...' from the behaviour."),
    steps: int = typer.Option(None, help="gcg: optimisation steps (default 250)."),
    search_width: int = typer.Option(None, help="gcg: candidates per step (default 512)."),
    topk: int = typer.Option(None, help="gcg: top-k tokens per position (default 256)."),
    attacker: str = typer.Option(None, help="pair: attacker model spec, local or api:URL#model "
                                 "(default: the model)."),
    streams: int = typer.Option(None, help="pair: parallel streams N (default 3)."),
    iterations: int = typer.Option(None, help="pair: refinement iterations K (default 3)."),
    strategy: list[str] = typer.Option(None, help="strategy: NAME or NAME=instruction "
                                       "(repeatable; default: the built-in list)."),
    mode: str = typer.Option("best", help="strategy: best (one strategy, chosen on --split) | "
                             "oracle (the best per scenario: an upper bound)."),
    episodes: int = typer.Option(None, help="strategy: episodes per strategy (default: one per "
                                 "scenario)."),
    speaker: str = typer.Option(None, help="api: the endpoint that speaks for the steered agent, "
                                "api:URL#model."),
    rounds: int = typer.Option(None),
    max_new_tokens: int = typer.Option(48),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    overwrite: bool = typer.Option(False, help="Replace a finished baseline in --out."),
) -> None:
    """Build a baseline to evaluate next to DAT: GCG suffixes (nanogcg), PAIR prompts, strategy
    prompting, or an API model as the steered agent. See docs/baselines.md."""
    from dat.baselines.build import BaselineJob, build

    job = BaselineJob(method, out, env, data, judge, model, partner, split, limit, rounds,
                      max_new_tokens, batch_size, seed, overwrite, device,
                      gcg={"targets": targets, "steps": steps, "search_width": search_width,
                           "topk": topk},
                      pair={"attacker": attacker, "streams": streams, "iterations": iterations},
                      strategies=strategy, mode=mode, episodes=episodes, speaker=speaker)
    made = _run(lambda: build(job), out)
    console.print(f"{made.label}: {len(made.scenario_ids) or 'all'} scenario(s), compute per "
                  f"scenario {made.compute_text()}; wrote {out}/baseline.json. Evaluate it with: "
                  f"dat eval --env {made.setting} --agent {made.method}={out} ...")


@app.command()
def directions(
    buffer: str = typer.Argument(..., help="Buffer folder from `dat collect --explore-directions K`."),
    baseline: str = typer.Option(None, help="Unsteered buffer on the same scenarios: effects "
                                 "are paired differences (recommended)."),
    compare: str = typer.Option(None, help="A second held-direction buffer (e.g. test topics, "
                                "same K and seed): prints how well effects transfer."),
    compare_baseline: str = typer.Option(None, help="Unsteered buffer for --compare."),
    k: int = typer.Option(None, help="Directions (default: the buffer's --explore-directions)."),
    json_out: str = typer.Option(None, "--json", help="Also write the numbers to this file."),
) -> None:
    """Per-direction reward effects of a held-direction buffer and whether they are real
    (split-half reliability, transfer to other topics). See docs/quickstart.md."""
    from dat.directions import format_study, study, transfer

    def go():
        res = {"buffer": study(buffer, baseline, k)}
        print(format_study(res["buffer"]))
        if compare:
            res["compare"] = study(compare, compare_baseline, k)
            res["transfer_r"] = transfer(res["buffer"], res["compare"])
            print(format_study(res["compare"]))
            print(f"transfer: correlation of direction effects between the two buffers "
                  f"r = {res['transfer_r']:.2f}")
        _write_json(json_out, res)

    _run(go)


@app.command()
def probe(
    env: str = typer.Option("taboo", help="Setting: taboo | openup | social | redteam."),
    data: str = typer.Option(None, help="Setting data (Sotopia folder / HarmBench CSV)."),
    judge: str = typer.Option(None, help="Judge spec (default: the setting's)."),
    model: str = typer.Option("default"),
    action: str = typer.Option("residual", help="residual | tokens"),
    layer: int = typer.Option(15, help="Residual: decoder layer whose output gets the vector."),
    residual_scale: float = typer.Option(0.15, help="Residual: vector norm / median residual norm."),
    position: str = typer.Option("prefix", help="Tokens: prefix | infix | suffix."),
    n_tokens: int = typer.Option(2, help="Tokens: number of action tokens."),
    act_norm: float = typer.Option(1.0, help="Action norm (tokens: x the median embedding norm)."),
    action_dim: int = typer.Option(64, help="Action size d' (PCA components)."),
    directions: int = typer.Option(8, help="Random directions K."),
    scenarios: int = typer.Option(16, help="Train scenarios N (raised to be coprime to K)."),
    rounds: int = typer.Option(1, help="Rounds per episode."),
    max_new_tokens: int = typer.Option(32),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    json_out: str = typer.Option(None, "--json", help="Also write the numbers to this file."),
) -> None:
    """Before a long collection: does this action space move the setting's text and reward?
    Split-half reliability of K random directions over N scenarios (a few minutes on a CPU)."""
    from dat.agent import ActionSpace
    from dat.collect import make_setting
    from dat.probe import ProbeConfig, format_probe
    from dat.probe import probe as run_probe

    def go():
        space = ActionSpace(kind=action, action_dim=action_dim, act_norm=act_norm,
                            n_tokens=n_tokens, position=position, layer=layer,
                            scale=residual_scale)
        pcfg = ProbeConfig(directions=directions, scenarios=scenarios, rounds=rounds,
                           max_new_tokens=max_new_tokens, seed=seed)
        space.validate()
        pcfg.validate()
        lm = _load_lm(model, "hf", device)
        res = run_probe(lm, make_setting(env, data, judge, lm, rounds), space, pcfg)
        print(format_probe(res))
        _write_json(json_out, res)

    _run(go)


@app.command()
def chat(
    agent: str = typer.Option(None, help="Agent folder (dat train / dat clone); none: unsteered."),
    model: str = typer.Option("default", help="Model: 'default', a hub id, a folder or a .gguf file."),
    system: str = typer.Option(None, help="The agent's system prompt (default: the scenario's, "
                               "else a friendly chat prompt)."),
    setting: str = typer.Option("openup", help="Setting of --scenario: openup | taboo | social | redteam."),
    data: str = typer.Option(None, help="Setting data (Sotopia folder / HarmBench CSV)."),
    judge: str = typer.Option(None, help="Judge spec for /reward (default: the setting's)."),
    scenario: str = typer.Option(None, help="Scenario id of the setting: its system prompt, its judge."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    max_new_tokens: int = typer.Option(64, help="New tokens per reply."),
    act_norm: float = typer.Option(None, help="Action norm (default: the agent's own)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    resume: str = typer.Option(None, help="Continue a dialogue saved with /save."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
) -> None:
    """Talk to an agent as its partner. Commands: /unsteered (toggle steering, regenerate the
    last reply), /reward, /save FILE, /help, /quit. With piped stdin: one line in, one reply out."""
    import sys

    from rich.markup import escape

    from dat import chat as chatting
    from dat.errors import DatError
    from dat.models import cache_dir

    def go():
        from dat.agent import Agent, load_agent
        from dat.collect import make_setting
        from dat.steer import SteeredLM

        if (act_norm is not None) and not act_norm > 0:
            raise DatError(f"--act-norm must be > 0, got {act_norm}.")
        saved = chatting.load_episode(resume) if resume else None  # bad files fail before loading
        lm = SteeredLM.from_pretrained(model, device=device)
        steered = load_agent(agent, lm) if agent else None
        if act_norm is not None:
            if not isinstance(steered, Agent):
                raise DatError("--act-norm needs one --agent (not per-scenario planners).")
            steered.act_norm = act_norm
        the_setting = make_setting(setting, data, judge, lm) if (scenario or resume) else None
        episode = saved or chatting.new_episode(system, the_setting, scenario)
        if resume and the_setting is not None and episode.scenario.id != "chat":
            the_setting.scenario_by_id(episode.scenario.id)  # a clear error if it is not there
        session = chatting.ChatSession(lm, episode, steered, the_setting, temperature=temperature,
                                       max_new_tokens=max_new_tokens, seed=seed)
        opener = (the_setting is not None and not episode.turns
                  and the_setting.opening(episode.scenario).speaker == "steered")
        if chatting.stdin_is_terminal():
            console.print(f"[dim]{lm.name}, {'agent ' + agent if agent else 'unsteered'}. "
                          f"/help lists the commands.[/]")
            chatting.run(session, chatting.interactive_lines(Path(cache_dir()) / "chat_history"),
                         lambda t: console.print(f"[bold]agent>[/] {escape(t)}"),
                         lambda t: console.print(f"[dim]{escape(t)}[/]"), opener)
        else:
            chatting.run(session, sys.stdin, lambda t: print(t, flush=True),
                         lambda t: print(t, file=sys.stderr, flush=True), opener)

    _run(go)


@app.command()
def quickstart(
    out: str = typer.Option("runs/quickstart", help="Folder for every step's output and the report."),
    tiny: bool = typer.Option(False, help="A few episodes: the whole pipeline in minutes."),
    setting: str = typer.Option("openup", help="Embedded setting: openup | taboo."),
    action: str = typer.Option("residual", help="Action kind of the main DAT: residual (a vector "
                               "added after --layer) | tokens (the paper's prefix tokens)."),
    layer: int = typer.Option(15, help="Residual actions: decoder layer whose output gets the vector."),
    residual_scale: float = typer.Option(0.15, help="Residual actions: vector norm relative to the "
                                         "layer's median residual norm."),
    iterations: int = typer.Option(1, help="Rounds of iterated DAT (explore around the planner, "
                                   "train again)."),
    compare_tokens: bool = typer.Option(True, help="Also train and evaluate the paper's prefix-token DAT."),
    per_scenario: bool = typer.Option(True, help="Also the paper's per-scenario protocol."),
    self_clone: bool = typer.Option(False, help="Also collect a corpus and evaluate the self-clone."),
    device: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    backend: str = BACKEND_OPTION,
    precision: str = PRECISION_OPTION,
) -> None:
    """The whole pipeline on the default model and an embedded setting: exploration, TD3+BC, evaluation on
    held-out topics against the unsteered agent (and the paper's prefix tokens and per-scenario
    protocol). Re-running resumes."""
    from dat.quickstart import QuickstartConfig
    from dat.quickstart import quickstart as run_quickstart

    _run(lambda: run_quickstart(QuickstartConfig(
        out=out, tiny=tiny, setting=setting, action=action, layer=layer, residual_scale=residual_scale,
        iterations=iterations, compare_tokens=compare_tokens, per_scenario=per_scenario,
        self_clone=self_clone, device=device, seed=seed, backend=backend, precision=precision)), out)


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

