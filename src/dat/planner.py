"""The planner (actor) and the up-mapping from actions to action-token embeddings.

``Planner``: z-normalised state -> MLP ``hidden -> hidden -> hidden -> d'`` (SiLU) -> action
rescaled to L2 norm ``act_norm``.

``UpMapping``: action ``d'`` -> ``L`` embeddings of size ``hidden``. Either learned
(``Linear(d', L*hidden)``, trained by self-cloning) or fixed from the top ``d'`` principal
components of the model's input-embedding matrix (one vector repeated ``L`` times).
With ``target="residual"`` it makes one vector (``L = 1``) that is added to the residual
stream after decoder layer ``layer`` (:class:`dat.steer.ResidualAt`); its fixed form uses the
top principal components of that layer's activations, scaled so that an action of norm
``act_norm`` becomes a vector of ``relative_scale`` times the layer's median residual norm.

Both save as ``config.json`` + ``model.safetensors`` (``save_pretrained``/``from_pretrained``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dat.errors import DatError
from dat.fileio import atomic_write, atomic_write_text
from dat.steer import ResidualAt

ACTION_KINDS = ("tokens", "residual")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
UP_MAPPING_DIR = "up_mapping"


def normalize_action(a: torch.Tensor, act_norm: float, eps: float = 1e-8) -> torch.Tensor:
    """Rescale each action (last dim) to L2 norm ``act_norm``."""
    return a * (act_norm / a.norm(dim=-1, keepdim=True).clamp_min(eps))


@dataclass
class PlannerConfig:
    hidden_size: int
    action_dim: int = 64
    n_tokens: int = 2
    position: str = "prefix"
    act_norm: float = 1.0
    base_model: str = "default"
    state_norm: dict = field(default_factory=dict)  # where the mean/std came from, and their size
    dat_version: str = ""


@dataclass
class UpMappingConfig:
    hidden_size: int
    action_dim: int = 64
    n_tokens: int = 2
    kind: str = "learned"  # "learned" | "pca"
    act_norm: float = 1.0
    base_model: str = "default"
    scale: float = 1.0  # pca: output norm per unit of action norm
    dat_version: str = ""
    target: str = "tokens"  # "tokens" (input-embedding action tokens) | "residual"
    layer: int | None = None  # residual: the decoder layer whose output gets the vector
    residual_positions: str = "reply"  # residual: "reply" | "all" (dat.steer.ResidualAt)
    relative_scale: float | None = None  # residual: vector norm / median residual norm
    residual_norm: float | None = None  # residual: median residual norm measured at the layer
    basis: str = "pca"  # fixed up-mappings: "pca" (top components) | "random" (seeded orthonormal)


class _Pretrained(nn.Module):
    """save_pretrained / from_pretrained with safetensors + config.json (no pickle)."""

    config_class: type

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from dat.version import __version__

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.dat_version = __version__
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write_text(out / CONFIG_NAME, json.dumps(asdict(self.config), indent=2))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, hidden_size: int | None = None,
                        device: str | torch.device = "cpu"):
        """Load from ``directory``. With ``hidden_size`` (or an LM's), check it matches."""
        d = Path(directory)
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file() or not (d / WEIGHTS_NAME).is_file():
            raise DatError(f"{d} is not a saved {cls.__name__}: expected {CONFIG_NAME} and {WEIGHTS_NAME}.")
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
            config = cls.config_class(**raw)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise DatError(f"{cfg_path}: not a valid {cls.__name__} config ({exc}).") from None
        if hidden_size is not None and hasattr(hidden_size, "hidden_size"):
            hidden_size = hidden_size.hidden_size
        if hidden_size is not None and int(hidden_size) != config.hidden_size:
            raise DatError(
                f"{cls.__name__} in {d} was made for hidden size {config.hidden_size} "
                f"(base model {config.base_model!r}), but the language model has hidden size "
                f"{hidden_size}. Train or clone a planner for this model."
            )
        module = cls(config)
        try:
            state = load_file(str(d / WEIGHTS_NAME))
        except (SafetensorError, OSError) as exc:
            raise DatError(f"{d / WEIGHTS_NAME}: unreadable weights ({exc}); the file is corrupt "
                           "or truncated.") from None
        bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
        if bad:
            raise DatError(f"{d / WEIGHTS_NAME}: non-finite (NaN or inf) values in {bad}; these "
                           "weights cannot steer anything.")
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise DatError(f"{d / WEIGHTS_NAME}: does not fit its {CONFIG_NAME} "
                           f"({str(exc).splitlines()[-1].strip()}).") from None
        if missing or unexpected:
            raise DatError(f"{d / WEIGHTS_NAME}: missing tensors {missing}, unexpected {unexpected}.")
        return module.to(device)


class Planner(_Pretrained):
    """Actor: state ``[B, hidden]`` -> action ``[B, d']`` of norm ``act_norm``."""

    config_class = PlannerConfig

    def __init__(self, config: PlannerConfig):
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.action_dim
        self.net = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, d))
        self.register_buffer("state_mean", torch.zeros(h))
        self.register_buffer("state_std", torch.ones(h))

    @classmethod
    def for_model(cls, lm, action_dim: int = 64, n_tokens: int = 2, position: str = "prefix",
                  act_norm: float = 1.0, seed: int | None = 0) -> Planner:
        if seed is not None:
            torch.manual_seed(seed)
        return cls(PlannerConfig(lm.hidden_size, action_dim, n_tokens, position, act_norm, lm.name))

    def set_state_norm(self, mean: torch.Tensor, std: torch.Tensor, source: str = "", count: int = 0,
                       eps: float = 1e-3) -> None:
        self.state_mean.copy_(mean.float())
        self.state_std.copy_(std.float().clamp_min(eps))
        self.config.state_norm = {"source": source, "count": int(count), "eps": eps}

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        return (state.float() - self.state_mean) / self.state_std

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        a = self.net(self.normalize_state(state.to(self.state_mean.device)))
        return normalize_action(a, self.config.act_norm)


