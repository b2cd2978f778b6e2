"""Faster CPU kernels for a bf16 model, chosen by ``--precision fast`` (:mod:`dat.precision`).

* :class:`PackedLinear`: a plain bf16 ``F.linear`` hands oneDNN a weight in PyTorch's layout,
  which oneDNN reorders into its blocked layout on every call. Decoding a small model runs
  hundreds of such calls per token, so the weights are reordered once, at load time
  (``torch.ops.mkldnn._reorder_linear_weight``, the kernels ``torch.compile`` uses for frozen
  CPU models).
* :class:`SharedInputLinear`: sibling projections that read the same input (``q_proj``,
  ``k_proj``, ``v_proj``; ``gate_proj``, ``up_proj``) run as one product on their stacked
  weights, which halves the number of small products per layer. A group is stacked only
  where the stacked product gives each projection's own output bit for bit.

Nothing here changes the state dict: the modules keep their ``weight`` and ``bias``.
"""

from __future__ import annotations

import torch

PACK_ROWS_HINT = 32  # oneDNN picks the blocked layout for this many input rows: a decoding batch


def can_pack() -> bool:
    """Whether this torch build has oneDNN's prepacked linear kernels (x86 CPU builds do)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


_LINEAR = torch.ops.mkldnn._linear_pointwise.default if can_pack() else None


def packed_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` on a weight reordered by ``_reorder_linear_weight``; the kernel
    takes any leading dims of ``x``, densely laid out."""
    return _LINEAR(x.contiguous(), weight, bias, "none", [], "")


class InferenceLinear(torch.nn.Linear):
    """An ``nn.Linear`` holding another one's parameters, whose inference forward is
    :meth:`inference`. A forward that needs gradients (``dat clone`` through the actions) takes
    the plain ``F.linear``, so ``isinstance`` checks and gradients are unchanged."""

    @classmethod
    def adopt(cls, linear: torch.nn.Linear):
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        return self.inference(x)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PackedLinear(InferenceLinear):
    """A bf16 linear layer run by oneDNN on a weight reordered once."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> PackedLinear:
        packed = cls.adopt(linear)
        packed.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach(), PACK_ROWS_HINT), persistent=False)
        packed.packed_bias = None if linear.bias is None else linear.bias.detach()
        return packed

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        return packed_product(x, self.packed_weight, self.packed_bias)


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class StackedProduct:
    """The one product of a group of sibling projections. Its result is kept for the input it
    was run on until every sibling has taken its slice, then dropped (a prefill's result is
    large). Each entry is one tuple, replaced whole, so concurrent callers never mix inputs."""

    def __init__(self, linears: list[torch.nn.Linear]):
        weight = torch.cat([m.weight.detach() for m in linears])
        biases = [m.bias for m in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
        self.widths = [m.out_features for m in linears]
        self.entry: tuple | None = None  # (input, its version, slices, indices not yet taken)

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor:
        entry = self.entry
        if entry is None or entry[0] is not x or entry[1] != x._version or index not in entry[3]:
            y = packed_product(x, self.weight, self.bias)
            entry = (x, x._version, y.split(self.widths, dim=-1), frozenset(range(len(self.widths))))
        left = entry[3] - {index}
        self.entry = (*entry[:3], left) if left else None
        return entry[2][index]


class SharedInputLinear(InferenceLinear):
    """One of a group of sibling projections computed by a shared :class:`StackedProduct`."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, product: StackedProduct, index: int
                    ) -> SharedInputLinear:
        shared = cls.adopt(linear)
        shared.product, shared.index = product, index
        return shared

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        return self.product.take(x, self.index)


def _stack_siblings(parent: torch.nn.Module) -> int:
    """Replace ``parent``'s sibling bf16 projections by :class:`SharedInputLinear` (where the
    stacked product gives each one's own output bit for bit); how many it replaced."""
    done = 0
    for names in SIBLINGS:
        linears = [getattr(parent, n, None) for n in names]
        if not all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears):
            continue
        if len({m.in_features for m in linears}) > 1 or len({m.bias is None for m in linears}) > 1:
            continue
        product = StackedProduct(linears)
        probe = torch.randn(4, 3, linears[0].in_features,
                            generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        with torch.no_grad():
            if not all(torch.equal(m(probe), product.take(probe, i)) for i, m in enumerate(linears)):
                continue
        for i, (name, m) in enumerate(zip(names, linears)):
            setattr(parent, name, SharedInputLinear.from_linear(m, product, i))
        done += len(names)
    return done


def use_cpu_kernels(model: torch.nn.Module) -> list[str]:
    """Replace, in place, ``model``'s bf16 sibling projections by :class:`SharedInputLinear`
    and its other bf16 linear layers by :class:`PackedLinear`. Returns what it did."""
    linears = stacked = 0
    for parent in list(model.modules()):
        stacked += _stack_siblings(parent)
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, PackedLinear.from_linear(child))
                linears += 1
    return [f"{linears} prepacked linear layers",
            f"{stacked} projections stacked with their siblings"]
