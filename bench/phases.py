"""Where one pipeline call spends its time: text encoding, denoising, VAE decode, conversion to PIL.

PhaseTimer wraps the pipeline's own entry points for the duration of a `with` block and synchronizes the
device at every edge, so each phase is charged its GPU time. The synchronizations cost a little, so the
timed runs are made without it and the breakdown comes from one extra call.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Callable

PHASES = ("text_encode", "denoise", "vae_decode", "postprocess")


class PhaseTimer:
    def __init__(self, pipe, sync: Callable[[], None]):
        self.pipe = pipe
        self.sync = sync
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._undo: list[Callable[[], None]] = []

    # ---- installation --------------------------------------------------------------------------
    def __enter__(self) -> "PhaseTimer":
        self._wrap(self.pipe, "encode_prompt", "text_encode")
        self._wrap(self.pipe.vae, "decode", "vae_decode")
        if getattr(self.pipe, "image_processor", None) is not None:
            self._wrap(self.pipe.image_processor, "postprocess", "postprocess")
        self._hook_forward(self.pipe.transformer, "denoise")
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def _wrap(self, obj, attr: str, phase: str) -> None:
        """Shadow a bound method with a timed one on the instance; undo restores what was there."""
        had_own = attr in vars(obj)
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[phase] += time.perf_counter() - started
                self.calls[phase] += 1

        setattr(obj, attr, timed)
        self._undo.append(lambda: setattr(obj, attr, original) if had_own else delattr(obj, attr))

    def _hook_forward(self, module, phase: str) -> None:
        # Hooks rather than a wrapped forward: compiled blocks inside stay untouched.
        state = {}

        def before(_mod, _args):
            self.sync()
            state["t"] = time.perf_counter()

        def after(_mod, _args, _out):
            self.sync()
            self.seconds[phase] += time.perf_counter() - state.pop("t")
            self.calls[phase] += 1

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        self._undo.append(lambda: [h.remove() for h in handles])

    # ---- result --------------------------------------------------------------------------------
    def breakdown(self, total_s: float) -> dict:
        """Seconds per phase, `other` (scheduler, latent packing, Python) and per-step denoising time."""
        out = {phase: round(self.seconds.get(phase, 0.0), 4) for phase in PHASES}
        out["other"] = round(max(0.0, total_s - sum(self.seconds.values())), 4)
        out["total"] = round(total_s, 4)
        steps = self.calls.get("denoise", 0)
        out["denoise_calls"] = steps
        out["denoise_per_step"] = round(self.seconds["denoise"] / steps, 5) if steps else None
        return out


def torch_profile(run: Callable[[], None], use_cuda: bool, rows: int = 25) -> tuple[str, list[dict]]:
    """One call under torch.profiler: the printable table and the top operators by self device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=activities) as prof:
        run()
    averages = prof.key_averages()

    def self_device_us(evt) -> float:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(evt, attr, None)
            if value is not None:
                return float(value)
        return 0.0

    key = self_device_us if use_cuda else (lambda evt: float(evt.self_cpu_time_total))
    table = ""
    for sort_by in (("self_device_time_total", "self_cuda_time_total") if use_cuda else ("self_cpu_time_total",)):
        try:
            table = averages.table(sort_by=sort_by, row_limit=rows)
            break
        except Exception:  # the sort key's name moved between torch versions
            continue
    top = [{"name": evt.key, "calls": evt.count, "self_device_ms": round(self_device_us(evt) / 1000, 3),
            "self_cpu_ms": round(float(evt.self_cpu_time_total) / 1000, 3)}
           for evt in sorted(averages, key=key, reverse=True)[:rows]]
    return table, top
