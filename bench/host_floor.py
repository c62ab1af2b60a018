"""The host memory a CUDA run holds before it does any work (Linux): VmRSS/VmHWM after importing
torch, initialising CUDA, a cuBLAS matmul, a cuSOLVER Cholesky, importing transformers and the
project's kernels, and compiling and launching one Triton kernel. The floor under a streamed run's
host peak (bench/scale.py, bench/host_trace.py).

    python -m bench.host_floor          # on a CUDA machine
"""
import sys


def mem() -> dict:
    d = dict(ln.split(":", 1) for ln in open("/proc/self/status") if ln.startswith(("VmRSS", "VmHWM")))
    return {k: round(int(v.split()[0]) / 2 ** 20, 3) for k, v in d.items()}


def main() -> None:
    sys.path.insert(0, ".")
    print("start", mem(), flush=True)
    import torch
    print("import torch", mem(), flush=True)
    torch.zeros(1, device="cuda")
    print("cuda init", mem(), flush=True)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    (a @ a).sum().item()
    print("cublas matmul", mem(), flush=True)
    torch.linalg.cholesky(torch.eye(512, device="cuda") * 2)
    print("cusolver cholesky", mem(), flush=True)
    import safetensors  # noqa: F401
    import transformers  # noqa: F401
    print("import transformers", mem(), flush=True)
    import mixed_kernel
    import solver_kernel  # noqa: F401
    print("import project kernels", mem(), flush=True)
    mixed_kernel._warm_one((dict(mixed_kernel.DENSE), "float16"))
    print("triton dequant compiled+launched", mem(), flush=True)


if __name__ == "__main__":
    main()
