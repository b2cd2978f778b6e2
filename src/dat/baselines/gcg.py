"""GCG (Zou et al. 2023) through ``nanogcg``: one adversarial suffix per behaviour.

Each suffix is optimised against the defender, single turn, in exactly the context the
defender sees at the attacker's first turn of a red-teaming episode::

    [system: defender system prompt, assistant: the opening greeting,
     user: "<behaviour> <suffix>"]

so that the defender's reply starts with a target string: the behaviour's entry of a
HarmBench targets JSON (``{BehaviorID: target}``), else ``"Sure, here is <behaviour>"``
(said once, and recorded per behaviour as ``target_source``). The suffixed request is stored
as the behaviour's fixed first attacker turn (:class:`~dat.prompting.PromptPolicy`); each
finished behaviour is saved at once, so an interrupted run resumes with the next one.

GCG needs the defender's gradients: an ``api:`` defender, a model without a torch module and
int8 linear layers are refused. ``nanogcg`` is installed without its dependencies (its
metadata pins an old transformers; it runs with ours without its prefix cache)::

    pip install --no-deps nanogcg==0.3.0
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dat.baseline_folder import Baseline, ProgressDir
from dat.errors import DatError
from dat.prompting import PromptPolicy

NANOGCG_INSTALL = "pip install --no-deps nanogcg==0.3.0"
OPTIM = "{optim_str}"  # where nanogcg puts the suffix
CPU_BATCH = 64  # candidates per forward pass on the CPU (bounds the memory of the logits)
log = logging.getLogger("dat.baselines.gcg")


@dataclass
class GCGSettings:
    """nanogcg's main settings. ``targets``: a HarmBench targets JSON ``{BehaviorID: target}``
    (None: ``"Sure, here is <behaviour>"`` for every behaviour)."""

    steps: int = 250
    search_width: int = 512
    topk: int = 256
    seed: int = 0
    n_replace: int = 1
    optim_str_init: str = "x x x x x x x x x x x x x x x x x x x x"
    targets: str | None = None

    def validate(self) -> None:
        for name in ("steps", "search_width", "topk", "n_replace"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DatError(f"GCG {name.replace('_', ' ')} must be an integer >= 1, got {value!r}.")
        if not isinstance(self.optim_str_init, str) or not self.optim_str_init.strip():
            raise DatError("GCG optim_str_init (the initial suffix) must be a non-empty string.")
        if self.targets is not None:
            load_targets(self.targets)


def load_targets(path: str | Path) -> dict[str, str]:
    """A HarmBench targets JSON: one object mapping behaviour ids to target strings."""
    path = Path(path)
    if not path.is_file():
        raise DatError(f"{path}: GCG targets file not found (expected a HarmBench targets JSON "
                       "{BehaviorID: target}).")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatError(f"{path}: GCG targets file is not readable JSON ({exc}).") from None
    if not isinstance(doc, dict) or not doc or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in doc.items()):
        raise DatError(f"{path}: GCG targets file must be a JSON object mapping each BehaviorID "
                       "to a non-empty target string, as HarmBench's harmbench_targets_text.json.")
    return doc


def fallback_target(behavior: str) -> str:
    """``"Sure, here is " + behaviour`` with its first letter lower-cased."""
    text = behavior.strip()
    return "Sure, here is " + text[:1].lower() + text[1:]


def check_defender(lm, setting, partner: str | None):
    """The local model GCG differentiates: ``lm`` itself, or the local ``partner`` model.
    A :class:`DatError` for an API defender, another setting than redteam, a model without
    a torch module or one with int8 linear layers."""
    import torch

    if partner is not None and str(partner).strip().startswith("api:"):
        raise DatError(f"GCG needs the defender's gradients; an API defender has none "
                       f"({partner}). Optimise against a local model (--partner hf:MODEL) and "
                       "evaluate the suffixes on the API defender for transfer.")
    if getattr(setting, "name", None) != "redteam":
        raise DatError(f"GCG optimises a request suffix against a red-teaming defender; the "
                       f"{getattr(setting, 'name', setting)!r} setting has none (use --env redteam).")
    defender = lm
    if partner is not None:
        from dat.partners import make_partner

        defender = getattr(make_partner(partner, lm), "lm", None)
    model = getattr(defender, "model", None)
    if getattr(defender, "backend", "hf") not in ("hf", "vllm") or not isinstance(
            model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise DatError(f"GCG needs the defender's gradients: {getattr(defender, 'name', defender)!r} "
                       "is not a local transformers model (load it with the hf backend).")
    precision = getattr(defender, "precision", None)
    if precision is not None and getattr(precision, "int8_linear", False):
        raise DatError("GCG needs the defender's gradients, which int8 linear layers do not "
                       "pass: run it with --precision exact or bf16.")
    return defender


def run_gcg(lm, setting, out: str | Path, settings: GCGSettings, *, split: str = "test",
            limit: int | None = None, partner: str | None = None,
            progress: bool = True) -> Baseline:
    """Optimise one suffix per behaviour of ``split`` (the first ``limit`` ones), write the
    baseline folder ``out`` and return it."""
    from dat.models import require
    from dat.progress import progress_bar

    settings.validate()
    defender = check_defender(lm, setting, partner)
    if limit is not None and limit < 1:
        raise DatError(f"--limit must be >= 1, got {limit}.")
    require("nanogcg", "nanogcg", NANOGCG_INSTALL, "dat baseline gcg")
    import nanogcg.gcg as gcg_mod
    scenarios = setting.scenarios(split)[:limit]
    if not scenarios:
        raise DatError(f"redteam: the {split!r} split has no behaviours to attack.")
    targets = load_targets(settings.targets) if settings.targets else None
    if targets is not None:
        missing = [s.id for s in scenarios if s.id not in targets]
        if missing:
            raise DatError(f"{settings.targets}: no GCG target for BehaviorID(s) "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                           f"({len(missing)} of {len(scenarios)}); add them or leave out "
                           "--targets to use 'Sure, here is ...' targets.")
    else:
        log.warning("GCG: no targets file; each behaviour's target is 'Sure, here is <behaviour>' "
                    "(pass a HarmBench targets JSON with --targets for HarmBench's targets).")
    vocab = defender.model.get_input_embeddings().num_embeddings
    if settings.topk > vocab:
        raise DatError(f"GCG topk {settings.topk} is larger than the vocabulary ({vocab}).")
    base = {**asdict(settings), "model": lm.name, "defender": defender.name,
            "setting": setting.name}
    runner = None
    results: dict[str, dict] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("GCG", total=len(scenarios), info="")
        for scn in scenarios:
            behavior = scn.data["behavior"]
            if OPTIM in behavior:
                raise DatError(f"behaviour {scn.id!r} contains {OPTIM!r}, which nanogcg reserves.")
            target = targets[scn.id] if targets is not None else fallback_target(behavior)
            messages = _messages(setting, scn)
            store = ProgressDir(out, {**base, "target": target, "messages": messages})
            done = store.get(scn.id)
            if done is None:
                if runner is None:
                    runner = _Runner(gcg_mod, defender, settings)
                step_task = bar.add_task(f"  {scn.id}", total=settings.steps, info="")
                t0 = time.perf_counter()
                res = runner.run(messages, target, scn.id,
                                 lambda k, t=step_task: bar.update(t, completed=k,
                                                                   info=f"step {k}"))
                bar.remove_task(step_task)
                done = {"first_turn": f"{behavior} {res['suffix']}", "target": target,
                        "target_source": "targets file" if targets is not None else "fallback",
                        **res, "seconds": round(time.perf_counter() - t0, 2)}
                store.put(scn.id, done)
            results[scn.id] = done
            bar.update(task, advance=1, info=f"{scn.id}: loss {done['first_loss']:.3f} -> "
                                             f"{done['best_loss']:.3f}")
    n = len(results)
    compute = {"forward_passes": sum(r["forward_passes"] for r in results.values()) / n,
               "backward_passes": sum(r["backward_passes"] for r in results.values()) / n}
    details = {"behaviors": {sid: {k: v for k, v in r.items() if k != "first_turn"}
                             for sid, r in results.items()},
               "fallback_targets": sum(r["target_source"] == "fallback" for r in results.values()),
               "mean_best_loss": sum(r["best_loss"] for r in results.values()) / n}
    made = Baseline("gcg", setting.name, lm.name,
                    PromptPolicy(first_turns={sid: r["first_turn"] for sid, r in results.items()}),
                    "GCG", sorted(results), compute,
                    {**asdict(settings), "split": split, "limit": limit,
                     "defender": defender.name}, details)
    made.write(out)
    return made


def _messages(setting, scn) -> list[dict]:
    """The defender's view at the attacker's first turn, the suffix at ``{optim_str}``."""
    _, defender_system = setting.system_prompts(scn)
    opening = setting.opening(scn)
    messages = [{"role": "system", "content": defender_system}]
    if opening.speaker == "partner" and opening.text:
        messages.append({"role": "assistant", "content": opening.text})
    messages.append({"role": "user", "content": f"{scn.data['behavior']} {OPTIM}"})
    return messages


class _Runner:
    """One ``nanogcg.gcg.GCG`` for every behaviour (it builds its token filter once), its
    passes counted as they happen: per step one forward and one backward pass for the token
    gradient, then one forward pass per candidate left after nanogcg's retokenisation
    filter (``search_width`` at most); once per behaviour one forward pass for the loss of the
    initial suffix."""

    def __init__(self, gcg_mod, defender, settings: GCGSettings):
        import torch

        self.mod = gcg_mod
        self.settings = settings
        on_cpu = defender.model.get_input_embeddings().weight.device.type == "cpu"
        self.config = gcg_mod.GCGConfig(
            num_steps=settings.steps, search_width=settings.search_width, topk=settings.topk,
            n_replace=settings.n_replace, optim_str_init=settings.optim_str_init,
            seed=settings.seed, verbosity="WARNING", use_prefix_cache=False,
            batch_size=min(settings.search_width, CPU_BATCH) if on_cpu else None)
        logging.getLogger("nanogcg").setLevel(logging.WARNING)
        self.model = defender.model
        self.gcg = gcg_mod.GCG(defender.model, defender.tokenizer, self.config)
        self.torch = torch
        self._wrap()

    def _wrap(self) -> None:
        gcg = self.gcg
        grad, init = gcg.compute_token_gradient, gcg.init_buffer

        def counted_grad(optim_ids):  # once per step: the backward pass of the step
            self.backward += 1
            if self.backward > 1:
                self.on_step(self.backward - 1)
            return grad(optim_ids)

        def recorded_init():
            buffer = init()
            self.initial = float(buffer.get_lowest_loss())
            return buffer

        def count_rows(module, args, kwargs, output):  # every forward pass, one per row
            x = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
            x = x if x is not None else (args[0] if args else None)
            self.forward += int(x.shape[0]) if x is not None else 1

        gcg.compute_token_gradient = counted_grad
        gcg.init_buffer = recorded_init
        self.count_rows = count_rows

    def run(self, messages: list[dict], target: str, scenario_id: str, on_step) -> dict:
        torch = self.torch
        self.forward = self.backward = 0
        self.initial = None
        self.on_step = on_step
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            # nanogcg turns deterministic algorithms on for a seeded run and draws a tqdm bar
            # of its own: both are undone here (dat shows one rich bar)
            handle = self.model.register_forward_hook(self.count_rows, with_kwargs=True)
            try:
                with torch.enable_grad(), _quiet_tqdm(self.mod):
                    result = self.gcg.run(messages, target)
            finally:
                handle.remove()
            on_step(self.backward)
        except RuntimeError as exc:
            if "No token sequences are the same" in str(exc):
                raise DatError(f"GCG on {scenario_id!r}: no candidate suffix survives "
                               "retokenisation; try another optim_str_init.") from None
            raise
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        return {"suffix": result.best_string, "first_loss": self.initial,
                "best_loss": float(result.best_loss),
                "losses": [float(x) for x in result.losses], "steps_run": len(result.losses),
                "forward_passes": self.forward, "backward_passes": self.backward}


@contextlib.contextmanager
def _quiet_tqdm(gcg_mod):
    import functools

    original = gcg_mod.tqdm
    gcg_mod.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gcg_mod.tqdm = original


__all__ = ["NANOGCG_INSTALL", "GCGSettings", "check_defender", "fallback_target", "load_targets",
           "run_gcg"]
