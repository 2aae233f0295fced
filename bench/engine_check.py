"""Engine timings per configuration (first GPU checks): `python bench/engine_check.py bf16cf` prints one JSON line.

Configuration names are the if-lines at the bottom; bench/raw.py is the full harness."""
import time, sys, os, torch, logging, json
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, os.getcwd())
from models.flux import FluxEngine, EngineConfig, ImageSpec
res = {}
def run(prec, sizes, compile=False, model="dummy:flux.1-dev", fuse=True):
    torch.cuda.reset_peak_memory_stats()
    t=time.time()
    e=FluxEngine(EngineConfig(model=model, precision=prec, device="cuda", compile=compile, warmup_sizes=[(1024,1024)], warmup_steps=2, fuse_qkv=fuse, compile_cache_dir="/tmp/ind"))
    e.load(); torch.cuda.synchronize(); load=time.time()-t
    resident=torch.cuda.memory_allocated()/2**30; peak_load=torch.cuda.max_memory_allocated()/2**30
    t=time.time(); e.warmup(); torch.cuda.synchronize(); wu=time.time()-t
    out={"load_s":load,"resident_gib":resident,"peak_load_gib":peak_load,"warmup_s":wu}
    for (w,h,st,bs) in sizes:
        ts=[]
        for r in range(2):
            torch.cuda.synchronize(); t=time.time()
            e.generate([ImageSpec(f"p{r}", r, w, h, st, 3.5)]*bs if bs>1 else [ImageSpec(f"a photo {r}", r, w, h, st, 3.5)])
            torch.cuda.synchronize(); ts.append(time.time()-t)
        out[f"{w}x{h}x{st}_bs{bs}"]=ts
    out["peak_gib"]=torch.cuda.max_memory_allocated()/2**30
    print(prec, compile, json.dumps(out), flush=True)
    res[f"{model}-{prec}{'-compile' if compile else ''}{'-fused' if fuse else ''}"]=out
    json.dump(res, open("/tmp/check.json","w"), indent=1)
    del e; import gc; gc.collect(); torch.cuda.empty_cache()
which = sys.argv[1].split(",")
if "bf16f" in which: run("bf16", [(1024,1024,28,1)])
if "bf16u" in which: run("bf16", [(1024,1024,28,1)], fuse=False)
if "bf16cu" in which: run("bf16", [(1024,1024,28,1)], compile=True, fuse=False)
if "fp8cs" in which: run("fp8", [(1024,1024,4,1)], compile=True, model="dummy:flux.1-schnell")
if "fp4" in which: run("fp4", [(1024,1024,28,1)])
if "bf16cf" in which: run("bf16", [(1024,1024,28,1),(512,512,28,1),(512,512,28,4)], compile=True)
if "schnellc" in which: run("bf16", [(1024,1024,4,1)], compile=True, model="dummy:flux.1-schnell")
if "fp4c" in which: run("fp4", [(1024,1024,28,1)], compile=True)
if "fp8c" in which: run("fp8", [(1024,1024,28,1)], compile=True)
sys.exit(0)
if "bf16" in which: run("bf16", [(1024,1024,28,1),(512,512,28,1)])
if "fp4" in which: run("fp4", [(1024,1024,28,1)])
if "fp8" in which: run("fp8", [(1024,1024,28,1)], compile=True)
if "bf16c" in which: run("bf16", [(1024,1024,28,1)], compile=True)
json.dump(res, open("/tmp/check.json","w"), indent=1)
