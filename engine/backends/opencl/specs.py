"""Each OpenCL kernel described once, in the manner of CLBlast's tuner specs.

A `KernelSpec` declares a kernel's tunable parameters (the key in `params` and kernels/tuning.toml,
the -D define it sets, its default, the values the tuner tries and what it means), the defines the
model's shape sets, functions of the defines for its local memory and work-group size, and the bytes
and FLOPs a launch moves for a shape (`cost`, the floor of a roofline). From it
come matmul.py's and fused.py's DEFAULT_PARAMS, the tuner's search space (`search_space`) and the
check made before a kernel is built (`check_fits`): a configuration whose local memory or work-group
size the device cannot hold is refused with a message naming the kernel and the limit, instead of
failing at launch.

A parameter with define None is a host-side choice (a threshold, a scheme), not a -D.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import PerfxError

F32 = 4
MMA_PAD = 8                  # gemm_mma.cl: halves of padding per local row


@dataclass(frozen=True)
class Param:
    key: str                     # name in params and kernels/tuning.toml: "att_wg"
    define: str | None           # the -D it sets ("ATT_WG"); None: a host-side choice
    default: Any
    candidates: tuple = ()       # values the tuner tries (empty: not searched)
    help: str = ""


@dataclass(frozen=True)
class KernelSpec:
    name: str                    # "attention"
    source: str | tuple[str, ...]   # the file under kernels/, or the files holding its variants
    section: str                 # its section of the tuning database: "matmul" or "fused"
    params: tuple[Param, ...]
    model_defines: tuple[str, ...] = ()                 # set from the model's shape, not tuned
    local_bytes: Callable[[dict], int] = lambda d: 0    # defines -> local memory per work-group
    work_group: Callable[[dict], int] = lambda d: 1     # defines -> work-items per work-group
    constraints: tuple[tuple[str, Callable[[dict], bool]], ...] = field(default=())   # (rule, defines -> ok)
    hint: str = "lower its tile sizes"                  # what to change when it does not fit
    traffic: Callable[[dict], tuple[int, int]] | None = None   # shape -> (bytes moved, FLOPs), at least

    def cost(self, **shape) -> tuple[int, int]:
        """(bytes, FLOPs) of one launch on a shape: the floor a roofline measures the kernel against."""
        if self.traffic is None:
            raise PerfxError(f"{self.name} declares no traffic")
        return self.traffic(shape)

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else self.source

    def defaults(self) -> dict[str, Any]:
        return {p.key: p.default for p in self.params}


WEIGHT_BYTES = {4: lambda n, k, g: n * k // 2 + n * (k // g) * 4,    # int4 + fp16 scale and zero per group
                8: lambda n, k, g: n * k + n * (k // 32) * 2,         # int8 + fp16 scale per 32
                16: lambda n, k, g: n * k * 2}


def _matmul_traffic(s: dict) -> tuple[int, int]:
    """y [T, N] = x [T, K] @ W [N, K]^T: the weights read once (weight_bytes as stored, or as bits and
    group make them), x read and y written in f32 (n_out columns of y: N / 2 for a gated product)."""
    T, N, K = s["T"], s["N"], s["K"]
    weights = s.get("weight_bytes") or WEIGHT_BYTES[s.get("bits", 4)](N, K, s.get("group", 32))
    return weights + 4 * T * (K + s.get("n_out", N)), 2 * T * N * K


def _attention_traffic(s: dict) -> tuple[int, int]:
    """T queries over S cached positions: K and V read once (kv_bytes each), Q read and out written in f32;
    QK^T and PV: 4 T S heads head_dim FLOPs (the causal half not subtracted)."""
    T, S, D = s["T"], s["S"], s["head_dim"]
    kv = 2 * S * s["n_kv_heads"] * D * s.get("kv_bytes", 4)
    return kv + 8 * T * s["n_heads"] * D, 4 * T * S * s["n_heads"] * D


def _attention_local(d: dict) -> int:
    """attention.cl's __local arrays: q_loc [ROWS, HEAD_DIM], p_loc [ROWS, ATT_WG], m, l, a [ROWS],
    red [ATT_WG] of VW floats, with KL > 1 s_part [ROWS, ATT_WG]; ROWS = QT * GROUP."""
    rows = d["QT"] * d["GROUP"]
    s_part = rows * d["ATT_WG"] if d.get("KL", 1) > 1 else 0
    return F32 * (rows * d["HEAD_DIM"] + rows * d["ATT_WG"] + 3 * rows + d["ATT_WG"] * d["VW"] + s_part)


GEMV = KernelSpec("gemv", ("gemv.cl", "gemv_int.cl"), "matmul", (      # float products, integer products
    Param("gemv_vec", "VEC", 16, (4, 8, 16), "piece width (lanes of the explicit vectors along K)"),
    Param("gemv_ksplit", "KSPLIT", 1, (1, 2, 4, 8, 16), "work-items splitting K within a work-group"),
    Param("gemv_wg_rows", "WG_ROWS", 8, (1, 2, 4, 8), "work-items along the rows per work-group"),
    Param("gemv_tpw", "TPW", 1, (), "row tiles (4 rows each) per work-item, sharing each load of x"),
    Param("gemv_zero_inline", None, False, (), "int4 zero terms from each work-item's own x (no xsum launch)"),
    Param("gemv_int_dot", None, True, (), "x in int16 and integer products where the device builds it"),
    Param("gemv_int_dot_256", None, False, (), "... with 256-bit instructions even where 512-bit exist"),
    Param("gemv_norm", None, True, (), "the residual projections' GEMV ends with the next RMSNorm"),
    Param("gemv_norm_in", None, False, (), "the GEMVs that read the normalised residual stream normalise it in "
          "their prologue, the o and down GEMVs add into it: no norm launches in decode (norm_in.h)"),
    Param("gemv_norm_stage", None, True, (), "... with x * norm weight staged in local memory (else scaled per load)"),
    Param("use_image", None, False, (), "read x through an image1d_buffer_t"),
    # The warp layout (GPUs; docs/performance.md, H200): gemv_ksplit 32, several pieces in flight, no tree.
    Param("gemv_prefetch", "PREFETCH", 1, (), "int4 pieces of the K walk whose weights a work-item loads "
          "before any arithmetic (gemv_tiles.h WALK128; 1: one piece at a time)"),
    Param("gemv_reduce", None, "tree", (), 'how the K split\'s partial sums meet: "tree" (local memory, '
          'log2(KSPLIT) barriers), "once" (local memory, one step), "shfl" (shfl.sync.bfly by NVIDIA inline PTX, '
          'probed at load; KSPLIT <= 32), "xor" (shfl emulated through local memory, for CPUs)'),
    Param("gemv_waves", None, 0, (), "work-groups per compute unit, each looping over row groups (GRID_STRIDE): "
          "whole waves; 0: one work-group per WG_ROWS row items"),
), model_defines=("FORMAT", "G"),
    local_bytes=lambda d: F32 * d["WG_ROWS"] * d["KSPLIT"] * (d["TPW"] * 4 + ("REDUCE_ONCE" in d)),   # part[][][]
    work_group=lambda d: d["KSPLIT"] * d["WG_ROWS"], traffic=_matmul_traffic, hint="lower gemv_ksplit or gemv_wg_rows",
    constraints=(("KSPLIT is a power of two and TPW at least 1",
                  lambda d: d["KSPLIT"] >= 1 and d["KSPLIT"] & (d["KSPLIT"] - 1) == 0 and d["TPW"] >= 1),
                 ("PREFETCH is at least 1", lambda d: d.get("PREFETCH", 1) >= 1),
                 ("with shfl.sync (LANE_PTX) KSPLIT is 2 to 32 and KSPLIT * WG_ROWS fills whole warps",
                  lambda d: not d.get("LANE_PTX") or (1 < d["KSPLIT"] <= 32 and d["KSPLIT"] * d["WG_ROWS"] % 32 == 0))))

# gemv_reduce's defines (gemv_kernel.h, lane_xor.h); "tree" sets none.
GEMV_REDUCE = {"tree": {}, "once": {"REDUCE_ONCE": True}, "shfl": {"LANE_SHFL": True, "LANE_PTX": 1},
               "xor": {"LANE_SHFL": True, "LANE_PTX": 0}}

GEMV_DP = KernelSpec("gemv_dp", "gemv_dp.cl", "matmul", (      # int4 x int16 by dp2a (NVIDIA PTX)
    Param("gemv_dp", None, "off", (), 'int4 GEMV by integer dot products: "off", "ptx", "emulated"'),
    Param("dp_vec", "VEC", 4, (4, 8, 16), "lanes of a 128-chunk per piece (16-byte loads per row)"),
    Param("dp_ksplit", "KSPLIT", 32, (8, 16, 32, 64), "work-items splitting K within a work-group"),
    Param("dp_wg_rows", "WG_ROWS", 4, (1, 2, 4, 8), "work-items along the rows per work-group"),
    Param("dp_tpw", "TPW", 1, (1, 2), "row tiles (4 rows each) per work-item, sharing each load of x"),
), model_defines=("G",),
    local_bytes=lambda d: F32 * d["WG_ROWS"] * d["TPW"] * 4 * d["KSPLIT"],   # gemv_kernel.h part[][][]
    work_group=lambda d: d["KSPLIT"] * d["WG_ROWS"], traffic=_matmul_traffic,
    constraints=(("KSPLIT is a power of two; with PTX and KSPLIT <= 32 (shfl.sync) KSPLIT * WG_ROWS fills whole warps",
                  lambda d: d["KSPLIT"] & (d["KSPLIT"] - 1) == 0 and not (
                      d.get("DP_PTX") and d["KSPLIT"] <= 32 and d["KSPLIT"] * d["WG_ROWS"] % 32)),))

GEMM_FEW = KernelSpec("gemm_few", "gemm.cl", "matmul", (
    Param("few_max_tokens", None, 32, (), "T up to this uses gemm_few, above it gemm_tiled"),
    Param("few_vec", "VEC", 16, (4, 8, 16), "piece width"),
    Param("few_tt", "TT", 4, (2, 4, 8), "tokens per work-item (fewer when T is smaller)"),
    Param("few_wg_rows", None, 1, (1, 4, 16), "row tiles per work-group"),
), model_defines=("FORMAT", "G"), traffic=_matmul_traffic)

GEMM_TILED = KernelSpec("gemm_tiled", "gemm.cl", "matmul", (
    Param("tiled_vec", "VEC", 16, (), "piece width when dequantizing into local memory"),
    Param("tiled_bn", "BN", 16, (16, 32, 64), "rows per work-group"),
    Param("tiled_bt", "BT", 48, (32, 48, 64), "tokens per work-group"),
    Param("tiled_rr", "RR", 4, (), "rows per work-item"),
    Param("tiled_tr", "TR", 6, (4, 6), "tokens per work-item"),
    Param("tiled_kc", None, 0, (), "chunks of 128 of K staged per barrier (0: all of K, as local memory allows)"),
    Param("tiled_x_local", "X_LOCAL", 0, (), "stage X in local memory too (0: read it from global memory)"),
    Param("tiled_arith", None, "f32", (), 'arithmetic of the many-token int4 GEMM: "f32" (gemm.cl), "half" '
          '(gemm_half.cl, cl_khr_fp16) or "dot8" (gemm_dot8.cl, cl_khr_integer_dot_product); probed at load'),
), model_defines=("FORMAT", "G"),
    local_bytes=lambda d: F32 * 128 * (d["BN"] + d["X_LOCAL"] * d["BT"]),     # one chunk of K staged
    work_group=lambda d: (d["BT"] // d["TR"]) * (d["BN"] // d["RR"]), traffic=_matmul_traffic,
    constraints=(("BN is a multiple of RR and BT of TR", lambda d: d["BN"] % d["RR"] == 0 and d["BT"] % d["TR"] == 0),))

def _reg_rules(d: dict) -> bool:
    mwi, twi = d["MWG"] // d["MDIMC"], d["NWG"] // d["NDIMC"]
    return (d["MWG"] % (d["MDIMC"] * d["VW"]) == 0 and d["NWG"] % (d["NDIMC"] * d["VW"]) == 0
            and (mwi // d["VW"]) % 2 == 0 and twi >= 1 and d["KWW"] in (2, 4) and d["VW"] in (2, 4))


GEMM_REG = KernelSpec("gemm_reg", "gemm_reg.cl", "matmul", (     # two-level tiles, double-buffered (any OpenCL 1.2)
    Param("tiled_reg", None, False, (), "the many-token GEMM by gemm_reg.cl in place of gemm_tiled "
          "(the tuner's reg group turns it on where one of its tilings is faster)"),
    Param("reg_mwg", "MWG", 128, (64, 128), "rows per work-group (with SWIGLU half gate, half up rows)"),
    Param("reg_nwg", "NWG", 128, (64, 128), "tokens per work-group"),
    Param("reg_mdimc", "MDIMC", 16, (8, 16), "work-items along the rows (register tile: MWG / MDIMC rows)"),
    Param("reg_ndimc", "NDIMC", 16, (8, 16), "work-items along the tokens (register tile: NWG / NDIMC tokens)"),
    Param("reg_kww", "KWW", 2, (2, 4), "lanes of each of a chunk's 8 planes per stage: K stage of 8 KWW elements"),
    Param("reg_vw", "VW", 4, (2, 4), "width of the local-memory reads of the register tile's operands"),
    Param("reg_pad", "PAD", 0, (0, 4), "floats of padding per row of the K-major local tiles"),
), model_defines=("FORMAT", "G"), traffic=_matmul_traffic, hint="lower reg_mwg, reg_nwg or reg_kww",
    local_bytes=lambda d: F32 * 2 * 8 * d["KWW"] * (d["MWG"] + d["NWG"] + 2 * d["PAD"]),   # Wl, Xl [2][KS][.. + PAD]
    work_group=lambda d: d["MDIMC"] * d["NDIMC"],
    constraints=(("MWG is a multiple of MDIMC * VW with an even count of VW-vectors per work-item (SWIGLU's gate "
                  "and up halves), NWG a multiple of NDIMC * VW, KWW and VW 2 or 4", _reg_rules),))

# The tiled GEMM's variants (gemm_variants.py) take gemm_tiled's tile parameters.
GEMM_HALF = KernelSpec("gemm_half", "gemm_half.cl", "matmul", (
    Param("half_fold", "HALF_FOLD", 4, (), "products summed in fp16 per accumulator before each fold into f32 "
          "(1 to 4: 8 loses more than 5e-4 of the output, docs/performance.md)"),
), model_defines=("G",), traffic=_matmul_traffic,
    local_bytes=lambda d: 2 * 128 * (d["BN"] + d["X_LOCAL"] * d["BT"]),       # one chunk of K staged
    work_group=lambda d: (d["BT"] // d["TR"]) * (d["BN"] // d["RR"]))

GEMM_DOT8 = KernelSpec("gemm_dot8", "gemm_dot8.cl", "matmul", (), model_defines=("G",), traffic=_matmul_traffic,
    local_bytes=lambda d: (128 + 4 * 8) * (d["BN"] + d["X_LOCAL"] * d["BT"]),   # int8 and (scale, zero) per 32
    work_group=lambda d: (d["BT"] // d["TR"]) * (d["BN"] // d["RR"]))

_MMA_PARAMS = (
    Param("gemm_mma", None, "off", (), 'many-token int4 GEMM on matrix units: "off", "ptx", "emulated"'),
    Param("mma_min_tokens", None, 64, (), "T from this uses it"),
    Param("mma_bn", "BN", 128, (), "rows per work-group"),
    Param("mma_bt", "BT", 64, (), "tokens per work-group"),
    Param("mma_wm", "WM", 64, (), "rows per warp"),
    Param("mma_wn", "WN", 32, (), "tokens per warp"),
    Param("mma_ks", "KS", 64, (32, 64), "K elements per stage staged in local memory: 32 or 64"),
    Param("mma_buffers", "BUFS", 1, (1, 2), "local buffers of stages: 2 stores stage s + 1 while stage s is "
          "multiplied (one barrier per stage)"),
    Param("mma_words_once", "WORDS_ONCE", 0, (0, 1), "a chunk's nibble words load once, at its first stage"),
    Param("mma_deq", None, "f32", (), 'int4 -> fp16 arithmetic: "f32" (converted to fp16) or "half2" '
          "(lop3 into 1024.0's mantissa, fma.rn.f16x2)"),
    Param("mma_ldmatrix", None, "off", (), 'fragments by ldmatrix.x4 instead of 32-bit loads: "off", or how '
          'a __local pointer becomes a shared-window address: "auto" (isspacep), "value", "cvta"'),
    Param("mma_maxrreg", None, 0, (), "at most this many registers per work-item (NVIDIA's -cl-nv-maxrregcount, "
          "128: two work-groups of 256 per SM; 0: the compiler's choice)"),
)


def _mma(d: dict) -> dict:
    """gemm_mma's defines, those not given at their declared defaults."""
    return {**{p.define: p.default for p in _MMA_PARAMS if p.define}, **d}


