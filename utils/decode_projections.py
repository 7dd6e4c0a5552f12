"""A decoder layer's linear projections, grouped by the input they read (q/k/v, o, gate/up, down), run by the
static decoder (utils/decoder.py) in as few kernels as their kind allows.

peft's LoRA layer spends ~8 small kernels a projection at batch 1 (casts to the adapter's fp32, A, B, the scale,
the sum), which halved the speed of chatting with a QLoRA adapter on its 4-bit base. Here, per group:
- the adapters (one plain LoRA adapter per projection, as finetune.py trains them) become two GEMVs: x A^T over
  the group's A matrices stacked, then times the group's B matrices, scaled, as one block-diagonal matrix;
- plain 16-bit bases without bias: one GEMV over their weights concatenated (the modules keep views into it),
  with the adapters' term as its bias when decoding one token;
- bitsandbytes 4-bit bases on a GPU: bitsandbytes' kernel per projection, with the adapter's term as its bias;
- other bases (8-bit, the CPU's 4-bit, a bias of their own): the base module, plus the adapter's term.
A group whose adapter does more than x A^T B^T s (DoRA, a LoRA bias, several adapters, active dropout) runs its
modules as they are. The adapter copies are made in the model's dtype; `stale()` notices when the adapter has
changed since (trained further, disabled, merged, swapped), so the decoder rebuilds them.
"""

import itertools

import torch
import torch.nn.functional as F


def lora_parts(module):
    """(A weight, B weight, scale) of a peft LoRA layer's active adapter, as its forward applies it in eval mode;
    None where the module adds nothing to its base (not a LoRA layer, adapters disabled or merged); False where its
    forward does something else too."""
    if not (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")):
        return None
    if module.disable_adapters or module.merged:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return None
    if len(active) > 1 or getattr(module, "fan_in_fan_out", False):
        return False
    name = active[0]
    for extra in ("use_dora", "lora_bias", "lora_variant"):
        if getattr(module, extra, {}).get(name):
            return False
    dropout = module.lora_dropout[name] if name in getattr(module, "lora_dropout", {}) else None
    if dropout is not None and dropout.training and getattr(dropout, "p", 0) > 0:
        return False
    a, b = module.lora_A[name], module.lora_B[name]
    if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)) or a.bias is not None \
            or b.bias is not None:
        return False
    return a.weight, b.weight, module.scaling[name]


def _base(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _is_4bit(base, dtype):
    """A bitsandbytes 4-bit layer whose kernel can take the adapter's term as its bias."""
    weight = getattr(base, "weight", None)
    return type(base).__name__ == "Linear4bit" and base.bias is None and weight is not None \
        and weight.device.type == "cuda" and getattr(weight, "quant_state", None) is not None \
        and getattr(base, "compute_dtype", None) == dtype


class Projections:
    """Callable: h (1, n, in) -> the group's outputs, one (1, n, out) tensor per module."""

    def __init__(self, modules, dtype, fuse_bases):
        self.modules, self.dtype = list(modules), dtype
        self.bases = [_base(m) for m in self.modules]
        self.sizes = [b.out_features for b in self.bases]
        self.ends = list(itertools.accumulate(self.sizes, initial=0))
        parts = [lora_parts(m) for m in self.modules]
        self.as_modules = any(p is False for p in parts)
        self.signature = self._signature()
        self.A = self.B = self.weight = None
        self.adapted = [bool(p) for p in parts]
        if self.as_modules:
            return
        if any(self.adapted):
            self._build_adapters(parts)
        if fuse_bases and all(type(b) is torch.nn.Linear and b.bias is None and b.weight.dtype == dtype
                              for b in self.bases):
            with torch.no_grad():
                self.weight = torch.cat([b.weight for b in self.bases])
                for b, part in zip(self.bases, self.weight.split(self.sizes)):
                    b.weight = torch.nn.Parameter(part, requires_grad=False)
        self.four_bit = [_is_4bit(b, dtype) for b in self.bases]
        if any(self.four_bit):
            from bitsandbytes import matmul_4bit
            self.matmul_4bit = matmul_4bit

    def _build_adapters(self, parts):
        """A: the adapters' A matrices stacked (sum of ranks, in); B: their B matrices times their scales, block
        diagonal (sum of outputs, sum of ranks); rows of projections without an adapter are zero."""
        present = [p for p in parts if p]
        ranks = [a.shape[0] for a, _, _ in present]
        device = present[0][0].device
        with torch.no_grad():
            A = torch.cat([a.to(self.dtype) for a, _, _ in present])
            B = torch.zeros(self.ends[-1], sum(ranks), dtype=self.dtype, device=device)
            col = 0
            for j, p in enumerate(parts):
                if p:
                    _, b, scale = p
                    B[self.ends[j]:self.ends[j + 1], col:col + b.shape[1]] = (b.float() * scale).to(self.dtype)
                    col += b.shape[1]
        if self.A is not None and self.A.shape == A.shape and self.B.shape == B.shape:
            self.A.copy_(A)  # in place: CUDA graphs captured with these buffers stay valid
            self.B.copy_(B)
        else:
            self.A, self.B = A, B

    def _signature(self):
        """What the adapter copies depend on: which adapter is active and how, and its weights' versions."""
        out = []
        for m in self.modules:
            p = lora_parts(m)
            if p is None or p is False:
                out.append(p)
            else:
                a, b, scale = p
                out.append((tuple(m.active_adapters), id(a), a.data_ptr(), a._version, id(b), b.data_ptr(),
                            b._version, scale))
        return tuple(out)

    def stale(self):
        return self._signature() != self.signature

    def refresh(self):
        """Remake the adapter copies after stale(). True: in place, so CUDA graphs captured with them stay valid;
        False: they changed shape or went away (the decoder drops its graphs); None: the group changed kind (an
        adapter the stacked path does not cover came or went), so the decoder makes a new Projections."""
        parts = [lora_parts(m) for m in self.modules]
        if any(p is False for p in parts) != self.as_modules:
            return None
        before = None if self.A is None else (self.A.shape, self.B.shape)
        if not self.as_modules:
            self.adapted = [bool(p) for p in parts]
            if any(self.adapted):
                self._build_adapters(parts)
            else:
                self.A = self.B = None
        self.signature = self._signature()
        return before == (None if self.A is None else (self.A.shape, self.B.shape))

    def __call__(self, h):
        if self.as_modules:
            return [m(h) for m in self.modules]
        one = h.shape[1] == 1
        term = F.linear(F.linear(h, self.A), self.B) if self.A is not None else None
        if self.weight is not None:
            if term is None:
                y = F.linear(h, self.weight)
            elif one:
                y = F.linear(h, self.weight, term.view(-1))
            else:
                y = F.linear(h, self.weight) + term
            return list(y.split(self.sizes, dim=-1))
        outs = []
        for j, base in enumerate(self.bases):
            part = term[..., self.ends[j]:self.ends[j + 1]] if term is not None and self.adapted[j] else None
            if part is not None and one and self.four_bit[j]:
                outs.append(self.matmul_4bit(h, base.weight, bias=part.reshape(-1),
                                             quant_state=base.weight.quant_state))
            else:
                y = base(h)
                outs.append(y if part is None else y + part)
        return outs
