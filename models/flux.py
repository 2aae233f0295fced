"""FluxEngine: loads one FluxPipeline on one device and renders batches of compatible images.

The engine is not thread-safe on purpose: diffusers pipelines keep per-call state (the scheduler's step
index, `_interrupt`), so the QueueManager calls `generate` from exactly one thread.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from models import compile_events, dummy, precision as prec
from models.lora import LoraError, LoraSlots

log = logging.getLogger(__name__)


# Measured on dummy:tiny: loading an adapter into PEFT's bitsandbytes 4-bit LoRA layers rewrites the base
# weights' quantization statistics (nested_absmax), so the base model's images change after the first LoRA request.
LORA_FP4_REFUSAL = ("fp4 workers do not serve LoRA adapters: loading one into bitsandbytes 4-bit layers changes the "
                    "base model's quantization statistics; send LoRA requests to a bf16 or fp8 worker")


class GenerationInterrupted(Exception):
    """Raised from the step callback when every image of a batch was cancelled or timed out."""


class EngineOutOfMemory(Exception):
    """The device ran out of memory for this batch; memory was released and the engine still works."""


@dataclass(frozen=True)
class ImageSpec:
    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    mode: str = "text"  # text, img2img, inpaint
    strength: float = 1.0  # img2img/inpaint: how much of the input image is re-drawn
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale), in request order
    image: Any = field(default=None, compare=False, repr=False)  # PIL RGB, already at width x height
    mask: Any = field(default=None, compare=False, repr=False)  # PIL L, white = re-draw

    @property
    def batch_key(self) -> tuple:
        """Images with the same key can share one pipeline call: same size and schedule, same pipeline (mode and
        strength) and the same adapters at the same scales."""
        return (self.width, self.height, self.steps, self.guidance, self.mode, self.strength, self.loras)

    def without_inputs(self) -> "ImageSpec":
        """The same spec without its decoded images, for a job kept after rendering."""
        if self.image is None and self.mask is None:
            return self
        return dataclasses.replace(self, image=None, mask=None)


@dataclass
class EngineConfig:
    model: str = "black-forest-labs/FLUX.1-schnell"
    precision: str = "bf16"
    device: str = "auto"
    compile: bool = False
    prompt_cache_size: int = 64
    warmup_sizes: Sequence[tuple[int, int]] | None = None  # None: 1024² and 512² on a GPU, 512² on a CPU
    warmup_steps: int = 2
    warmup_batch: int = 1  # the queue's max_concurrent: the largest batch a request can land in
    fp4_quant_type: str = "fp4"
    compile_cache_dir: str | None = None
    fuse_qkv: bool = False  # measured on H100: no gain with compile (3.97 vs 3.99 s), +4 GiB at load
    attention_backend: str = "native"  # diffusers backend name: native, _native_cudnn, _native_flash, ...
    compile_mode: str | None = None  # torch.compile mode, e.g. max-autotune-no-cudagraphs; None: default
    # One graph for every image size and batch: the blocks are compiled with symbolic sequence-length and batch
    # dimensions up front, so the warm-up compiles once instead of once per size (and once more per batch).
    compile_dynamic: bool = True
    compile_vae: bool = False  # torch.compile the VAE decoder too (GPU only)
    lora_dir: str | None = None  # folder of NAME.safetensors adapters; None: no LoRA slots, no LoRA requests
    lora_slots: int = 3  # adapters one request may combine (FLUX_MAX_LORAS_PER_REQUEST)
    lora_max_rank: int = 64  # every slot is allocated at this rank (hot-swap pads smaller adapters)
    lora_cache: int = 8  # converted adapters kept on the device (LRU)
    compile_backend: str | None = None  # tests only: a torch.compile backend (e.g. "eager") that also runs on CPU


@dataclass
class EngineInfo:
    model: str
    synthetic: bool
    precision: str
    device: str
    device_name: str
    dtype: str
    default_steps: int
    default_guidance: float
    max_sequence_length: int
    compiled: bool = False
    notes: list[str] = field(default_factory=list)


def resolve_device(preference: str) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" or preference.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError("FLUX_DEVICE=cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
        # "cuda:N": one rank of a GPU group (models/parallel.py); a worker alone uses its first visible GPU
        return torch.device(preference if ":" in preference else "cuda:0")
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def custom_attention_backend(name: str) -> bool:
    """True for a diffusers attention backend other than PyTorch's own choice; an unknown name is refused at load,
    on every device."""
    if name in ("", "native"):
        return False
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [b.value for b in AttentionBackendName]
    if name not in known:
        raise ValueError(f"unknown attention backend {name!r}; diffusers knows: {', '.join(known)}")
    return True


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def fuse_qkv(transformer: torch.nn.Module) -> int:
    """Fuse each attention's q/k/v (and added q/k/v) Linears into one matmul, and free the originals.

    Lossless: the fused weight is the concatenation of the three. diffusers' own fuse_projections keeps the
    separate layers too, which would cost ~4 GiB on FLUX.1-dev, so they are dropped here.
    """
    fused = 0
    for module in transformer.modules():
        if hasattr(module, "fuse_projections") and getattr(module, "_supports_qkv_fusion", True) \
                and type(getattr(module, "to_q", None)) is torch.nn.Linear:
            module.fuse_projections()
            if getattr(module, "fused_projections", False):
                for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                    if hasattr(module, name) and getattr(module, name) is not None:
                        delattr(module, name)
                        setattr(module, name, None)
                fused += 1
    return fused


class FluxEngine:
    def __init__(self, config: EngineConfig):
        if config.precision not in prec.PRECISIONS:
            raise ValueError(f"precision must be one of {prec.PRECISIONS}, got {config.precision!r}")
        self.config = config
        self.pipe = None
        self.info: EngineInfo | None = None
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0
        self.loras: LoraSlots | None = None
        self._derived_pipes: dict[str, Any] = {}
        self.compiles_at_ready: int | None = None
        self._progress: dict = {"phase": "loading", "started_at": time.time()}
        self._progress_lock = threading.Lock()

    # ---- start-up progress ---------------------------------------------------------------------
    def progress(self) -> dict:
        """What the engine is doing while it starts: phase (loading, warmup, ready), the warm-up item being
        compiled, items done/total, seconds elapsed and the seconds this item took on the last start with the
        same settings (`expected_s`, null when unknown). Read from other threads (/health)."""
        with self._progress_lock:
            out = dict(self._progress)
        out["elapsed_s"] = round(time.time() - out.pop("started_at"), 1)
        if "item_started_at" in out:
            out["item_elapsed_s"] = round(time.time() - out.pop("item_started_at"), 1)
        return out

    def _set_progress(self, **fields) -> None:
        with self._progress_lock:
            self._progress.update(fields)

    # ---- loading -------------------------------------------------------------------------------
    def load(self) -> EngineInfo:
        cfg = self.config
        device = resolve_device(cfg.device)
        dtype = prec.compute_dtype(device)
        notes: list[str] = []
        precision = cfg.precision
        if precision == "fp8":
            ok, why = prec.fp8_supported(device)
            if not ok:
                # Serve rather than fail: a mixed deployment keeps its fast route, at bf16 speed.
                notes.append(f"fp8 is not available here ({why}); serving bf16 instead")
                log.warning("%s", notes[-1])
                precision = "bf16"
        custom_attention = custom_attention_backend(cfg.attention_backend)
        self._set_progress(phase="loading", started_at=time.time())
        quantize = prec.fp4_replacer(device, dtype, cfg.fp4_quant_type) if precision == "fp4" else None
        if precision == "fp4" and device.type == "cuda":
            prec.use_expandable_segments()
        started = time.perf_counter()
        if dummy.is_dummy(cfg.model):
            pipe, spec = dummy.build_dummy_pipeline(cfg.model, device, dtype, quantize=quantize)
            default_steps, default_guidance, max_seq = spec.default_steps, spec.default_guidance, \
                spec.max_sequence_length
            synthetic = True
        else:
            pipe = self._load_pretrained(cfg.model, device, dtype, quantize)
            guidance_embeds = bool(getattr(pipe.transformer.config, "guidance_embeds", True))
            default_steps = 28 if guidance_embeds else 4
            default_guidance = 3.5 if guidance_embeds else 0.0
            max_seq = 512 if guidance_embeds else 256
            synthetic = False
        if cfg.fuse_qkv and precision != "fp4":
            fuse_qkv(pipe.transformer)
            pipe.transformer.eval().requires_grad_(False)  # the fused layers are created in train mode
            self.release_memory()  # the unfused weights sit in reference cycles until collected
        if cfg.lora_dir:
            if precision == "fp4":
                notes.append(LORA_FP4_REFUSAL)
            else:  # before fp8 (which then quantizes the base layers only) and before compile
                self._install_loras(pipe, device, dtype)
        if precision == "fp8":
            prec.apply_fp8(pipe.transformer, skip_lora=self.loras is not None)
        if device.type == "cuda":
            pipe.vae.to(memory_format=torch.channels_last)
            if custom_attention:
                pipe.transformer.set_attention_backend(cfg.attention_backend)
        elif custom_attention:
            notes.append(f"attention backend {cfg.attention_backend} ignored on CPU")
        pipe.set_progress_bar_config(disable=True)
        self._before_compile(pipe, device, notes)
        compiled = False
        compile_events.install()
        if cfg.compile:
            if device.type == "cuda" or cfg.compile_backend:
                self._enable_compile(pipe, precision)
                compiled = True
            else:
                notes.append("compile requested but ignored on CPU")
        self.pipe = pipe
        self.device = device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.info = EngineInfo(
            model=cfg.model, synthetic=synthetic, precision=precision, device=str(device), device_name=name,
            dtype=str(dtype).replace("torch.", ""), default_steps=default_steps, default_guidance=default_guidance,
            max_sequence_length=max_seq, compiled=compiled, notes=notes,
        )
        log.info("loaded %s (%s, %s) on %s in %.1f s", cfg.model, precision, self.info.dtype, name,
                 time.perf_counter() - started)
        return self.info

    def _before_compile(self, pipe, device: torch.device, notes: list[str]) -> None:
        """Where a subclass changes the pipeline before its blocks are compiled (models/parallel.py)."""

    @staticmethod
    def _load_pretrained(model: str, device: torch.device, dtype: torch.dtype, quantize):
        """A hub id or a local diffusers folder; honours HF_HOME and HF_HUB_OFFLINE like any diffusers load."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(model, torch_dtype=dtype, low_cpu_mem_usage=True)
        if quantize is not None:
            # Weights sit in host memory here; each Linear is quantized as it moves to the device.
            for component in prec.FP4_COMPONENTS:
                module = getattr(pipe, component)
                dummy.swap_linears(module, lambda name, lin, c=component: quantize(c, name, lin))
        for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            getattr(pipe, component).to(device).eval().requires_grad_(False)
        return pipe

    def _enable_compile(self, pipe, precision: str) -> None:
        if self.config.compile_cache_dir:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", self.config.compile_cache_dir)
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        try:
            inductor_config.autotune_local_cache = True
        except AttributeError:
            pass
        self._load_compile_artifacts(precision)
        options = {"mode": self.config.compile_mode} if self.config.compile_mode else {}
        if self.config.compile_dynamic:
            options["dynamic"] = True
        if self.config.compile_backend:
            options["backend"] = self.config.compile_backend
        pipe.transformer.compile_repeated_blocks(fullgraph=True, **options)
        if self.config.compile_vae:
            pipe.vae.decoder = torch.compile(pipe.vae.decoder, dynamic=self.config.compile_dynamic)

    # ---- compiled artifacts shared by a fleet ----------------------------------------------------
    def artifacts_path(self, precision: str | None = None) -> str | None:
        """The portable compile cache of this model, precision and torch build (torch.compiler's
        save_cache_artifacts), kept in the compile cache folder: a `prepare` run writes it, every worker
        that starts later loads it before compiling, and a Docker image can bake the folder in."""
        if not self.config.compile_cache_dir:
            return None
        cfg = self.config
        parts = [cfg.model, precision or cfg.precision, torch.__version__, "dyn" if cfg.compile_dynamic else "static",
                 cfg.compile_mode or "default", "vae" if cfg.compile_vae else ""]
        key = re.sub(r"[^A-Za-z0-9.+-]+", "_", "-".join(p for p in parts if p))
        return os.path.join(cfg.compile_cache_dir, f"artifacts-{key}.bin")

    def _load_compile_artifacts(self, precision: str) -> None:
        path = self.artifacts_path(precision)
        if not path or not os.path.isfile(path):
            return
        try:
            with open(path, "rb") as fh:
                info = torch.compiler.load_cache_artifacts(fh.read())
            log.info("loaded compile artifacts from %s (%s)", path, info)
        except Exception as exc:  # a stale or foreign file only costs the compile it would have saved
            log.warning("ignoring compile artifacts %s: %s", path, exc)

    def save_compile_artifacts(self) -> str | None:
        """Write what this process compiled (and loaded) as one portable file; returns its path or None."""
        if not (self.info and self.info.compiled):
            return None
        path = self.artifacts_path(self.info.precision)
        if not path:
            return None
        saved = torch.compiler.save_cache_artifacts()
        if not saved:
            return None
        data, info = saved
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        log.info("saved compile artifacts to %s (%.1f MiB)", path, len(data) / 2**20)
        return path

    def _timings_path(self) -> str | None:
        return os.path.join(self.config.compile_cache_dir, "warmup-times.json") if self.config.compile_cache_dir \
            else None

    def _timings_key(self) -> str:
        cfg = self.config
        return "|".join(str(x) for x in (cfg.model, self.info.precision if self.info else cfg.precision,
                                         self.info.compiled if self.info else cfg.compile, cfg.compile_dynamic,
                                         cfg.compile_mode, cfg.compile_vae, cfg.warmup_steps))

    def _read_timings(self) -> dict:
        path = self._timings_path()
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh).get(self._timings_key(), {})
        except (OSError, TypeError, ValueError, AttributeError):
            return {}

    def _write_timings(self, timings: dict) -> None:
        path = self._timings_path()
        if not path:
            return
        try:
            try:
                with open(path, encoding="utf-8") as fh:
                    every = json.load(fh)
            except (OSError, ValueError):
                every = {}
            every[self._timings_key()] = timings
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(every, fh)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache folder: progress just has no estimate next time
            log.warning("cannot record warm-up times in %s: %s", path, exc)

    def warmup_plan(self) -> list[tuple[int, int, int]]:
        """(width, height, batch) of each warm-up call."""
        sizes = self.config.warmup_sizes
        if sizes is None:
            sizes = ((1024, 1024), (512, 512)) if self.device.type == "cuda" else ((512, 512),)
        plan = [(w, h, 1) for w, h in sizes]
        if plan and self.config.warmup_batch > 1:
            # A batched call has other shapes: without this, the first time two compatible requests meet in
            # the queue they would wait for a recompile (measured 13-30 s on H100) while /health says ready.
            plan.append((plan[-1][0], plan[-1][1], self.config.warmup_batch))
        return plan

    def warmup(self) -> float:
        """One small generation per configured size, so the first request pays no compile or allocator cost.
        Progress (which item, done/total, the time it took last start) is readable through progress()."""
        started = time.perf_counter()
        plan = self.warmup_plan()
        expected = self._read_timings()
        took: dict[str, float] = {}
        with self._compile_turn(first_time=not expected):
            self._run_warmup(plan, expected, took)
            if self.loras is not None:
                self._warm_loras(plan, expected, took)
        self._prompt_cache.clear()
        self.compiles_at_ready = compile_events.count()
        total = time.perf_counter() - started
        with self._progress_lock:
            for key in ("item", "expected_s", "item_started_at"):
                self._progress.pop(key, None)
            self._progress.update(phase="ready", done=len(plan), total=len(plan), warmup_s=round(total, 1),
                                  items_s=took)
        self._write_timings(took)
        # The warm-up's largest activations (a batch at the last size) stay in the allocator's cache otherwise:
        # measured on H200, fp4 1024²: 12.93 GiB in use on the card after the warm-up, 9.98 GiB after this.
        self.release_memory()
        return total

    @contextlib.contextmanager
    def _compile_turn(self, first_time: bool):
        """Workers that start together with an empty compile cache would each compile the same graphs, N times
        the CPU work. The first takes an exclusive lock in the cache folder and compiles; the others wait for it
        (shared lock) and then warm up from its cache, in parallel. Once a warm-up with these settings is on
        record, nobody waits."""
        if not (first_time and self.info and self.info.compiled and self.config.compile_cache_dir):
            yield
            return
        import fcntl

        try:
            os.makedirs(self.config.compile_cache_dir, exist_ok=True)
            fh = open(os.path.join(self.config.compile_cache_dir, "compile.lock"), "a+")
        except OSError as exc:  # a read-only cache (baked into an image): nothing to coordinate, compile alone
            log.warning("no compile lock in %s: %s", self.config.compile_cache_dir, exc)
            yield
            return
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._set_progress(phase="waiting", item="another worker is compiling into the shared cache",
                                   item_started_at=time.time())
                log.info("another worker is compiling into %s: waiting for its cache", self.config.compile_cache_dir)
                fcntl.flock(fh, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _run_warmup(self, plan, expected: dict, took: dict, suffix: str = "") -> None:
        for done, (width, height, batch) in enumerate(plan):
            item = f"{width}x{height}" + (f" batch {batch}" if batch > 1 else "") + suffix
            self._set_progress(phase="warmup", item=item, done=done, total=len(plan),
                               expected_s=expected.get(item), item_started_at=time.time())
            spec = ImageSpec(prompt="warm-up", seed=0, width=width, height=height,
                             steps=max(1, self.config.warmup_steps), guidance=self.info.default_guidance)
            t0 = time.perf_counter()
            self.generate([spec] * batch)
            took[item] = round(time.perf_counter() - t0, 1)
            log.info("warm-up %d/%d %s: %.1f s", done + 1, len(plan), item, took[item])

    # ---- generation ----------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5+CLIP embeddings, from a bounded LRU cache: repeated prompts skip both encoders."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        self.prompt_cache_hits += len(prompts) - len(missing)
        self.prompt_cache_misses += len(missing)
        fresh = {}
        if missing:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=missing, prompt_2=None, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.info.max_sequence_length)
            fresh = {p: (embeds[i:i + 1], pooled[i:i + 1]) for i, p in enumerate(missing)}
        rows = [self._prompt_cache.get(p) or fresh[p] for p in prompts]
        if self.config.prompt_cache_size > 0:
            for p, value in fresh.items():
                self._prompt_cache[p] = value
            for p in prompts:
                self._prompt_cache.move_to_end(p)
            while len(self._prompt_cache) > self.config.prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def generate(self, specs: list[ImageSpec], should_stop: Callable[[int, int], bool] | None = None):
        """Render one batch of compatible images; `should_stop(step, total)` runs after each denoising step."""
        if not specs:
            return []
        first = specs[0]
        key = first.batch_key
        if any(s.batch_key != key for s in specs):
            raise ValueError("a batch must share width, height, steps, guidance, mode, strength and adapters")
        width, height, steps, guidance = first.width, first.height, first.steps, first.guidance
        pipe, extra = self._pipe_for(specs)
        self._apply_loras(first.loras)
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]

        def on_step_end(pipe, step_index, timestep, callback_kwargs):
            if should_stop is not None and should_stop(step_index + 1, steps):
                raise GenerationInterrupted()
            return callback_kwargs

        try:
            with torch.inference_mode():
                embeds, pooled = self._encode([s.prompt for s in specs])
                out = pipe(
                    prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=width, height=height,
                    num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    max_sequence_length=self.info.max_sequence_length, output_type="pil",
                    callback_on_step_end=on_step_end, **extra,
                )
            return out.images
        except Exception as exc:
            if is_out_of_memory(exc):
                self.release_memory()
                raise EngineOutOfMemory(str(exc).splitlines()[0][:200]) from None
            raise

    def release_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def memory_stats(self) -> dict:
        if self.pipe is None or self.device.type != "cuda":
            return {}
        return {
            "allocated_mb": round(torch.cuda.memory_allocated(self.device) / 2**20, 1),
            "reserved_mb": round(torch.cuda.memory_reserved(self.device) / 2**20, 1),
            "peak_allocated_mb": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1),
        }

    # ---- LoRA adapters (models/lora.py) ------------------------------------------------------------
    def _install_loras(self, pipe, device, dtype) -> None:
        cfg = self.config
        self.loras = LoraSlots(pipe, Path(cfg.lora_dir), slots=cfg.lora_slots, max_rank=cfg.lora_max_rank,
                               cache_size=cfg.lora_cache, device=device, dtype=dtype)
        self.loras.install()

    def _apply_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        if self.loras is not None:
            self.loras.apply(loras)
        elif loras:
            why = LORA_FP4_REFUSAL if self.info and self.info.precision == "fp4" else \
                "this worker serves no LoRA adapters (FLUX_LORA_DIR is not set)"
            raise LoraError(f"loras: {why}", "loras")

    def _warm_loras(self, plan, expected: dict, took: dict) -> None:
        """The warm-up again with the (zeroed) slots enabled: the LoRA variant of every compiled graph (each size,
        and the batch) is compiled before /health says ready, so no adapter request waits for a compile."""
        self.loras.pipe.enable_lora()
        try:
            self._run_warmup(plan, expected, took, suffix=" with LoRA slots")
        finally:
            self.loras.pipe.disable_lora()

    def lora_stats(self) -> dict:
        stats = self.loras.stats() if self.loras is not None else {}
        stats["compiles_total"] = compile_events.count()
        stats["compiles_after_ready"] = None if self.compiles_at_ready is None else \
            compile_events.count() - self.compiles_at_ready
        return stats

    # ---- image-to-image and inpainting -----------------------------------------------------------
    def _pipe_for(self, specs: list[ImageSpec]):
        """The pipeline of a batch's mode and its extra arguments. Img2img and inpaint pipelines are built once
        from the loaded pipeline's modules (from_pipe): the same transformer object, no second copy of weights."""
        mode = specs[0].mode
        if mode == "text":
            return self.pipe, {}
        if mode not in ("img2img", "inpaint"):
            raise ValueError(f"unknown mode {mode!r}")
        pipe = self._derived_pipes.get(mode)
        if pipe is None:
            from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

            cls = FluxImg2ImgPipeline if mode == "img2img" else FluxInpaintPipeline
            pipe = cls.from_pipe(self.pipe)
            pipe.set_progress_bar_config(disable=True)
            self._derived_pipes[mode] = pipe
        extra = {"image": [s.image for s in specs], "strength": specs[0].strength}
        if mode == "inpaint":
            extra["mask_image"] = [s.mask for s in specs]
        return pipe, extra