class UpMapping(_Pretrained):
    """Action ``[B, d']`` -> action-token embeddings ``[B, L, hidden]``."""

    config_class = UpMappingConfig

    def __init__(self, config: UpMappingConfig):
        super().__init__()
        self.config = config
        h, d, L = config.hidden_size, config.action_dim, config.n_tokens
        if config.target not in ACTION_KINDS:
            raise DatError(f"UpMapping target must be one of {ACTION_KINDS}, got {config.target!r}.")
        if config.target == "residual":
            if L != 1:
                raise DatError(f"a residual up-mapping makes one vector (n_tokens = 1), got {L}.")
            ResidualAt(int(config.layer), config.residual_positions)  # validates both
        if config.kind == "learned":
            self.linear = nn.Linear(d, L * h)
        elif config.kind == "pca":
            self.register_buffer("components", torch.zeros(d, h))  # orthonormal rows
        else:
            raise DatError(f"UpMapping kind must be 'learned' or 'pca', got {config.kind!r}.")

    @classmethod
    def learned(cls, lm, action_dim: int = 64, n_tokens: int = 2, act_norm: float = 1.0,
                seed: int | None = 0) -> UpMapping:
        if seed is not None:
            torch.manual_seed(seed)
        m = cls(UpMappingConfig(lm.hidden_size, action_dim, n_tokens, "learned", act_norm, lm.name))
        # Start at the scale of real token embeddings so early actions are neither lost nor huge.
        with torch.no_grad():
            typical = _typical_norm(lm.model.get_input_embeddings().weight)
            m.linear.weight.normal_(0.0, typical / (act_norm * lm.hidden_size ** 0.5))
            m.linear.bias.zero_()
        return m

    @classmethod
    def from_embedding_pca(cls, lm, action_dim: int = 64, n_tokens: int = 2, act_norm: float = 1.0,
                           seed: int = 0, chunk_rows: int = 16384) -> UpMapping:
        """Top ``action_dim`` principal components of the input-embedding matrix.

        Randomised low-rank PCA: it never forms the covariance matrix or a dense copy of
        more than the embedding matrix itself, so a 128k x 4096 matrix needs a few GiB.
        The scale makes an action of norm ``act_norm`` an embedding of the median norm
        of real token embeddings.
        """
        weight = lm.model.get_input_embeddings().weight.detach()
        components = embedding_pca(weight, action_dim, seed=seed, chunk_rows=chunk_rows)
        typical = _typical_norm(weight)
        cfg = UpMappingConfig(lm.hidden_size, action_dim, n_tokens, "pca", act_norm, lm.name,
                              scale=typical / act_norm)
        m = cls(cfg)
        m.components.copy_(components)
        return m

    @classmethod
    def residual_learned(cls, lm, layer: int, action_dim: int = 64, act_norm: float = 1.0,
                         relative_scale: float = 0.15, positions: str = "reply",
                         dialogues=None, seed: int | None = 0) -> UpMapping:
        """A learned residual up-mapping (for self-cloning), initialised to output vectors of
        about ``relative_scale`` times the layer's median residual norm."""
        norm = residual_norm(lm, layer, dialogues)
        if seed is not None:
            torch.manual_seed(seed)
        m = cls(_residual_config(lm, "learned", layer, action_dim, act_norm, relative_scale,
                                 positions, norm))
        with torch.no_grad():
            m.linear.weight.normal_(0.0, relative_scale * norm / (act_norm * action_dim ** 0.5))
            m.linear.bias.zero_()
        return m

    @classmethod
    def from_residual_pca(cls, lm, layer: int, dialogues, action_dim: int = 64,
                          act_norm: float = 1.0, relative_scale: float = 0.15,
                          positions: str = "reply", basis: str = "pca",
                          seed: int = 0) -> UpMapping:
        """Top ``action_dim`` principal components of layer ``layer``'s outputs over the prompts
        ``dialogues`` (each prompt's first token, an attention sink of outsized norm, left out).
        ``basis="random"``: a seeded random orthonormal basis of the whole hidden space
        instead (the residual norm is still measured on ``dialogues``)."""
        acts = residual_activations(lm, layer, dialogues)
        if action_dim > acts.shape[1]:
            raise DatError(f"a residual PCA of {action_dim} components needs hidden size >= "
                           f"{action_dim}; {lm.name} has {acts.shape[1]}.")
        if action_dim > acts.shape[0]:
            raise DatError(f"a residual PCA of {action_dim} components needs at least {action_dim} "
                           f"activation vectors; the {len(dialogues)} prompts gave {acts.shape[0]}.")
        norm = float(acts.norm(dim=-1).median())
        m = cls(_residual_config(lm, "pca", layer, action_dim, act_norm, relative_scale,
                                 positions, norm))
        if basis == "random":
            g = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(acts.shape[1], action_dim, generator=g))
            m.components.copy_(q.T.contiguous())
        elif basis == "pca":
            m.components.copy_(embedding_pca(acts, action_dim))
        else:
            raise DatError(f"basis must be 'pca' or 'random', got {basis!r}.")
        m.config.basis = basis
        return m

    @property
    def kind(self) -> str:
        """How the action is applied: "tokens" or "residual"."""
        return self.config.target

    @property
    def residual_at(self) -> ResidualAt | None:
        c = self.config
        return ResidualAt(int(c.layer), c.residual_positions) if c.target == "residual" else None

    def forward(self, action: torch.Tensor) -> torch.Tensor:
        c = self.config
        if action.shape[-1] != c.action_dim:
            raise DatError(f"UpMapping expects actions of size {c.action_dim}, got {list(action.shape)}.")
        if c.kind == "learned":
            return self.linear(action).view(*action.shape[:-1], c.n_tokens, c.hidden_size)
        one = (action.to(self.components.dtype) @ self.components) * c.scale
        return one.unsqueeze(-2).expand(*one.shape[:-1], c.n_tokens, c.hidden_size)


