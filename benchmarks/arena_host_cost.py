"""Host cost of the steps of torch_fused_a2a/_arena.py's allocation on one GPU, no fused_a2a build
needed: run 108 measured the whole allocation at 100-150 us a call (host), against a dispatch of
~300-500 us at EP 2, so which step is it. Prints microseconds per call (median of 200)."""

import statistics
import time

import torch


class Obj:
    def __init__(self, address, nbytes):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
        }


def cost(name, fn, n=200):
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    print(f"{name:48s} {statistics.median(times):8.1f} us (max {max(times):8.1f})", flush=True)


dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
region = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
base = region.data_ptr()
nbytes = 117 << 20
stream = torch.cuda.current_stream(dev)
ev = torch.cuda.Event()
ev.record(stream)
cost("torch.cuda.current_stream", lambda: torch.cuda.current_stream(dev))
cost("is_current_stream_capturing", torch.cuda.is_current_stream_capturing)
cost("Event() + record", lambda: torch.cuda.Event().record(stream))
cost("event.query", ev.query)
cost("stream.wait_event", lambda: stream.wait_event(ev))
cost("Obj (CAI dict)", lambda: Obj(base, nbytes))
cost("torch.as_tensor(CAI, device)", lambda: torch.as_tensor(Obj(base, nbytes), device=dev))
cost("torch.as_tensor(CAI)", lambda: torch.as_tensor(Obj(base, nbytes)))
raw = torch.as_tensor(Obj(base, nbytes), device=dev)
cost(
    "empty(0).set_(storage, 0, shape)",
    lambda: torch.empty(0, dtype=torch.bfloat16, device=dev).set_(
        raw.untyped_storage(), 0, (8192, 7168)
    ),
)
cost(
    "torch.empty(8192x7168 bf16)",
    lambda: torch.empty((8192, 7168), dtype=torch.bfloat16, device=dev),
)
# the same with work queued on the stream (the host ahead of the GPU, as in the ops)
big = torch.empty(1 << 28, dtype=torch.float32, device=dev)
for _ in range(50):
    big.mul_(1.0001)
cost(
    "torch.as_tensor(CAI, device), stream busy",
    lambda: torch.as_tensor(Obj(base, nbytes), device=dev),
    n=50,
)
cost("event.query, stream busy", ev.query, n=50)
torch.cuda.synchronize()
