"""The low-rank branch beside a Linear layer of any format: `LoraBranch`, attached by a forward hook.

    y = layer(x) + x A^T B^T,    A = lora_A [R, K],  B = lora_B [N, R]

A and B are the fused factors of every LoRA active on the layer: their A's concatenated along the rank and their
B's, each multiplied by strength · alpha / rank, concatenated the same way (R = the sum of their ranks), built in
float32 and rounded once to the layer's compute dtype (bf16 in the pipelines). They are rebuilt whenever the set of
LoRAs or a strength changes, so a forward call runs exactly two GEMMs whatever the number of LoRAs: x2 [T, K] @ A^T
into h [T, R], then `out.addmm_(h, B^T)`, which adds into the layer's output in place (no second pass over it).
The branch reads the layer's own input tensor as a [T, K] view (no copy). An output that is not contiguous (the
slice of a fused q/k/v output that `ditq.formats.fused` hands each part) gets the sum out of place, so the fused
output the other parts slice stays as it was. On CPUs, bf16 activations go through two numba kernels instead
(`ditq.lora._cpu_kernels`: the same two products, float32 accumulation, h kept in float32), 10-40x faster than
torch's bf16 GEMMs on CPUs without bf16 matrix units; `LoraBranch.kernel` ("auto", "torch", "numba") overrides the
choice. LoRAs at strength 0 take no rank; with none active the hook returns the layer's output untouched, so
strength 0 is the base bit for bit.

The layer is neither replaced nor renamed: the branch is its child module `lora` (so `named_parameters` lists
`<layer>.lora.lora_A` / `lora_B`, and `.to()`, offloading hooks and `state_dict` see them) and a forward hook on
the layer calls it. This works for every `ditq.formats.QuantizedLinear` and for `nn.Linear`, since only the layer's
input and output are touched. Unloading removes the hook and the child: the layer is as it was, bit for bit.

Each LoRA's own factors stay where the file put them (the host, as stored), referenced by the branch's `entries`;
only the fused pair lives on the layer's device. Apply LoRAs before enabling offloading, so its hooks see the
branch's parameters; a branch whose factors are on another device than the input is moved per call (correct,
slow).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache, partial

import numpy as np
import torch
from torch import nn

from ditq.errors import ConfigError
from ditq.lora.frames import LayerFrame
from ditq.lora.targets import LayerFactor

log = logging.getLogger(__name__)

CHILD = "lora"
# "auto": the numba CPU kernels for bf16 activations of at least NUMBA_MIN_ELEMENTS, torch otherwise
KERNELS = ("auto", "torch", "numba")
DEFAULT_KERNEL = "auto"
NUMBA_MIN_ELEMENTS = 1 << 12  # below this (a few tokens) the call overhead outweighs torch's slow bf16 GEMM


@cache
def _cpu_kernels():
    try:
        from ditq.lora import _cpu_kernels as kernels
    except ImportError as exc:  # pragma: no cover - numba is a declared dependency
        log.warning("numba LoRA kernels unavailable (%s); using torch ops on CPU", exc)
        return None
    return kernels


def _bits(t: torch.Tensor) -> np.ndarray:
    """The uint16 bit patterns of a bf16 tensor (any strides), as a numpy array sharing its memory."""
    return t.view(torch.int16).numpy().view(np.uint16)


def _numba_branch(x2: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out + (x2 aᵀ) bᵀ with the numba kernels (bf16 CPU tensors; h stays float32): into `out` itself when it is
    contiguous, else (a slice of a fused output that other parts read) into a new tensor."""
    kernels = _cpu_kernels()
    x2 = x2.contiguous()  # a view of the layer's input when it is contiguous (the usual case)
    bt = b.t() if b.t().is_contiguous() else b.t().contiguous()
    h = torch.empty(x2.shape[0], a.shape[0], dtype=torch.float32)
    kernels.down_bf16(_bits(x2), _bits(a.contiguous()), h.numpy())
    y = out.reshape(-1, out.shape[-1]) if out.is_contiguous() else _rows(out)
    dst = y if out.is_contiguous() else torch.empty(y.shape, dtype=out.dtype)
    kernels.up_bf16(h.numpy(), _bits(bt), _bits(y), _bits(dst))
    return out if dst is y else dst.view(out.shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., N] as [T, N] without a copy where the leading dims merge (a column slice of a 2-D or 3-D output)."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


@dataclass
class BranchEntry:
    """One LoRA on one layer: its factors (as stored) and its strength."""

    factor: LayerFactor
    strength: float


