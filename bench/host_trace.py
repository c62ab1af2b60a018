"""Where the host memory of a streamed CLI run peaks (Linux): a random LLaMA-shaped model is written
as bench.scale writes it, compressed in this process (50% + MI 4.0, 10 groups, --eval none, saved),
and a sampler thread reads VmRSS every 10 ms and records the main thread's stack whenever the
resident memory passes its high-water mark by 8 MiB.

    python -m bench.host_trace SHAPE LAYERS DEVICE NSAMPLES SEQLEN    # e.g. 7b 16 cuda:0 128 2048
"""
import sys, threading, time, tempfile, traceback
sys.path.insert(0, ".")
import torch
from pathlib import Path
import vicuna_mi
from streaming import host_memory_gib


def main() -> None:
    shape, layers, dev, nsamples, seqlen = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    from bench.scale import build_model, SMOKE_SHAPE
    from bench import speed
    speed.SHAPES.setdefault("smoke", SMOKE_SHAPE)
    from tests.conftest import make_text
    work = Path(tempfile.mkdtemp())
    build_model(work / "model", layers, torch.device(dev), shape)
    (work / "calib.txt").write_text(make_text(12000, 1))
    main_id = threading.get_ident()
    rec, state = [], {"hi": 0.0, "stop": False}
    def rss():  # MiB
        return host_memory_gib()["host_gib"] * 1024
    def sampler():
        while not state["stop"]:
            r = rss()
            if r > state["hi"] + 8:
                state["hi"] = r
                fr = sys._current_frames().get(main_id)
                st = traceback.extract_stack(fr)[-7:] if fr else []
                rec.append((time.perf_counter(), r, " < ".join(f"{Path(f.filename).name}:{f.name}:{f.lineno}" for f in reversed(st))))
            time.sleep(0.01)
    threading.Thread(target=sampler, daemon=True).start()
    t0 = time.perf_counter()
    rc = vicuna_mi.main([str(work / "model"), str(work / "calib.txt"), "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "4.0",
                         "--n_groups", "10", "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--eval", "none",
                         "--save", str(work / "out"), "--no_checkpoint", "--device", dev])
    state["stop"] = True
    print("rc", rc, "VmHWM", next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).strip())
    for t, r, s in rec:
        print(f"{t - t0:7.2f}s {r:8.0f} MiB  {s}")


if __name__ == "__main__":
    main()
