"""The register-blocked inner kernel of the direct convolution, written in LLVM IR.

Numba does not block loops for registers: its direct loops kept every partial sum in memory and
ran at 10-25 % of what a core can do. This module emits, per (MR, NV), one small loop whose
MR x NV partial sums are SIMD registers for its whole life:

    acc[i][v] = sum_{t < T}  a[arow[i] + aoff[t]]  *  b[boff[t] + v*VL : + VL]
    c[i*ldc + v*VL : + VL]  =  acc[i][v]            (+= with ``add``)

one scalar of ``a`` broadcast per row, NV vectors of ``b`` per step, MR*NV fused multiply-adds.
The offset tables make it a convolution: with a = the padded input, arow = output pixel offsets
and aoff = tap offsets, b = the weights laid out (taps, output channels), it is the forward
pass with output channels across the vector lanes (direct.py, "form A"); with a = the weights,
b = the padded input and boff = tap offsets, output pixels go across the lanes ("form B"); with
a = the padded input at tap offsets, aoff = pixel offsets and b = grad_y laid out (pixels,
output channels), it is the filter gradient. LeNet-5's conv2 forward (16 images, one thread)
ran 173 us as im2col + BLAS GEMM and 68 us as form A.

VL is the SIMD width of this CPU (64 bytes with AVX-512, else 32), MR x NV is chosen so that
the accumulators, NV vectors of b and one broadcast fit the register file. The caller passes
raw addresses (``arr.ctypes.data``, uint64) and guarantees every offset is in bounds: nothing
here checks. Results are summed over t in order: deterministic.
"""

import functools
import itertools

import llvmlite.binding as llb
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = [
    "COMBOS",
    "DOT_COMBOS",
    "VBYTES",
    "dot_tile",
    "dot_tile_shape",
    "lanes",
    "tile",
    "tile_rows",
    "tile_vectors",
]

# CPUs that LLVM knows by name and that have AVX-512F (for NUMBA_CPU_NAME without a features
# list); any other named CPU is taken to have AVX2 at most.
_AVX512_CPUS = (
    "skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake-client",
    "icelake-server", "tigerlake", "rocketlake", "sapphirerapids", "graniterapids",
    "emeraldrapids", "znver4", "znver5", "x86-64-v4", "knl", "knm",
)  # fmt: skip


def _target_avx512():
    """Does the code Numba compiles (and these tiles join) have AVX-512F? The host's
    features, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name another target (portable
    caches; ``NUMBA_CPU_NAME=haswell`` runs the AVX2 tiles on an AVX-512 machine): 512-bit
    vectors on a target without them would be split in two and spill the 32 registers the
    tile shapes assume."""
    from numba.core import config

    features = getattr(config, "CPU_FEATURES", None)
    if features:
        flags = {f[1:]: f[0] == "+" for f in features.replace(" ", "").split(",") if f}
        return bool(flags.get("avx512f", False))
    name = getattr(config, "CPU_NAME", None)
    if name and name != "host":
        return name in _AVX512_CPUS
    return bool(llb.get_host_cpu_features().get("avx512f", False))


_AVX512 = _target_avx512()
VBYTES = 64 if _AVX512 else 32  # bytes per SIMD register used by the tiles
_REGISTERS = 32 if _AVX512 else 16


