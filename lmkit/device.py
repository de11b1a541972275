"""Everything device-specific: choosing a device, precision, transfers, RNG state, processes."""
import contextlib
import datetime
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from lmkit.errors import UserError


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU; "
                            "use --device auto or cpu", exit_code=2)
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_procs > torch.cuda.device_count():  # checked on every rank, so rank 0 says it
            raise UserError(f"{local_procs} processes per machine but {torch.cuda.device_count()} "
                            "GPUs; start at most one process per GPU", exit_code=2)
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "mps" and not _mps_available():
        raise UserError("--device mps was asked for but this machine has no usable Apple GPU; "
                        "use --device auto or cpu", exit_code=2)
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bfloat16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flags() >= {"avx512_bf16"}
    except (AttributeError, RuntimeError):
        return False


def has_native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bfloat16 in hardware rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return device.type == "mps"


def slow_dtype_note(device: torch.device, dtype: torch.dtype):
    """One line to print when the chosen precision is emulated on this device, else None."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        return ("note: this CPU has no native bfloat16 (no AVX-512 BF16 or AMX), so --dtype "
                "bfloat16 is emulated and runs many times slower than --dtype float32")
    if dtype == torch.float16 and device.type == "cpu" and "amx_fp16" not in _cpu_flags():
        return ("note: this CPU has no native float16 products (no AMX-FP16), so --dtype "
                "float16 is emulated and runs slower than --dtype float32")
    return None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compute_dtype(device: torch.device, choice: str, large_matmuls: bool = True) -> torch.dtype:
    """The autocast dtype for `--dtype` on this device (float32 means no autocast).

    On a CPU, bfloat16 autocast pays only when large matrix products dominate: for narrow
    models the casts around every op cost more than the faster products save (measured on
    a 2-core AVX-512 BF16 machine: a 128-wide char model ran 10% slower in bfloat16, the
    384-wide one and the 50304-token GPT head 20-25% faster).

    On a CUDA GPU without native bfloat16 (T4, V100, RTX 20xx) auto picks float16, which
    needs a gradient scaler (see needs_grad_scaler). On Apple GPUs auto keeps float32: MPS
    autocast (float16; bfloat16 from macOS 14) has not been measured here.
    """
    if choice != "auto":
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[choice]
        check_dtype_supported(device, dtype)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    if device.type == "cpu" and large_matmuls and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def check_dtype_supported(device: torch.device, dtype: torch.dtype) -> None:
    if device.type == "mps" and dtype == torch.bfloat16 and not _macos_at_least(14):
        raise UserError("bfloat16 on an Apple GPU needs macOS 14 or later; use --dtype float16 "
                        "or float32", exit_code=2)


def _macos_at_least(major: int) -> bool:
    import platform
    version = platform.mac_ver()[0]
    return bool(version) and int(version.split(".")[0]) >= major


def needs_grad_scaler(dtype: torch.dtype) -> bool:
    """float16's narrow range lets small gradients underflow unless the loss is scaled up."""
    return dtype == torch.float16


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """For summing many losses: float64, except on Apple GPUs, which have none."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_can_compile() -> None:
    """torch.compile builds C++ with the machine's compiler; refuse --compile without one."""
    import shutil
    candidates = [os.environ.get("CXX"), "g++", "clang++", "c++", "cl"]
    if not any(name and shutil.which(name) for name in candidates):
        raise UserError("--compile needs a C++ compiler (g++ or clang++) on the PATH and this "
                        "machine has none; install one or train without --compile", exit_code=2)


def has_fused_adamw(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu")


def ddp_device_ids(device: torch.device):
    """DistributedDataParallel's device_ids: this rank's GPU, or None on CPUs."""
    return [device.index] if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform
        return platform.processor() or platform.machine()
    return device.type


def inference_dtype(device: torch.device) -> torch.dtype:
    """Generation: bfloat16 on CUDA; float32 elsewhere, where tiny per-token products gain
    nothing from casts."""
    return compute_dtype(device, "auto") if device.type == "cuda" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array.astype(np.int64))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory, or this process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def seeded_rng_state(seed: int, device: torch.device) -> dict:
    """What rng_state(device) returns after torch.manual_seed(seed), without seeding the process."""
    state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if device.type in ("cuda", "mps"):
        state[device.type] = torch.Generator(device).manual_seed(seed).get_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state saved; a checkpoint from another device restores the CPU's."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