def embedding_pca(weight: torch.Tensor, k: int, seed: int = 0, oversample: int = 16, niter: int = 4,
                  chunk_rows: int = 16384) -> torch.Tensor:
    """Top-``k`` principal directions ``[k, hidden]`` (orthonormal rows) of ``weight``'s rows.

    Randomised range finder with power iterations (Halko et al.), centring applied implicitly
    and the rows streamed in float32 chunks, so memory stays at the matrix plus
    ``rows x (k + oversample)``. Signs are fixed for reproducibility.
    """
    V, H = weight.shape
    q = min(k + oversample, H)
    if k > H:
        raise DatError(f"Cannot take {k} principal components of {H}-dimensional embeddings.")
    mean = torch.zeros(H, dtype=torch.float64)
    for lo in range(0, V, chunk_rows):
        mean += weight[lo:lo + chunk_rows].double().sum(0).cpu()
    mean = (mean / V).float()

    def times(mat: torch.Tensor) -> torch.Tensor:  # (W - mean) @ mat : [V, q]
        return torch.cat([(weight[lo:lo + chunk_rows].float().cpu() - mean) @ mat
                          for lo in range(0, V, chunk_rows)])

    def t_times(mat: torch.Tensor) -> torch.Tensor:  # (W - mean)^T @ mat : [H, q]
        acc = torch.zeros(H, mat.shape[1])
        for lo in range(0, V, chunk_rows):
            acc += (weight[lo:lo + chunk_rows].float().cpu() - mean).T @ mat[lo:lo + chunk_rows]
        return acc

    gen = torch.Generator().manual_seed(seed)
    Y = times(torch.randn(H, q, generator=gen))
    Q, _ = torch.linalg.qr(Y)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(t_times(Q))
        Q, _ = torch.linalg.qr(times(Z))
    B = t_times(Q).T  # [q, H] = Q^T (W - mean)
    _, _, Vh = torch.linalg.svd(B, full_matrices=False)
    comps = Vh[:k]
    flip = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return (comps * flip).contiguous()


