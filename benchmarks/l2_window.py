"""Keep a tensor resident in a GPU's L2 cache: a persisting access-policy window on a stream.

Issue 3's stretch goal: a value head that fits in L2 (one 4096 x 4096 bf16 hidden layer is
32 MB; an H100 has 50 MB of L2) could be read from L2 instead of HBM on every one of the 2 x 30
products of an ascent. Triton 3.6 drops ``eviction_policy`` hints from the pipelined
(``cp.async``) loads the kernel's weight tiles use (checked on the sm_90 PTX), so the hint has
to come from the CUDA driver instead: a slice of L2 is set aside for persisting accesses
(``CU_LIMIT_PERSISTING_L2_CACHE_SIZE``), and a stream's access-policy window marks one address
range as persisting. Kernels captured from that stream into a CUDA graph are meant to keep the
window as a node attribute; ``probe`` measures whether they do.

Benchmark-only until measured on a GPU (``bench_kernel.py``: the ``triton-l2-graph`` variant
and the ``l2_probe`` entry of the results). The driver is reached through ctypes
(``libcuda.so.1``), so nothing beyond torch is needed.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38
CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108
CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE = 109
CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1
CU_ACCESS_PROPERTY_NORMAL, CU_ACCESS_PROPERTY_STREAMING, CU_ACCESS_PROPERTY_PERSISTING = 0, 1, 2


class AccessPolicyWindow(ctypes.Structure):
    """``CUaccessPolicyWindow`` (cuda.h)."""

    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t),
                ("hitRatio", ctypes.c_float), ("hitProp", ctypes.c_int),
                ("missProp", ctypes.c_int)]


class StreamAttrValue(ctypes.Union):
    """``CUstreamAttrValue`` = ``CUlaunchAttributeValue``: a 64-byte union (cuda.h)."""

    _fields_ = [("accessPolicyWindow", AccessPolicyWindow), ("pad", ctypes.c_char * 64)]


@dataclass(frozen=True)
class L2Limits:
    """What the device allows, in bytes (0 where the feature is missing)."""

    l2_bytes: int
    persisting_max: int
    window_max: int


@functools.lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RuntimeError(f"the CUDA driver library libcuda.so.1 cannot be loaded: {exc}") from exc


def _check(code: int, call: str) -> None:
    if code != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(code, ctypes.byref(name))
        raise RuntimeError(f"{call} failed: {(name.value or b'?').decode()} ({code})")


def limits(device: torch.device) -> L2Limits:
    """The device's L2 size, largest persisting set-aside and largest window."""
    torch.cuda.init()  # the driver calls below need torch's (primary) context current
    lib, dev = _driver(), ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(dev), device.index or 0), "cuDeviceGet")
    values = []
    for attr in (CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE,
                 CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE):
        value = ctypes.c_int()
        _check(lib.cuDeviceGetAttribute(ctypes.byref(value), attr, dev), "cuDeviceGetAttribute")
        values.append(value.value)
    return L2Limits(*values)


def window_value(base_ptr: int, num_bytes: int, hit_ratio: float) -> StreamAttrValue:
    """The attribute value marking ``hit_ratio`` of [base, base + bytes) persisting."""
    value = StreamAttrValue()
    value.accessPolicyWindow = AccessPolicyWindow(
        ctypes.c_void_p(base_ptr), num_bytes, hit_ratio, CU_ACCESS_PROPERTY_PERSISTING,
        CU_ACCESS_PROPERTY_STREAMING)
    return value


def persist(stream: torch.cuda.Stream, base_ptr: int, num_bytes: int) -> float:
    """Set aside L2 for ``num_bytes`` (capped by the device) and mark the range persisting for
    kernels launched on (or captured from) ``stream``; returns the hit ratio used (the share
    of the range that can stay resident)."""
    lim = limits(stream.device)
    if lim.persisting_max <= 0 or lim.window_max <= 0:
        raise RuntimeError("this device has no L2 persistence (needs compute capability >= 8.0, "
                           "and no MIG/MPS restriction)")
    set_aside = min(num_bytes, lim.persisting_max)
    window = min(num_bytes, lim.window_max)
    lib = _driver()
    _check(lib.cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(set_aside)),
           "cuCtxSetLimit(PERSISTING_L2_CACHE_SIZE)")
    ratio = min(1.0, set_aside / window)
    value = window_value(base_ptr, window, ratio)
    _check(lib.cuStreamSetAttribute(ctypes.c_void_p(stream.cuda_stream),
                                    CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW, ctypes.byref(value)),
           "cuStreamSetAttribute(ACCESS_POLICY_WINDOW)")
    return ratio


def release(stream: torch.cuda.Stream | None = None) -> None:
    """Drop the stream's window, evict persisting lines and give the set-aside back."""
    lib = _driver()
    if stream is not None:
        _check(lib.cuStreamSetAttribute(ctypes.c_void_p(stream.cuda_stream),
                                        CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW,
                                        ctypes.byref(window_value(0, 0, 0.0))),
               "cuStreamSetAttribute(ACCESS_POLICY_WINDOW)")
    _check(lib.cuCtxResetPersistingL2Cache(), "cuCtxResetPersistingL2Cache")
    _check(lib.cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(0)),
           "cuCtxSetLimit(PERSISTING_L2_CACHE_SIZE)")


def probe(device: torch.device, sizes_mb: tuple[int, ...] = (32, 64), reads: int = 30) -> dict:
    """Does a window keep a buffer in L2, launched eagerly and replayed from a CUDA graph?

    For each size (32 MB: one 4096-wide bf16 hidden layer; 64 MB: two, more than L2 holds)
    times ``reads`` sums of the whole buffer (an ascent reads its head 2 x steps times) four
    ways: plain and windowed, eager on a stream and replayed from a graph captured on that
    stream. A working window makes the windowed rows faster than the plain ones; at 64 MB,
    where plain reads cycle through more than L2 and miss, it can keep the set-aside share."""
    out = {"reads": reads, "limits": vars(limits(device)), "sizes": []}
    for megabytes in sizes_mb:
        out["sizes"].append(_probe_size(device, megabytes, reads))
    return out


def _probe_size(device: torch.device, megabytes: int, reads: int) -> dict:
    from vllm_recontrol.ascent_graphs import capture_graph

    x = torch.ones(megabytes * 2**19, device=device, dtype=torch.bfloat16)
    sink = torch.empty(reads, device=device, dtype=torch.float32)

    def reads_of_x() -> None:
        for i in range(reads):
            torch.sum(x, dim=0, dtype=torch.float32, out=sink[i])

    def time_on(stream: torch.cuda.Stream, fn) -> float:
        with torch.cuda.stream(stream):
            fn()  # warm
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(20):
                torch.cuda._sleep(1_000_000)  # keep the launches ahead of the GPU
                start.record(stream)
                fn()
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    nbytes = x.numel() * x.element_size()
    out = {"megabytes": megabytes, "hbm_3tbs_ms": reads * nbytes / 3.0e9}  # for orientation
    for mode in ("plain", "window"):
        stream = torch.cuda.Stream(device)
        try:
            if mode == "window":
                out["hit_ratio"] = persist(stream, x.data_ptr(), nbytes)
            out[f"{mode}_eager_ms"] = time_on(stream, reads_of_x)
            graph = capture_graph(reads_of_x, device, stream=stream)
            out[f"{mode}_graph_ms"] = time_on(stream, graph.replay)
            del graph
        finally:
            if mode == "window":
                release(stream)
    return out
