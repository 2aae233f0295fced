"""LoRA adapters for a FluxPipeline: reading and checking adapter files, and serving them without recompiling.

Files are read with safetensors (never pickle) and converted by diffusers' own FLUX loader, so every format
`load_lora_weights` reads for FLUX is accepted (diffusers/PEFT keys, kohya/BFL keys, ...). Before a file
touches the pipeline it is checked against the transformer: every key must name a Linear of the transformer,
shapes must match, the rank must be at most the worker's limit, and the values must be finite.

Serving uses fixed *slots* (one per adapter a request may carry), created once at load with diffusers'
LoRA hot-swap (`enable_lora_hotswap(target_rank=max_rank)`): every slot covers every Linear of the
transformer at the maximum rank, its scaling is a tensor, and a request's adapters are copied into the
slots (`load_lora_weights(..., hotswap=True)`). Switching adapters therefore changes tensor values only:
modules, ranks and active adapter names never change, so a compiled transformer never recompiles. The
request's scale is multiplied into lora_B (so scale 0 contributes exact zeros), and a request without
adapters runs with the LoRA layers disabled: no LoRA math, the base image byte for byte.

Converted adapters are kept on the device in an LRU (`cache_size` adapters), so a popular adapter costs a
device-to-device copy after its first use.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
SUFFIX = ".safetensors"
LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_KEYS = 20_000  # FLUX.1 has ~500 Linears; a header with more keys is not a FLUX LoRA


class LoraError(ValueError):
    """An adapter that cannot be served; `field` names the request field, `status` the HTTP class."""

    def __init__(self, message: str, field: str | None = None, status: int = 422):
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


class LoraSlotLost(RuntimeError):
    """A hot-swap failed and diffusers deleted the slot with it: every later LoRA request would fail, and a slot
    cannot be made again without recompiling. Fatal (read by the queue): the worker reports failed and exits, and
    its supervisor starts a clean one."""

    fatal = True


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    modules: int
    size_bytes: int
    signature: tuple  # (size, mtime_ns, inode): a changed file is checked again


def valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and name not in (".", "..")


def resolve_file(folder: Path, name: str) -> Path | None:
    """The adapter file of `name` inside `folder`, or None. The resolved path must be a regular file directly
    in the resolved folder, so neither a crafted name nor a symlink reaches anything outside it."""
    if not valid_name(name):
        return None
    root = folder.resolve()
    try:
        path = (root / (name + SUFFIX)).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if path.parent != root or not path.is_file():
        return None
    return path


def signature(path: Path) -> tuple:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def lora_targets(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear-like module of the transformer (nn.Linear, bitsandbytes 4/8-bit): name -> (in, out)."""
    targets = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "base_layer"):  # already wrapped by PEFT: the wrapped layer is listed under it
            continue
        if isinstance(module, torch.nn.Linear) or (
                hasattr(module, "in_features") and hasattr(module, "out_features") and type(module).__name__
                in ("Linear4bit", "Linear8bitLt")):
            if ".base_layer" in name or ".lora_" in name:
                continue
            targets[name] = (int(module.in_features), int(module.out_features))
    return targets


_KEY_RE = re.compile(r"transformer\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight")


