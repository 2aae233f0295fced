"""Latency mode: one worker renders each image on a group of GPUs with diffusers' context parallelism.

Rank 0 is the ordinary worker process (HTTP, queue, health, drain); it spawns one follower process per extra
GPU (`python -m models.parallel`). Every rank loads the transformer and calls diffusers'
`transformer.enable_parallelism(ContextParallelConfig(...))`: each image's tokens are split across the ranks and
attention exchanges them (Ulysses all-to-all or ring all-gather) over torch.distributed (NCCL on GPUs).

Division of work per batch:
- rank 0 alone encodes the prompts (T5 + CLIP, with its prompt cache) and broadcasts the embeddings over the
  group; the followers never load a text encoder's worth of work and free both encoders and the VAE;
- every rank runs the denoising loop with identical seeds (the latents start identical everywhere);
- rank 0 alone decodes with the VAE and returns the images.

Control runs over each follower's stdin pipe (JSON lines), not over a collective: an idle follower waits on the
pipe without any collective timeout, and the pipe's end of file tells it at once that rank 0 has gone. Rank 0
sends each batch's specs, then one message per denoising step saying whether to stop (cancel / deadline), so
every rank leaves the loop at the same step and the group never falls out of step.

Failure: a group cannot lose a member and go on. Rank 0 watches its followers' processes and exits non-zero
(GROUP_EXIT_CODE) the moment one dies, so its supervisor restarts the whole group instead of it hanging in a
collective; a follower exits as soon as rank 0's pipe closes, and ignores SIGINT/SIGTERM (a stop signal is for
rank 0, which drains first). A failure inside the collective part of a batch on rank 0 stops the followers and
marks the worker failed (the queue's fatal error), so it exits for a restart too. The collective timeout
(FLUX_PARALLEL_TIMEOUT_S) is only the last resort.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from models.flux import (EngineConfig, EngineOutOfMemory, FluxEngine, GenerationInterrupted, ImageSpec,
                         is_out_of_memory)

log = logging.getLogger(__name__)

MODES = ("ulysses", "ring")
GROUP_EXIT_CODE = 4  # rank 0's exit status when a follower died: the supervisor restarts the group
PROJECT_DIR = Path(__file__).resolve().parents[1]
# diffusers' ring attention merges partial results by their log-sum-exp, which PyTorch's plain SDPA backend does
# not return; cuDNN's does (and was the backend of the measured runs).
RING_ATTENTION_BACKEND = "_native_cudnn"


class UnsplittableSize(ValueError):
    """A request this group cannot render (its tokens do not split across the ranks); a client error."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ParallelGroupFailed(RuntimeError):
    """The group lost step (an error inside a collective phase): the worker must restart."""

    fatal = True  # read by the queue: the worker reports failed and exits for its supervisor


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    mode: str  # ulysses | ring
    world_size: int
    backend: str = "auto"  # auto | nccl | gloo
    timeout_s: float = 300.0
    overlap: bool = False  # inductor may reorder the compiled blocks' collectives to overlap compute
    log_level: str = "info"


def _resolve_backend(group: GroupConfig, device_pref: str) -> tuple[str, str]:
    """(backend, device kind); refuses combinations that cannot render, with a message naming the fix."""
    if group.mode not in MODES:
        raise ValueError(f"FLUX_PARALLEL must be off, ulysses or ring, got {group.mode!r}")
    if group.world_size < 2:
        raise ValueError(f"FLUX_PARALLEL={group.mode} needs at least 2 GPUs per worker (FLUX_GPUS_PER_WORKER or a "
                         f"CUDA_VISIBLE_DEVICES list of several GPUs); this worker has {group.world_size}")
    backend = "nccl" if group.backend == "auto" else group.backend
    cuda = device_pref != "cpu" and torch.cuda.is_available()
    if backend == "nccl":
        if not cuda:
            raise RuntimeError(
                f"FLUX_PARALLEL={group.mode} renders one image on several GPUs through NCCL, and no CUDA GPU is "
                f"available here (FLUX_DEVICE={device_pref}); use FLUX_PARALLEL=off on a CPU "
                "(FLUX_PARALLEL_BACKEND=gloo runs the group on the CPU for tests only)")
        visible = torch.cuda.device_count()
        if visible < group.world_size:
            raise RuntimeError(f"FLUX_PARALLEL={group.mode} over {group.world_size} GPUs, but only {visible} "
                               "visible (CUDA_VISIBLE_DEVICES)")
        return backend, "cuda"
    if cuda:
        raise RuntimeError("FLUX_PARALLEL_BACKEND=gloo is for CPU tests; GPUs use nccl")
    if group.mode == "ring":
        raise RuntimeError("FLUX_PARALLEL=ring needs an attention backend with log-sum-exp output (cuDNN, flash), "
                           "which runs on GPUs only; use ulysses on the CPU")
    return backend, "cpu"