def layer_compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: a QuantizedLinear's `compute_dtype`, an nn.Linear's weight dtype."""
    dtype = getattr(layer, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return torch.bfloat16


def _layer_device(layer: nn.Module) -> torch.device:
    """Where the layer's own tensors are; the host for a layer whose weights are offloaded to `meta` (sequential
    offloading loads them per call; the branch then follows its input, see `forward`)."""
    for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)):
        return t.device if t.device.type != "meta" else torch.device("cpu")
    return torch.device("cpu")


class LoraBranch(nn.Module):
    """The fused low-rank update of one layer (see the module docstring): `lora_A` [R, K], `lora_B` [N, R] (stored
    as the transpose of a contiguous [R, N]), both None while no LoRA is active; `entries` maps LoRA names to their
    factors and strengths; `kernel` is one of KERNELS."""

    def __init__(self, layer: nn.Module, frame: LayerFrame | None = None) -> None:
        """A branch for `layer` (read for its in/out features only; the layer is not referenced)."""
        super().__init__()
        self.in_features, self.out_features = int(layer.in_features), int(layer.out_features)
        self.entries: dict[str, BranchEntry] = {}
        self.frame = frame
        self.kernel = DEFAULT_KERNEL
        self._handle = None
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)

    @property
    def rank(self) -> int:
        """R: the summed rank of the active LoRAs (0 when none is)."""
        return 0 if self.lora_A is None else int(self.lora_A.shape[0])

    def rebuild(self, layer: nn.Module) -> None:
        """Fuse the active entries into `lora_A` / `lora_B` on `layer`'s device, in its compute dtype."""
        active = [e for e in self.entries.values() if e.strength != 0.0]
        if not active:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
            return
        device, dtype = _layer_device(layer), layer_compute_dtype(layer)
        frame = self.frame or LayerFrame()
        downs, ups = [], []
        for e in active:
            down = e.factor.down.to(device=device, dtype=torch.float32)
            up = e.factor.up.to(device=device, dtype=torch.float32) * (e.strength * e.factor.scale)
            if frame.input_scale is not None:
                down = down * frame.input_scale.to(device)[None, :]
            if frame.output_scale is not None:
                up = up / frame.output_scale.to(device)[:, None]
            downs.append(down)
            ups.append(up)
        a = torch.cat(downs, dim=0).to(dtype).contiguous()
        # B [N, R] is kept as the transpose of a contiguous Bᵀ [R, N]: the layout the up-projection streams
        bt = torch.cat(ups, dim=1).to(dtype).t().contiguous()
        self.lora_A = nn.Parameter(a, requires_grad=False)
        self.lora_B = nn.Parameter(bt.t(), requires_grad=False)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` [..., N] (the layer's output for `x` [..., K]) plus x A^T B^T, added in place when allowed."""
        a, b = self.lora_A, self.lora_B
        if a is None:
            return out
        if a.device != x.device:
            a, b = a.to(x.device), b.to(x.device)
        x2 = x.reshape(-1, self.in_features)
        grad = torch.is_grad_enabled() and (out.requires_grad or x.requires_grad or a.requires_grad)
        if not grad and self._numba_takes(x2, out, a):
            return _numba_branch(x2, out, a, b)
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        h = torch.mm(x2, a.t())
        if out.dtype != h.dtype:
            return out + torch.mm(h, b.t()).view(out.shape).to(out.dtype)
        if out.is_contiguous() and not grad:
            out.view(-1, self.out_features).addmm_(h, b.t())
            return out
        # the same arithmetic out of place, so that autograd can record it
        return torch.addmm(out.reshape(-1, self.out_features), h, b.t()).view(out.shape)

    def _numba_takes(self, x2: torch.Tensor, out: torch.Tensor, a: torch.Tensor) -> bool:
        if self.kernel == "torch" or x2.device.type != "cpu" or out.dim() == 0:
            return False
        if not (x2.dtype == out.dtype == a.dtype == torch.bfloat16):
            return False
        if self.kernel == "auto" and x2.numel() < NUMBA_MIN_ELEMENTS:
            return False
        return _cpu_kernels() is not None

    def extra_repr(self) -> str:
        loras = ", ".join(f"{n}@{e.strength:g}" for n, e in self.entries.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"kernel={self.kernel}, [{loras}]"
        )


def _run_branch(branch: LoraBranch, module: nn.Module, args, kwargs, output):
    x = args[0] if args else next(iter(kwargs.values()))
    return branch(x, output)


def branch_of(layer: nn.Module) -> LoraBranch | None:
    child = layer._modules.get(CHILD)
    return child if isinstance(child, LoraBranch) else None


def attach(layer: nn.Module, frame: LayerFrame | None = None) -> LoraBranch:
    """The layer's branch, created (child `lora` + forward hook) when it has none."""
    branch = branch_of(layer)
    if branch is not None:
        if frame is not None:
            branch.frame = frame
        return branch
    if hasattr(layer, CHILD):
        raise ConfigError(
            f"{type(layer).__name__} already has an attribute {CHILD!r}; cannot attach a LoRA branch"
        )
    branch = LoraBranch(layer, frame)
    layer.add_module(CHILD, branch)
    branch._handle = layer.register_forward_hook(partial(_run_branch, branch), with_kwargs=True)
    return branch


def detach(layer: nn.Module) -> None:
    """Remove the layer's branch and its hook (no-op without one)."""
    branch = branch_of(layer)
    if branch is None:
        return
    if branch._handle is not None:
        branch._handle.remove()
        branch._handle = None
    del layer._modules[CHILD]
