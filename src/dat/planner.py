"""The planner (actor) and the up-mapping from actions to action-token embeddings.

``Planner``: z-normalised state -> MLP ``hidden -> hidden -> hidden -> d'`` (SiLU) -> action
rescaled to L2 norm ``act_norm``.

``UpMapping``: action ``d'`` -> ``L`` embeddings of size ``hidden``. Either learned
(``Linear(d', L*hidden)``, trained by self-cloning) or fixed from the top ``d'`` principal
components of the model's input-embedding matrix (one vector repeated ``L`` times).

Both save as ``config.json`` + ``model.safetensors`` (``save_pretrained``/``from_pretrained``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dat.errors import DatError
from dat.fileio import atomic_write, atomic_write_text

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
    scale: float = 1.0  # pca: embedding norm per unit of action norm
    dat_version: str = ""


class _Pretrained(nn.Module):
    """save_pretrained / from_pretrained with safetensors + config.json (no pickle)."""

    config_class: type

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from dat import __version__

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
            raw = json.loads(cfg_path.read_text())
            config = cls.config_class(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise DatError(f"{cfg_path}: not a valid {cls.__name__} config ({exc}).") from exc
        if hidden_size is not None and hasattr(hidden_size, "hidden_size"):
            hidden_size = hidden_size.hidden_size
        if hidden_size is not None and int(hidden_size) != config.hidden_size:
            raise DatError(
                f"{cls.__name__} in {d} was made for hidden size {config.hidden_size} "
                f"(base model {config.base_model!r}), but the language model has hidden size "
                f"{hidden_size}. Train or clone a planner for this model."
            )
        module = cls(config)
        state = load_file(str(d / WEIGHTS_NAME))
        missing, unexpected = module.load_state_dict(state, strict=False)
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
                  act_norm: float = 1.0, seed: int | None = 0) -> "Planner":
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
        if config.kind == "learned":
            self.linear = nn.Linear(d, L * h)
        elif config.kind == "pca":
            self.register_buffer("components", torch.zeros(d, h))  # orthonormal rows
        else:
            raise DatError(f"UpMapping kind must be 'learned' or 'pca', got {config.kind!r}.")

    @classmethod
    def learned(cls, lm, action_dim: int = 64, n_tokens: int = 2, act_norm: float = 1.0,
                seed: int | None = 0) -> "UpMapping":
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
                           seed: int = 0, chunk_rows: int = 16384) -> "UpMapping":
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


def _typical_norm(weight: torch.Tensor, sample: int = 65536) -> float:
    rows = weight if weight.shape[0] <= sample else weight[:: max(1, weight.shape[0] // sample)]
    return float(rows.float().norm(dim=-1).median())


def load_agent(directory: str | os.PathLike, lm=None, device: str | torch.device = "cpu"):
    """Load ``(planner, up_mapping)`` from a folder written by ``save_agent``."""
    hidden = lm.hidden_size if lm is not None else None
    d = Path(directory)
    planner = Planner.from_pretrained(d, hidden_size=hidden, device=device)
    up = UpMapping.from_pretrained(d / UP_MAPPING_DIR, hidden_size=hidden, device=device)
    if up.config.action_dim != planner.config.action_dim or up.config.n_tokens != planner.config.n_tokens:
        raise DatError(f"{d}: planner and up-mapping disagree on action size or number of tokens.")
    return planner, up


def save_agent(directory: str | os.PathLike, planner: Planner, up_mapping: UpMapping) -> Path:
    """Save a planner with its up-mapping in ``directory/`` and ``directory/up_mapping/``."""
    d = planner.save_pretrained(directory)
    up_mapping.save_pretrained(d / UP_MAPPING_DIR)
    return d
