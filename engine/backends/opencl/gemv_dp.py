"""The int4 GEMV by integer dot products (kernels/gemv_dp.cl): x in int16 blocks of 32, weights' nibbles
multiplied by dp2a (NVIDIA inline PTX), 4-5 times fewer instructions per weight than gemv.cl's float
pieces.

Matmul uses it for int4 GEMVs (fp16 scales, no norm epilogue) when the tuning database asks for it
(matmul parameter gemv_dp):
  "off"       never (the default);
  "ptx"       the PTX instructions, checked at load (`probe`: a small product against NumPy); a device
              whose compiler rejects them, or whose result is wrong, keeps gemv.cl, and the reason goes
              to stderr once;
  "emulated"  the same kernel with each instruction replaced by ordinary arithmetic on the same
              registers, so that a CPU checks the layout, pieces, tails and epilogues.
"""
from __future__ import annotations


from ...errors import PerfxError
from .probe import int4_gemv, passed
from .runtime import Runtime
from .specs import check_fits

MODES = ("off", "ptx", "emulated")


class DpGemv:
    """Build options of gemv_dp for one device: its mode and work decomposition (dp_vec, dp_ksplit,
    dp_wg_rows, dp_tpw). Matmul._gemv makes the launches."""

    def __init__(self, rt: Runtime, params: dict):
        mode = params["gemv_dp"]
        if mode not in MODES:
            raise PerfxError(f"gemv_dp must be one of {MODES}, got {mode!r}")
        self.rt, self.mode = rt, mode
        keys = ("dp_vec", "dp_ksplit", "dp_wg_rows", "dp_tpw")
        self.vec, self.ksplit, self.wg_rows, self.tpw = (int(params[k]) for k in keys)
        if (self.vec not in (4, 8, 16) or self.ksplit < 1 or self.ksplit & (self.ksplit - 1)
                or self.tpw < 1 or self.wg_rows < 1):
            raise PerfxError(f"dp_vec must be 4, 8 or 16, dp_ksplit a power of two, dp_tpw and dp_wg_rows at least 1, "
                             f"got {self.vec}, {self.ksplit}, {self.tpw}, {self.wg_rows}")

    def takes(self, w, norm, norm_in=None) -> bool:
        """Whether it multiplies this matrix (int4 with fp16 scales) in this call: not with the norm
        epilogue (gemv_kernel.h NORM) or prologue (norm_in.h), which gemv.cl keeps."""
        return w.fmt == "int4" and not w.scale_f32 and norm is None and norm_in is None

    def defines(self) -> dict:
        return {"VEC": self.vec, "KSPLIT": self.ksplit, "WG_ROWS": self.wg_rows, "TPW": self.tpw, "DP_PTX": int(self.mode == "ptx")}

    def probe(self, mm) -> str | None:
        """None when the kernel builds and matches NumPy on a small product through `mm` (a Matmul using
        this GEMV): two tokens, rows not a multiple of 4, a 64- and a 32-element tail; else why not."""
        dev = self.rt.device
        return int4_gemv(mm, lambda: check_fits("gemv_dp", {**self.defines(), "G": 32}, dev.local_mem_size,
                                                dev.max_work_group_size))


def make(rt: Runtime, params: dict) -> DpGemv | None:
    """The device's DpGemv, or None where gemv_dp is off (the probe runs once Matmul can launch it)."""
    return None if params["gemv_dp"] == "off" else DpGemv(rt, params)


def checked(mm, dp: DpGemv | None) -> DpGemv | None:
    """dp when its probe through mm passes, else None (the reason said on stderr)."""
    if dp is None:
        return None
    ok = passed(mm.rt.device, dp.probe(mm), "the integer dot-product GEMV", "decode uses the float GEMV")
    return dp if ok else None