def _residual_config(lm, kind, layer, action_dim, act_norm, relative_scale, positions, norm):
    if not (math.isfinite(relative_scale) and relative_scale > 0):
        raise DatError(f"residual scale must be a finite number > 0, got {relative_scale!r}.")
    lm.check_position(ResidualAt(layer, positions))
    return UpMappingConfig(lm.hidden_size, action_dim, 1, kind, act_norm, lm.name,
                           scale=relative_scale * norm / act_norm, target="residual", layer=layer,
                           residual_positions=positions, relative_scale=relative_scale,
                           residual_norm=norm)


@torch.no_grad()
def residual_activations(lm, layer: int, dialogues, batch_size: int = 16) -> torch.Tensor:
    """Outputs ``[N, hidden]`` (float32, CPU) of decoder layer ``layer`` at every token of the
    templated prompts ``dialogues`` except each prompt's first."""
    lm.check_position(ResidualAt(layer))
    if not dialogues:
        raise DatError("residual statistics need at least one prompt.")
    rows = []
    for lo in range(0, len(dialogues), batch_size):
        ids = [lm.encode(d) for d in dialogues[lo:lo + batch_size]]
        b = lm.make_batch(ids)
        out = lm.model.base_model(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask,
                                  position_ids=b.position_ids, output_hidden_states=True)
        h = out.hidden_states[layer + 1]
        for i, x in enumerate(ids):
            rows.append(h[i, h.shape[1] - len(x) + 1:].float().cpu())
    return torch.cat(rows)


def residual_norm(lm, layer: int, dialogues=None) -> float:
    """Median L2 norm of layer ``layer``'s outputs (over ``dialogues``, or a generic chat)."""
    dialogues = dialogues or [[{"role": "system", "content": "You are a helpful assistant."},
                               {"role": "user", "content": "Hi! How has your day been so far?"}]]
    return float(residual_activations(lm, layer, dialogues).norm(dim=-1).median())


def _typical_norm(weight: torch.Tensor, sample: int = 65536) -> float:
    rows = weight if weight.shape[0] <= sample else weight[:: max(1, weight.shape[0] // sample)]
    return float(rows.float().norm(dim=-1).median())
