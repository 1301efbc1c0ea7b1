// Shared definitions of the retention kernels: element types, conversions, tensor-core MMA, entry points.
//
// The sources include no header at all, so NVRTC (CuPy's RawModule) compiles them without include paths
// and with no dependency on the CUDA toolkit's headers being installed next to CuPy.
//
// Built with -DSEQMIXERS_CUDA_EMULATION (tests/cuda_emu), the very same kernel code compiles as host
// C++: every CUDA thread becomes a fiber, __syncthreads a barrier between fibers, and the warp-wide MMA
// an exchange between the 32 fibers of a warp. The tests run the kernels that way on a CPU, against the
// float64 reference, under shuffled thread schedules (a missing barrier shows up as a wrong result).
// Only the few device intrinsics below have a host twin; the kernels themselves have no #ifdef.
#pragma once

#ifdef SEQMIXERS_CUDA_EMULATION
#include "emu.h"
#define SM_DEVICE inline
#else
#define SM_DEVICE __device__ __forceinline__
#endif

typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;

// 16 bytes: one vector access, and the alignment of dynamic shared memory.
struct alignas(16) sm_vec16 {
    u32 x, y, z, w;
};

// Element types of q, k, v and o. The state is always float32.
#define SM_F32 0
#define SM_F16 1
#define SM_BF16 2