def _rows(nv):
    """Rows MR for NV vectors: MR*NV accumulators + NV vectors of b + MR broadcasts of a fit
    the register file (LLVM may load all broadcasts of a step first; it spilled otherwise)."""
    return max(1, min(12, (_REGISTERS - nv) // (nv + 1)))


# (MR, NV) of the tiles compiled: NV = 1..4 with the most rows that fit (combo index NV - 1),
# then, with AVX-512's 32 registers, two with fewer rows for the row counts those pad most where
# rows are channels (form B, the scatter grad_x): (6, 3) for 6, 12, 18, 24 ... channels ((7, 3)
# pads LeNet-5's 6 to 7, fast99's 24 to 28) and (8, 2) for 8, 16, 32, 64 ((10, 2) pads 16 to 20).
# With AVX2's 16 registers the NV = 3 / 2 tiles already have 3 and 4 rows.
_EXTRA = ((6, 3), (8, 2)) if _REGISTERS == 32 else ()
COMBOS = tuple((_rows(nv), nv) for nv in (1, 2, 3, 4))
COMBOS += tuple(c for c in _EXTRA if c not in COMBOS)
assert len(COMBOS) in (4, 6) and all(mr * nv + nv + mr <= _REGISTERS for mr, nv in COMBOS)


def _dot_rows(nk):
    """Rows MR of a dot tile with NK columns: MR*NK accumulators + NK vectors of b (a's
    vectors feed the multiply-adds straight from memory) fit the register file."""
    return max(1, min(12, (_REGISTERS - nk - 2) // nk))


# (MR, NK) of the dot tiles compiled, NK = 1..4: combo index = NK - 1.
DOT_COMBOS = tuple((_dot_rows(nk), nk) for nk in (1, 2, 3, 4))


def lanes(itemsize):
    """VL: elements of this size per SIMD register."""
    return VBYTES // itemsize


_I64, _I32 = ir.IntType(64), ir.IntType(32)
_ARGS = (types.uintp,) * 5 + (types.int64, types.uintp, types.int64, types.boolean)


_loops = itertools.count()


def _no_unroll(module):
    """Loop metadata that keeps LLVM from unrolling the tile loop: unrolled by two, it loaded
    every broadcast of both steps first and spilled registers (LeNet-5 conv1: 2-3x slower)."""
    off = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    tag = module.add_metadata([ir.MetaDataString(module, f"fastconv.tile.{next(_loops)}")])
    loop_id = module.add_metadata([off, tag])
    loop_id.operands = (loop_id, off, tag)  # a loop id's first operand is itself
    return loop_id


def _make(mr, nv, itemsize):
    fl = ir.FloatType() if itemsize == 4 else ir.DoubleType()
    vl = VBYTES // itemsize
    vt = ir.VectorType(fl, vl)

    @intrinsic
    def tile(typingctx, a, arow, aoff, b, boff, T, c, ldc, add):
        def codegen(context, builder, signature, args):
            a, arow, aoff, b, boff, T, c, ldc, add = args
            fp, ip, vp = fl.as_pointer(), _I64.as_pointer(), vt.as_pointer()
            a, b, c = (builder.inttoptr(v, fp) for v in (a, b, c))
            arow, aoff, boff = (builder.inttoptr(v, ip) for v in (arow, aoff, boff))

            def at(p, i):
                return builder.gep(p, [i if isinstance(i, ir.Value) else ir.Constant(_I64, i)])

            def vload(p):
                return builder.load(builder.bitcast(p, vp), align=itemsize)

            rowp = [at(a, builder.load(at(arow, i))) for i in range(mr)]
            zero = ir.Constant(vt, None)
            name = f"llvm.fma.v{vl}f{8 * itemsize}"
            fma = builder.module.globals.get(name) or ir.Function(
                builder.module, ir.FunctionType(vt, [vt, vt, vt]), name
            )
            splat = ir.Constant(ir.VectorType(_I32, vl), [0] * vl)
            entry = builder.block
            loop = builder.function.append_basic_block("tile_loop")
            done = builder.function.append_basic_block("tile_done")
            builder.cbranch(builder.icmp_signed(">", T, ir.Constant(_I64, 0)), loop, done)

            builder.position_at_end(loop)  # one step t: NV loads of b, MR broadcasts of a
            t = builder.phi(_I64)
            acc = [[builder.phi(vt) for _ in range(nv)] for _ in range(mr)]
            ao, bo = builder.load(at(aoff, t)), builder.load(at(boff, t))
            bt = at(b, bo)
            bv = [vload(at(bt, v * vl)) for v in range(nv)]
            new = []
            for i in range(mr):
                s = builder.insert_element(
                    ir.Constant(vt, ir.Undefined), builder.load(at(rowp[i], ao)), _I32(0)
                )
                s = builder.shuffle_vector(s, ir.Constant(vt, ir.Undefined), splat)
                new.append([builder.call(fma, [s, bv[v], acc[i][v]]) for v in range(nv)])
            t1 = builder.add(t, ir.Constant(_I64, 1))
            t.add_incoming(ir.Constant(_I64, 0), entry)
            t.add_incoming(t1, loop)
            for i in range(mr):
                for v in range(nv):
                    acc[i][v].add_incoming(zero, entry)
                    acc[i][v].add_incoming(new[i][v], loop)
            br = builder.cbranch(builder.icmp_signed("<", t1, T), loop, done)
            br.set_metadata("llvm.loop", _no_unroll(builder.module))

            builder.position_at_end(done)  # store (or add to) c
            res = [[builder.phi(vt) for _ in range(nv)] for _ in range(mr)]
            for i in range(mr):
                for v in range(nv):
                    res[i][v].add_incoming(zero, entry)
                    res[i][v].add_incoming(new[i][v], loop)
            for i in range(mr):
                crow = at(c, builder.mul(ldc, ir.Constant(_I64, i)))
                for v in range(nv):
                    r = res[i][v]
                    p = builder.bitcast(at(crow, v * vl), vp)
                    with builder.if_then(add):
                        old = builder.load(p, align=itemsize)
                        builder.store(builder.fadd(old, r), p, align=itemsize)
                    with builder.if_then(builder.not_(add)):
                        builder.store(r, p, align=itemsize)
            return context.get_dummy_value()

        return types.void(*_ARGS), codegen

    return tile


_DOT_ARGS = (types.uintp, types.uintp, types.uintp, types.int64, types.int64, types.uintp)
_DOT_ARGS += (types.int64, types.boolean)


def _make_dot(mr, nk, itemsize):
    """The dot tile: MR x NK vector accumulators, lane-wise products summed over S steps, then
    each accumulator's lanes added up (a fixed tree: deterministic):

        c[i*ldc + k]  =  sum_{s < S} sum_lanes  a[arow[i] + s*VL : + VL] * b[k*ldb + s*VL : + VL]

    (+= with ``add``). MR + NK vector loads feed MR*NK fused multiply-adds a step."""
    fl = ir.FloatType() if itemsize == 4 else ir.DoubleType()
    vl = VBYTES // itemsize
    vt = ir.VectorType(fl, vl)

    @intrinsic
    def dot_tile(typingctx, a, arow, b, ldb, S, c, ldc, add):
        def codegen(context, builder, signature, args):
            a, arow, b, ldb, S, c, ldc, add = args
            fp, ip, vp = fl.as_pointer(), _I64.as_pointer(), vt.as_pointer()
            a, b, c = (builder.inttoptr(v, fp) for v in (a, b, c))
            arow = builder.inttoptr(arow, ip)

            def at(p, i):
                return builder.gep(p, [i if isinstance(i, ir.Value) else ir.Constant(_I64, i)])

            def vload(p):
                return builder.load(builder.bitcast(p, vp), align=itemsize)

            rowp = [at(a, builder.load(at(arow, i))) for i in range(mr)]
            colp = [at(b, builder.mul(ldb, ir.Constant(_I64, k))) for k in range(nk)]
            zero = ir.Constant(vt, None)
            name = f"llvm.fma.v{vl}f{8 * itemsize}"
            fma = builder.module.globals.get(name) or ir.Function(
                builder.module, ir.FunctionType(vt, [vt, vt, vt]), name
            )
            entry = builder.block
            loop = builder.function.append_basic_block("dot_loop")
            done = builder.function.append_basic_block("dot_done")
            builder.cbranch(builder.icmp_signed(">", S, ir.Constant(_I64, 0)), loop, done)

            builder.position_at_end(loop)  # one step s: NK loads of b, MR of a
            s = builder.phi(_I64)
            acc = [[builder.phi(vt) for _ in range(nk)] for _ in range(mr)]
            o = builder.mul(s, ir.Constant(_I64, vl))
            bv = [vload(at(colp[k], o)) for k in range(nk)]
            new = []
            for i in range(mr):
                av = vload(at(rowp[i], o))
                new.append([builder.call(fma, [av, bv[k], acc[i][k]]) for k in range(nk)])
            s1 = builder.add(s, ir.Constant(_I64, 1))
            s.add_incoming(ir.Constant(_I64, 0), entry)
            s.add_incoming(s1, loop)
            for i in range(mr):
                for k in range(nk):
                    acc[i][k].add_incoming(zero, entry)
                    acc[i][k].add_incoming(new[i][k], loop)
            br = builder.cbranch(builder.icmp_signed("<", s1, S), loop, done)
            br.set_metadata("llvm.loop", _no_unroll(builder.module))

            builder.position_at_end(done)  # lanes added pairwise, then stored (or added) to c
            res = [[builder.phi(vt) for _ in range(nk)] for _ in range(mr)]
            for i in range(mr):
                for k in range(nk):
                    res[i][k].add_incoming(zero, entry)
                    res[i][k].add_incoming(new[i][k], loop)
            for i in range(mr):
                crow = at(c, builder.mul(ldc, ir.Constant(_I64, i)))
                for k in range(nk):
                    r = res[i][k]
                    width = vl
                    while width > 1:
                        width //= 2
                        undef = ir.Constant(r.type, ir.Undefined)
                        halves = [
                            builder.shuffle_vector(
                                r, undef, ir.Constant(ir.VectorType(_I32, width), list(idx))
                            )
                            for idx in (range(width), range(width, 2 * width))
                        ]
                        r = builder.fadd(*halves)
                    v = builder.extract_element(r, _I32(0))
                    p = at(crow, k)
                    old = builder.load(p)
                    builder.store(builder.select(add, builder.fadd(old, v), v), p)
            return context.get_dummy_value()

        return types.void(*_DOT_ARGS), codegen

    return dot_tile


def tile(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add):
    """Run tile COMBOS[combo] in ``dtype`` (the arrays' ``.dtype``: float32 or float64).
    Addresses are uint64. Compiled code holds only that dtype's tiles (``_tile``)."""
    raise NotImplementedError("microkernel.tile runs inside compiled kernels only")


def dot_tile(combo, dtype, a, arow, b, ldb, S, c, ldc, add):
    """Run dot tile DOT_COMBOS[combo] in ``dtype`` (float32 or float64). Addresses are uint64."""
    raise NotImplementedError("microkernel.dot_tile runs inside compiled kernels only")


@functools.cache
def _tiles(make, combos, itemsize):
    """The intrinsics of one dtype, built on first use: a kernel compiled for float32 never
    generates (or makes LLVM optimise) the float64 tiles, and a float64 run builds its own."""
    return tuple(make(mr, n, itemsize) for mr, n in combos)


def _itemsize(dtype):
    """Bytes of the element type a kernel passes as ``x.dtype`` (a types.DType)."""
    if isinstance(dtype, types.DType) and dtype.dtype in (types.float32, types.float64):
        return dtype.dtype.bitwidth // 8
    raise TypeError(f"microkernel: float32 or float64 dtype expected, got {dtype}")


def _first_tiles(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add):
    """``tile`` for combo < 4 (the four tiles every CPU has)."""
    raise NotImplementedError("microkernel tiles run inside compiled kernels only")


@overload(_first_tiles, inline="always")
def _first_tiles_impl(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add):
    t0, t1, t2, t3 = _tiles(_make, COMBOS, _itemsize(dtype))[:4]

    def impl(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add):
        if combo == 0:
            t0(a, arow, aoff, b, boff, T, c, ldc, add)
        elif combo == 1:
            t1(a, arow, aoff, b, boff, T, c, ldc, add)
        elif combo == 2:
            t2(a, arow, aoff, b, boff, T, c, ldc, add)
        else:
            t3(a, arow, aoff, b, boff, T, c, ldc, add)

    return impl


@overload(tile, inline="always")
def _tile(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add):
    ts = _tiles(_make, COMBOS, _itemsize(dtype))
    if len(ts) == 4:  # the dispatch holds only the tiles compiled (each arm is inlined code)

        def impl(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add):
            _first_tiles(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add)

        return impl
    t4, t5 = ts[4:]

    def impl6(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add):
        if combo < 4:
            _first_tiles(combo, dtype, a, arow, aoff, b, boff, T, c, ldc, add)
        elif combo == 4:
            t4(a, arow, aoff, b, boff, T, c, ldc, add)
        else:
            t5(a, arow, aoff, b, boff, T, c, ldc, add)

    return impl6


@overload(dot_tile, inline="always")
def _dot_tile(combo, dtype, a, arow, b, ldb, S, c, ldc, add):
    t0, t1, t2, t3 = _tiles(_make_dot, DOT_COMBOS, _itemsize(dtype))

    def impl(combo, dtype, a, arow, b, ldb, S, c, ldc, add):
        if combo == 0:
            t0(a, arow, b, ldb, S, c, ldc, add)
        elif combo == 1:
            t1(a, arow, b, ldb, S, c, ldc, add)
        elif combo == 2:
            t2(a, arow, b, ldb, S, c, ldc, add)
        else:
            t3(a, arow, b, ldb, S, c, ldc, add)

    return impl


_DMR = tuple(mr for mr, _ in DOT_COMBOS)
_DNK = tuple(nk for _, nk in DOT_COMBOS)


@njit(cache=True)
def dot_tile_shape(combo):
    """(MR, NK) of DOT_COMBOS[combo] as compiled into the caller (see direct._check_tile)."""
    return _DMR[combo], _DNK[combo]


_MR = tuple(mr for mr, _ in COMBOS)
_NV = tuple(nv for _, nv in COMBOS)


@njit(cache=True)
def tile_rows(combo):
    """MR of COMBOS[combo] as compiled into the caller (see direct._check_tile)."""
    return _MR[combo]


@njit(cache=True)
def tile_vectors(combo):
    return _NV[combo]
