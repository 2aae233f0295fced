"""The request side of LoRA adapters: which adapters a worker serves, and admission checks of a request's list.

A request's adapters are checked before it is queued, so a bad name, a corrupt file or a rank above the limit
is a 422 naming the field (`loras.0.name`) and never a failed job. Files are read with safetensors in a thread
(one at a time, so a burst of new adapters cannot fill host memory) and each file's verdict is remembered until
the file changes (size, mtime, inode).
"""
from __future__ import annotations

import asyncio
import weakref
from pathlib import Path

from api.errors import InvalidRequest, NotReady
from api.schemas import LoraRef
from models.lora import LoraError, folder_listing, file_rank, read_adapter, resolve_file, signature, valid_name

_checks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = weakref.WeakKeyDictionary()


def _one_at_a_time() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    sem = _checks.get(loop)
    if sem is None:
        sem = _checks[loop] = asyncio.Semaphore(1)
    return sem


class LoraRegistry:
    def __init__(self, settings, engine):
        self.folder = Path(settings.lora_dir) if settings.lora_dir else None
        self.max_rank = settings.lora_max_rank
        self.max_per_request = settings.max_loras_per_request
        self.engine = engine
        self._verdicts: dict[str, tuple[tuple, int | str]] = {}  # name -> (signature, rank or error message)

    def _slots(self):
        return getattr(self.engine, "loras", None)

    def listing(self) -> list[dict]:
        if self.folder is None:
            return []
        slots = self._slots()
        loaded = set(slots.cached()) if slots is not None else set()
        out = []
        for name, path in folder_listing(self.folder):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            out.append({"name": name, "rank": file_rank(path), "size_bytes": size, "loaded": name in loaded})
        return out

    async def check(self, refs: list[LoraRef] | None) -> tuple[tuple[str, float], ...]:
        """The (name, scale) pairs to render with, scale-0 entries dropped (they change nothing), or a 422."""
        if not refs:
            return ()
        if self.folder is None:
            raise InvalidRequest("loras: this worker serves no LoRA adapters (FLUX_LORA_DIR is not set)",
                                 field="loras")
        slots = self._slots()
        if slots is None:
            info = getattr(self.engine, "info", None)
            if info is None:
                raise NotReady("the model is not ready (loading)", retry_after=5)
            from models.flux import LORA_FP4_REFUSAL

            why = LORA_FP4_REFUSAL if info.precision == "fp4" else "this worker serves no LoRA adapters"
            raise InvalidRequest(f"loras: {why}", field="loras")
        if len(refs) > self.max_per_request:
            raise InvalidRequest(f"loras: at most {self.max_per_request} adapters per request", field="loras")
        seen: set[str] = set()
        out = []
        for i, ref in enumerate(refs):
            field = f"loras.{i}.name"
            if not valid_name(ref.name):
                raise InvalidRequest(f"{field}: a name is 1 to 64 letters, digits, '.', '_' or '-'", field=field)
            if ref.name in seen:
                raise InvalidRequest(f"{field}: {ref.name!r} is listed twice", field=field)
            seen.add(ref.name)
            path = resolve_file(self.folder, ref.name)
            if path is None:
                raise InvalidRequest(f"{field}: no LoRA named {ref.name!r} (GET /loras lists them)", field=field)
            await self._validate(ref.name, path, field, slots.targets)
            if ref.scale != 0.0:
                out.append((ref.name, float(ref.scale)))
        return tuple(out)

    async def _validate(self, name: str, path: Path, field: str, targets) -> None:
        try:
            sig = signature(path)
        except OSError:
            raise InvalidRequest(f"{field}: no LoRA named {name!r}", field=field) from None
        verdict = self._verdicts.get(name)
        if verdict is None or verdict[0] != sig:
            async with _one_at_a_time():
                verdict = self._verdicts.get(name)
                if verdict is None or verdict[0] != sig:
                    try:
                        _, rank = await asyncio.to_thread(read_adapter, path, targets, self.max_rank, "loras")
                        verdict = (sig, rank)
                    except LoraError as exc:
                        verdict = (sig, exc.message.removeprefix("loras: "))
                    self._verdicts[name] = verdict
        if isinstance(verdict[1], str):
            raise InvalidRequest(f"{field}: {name!r}: {verdict[1]}", field=field)