@contextlib.contextmanager
def _cpu_device_index():
    """diffusers places rank r on accelerator `r % device_count()`, which divides by zero without one; on the
    CPU (gloo tests) there is one device for every rank."""
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


class _GroupMember(FluxEngine):
    """What every rank shares: joining the group, enabling diffusers' context parallelism, the denoising loop."""

    def __init__(self, config: EngineConfig, group: GroupConfig, rank: int):
        super().__init__(config)
        self.group = group
        self.rank = rank
        self.backend = self.device_kind = None

    def _resolve(self) -> None:
        """Refuse what cannot run (before anything starts); pick this rank's device and attention backend."""
        self.backend, self.device_kind = _resolve_backend(self.group, self.config.device)
        if self.group.mode == "ring" and self.config.attention_backend in ("", "native"):
            self.config.attention_backend = RING_ATTENTION_BACKEND
        # every rank on its own GPU of the group's CUDA_VISIBLE_DEVICES list
        self.config.device = f"cuda:{self.rank}" if self.device_kind == "cuda" else "cpu"

    def join(self, store) -> None:
        import torch.distributed as dist

        if self.device_kind == "cuda":
            torch.cuda.set_device(self.rank)
        kwargs = {"device_id": torch.device("cuda", self.rank)} if self.backend == "nccl" else {}
        dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.group.world_size,
                                timeout=datetime.timedelta(seconds=self.group.timeout_s), **kwargs)

    def _before_compile(self, pipe, device: torch.device, notes: list[str]) -> None:
        from diffusers import ContextParallelConfig

        n = self.group.world_size
        heads = pipe.transformer.config.num_attention_heads
        if self.group.mode == "ulysses" and heads % n:
            raise ValueError(f"Ulysses attention splits the {heads} attention heads across the group: "
                             f"{n} GPUs do not divide them; use ring or a group size that divides {heads}")
        # diffusers' *_anything variants would take any token count, but ask every rank for its sizes in each
        # attention call (a device-to-host sync, 3 per block per step); sizes that do not split are refused
        # instead (check_spec).
        cp = ContextParallelConfig(ulysses_degree=n) if self.group.mode == "ulysses" else \
            ContextParallelConfig(ring_degree=n)
        with _cpu_device_index() if device.type == "cpu" else contextlib.nullcontext():
            pipe.transformer.enable_parallelism(config=cp)
        if self.group.overlap and self.config.compile and device.type == "cuda":
            import torch._inductor.comms as inductor_comms
            import torch._inductor.config as inductor_config

            inductor_config.reorder_for_compute_comm_overlap = True
            # torch's recommended pass list (config.py), keeping those this torch has
            passes = ["reorder_communication_preserving_peak_memory", "sink_waits_iterative",
                      "reorder_communication_preserving_peak_memory"]
            inductor_config.reorder_for_compute_comm_overlap_passes = [
                p for p in passes if hasattr(inductor_comms, p)]
        notes.append(f"context parallel: {self.group.mode} over {n} "
                     f"{'GPUs' if device.type == 'cuda' else 'CPU processes'} ({self.backend}, attention "
                     f"{self.config.attention_backend})")
        if self.rank > 0:
            # rank 0 encodes the prompts and decodes the latents: the followers need neither
            pipe.text_encoder = pipe.text_encoder_2 = pipe.vae = None
            self.release_memory()

    def check_spec(self, spec: ImageSpec) -> None:
        """Refuse an image whose tokens do not split evenly across the group (read by the queue at submit)."""
        # The followers are driven with text-to-image specs only (sent as JSON); adapters and input images
        # would need their own broadcast: refused here, at admission, rather than failing on the GPUs.
        if spec.mode != "text":
            raise UnsplittableSize("image-to-image and inpainting are not served by a multi-GPU (latency) worker; "
                                   "send them to a one-GPU worker", field="image")
        if spec.loras:
            raise UnsplittableSize("LoRA adapters are not served by a multi-GPU (latency) worker; send them to a "
                                   "one-GPU worker", field="loras")
        n = self.group.world_size
        scale = 16  # 8x VAE downsampling, then 2x2 latent packing: one token per 16x16 pixels
        if (spec.width // scale) * (spec.height // scale) % n:
            raise UnsplittableSize(
                f"this worker renders each image on {n} GPUs and needs (width/16)*(height/16) to be a multiple of "
                f"{n}; {spec.width}x{spec.height} is not (e.g. make width or height a multiple of {16 * n})",
                field="width")

    def _denoise(self, specs: list[ImageSpec], embeds: torch.Tensor, pooled: torch.Tensor,
                 on_step: Callable[[int], None]) -> torch.Tensor:
        """The collective part of a batch: every rank calls this with the same specs, in the same order."""
        import torch.distributed as dist

        width, height, steps, guidance = specs[0].width, specs[0].height, specs[0].steps, specs[0].guidance
        dist.broadcast(embeds, src=0)
        dist.broadcast(pooled, src=0)
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]

        def on_step_end(pipe, step_index, timestep, callback_kwargs):
            on_step(step_index + 1)
            return callback_kwargs

        return self.pipe(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=width, height=height,
            num_inference_steps=steps, guidance_scale=guidance, generator=generators,
            max_sequence_length=self.info.max_sequence_length, output_type="latent",
            callback_on_step_end=on_step_end,
        ).images