def read_adapter(path: Path, targets: dict[str, tuple[int, int]], max_rank: int, field: str = "loras",
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> tuple[dict, int]:
    """Read, convert and check one adapter file; returns (diffusers-format state dict, rank) or raises LoraError.

    Nothing in the file is trusted: the safetensors header is parsed by safetensors (no code runs), the key
    count is bounded before any tensor is read, and conversion errors become a 422 naming the field.
    """
    from safetensors import SafetensorError, safe_open

    # the largest file a valid adapter can be: every Linear at max_rank in float32, plus a header; a bigger
    # file is refused before a byte of it is read into memory
    bound = max_rank * sum(i + o for i, o in targets.values()) * 4 + (4 << 20)
    try:
        size = path.stat().st_size
    except OSError:
        raise LoraError(f"{field}: the file cannot be read", field) from None
    if size > bound:
        raise LoraError(f"{field}: the file is {size} bytes, larger than any adapter of rank {max_rank} or less for "
                        f"this model ({bound} bytes)", field)
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if not keys or len(keys) > MAX_KEYS:
                raise LoraError(f"{field}: the file holds {len(keys)} tensors; not a FLUX LoRA", field)
            raw = {k: fh.get_tensor(k) for k in keys}
    except LoraError:
        raise
    except SafetensorError as exc:  # its messages name the defect, never the path
        raise LoraError(f"{field}: the file is not a readable safetensors file ({str(exc)[:120]})", field) from None
    except (OSError, ValueError, RuntimeError, TypeError) as exc:  # an OSError's text would hold the path
        raise LoraError(f"{field}: the file is not a readable safetensors file ({type(exc).__name__})",
                        field) from None
    # fp8 is floating point too, but torch cannot check it for NaN (isfinite raises) nor do PEFT's maths on it
    if not all(t.dtype in LORA_DTYPES for t in raw.values()):
        raise LoraError(f"{field}: LoRA tensors must be float16, bfloat16, float32 or float64", field)
    from diffusers import FluxPipeline

    try:
        converted = FluxPipeline.lora_state_dict(raw)
    except Exception as exc:  # the converter raises anything from KeyError to ValueError on foreign keys
        raise LoraError(f"{field}: not a FLUX LoRA in a format diffusers reads ({type(exc).__name__})",
                        field) from None
    if isinstance(converted, tuple):
        converted = converted[0]
    state = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        match = _KEY_RE.fullmatch(key)
        if match is None:
            what = "text-encoder LoRA weights are not served (transformer only)" if key.startswith("text_encoder") \
                else f"not a FLUX transformer LoRA (unexpected key {key[:100]!r})"
            raise LoraError(f"{field}: {what}", field)
        module = match["module"]
        if module not in targets:
            raise LoraError(f"{field}: the adapter targets {module[:100]!r}, which this model does not have", field)
        pairs.setdefault(module, {})[match["ab"]] = tensor
        state[key] = tensor
    if not pairs:
        raise LoraError(f"{field}: the file holds no LoRA weights", field)
    rank = 0
    for module, ab in pairs.items():
        a, b = ab.get("A"), ab.get("B")
        in_f, out_f = targets[module]
        if a is None or b is None or a.dim() != 2 or b.dim() != 2:
            raise LoraError(f"{field}: {module} needs a 2-D lora_A and lora_B", field)
        r = a.shape[0]
        if r < 1:  # an empty lora_A: diffusers divides by the rank, and a failed hot-swap deletes the slot
            raise LoraError(f"{field}: {module} has rank 0 (empty lora_A/lora_B)", field)
        if a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != r:
            raise LoraError(f"{field}: {module} has shapes A{tuple(a.shape)} B{tuple(b.shape)}; this model needs "
                            f"A(r, {in_f}) and B({out_f}, r)", field)
        rank = max(rank, r)
    if rank > max_rank:
        raise LoraError(f"{field}: rank {rank} is above this worker's limit of {max_rank} (FLUX_LORA_MAX_RANK)",
                        field)
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise LoraError(f"{field}: the adapter holds NaN or infinite values", field)
    if dtype is not None or str(device) != "cpu":
        state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    return state, rank


class LoraSlots:
    """The engine side: adapter slots on the transformer, an LRU of converted adapters on the device.

    Runs on the GPU thread only, like the rest of the engine.
    """

    def __init__(self, pipe, folder: Path, slots: int, max_rank: int, cache_size: int, device, dtype):
        self.pipe, self.folder, self.max_rank = pipe, Path(folder), max_rank
        self.slot_names = [f"slot{i}" for i in range(slots)]
        self.cache_size = max(1, cache_size)
        self.device, self.dtype = device, dtype
        self.targets = lora_targets(pipe.transformer)
        self._cache: OrderedDict[str, tuple[tuple, dict, int]] = OrderedDict()  # name -> (signature, sd, rank)
        self._current: list[tuple | None] = [None] * slots  # what each slot holds now
        self._enabled = False
        self.hits = self.misses = self.swaps = 0
        self.load_seconds = 0.0

    # ---- set-up (before compile) -----------------------------------------------------------------
    def install(self) -> None:
        """Create every slot at max rank over every Linear, then disable them. Must run before compile."""
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        pipe = self.pipe
        pipe.enable_lora_hotswap(target_rank=self.max_rank, check_compiled="error")
        zero = {}
        for module, (in_f, out_f) in self.targets.items():
            zero[f"transformer.{module}.lora_A.weight"] = torch.zeros(1, in_f, dtype=self.dtype)
            zero[f"transformer.{module}.lora_B.weight"] = torch.zeros(out_f, 1, dtype=self.dtype)
        for slot in self.slot_names:
            pipe.load_lora_weights(dict(zero), adapter_name=slot)
        # diffusers prepares (pads, tensor scalings) only the adapters present at its first load: do all of them
        prepare_model_for_compiled_hotswap(pipe.transformer, target_rank=self.max_rank, check_compiled="ignore")
        for layer in self._layers():
            layer.set_adapter(list(self.slot_names))
        pipe.transformer.requires_grad_(False)
        pipe.disable_lora()
        self._enabled = False

    def _layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.pipe.transformer.modules() if isinstance(m, BaseTunerLayer)]

    def structure(self) -> list:
        """What a compiled graph depends on: adapter names, ranks and shapes per LoRA layer (for tests)."""
        out = []
        for layer in self._layers():
            out.append((tuple(layer.active_adapters), tuple(
                (s, tuple(layer.lora_A[s].weight.shape), tuple(layer.lora_B[s].weight.shape),
                 type(layer.scaling[s]).__name__) for s in self.slot_names)))
        return out

    # ---- per batch --------------------------------------------------------------------------------
    def cached(self) -> list[str]:
        """Read from other threads (/loras, /metrics) while the GPU thread may change the LRU: retry a torn read."""
        for _ in range(5):
            try:
                return list(self._cache)
            except RuntimeError:
                continue
        return []

    def _signature(self, name: str) -> tuple:
        path = resolve_file(self.folder, name)
        if path is None:
            raise LoraError(f"loras: no LoRA named {name!r}", "loras")
        return signature(path)

    def _adapter(self, name: str, sig: tuple) -> dict:
        path = resolve_file(self.folder, name)
        if path is None:
            raise LoraError(f"loras: no LoRA named {name!r}", "loras")
        entry = self._cache.get(name)
        if entry is not None and entry[0] == sig:
            self.hits += 1
            self._cache.move_to_end(name)
            return entry[1]
        self.misses += 1
        started = time.perf_counter()
        state, rank = read_adapter(path, self.targets, self.max_rank, device=self.device, dtype=self.dtype)
        self.load_seconds += time.perf_counter() - started
        self._cache[name] = (signature(path), state, rank)
        self._cache.move_to_end(name)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return state

    def apply(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Make the pipeline serve exactly these (name, scale) adapters; () serves the base model."""
        active = [(n, s) for n, s in loras if s != 0.0]
        if not active:
            if self._enabled:
                self.pipe.disable_lora()
                self._enabled = False
            return
        if len(active) > len(self.slot_names):
            raise LoraError(f"loras: at most {len(self.slot_names)} adapters per request", "loras")
        # a slot is known by (name, scale, file signature): a file replaced on disk is swapped in again
        wanted = [(n, s, self._signature(n)) for n, s in active] + [None] * (len(self.slot_names) - len(active))
        for index, (slot, want) in enumerate(zip(self.slot_names, wanted)):
            if want == self._current[index]:
                continue
            self._current[index] = None  # a failure half-way leaves the slot unknown, so it is rewritten next
            if want is None:
                self._zero(slot)
            else:
                name, scale, sig = want
                state = self._adapter(name, sig)
                scaled = {k: (v * scale if ".lora_B." in k else v) for k, v in state.items()}
                try:
                    self.pipe.load_lora_weights(scaled, adapter_name=slot, hotswap=True)
                except Exception as exc:
                    if not any(slot in layer.lora_A for layer in self._layers()):
                        raise LoraSlotLost(f"LoRA {slot} was deleted by a failed hot-swap ({type(exc).__name__})") \
                            from exc
                    raise
                self.swaps += 1
            self._current[index] = want
        if not self._enabled:
            self.pipe.enable_lora()
            self._enabled = True

    def _zero(self, slot: str) -> None:
        with torch.no_grad():
            for layer in self._layers():
                if slot in layer.lora_B:
                    layer.lora_B[slot].weight.zero_()

    def stats(self) -> dict:
        return {"cached": self.cached(), "hits": self.hits, "misses": self.misses, "swaps": self.swaps,
                "load_seconds": round(self.load_seconds, 3), "slots": len(self.slot_names),
                "max_rank": self.max_rank}


def slot_memory_bytes(targets: dict[str, tuple[int, int]], rank: int, slots: int, element_size: int) -> int:
    return sum(rank * (i + o) for i, o in targets.values()) * slots * element_size


def file_rank(path: Path) -> int | None:
    """The rank from the header alone (the smallest dimension of a lora_A/lora_down tensor), for listings."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if ("lora_A" in key or "lora_down" in key) and key.endswith("weight"):
                    shape = fh.get_slice(key).get_shape()
                    return int(min(shape)) if shape else None
    except Exception:
        return None
    return None


def folder_listing(folder: Path) -> list[tuple[str, Path]]:
    """(name, path) of every adapter file served from the folder, sorted by name."""
    out = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return out
    for entry in sorted(entries):
        if entry.endswith(SUFFIX):
            name = entry[:-len(SUFFIX)]
            path = resolve_file(folder, name)
            if path is not None:
                out.append((name, path))
    return out