class RandomStream:
    """A random stream of its own for code that draws from torch's global generators, as dropout
    does: `with stream:` swaps the stream's state in, and the process's back when the block ends.
    The process's random state stays as it was, and state_dict() holds the stream to resume."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.state = seeded_rng_state(seed, device)

    def __enter__(self):
        self.outside = rng_state(self.device)
        set_rng_state(self.state, self.device)

    def __exit__(self, *exc):
        self.state = rng_state(self.device)
        set_rng_state(self.outside, self.device)

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict saved; a stream saved on another device restores the CPU's."""
        self.state.update({k: v for k, v in state.items() if k in self.state})


# ---- memory: what a model or a run needs, checked before anything is allocated --------------

def model_shapes(model_cls, config) -> tuple:
    """(the shape of every tensor in the model's state_dict, by name; its number of parameters)
    from the config alone: built on the meta device, so nothing is allocated, and with one
    block, whose tensors the others repeat, so a config that claims thousands of layers is
    measured as fast as one."""
    with torch.device("meta"):
        model = model_cls(replace(config, n_layer=1))
    shapes, block = {}, {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if len(parts) > 2 and parts[1] == "0":  # in the model's list of blocks: h.0.*, blocks.0.*
            block[name] = tuple(tensor.shape)
        else:
            shapes[name] = tuple(tensor.shape)
    for i in range(config.n_layer):
        for name, shape in block.items():
            parts = name.split(".")
            shapes[".".join([parts[0], str(i), *parts[2:]])] = shape
    per_block = sum(math.prod(shape) for shape in block.values())
    n_params = sum(p.numel() for p in model.parameters()) + (config.n_layer - 1) * per_block
    return shapes, n_params


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2 ** 30:,.1f} GiB"


def check_fits(needed: int, what: str, fix: str, device=None) -> None:
    """Refuse work that needs more memory than is available, before it allocates any: past the
    machine's memory the kernel's OOM killer ends the process with no message and nothing
    saved. device: a CUDA GPU's free memory is what counts; otherwise the machine's."""
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        where = "the GPU" if device is not None and device.type == "cuda" else "the machine"
        raise UserError(f"{what} needs at least {gib(needed)} of memory and {where} has "
                        f"{gib(available)} available; {fix}")


def check_training_fits(model_cls, config, batch_size: int, grad_accum_steps: int,
                         device: torch.device) -> None:
    """Refuse a run that cannot fit before it allocates. The model is built on the CPU before
    it moves to its device, so its weights (4 bytes a parameter) must fit the machine on any
    device. A CPU run is estimated whole, as a lower bound: weights, gradients and AdamW's two
    moments (16 bytes a parameter), about 17 saved activations of width n_embd per token and
    layer for the backward pass, and the token ids of the step's micro-batches, which are all
    drawn before its first forward."""
    _, n_params = model_shapes(model_cls, config)
    if device.type != "cpu":
        check_fits(4 * n_params, f"building this {n_params:,}-parameter model",
                   "use a smaller model")
        return
    tokens = batch_size * config.block_size
    model = 16 * n_params + 4 * tokens * (17 * config.n_layer + 2) * config.n_embd
    batches = 8 * grad_accum_steps * batch_size * (config.block_size + 1)
    fix = ("use a smaller --batch-size with a larger --grad-accum-steps (the same tokens per "
           "step), or a smaller model")
    if batches > model:
        fix = "use fewer --grad-accum-steps (a step holds the token ids of all its micro-batches)"
    check_fits(model + batches, "this run", fix)


def available_memory_bytes(device=None):
    """Memory this process can still get, or None if unknown: a CUDA GPU's free memory, else
    the machine's (Linux and macOS)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device is not None and device.type == "mps":
        return None  # unified memory that macOS compresses and swaps: no useful figure
    try:
        with open("/proc/meminfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Processes:
    """Where this process stands in a torchrun job (a plain run is rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device_name: str, peer_timeout_s: float) -> tuple:
    """Join the torchrun job if there is one; return (Processes, device). A collective that
    waits longer than peer_timeout_s for a peer raises (Gloo) instead of waiting forever."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Processes(), pick_device(device_name)
    procs = Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                      int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name, procs.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "mps":
        raise UserError("torchrun on Apple GPUs is not supported by PyTorch; use --device cpu", 2)
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                            timeout=datetime.timedelta(seconds=peer_timeout_s))
    return procs, device


def stop_processes(wait_for_all: bool = False) -> None:
    """Leave the torchrun job, if any. After a normal finish, first wait until every rank is
    done (rank 0 still writes the sample): Gloo can abort a process whose peer is gone."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    if procs.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj, procs: Processes) -> list:
    if not procs.distributed:
        return [obj]
    gathered = [None] * procs.world_size
    dist.all_gather_object(gathered, obj)
    return gathered