def _mma_warps(d: dict) -> int:
    return (d["BN"] // d["WM"]) * (d["BT"] // d["WN"])


def _mma_local(d: dict) -> int:
    """gemm_mma.cl's __local arrays: BUFS stages of fp16 W [BN][KS + PAD] and X [BT][KS + PAD]; without the
    instructions (MMA = 0) also the exchange of the warps' registers, 6 words per work-item."""
    d = _mma(d)
    exchange = 0 if d.get("MMA", 1) else 6 * 4 * 32 * _mma_warps(d)
    return 2 * d["BUFS"] * (d["BN"] + d["BT"]) * (d["KS"] + MMA_PAD) + exchange


def _mma_items_whole(d: dict) -> bool:
    """Each work-item has whole X items and an even number of whole W items (gemm_mma.cl's IX, IW)."""
    d, nwi = _mma(d), 32 * _mma_warps(d)
    return not (8 * d["BN"] % nwi or d["BT"] * d["KS"] // 8 % nwi or 8 * d["BN"] // nwi % 2)


GEMM_MMA = KernelSpec("gemm_mma", "gemm_mma.cl", "matmul", _MMA_PARAMS, model_defines=("G",),
    traffic=_matmul_traffic, local_bytes=_mma_local, work_group=lambda d: 32 * _mma_warps(d),     # a warp per WM x WN tile
    hint="lower mma_bn or mma_bt (or mma_ks, mma_buffers)",
    constraints=(("BN % WM, BT % WN, WM % 16 and WN % 8 are 0",
                  lambda d: not (d["BN"] % d["WM"] or d["BT"] % d["WN"] or d["WM"] % 16 or d["WN"] % 8)),
                 ("KS is 32 or 64 and BUFS 1 or 2",
                  lambda d: _mma(d)["KS"] in (32, 64) and _mma(d)["BUFS"] in (1, 2)),
                 ("NWI (32 per warp) divides BT KS / 8, and 8 BN into an even number", _mma_items_whole),
                 ("with ldmatrix WN % 16 is 0", lambda d: not (d.get("LDSM") and d["WN"] % 16))))

RMSNORM = KernelSpec("rmsnorm", "rmsnorm.cl", "fused", (
    Param("rms_wg", "RMS_WG", 64, (32, 64, 128, 256), "add_rmsnorm work-group size (power of two)"),
), local_bytes=lambda d: F32 * d["RMS_WG"], work_group=lambda d: d["RMS_WG"],
    constraints=(("RMS_WG is a power of two", lambda d: d["RMS_WG"] & (d["RMS_WG"] - 1) == 0),))

ATTENTION = KernelSpec("attention", "attention.cl", "fused", (
    Param("att_wg", "ATT_WG", 128, (32, 64, 128, 256), "work-group size = keys per block "
          "(a multiple of att_vec and of head_dim / att_vec)"),
    Param("att_vec", "VW", 4, (4, 8, 16), "vector width per work-item: 4, 8 or 16"),
    Param("att_key_lanes", "KL", 1, (1, 4, 8), "work-items per key in the score step of decode launches "
          "(QT = 1): 1, one key each; more, a key's row read side by side by that many"),
    Param("att_rows", None, 32, (8, 16, 32, 64), "most query rows (tile tokens x query heads of a KV head) "
          "per work-group: sets QT"),
    Param("split_max_t", None, 8, (), "split-KV (flash-decoding) only for T up to this ..."),
    Param("split_min_chunk", None, 128, (), "... with at least this many keys per slice ..."),
    Param("split_wgs", None, 0, (), "... aiming at this many work-groups per launch (0: the compute units)"),
    Param("max_splits", None, 64, (), "... and at most this many slices per KV head"),
    Param("kv_half", "KV_HALF", False, (), "KV cache stored as fp16 (vstore_half / vload_half)"),
    Param("split_combine", "SPLIT_COMBINE", False, (), "split-KV: the last work-group of a KV head to finish "
          "merges the slices (no combine launch)"),
    Param("att_serial", None, False, (False, True), "decode (T = 1, no split) by attend_one: one work-item "
          "per KV head (CPUs)"),
), model_defines=("HEAD_DIM", "N_KV_HEADS", "GROUP", "QT"),
    local_bytes=_attention_local, work_group=lambda d: d["ATT_WG"], hint="lower att_rows (or att_wg)",
    traffic=_attention_traffic,
    constraints=(("VW is 4, 8 or 16 and divides HEAD_DIM",
                  lambda d: d["VW"] in (4, 8, 16) and d["HEAD_DIM"] % d["VW"] == 0),
                 ("ATT_WG is a multiple of VW and of HEAD_DIM / VW",
                  lambda d: d["ATT_WG"] % d["VW"] == 0 and d["ATT_WG"] % max(d["HEAD_DIM"] // d["VW"], 1) == 0),
                 ("KL is a power of two dividing ATT_WG",
                  lambda d: d.get("KL", 1) & (d.get("KL", 1) - 1) == 0 and d["ATT_WG"] % d.get("KL", 1) == 0)))

def _attention_mma_local(d: dict) -> int:
    """attention_mma.cl's __local arrays: fp16 Q / K [max(ROWS, BK)][HEAD_DIM + 8] and V^T [HEAD_DIM][BK + 8]
    (ROWS = 16 WARPS); without the instructions (MMA = 0) also the exchange of the warps' registers,
    7 words per work-item."""
    rows = max(16 * d["WARPS"], d["BK"])
    exchange = 0 if d.get("MMA", 1) else 7 * 4 * 32 * d["WARPS"]
    return 2 * (rows * (d["HEAD_DIM"] + 8) + d["HEAD_DIM"] * (d["BK"] + 8)) + exchange


ATTENTION_MMA = KernelSpec("attention_mma", "attention_mma.cl", "fused", (
    Param("attention_mma", None, "off", (), 'prefill attention on matrix units: "off", "ptx", "emulated"'),
    Param("att_mma_min_tokens", None, 64, (), "prefill passes of T from this use it"),
    Param("att_mma_warps", "WARPS", 4, (2, 4, 8), "warps per work-group, 16 query rows (tokens x GQA heads) each"),
    Param("att_mma_bk", "BK", 64, (32, 64), "keys per block staged in local memory"),
), model_defines=("HEAD_DIM", "N_KV_HEADS", "GROUP"),
    local_bytes=_attention_mma_local, work_group=lambda d: 32 * d["WARPS"], traffic=_attention_traffic,
    hint="lower att_mma_bk (or att_mma_warps)",
    constraints=(("HEAD_DIM and BK are multiples of 16, GROUP at most 16 * WARPS",
                  lambda d: d["HEAD_DIM"] % 16 == 0 and d["BK"] % 16 == 0 and d["GROUP"] <= 16 * d["WARPS"]),))

PAGED_ATTENTION = KernelSpec("paged_attention", "paged_attention.cl", "fused", (
    Param("att_wg", "ATT_WG", 128, (32, 64, 128, 256), "work-group size = keys per step (attention's)"),
    Param("att_vec", "VW", 4, (4, 8, 16), "vector width per work-item (attention's)"),
), model_defines=("HEAD_DIM", "N_KV_HEADS", "GROUP", "BLOCK_SIZE", "QT"),
    local_bytes=lambda d: F32 * (d["QT"] * d["GROUP"] * (d["HEAD_DIM"] + d["ATT_WG"] + 3)
                                 + d["ATT_WG"] * (1 + d["VW"])),
    work_group=lambda d: d["ATT_WG"], hint="lower att_wg", traffic=_attention_traffic)

ARGMAX = KernelSpec("argmax", "argmax.cl", "fused", (
    Param("argmax_wg", "ARGMAX_WG", 64, (), "work-group size (power of two)"),
    Param("argmax_groups", "ARGMAX_GROUPS", 64, (), "stage-1 work-groups"),
), local_bytes=lambda d: 2 * F32 * d["ARGMAX_WG"], work_group=lambda d: d["ARGMAX_WG"],
    constraints=(("ARGMAX_WG is a power of two", lambda d: d["ARGMAX_WG"] & (d["ARGMAX_WG"] - 1) == 0),))

SPECS: dict[str, KernelSpec] = {
    s.name: s for s in (GEMV, GEMV_DP, GEMM_FEW, GEMM_TILED, GEMM_REG, GEMM_HALF, GEMM_DOT8, GEMM_MMA, RMSNORM,
                        ATTENTION, ATTENTION_MMA,
                        PAGED_ATTENTION, ARGMAX)}


def defaults(section: str) -> dict[str, Any]:
    """The default params of every kernel of a tuning-database section ("matmul" or "fused")."""
    out: dict[str, Any] = {}
    for spec in SPECS.values():
        if spec.section == section:
            out.update(spec.defaults())
    return out


def source_defaults(source: str) -> dict[str, Any]:
    """{define: default} of the tunable -D parameters read by kernels/<source>: the defaults that the
    .cl files do not repeat (Runtime.program fills in any that a build does not set)."""
    out: dict[str, Any] = {}
    for spec in SPECS.values():
        if source in spec.sources:
            for p in spec.params:
                if p.define:
                    out.setdefault(p.define, p.default)
    return out


def search_space(kernel: str) -> dict[str, tuple]:
    """The tuner's candidates for one kernel's parameters: {key: values}."""
    return {p.key: p.candidates for p in SPECS[kernel].params if p.candidates}


def _where(spec: KernelSpec, defines: dict[str, Any]) -> str:
    return f"{spec.name} ({', '.join(spec.sources)}) with " + ", ".join(f"{k}={v}" for k, v in sorted(defines.items()))


def check_rules(kernel: str, defines: dict[str, Any]) -> None:
    """Refuses a configuration that breaks one of the kernel's declared constraints."""
    spec = SPECS[kernel]
    broken = [rule for rule, ok in spec.constraints if not ok(defines)]
    if broken:
        raise PerfxError(f"{_where(spec, defines)}: {'; '.join(broken)} does not hold")


def over_limits(kernel: str, defines: dict[str, Any], local_mem: int, max_work_group: int) -> str | None:
    """Why a configuration's local memory or work-group size is more than the device holds; None when it fits."""
    spec = SPECS[kernel]
    where, fix = _where(spec, defines), f"{spec.hint} in kernels/tuning.toml or the device's override file"
    need = spec.local_bytes(defines)
    if need > local_mem:
        return (f"{where}: needs {need} bytes of local memory per work-group, more than the device's "
                f"{local_mem}; {fix}")
    wg = spec.work_group(defines)
    if wg > max_work_group:
        return f"{where}: needs work-groups of {wg} work-items, more than the device's {max_work_group}; {fix}"
    return None


def check_fits(kernel: str, defines: dict[str, Any], local_mem: int, max_work_group: int) -> None:
    """Refuses a configuration that breaks a constraint of the kernel, or whose local memory or
    work-group size the device cannot hold, before it is built or launched."""
    check_rules(kernel, defines)
    why = over_limits(kernel, defines, local_mem, max_work_group)
    if why:
        raise PerfxError(why)