// ---------------------------------------------------------------------------------------------------
// Bit casts and conversions (round to nearest even, as torch's .to() does).
// ---------------------------------------------------------------------------------------------------
#ifdef SEQMIXERS_CUDA_EMULATION
SM_DEVICE float sm_bits_to_float(u32 u) { return emu::bits_to_float(u); }
SM_DEVICE u32 sm_float_to_bits(float x) { return emu::float_to_bits(x); }
SM_DEVICE float sm_half_to_float(u16 h) { return emu::half_to_float(h); }
SM_DEVICE u16 sm_float_to_half(float x) { return emu::float_to_half(x); }
SM_DEVICE void sm_trap(const char* why) { emu::fail(why); }
SM_DEVICE unsigned sm_dynamic_smem_bytes() { return emu::dynamic_smem_bytes(); }
// The block's dynamic shared memory, as floats (16-byte aligned).
#define SM_DYNAMIC_SMEM(name) float* name = emu::dynamic_smem()
#else
SM_DEVICE float sm_bits_to_float(u32 u) { return __uint_as_float(u); }
SM_DEVICE u32 sm_float_to_bits(float x) { return __float_as_uint(x); }
SM_DEVICE float sm_half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
SM_DEVICE u16 sm_float_to_half(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
SM_DEVICE void sm_trap(const char*) { asm volatile("trap;"); }
SM_DEVICE unsigned sm_dynamic_smem_bytes() {
    unsigned n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}
#define SM_DYNAMIC_SMEM(name)                 \
    extern __shared__ sm_vec16 name##_raw_[]; \
    float* name = reinterpret_cast<float*>(name##_raw_)
#endif

SM_DEVICE float sm_bf16_to_float(u16 h) { return sm_bits_to_float(((u32)h) << 16); }

// Whether a bfloat16 is finite (its exponent is not all ones, which marks inf and NaN).
SM_DEVICE bool sm_bf16_finite(u16 h) { return (h & 0x7f80u) != 0x7f80u; }

// float -> bfloat16 by integer rounding: exact round-to-nearest-even on every architecture (and on the
// host), with NaN kept a quiet NaN of the same sign.
SM_DEVICE u16 sm_float_to_bf16(float x) {
    u32 u = sm_float_to_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)(((u >> 16) & 0x8000u) | 0x7fc0u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

template <int DT>
SM_DEVICE float sm_to_float(u16 h) {
    if constexpr (DT == SM_BF16) {
        return sm_bf16_to_float(h);
    } else {
        return sm_half_to_float(h);
    }
}

template <int DT>
SM_DEVICE u16 sm_from_float(float x) {
    if constexpr (DT == SM_BF16) {
        return sm_float_to_bf16(x);
    } else {
        return sm_float_to_half(x);
    }
}

// Element i of a q/k/v tensor of type DT, as float.
template <int DT>
SM_DEVICE float sm_load(const void* p, i64 i) {
    if constexpr (DT == SM_F32) {
        return static_cast<const float*>(p)[i];
    } else {
        return sm_to_float<DT>(static_cast<const u16*>(p)[i]);
    }
}

template <int DT>
SM_DEVICE void sm_store(void* p, i64 i, float x) {
    if constexpr (DT == SM_F32) {
        static_cast<float*>(p)[i] = x;
    } else {
        static_cast<u16*>(p)[i] = sm_from_float<DT>(x);
    }
}

SM_DEVICE i64 sm_min(i64 a, i64 b) { return a < b ? a : b; }
SM_DEVICE i64 sm_cdiv(i64 a, i64 b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------
// Tensor cores: D += A B for one m16n8k16 tile, A 16x16 and B 16x8 in bfloat16, D in float32.
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4 and t = lane % 4; each u32 holds two elements, the lower column (or row of B) in the low
// half:
//   a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]                          d[2], d[3] = D[g+8][2t, 2t+1]
// ---------------------------------------------------------------------------------------------------
SM_DEVICE u32 sm_pack(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

SM_DEVICE void sm_mma_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#ifdef SEQMIXERS_CUDA_EMULATION
    emu::mma_m16n8k16_bf16(d, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// x = hi + lo in bfloat16: a float32 operand as two 16-bit ones, so that a product with it on the
// tensor cores keeps 16 significant bits instead of 8. (x - hi is exact in float32, and bfloat16 has
// float32's exponent range, so the split loses nothing to underflow or overflow.)
SM_DEVICE void sm_split_bf16(float x, u16& hi, u16& lo) {
    hi = sm_float_to_bf16(x);
    lo = sm_float_to_bf16(x - sm_bf16_to_float(hi));
}

// Two adjacent 16-bit elements (4-byte aligned) as one 32-bit word, the lower index in the low half.
SM_DEVICE u32 sm_ld32(const u16* p) {
#ifdef SEQMIXERS_CUDA_EMULATION
    return emu::load32(p);
#else
    return *reinterpret_cast<const u32*>(p);
#endif
}

SM_DEVICE void sm_st32(u16* p, u32 x) {
#ifdef SEQMIXERS_CUDA_EMULATION
    emu::store32(p, x);
#else
    *reinterpret_cast<u32*>(p) = x;
#endif
}

// Copy 8 16-bit elements (16 bytes) between 16-byte aligned addresses, in one access.
SM_DEVICE void sm_copy16(void* dst, const void* src) {
    *static_cast<sm_vec16*>(dst) = *static_cast<const sm_vec16*>(src);
}

SM_DEVICE void sm_zero16(void* dst) { *static_cast<sm_vec16*>(dst) = sm_vec16{0u, 0u, 0u, 0u}; }

SM_DEVICE bool sm_aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15u) == 0; }

#ifdef SEQMIXERS_CUDA_EMULATION
SM_DEVICE void sm_syncwarp() { emu::syncwarp(); }
#else
SM_DEVICE void sm_syncwarp() { __syncwarp(); }
#endif

// ---------------------------------------------------------------------------------------------------
// Entry points. SM_ENTRY(name, threads, (params), make_args, body) defines extern "C" kernel `name`
// that calls body(make_args); under emulation the same name is a host function that runs the body on
// the grid set by emu_configure(). Every scalar parameter is a 64-bit integer or a double, so that
// CuPy's Python ints (int64) and floats (float64) match the parameter sizes without casts.
// ---------------------------------------------------------------------------------------------------
#ifdef SEQMIXERS_CUDA_EMULATION
#define SM_ENTRY(name, threads, params, make_args, body) \
    extern "C" int name params {                          \
        const auto args_ = make_args;                     \
        return emu::launch([args_] { body(args_); });     \
    }
#else
#define SM_ENTRY(name, threads, params, make_args, body) \
    extern "C" __global__ void __launch_bounds__(threads) name params { body(make_args); }
#endif

// Strided access to a [B, T, H, D] tensor whose last dimension is contiguous.
struct SmTensor {
    const void* p;
    i64 sb, st, sh;
};

SM_DEVICE i64 sm_row(const SmTensor& x, i64 b, i64 t, i64 h) { return b * x.sb + t * x.st + h * x.sh; }