class ParallelEngine(_GroupMember):
    """Rank 0: the engine the worker's queue drives, with the same interface as FluxEngine."""

    def __init__(self, config: EngineConfig, group: GroupConfig):
        super().__init__(config, group, rank=0)
        self._followers: list[subprocess.Popen] = []
        self._closing = False
        self._broken: str | None = None
        self._send_lock = threading.Lock()

    # ---- the group -------------------------------------------------------------------------------
    def load(self):
        import torch.distributed as dist

        self._resolve()
        try:
            store = dist.TCPStore("127.0.0.1", 0, self.group.world_size, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=self.group.timeout_s))
            self._spawn_followers(store.port)
            self.join(store)
            info = super().load()
            if info.max_sequence_length % self.group.world_size:
                raise ValueError(f"the {info.max_sequence_length} text tokens of {info.model} do not split across "
                                 f"{self.group.world_size} GPUs; use a group of 2, 4 or 8")
        except BaseException:
            self.close()
            raise
        log.info("GPU group of %d ranks ready (%s, %s); followers: %s", self.group.world_size, self.group.mode,
                 self.backend, [p.pid for p in self._followers])
        return info

    def _spawn_followers(self, store_port: int) -> None:
        hello = {"config": dataclasses.asdict(self.config), "group": dataclasses.asdict(self.group),
                 "store_port": store_port}
        for rank in range(1, self.group.world_size):
            proc = subprocess.Popen([sys.executable, "-m", "models.parallel"], cwd=PROJECT_DIR,
                                    stdin=subprocess.PIPE, bufsize=0)
            self._followers.append(proc)
            self._write(proc, dict(hello, rank=rank))
        threading.Thread(target=self._watch_followers, name="group-watch", daemon=True).start()
        import atexit

        atexit.register(self._at_exit)

    def follower_pids(self) -> list[int]:
        return [p.pid for p in self._followers]

    def _watch_followers(self) -> None:
        """A dead follower breaks the group; rank 0 cannot finish a collective without it, so it exits at once."""
        while not self._closing:
            for rank, proc in enumerate(self._followers, start=1):
                code = proc.poll()
                if code is not None and not self._closing and self._broken is None:
                    log.critical("rank %d (pid %d) of the GPU group exited with %s: exiting (status %d) so the "
                                 "group restarts", rank, proc.pid, code, GROUP_EXIT_CODE)
                    self._stop_followers(grace_s=0)
                    for handler in logging.getLogger().handlers:
                        with contextlib.suppress(Exception):
                            handler.flush()
                    os._exit(GROUP_EXIT_CODE)
            time.sleep(0.1)

    @staticmethod
    def _write(proc: subprocess.Popen, message: dict) -> None:
        proc.stdin.write((json.dumps(message) + "\n").encode())

    def _send(self, message: dict) -> None:
        with self._send_lock:
            for proc in self._followers:
                self._write(proc, message)

    def _stop_followers(self, grace_s: float) -> None:
        for proc in self._followers:
            with contextlib.suppress(Exception):
                proc.stdin.close()  # end of file: a follower between batches exits at once
        deadline = time.monotonic() + grace_s
        for proc in self._followers:
            with contextlib.suppress(Exception):
                proc.wait(max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(5)

    def close(self) -> None:
        """Stop the followers (at exit, or when loading failed)."""
        if self._closing:
            return
        self._closing = True
        self._stop_followers(grace_s=5)

    def _at_exit(self) -> None:
        self.close()
        if self._broken:
            # skip interpreter teardown: a communicator left inside an unfinished collective can block it
            logging.shutdown()
            os._exit(3)

    def _break_group(self, why: str) -> None:
        self._broken = why
        self._stop_followers(grace_s=0)

    # ---- rendering -------------------------------------------------------------------------------
    def generate(self, specs: list[ImageSpec], should_stop: Callable[[int, int], bool] | None = None):
        if not specs:
            return []
        key = specs[0].batch_key
        if any(s.batch_key != key for s in specs):
            raise ValueError("a batch must share width, height, steps and guidance")
        if self._broken:
            raise ParallelGroupFailed(f"the GPU group is broken ({self._broken}); the worker restarts")
        width, height, steps = specs[0].width, specs[0].height, specs[0].steps
        self.check_spec(specs[0])
        try:
            with torch.inference_mode():
                # rank 0 alone: the followers are not told about the batch until its embeddings exist
                embeds, pooled = self._encode([s.prompt for s in specs])
                embeds, pooled = embeds.contiguous(), pooled.contiguous()
        except Exception as exc:
            if is_out_of_memory(exc):
                self.release_memory()
                raise EngineOutOfMemory(str(exc).splitlines()[0][:200]) from None
            raise

        def on_step(step: int) -> None:
            stop = should_stop is not None and should_stop(step, steps)
            self._send({"op": "step", "stop": bool(stop)})
            if stop:
                raise GenerationInterrupted()

        try:
            self._send({"op": "generate", "specs": [dataclasses.asdict(s) for s in specs],
                        "embeds": list(embeds.shape), "pooled": list(pooled.shape),
                        "dtype": str(embeds.dtype).replace("torch.", "")})
            with torch.inference_mode():
                latents = self._denoise(specs, embeds, pooled, on_step)
        except GenerationInterrupted:
            raise  # every rank stopped at the same step: the group is in step
        except Exception as exc:
            # A rank may now wait in a collective that will never complete: the group cannot go on.
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log.error("GPU group lost step during a batch (%s); stopping it for a restart", why)
            self._break_group(why)
            raise ParallelGroupFailed(f"the GPU group failed during generation ({why})") from exc
        try:
            with torch.inference_mode():
                return self._decode(latents, width, height)
        except Exception as exc:  # rank 0 alone: the followers already wait for the next batch
            if is_out_of_memory(exc):
                self.release_memory()
                raise EngineOutOfMemory(str(exc).splitlines()[0][:200]) from None
            raise

    def _decode(self, latents: torch.Tensor, width: int, height: int):
        """FluxPipeline's own last step, on rank 0 only."""
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")


# ---- followers ---------------------------------------------------------------------------------------
class _Channel:
    """Messages from rank 0, read by a thread that ends the process when rank 0 goes (pipe closed, or a parent
    that is no longer ours), even while the main thread waits in a collective."""

    def __init__(self, fd: int = 0):
        import queue

        self._fd = fd
        self._parent = os.getppid()
        self._messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name="rank0-pipe", daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while True:
            ready, _, _ = select.select([self._fd], [], [], 1.0)
            if not ready:
                if os.getppid() != self._parent:
                    self._exit("rank 0 is gone (parent changed)")
                continue
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                self._exit("rank 0 closed the pipe")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self._messages.put(json.loads(line))

    @staticmethod
    def _exit(why: str) -> None:
        # rank 0 is what is supervised: whether it stopped cleanly or died, a follower has nothing left to do
        log.info("%s: exiting", why)
        logging.shutdown()
        os._exit(0)

    def next(self) -> dict:
        return self._messages.get()


def follow(channel: _Channel) -> None:
    """A follower's life: join the group, load, then render each batch rank 0 announces."""
    import torch.distributed as dist

    hello = channel.next()
    rank = int(hello["rank"])
    group = GroupConfig(**hello["group"])
    config = EngineConfig(**hello["config"])
    logging.basicConfig(level=group.log_level.upper(), stream=sys.stdout,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    member = _GroupMember(config, group, rank)
    member._resolve()
    store = dist.TCPStore("127.0.0.1", int(hello["store_port"]), group.world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=group.timeout_s))
    member.join(store)
    member.load()
    log.info("rank %d loaded on %s", rank, member.device)
    device = member.device

    def on_step(step: int) -> None:
        message = channel.next()
        if message.get("stop"):
            raise GenerationInterrupted()

    while True:
        message = channel.next()
        if message["op"] != "generate":
            raise RuntimeError(f"unexpected message from rank 0: {message['op']}")
        specs = [ImageSpec(**dict(s, loras=tuple(map(tuple, s.get("loras", ()))))) for s in message["specs"]]
        dtype = getattr(torch, message["dtype"])
        with torch.inference_mode():
            embeds = torch.empty(message["embeds"], device=device, dtype=dtype)
            pooled = torch.empty(message["pooled"], device=device, dtype=dtype)
            try:
                member._denoise(specs, embeds, pooled, on_step)
            except GenerationInterrupted:
                continue


def main() -> int:
    # A stop signal is for rank 0, which drains its queue first; this process ends with rank 0 (its pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = _Channel()
    try:
        follow(channel)
    except Exception:
        log.exception("follower failed; the group goes down with it")
        logging.shutdown()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
