// Recurrent retention, token by token, fused: for t = 0 .. T-1
//     S = gamma S + k_t^T v_t;   o_t = q_t S
// in one launch batched over B and H; with T = 1 it is the decode step (decay, state update and
// read-out in one pass over the state). The float32 state is read from global memory once, kept in
// registers across all T tokens, and written once.
//
// Grid: B * H * ceil(Dv / 32) blocks in x. Block (32, RG): thread (tx, ty) owns value column
// e = v0 + tx and state rows d = ty + RG i (i < ceil(Dk / RG) <= ROWS), so each warp reads and writes
// whole 128-byte rows of the state. ROWS = 16 serves Dk <= 256 (RG <= 16) without register spills;
// ROWS = 32 serves Dk <= 512. Per token the block stages q_t and k_t in shared memory and
// sums the RG partial read-outs of each column there, in a fixed order (so results are reproducible).
// Shared memory (float32): q [Dk] | k [Dk] | partial sums [RG][33].
#include "common.cuh"

struct RecArgs {
    SmTensor q, k, v;  // [B, T, H, Dk], [B, T, H, Dk], [B, T, H, Dv]
    void* o;           // [B, T, H, Dv]
    i64 o_sb, o_st, o_sh;
    const float* s0;   // [B, H, Dk, Dv] (any strides), or null for zeros
    i64 s0_sb, s0_sh, s0_sd, s0_se;
    float* sT;         // [B, H, Dk, Dv] contiguous (may alias s0: each thread reads its entries first)
    const double* gamma;
    i64 B, T, H, Dk, Dv;
};

SM_DEVICE i64 rec_smem_floats(i64 Dk, i64 RG) { return 2 * Dk + RG * 33; }

template <int DT, int ROWS>
SM_DEVICE void recurrent(const RecArgs& a) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int RG = blockDim.y;
    const int tid = ty * 32 + tx, nthreads = 32 * RG;
    const i64 n_vtiles = sm_cdiv(a.Dv, 32);
    const i64 bh = blockIdx.x / n_vtiles;
    const i64 b = bh / a.H, h = bh % a.H;
    const i64 e = (blockIdx.x % n_vtiles) * 32 + tx;
    const bool col_ok = e < a.Dv;
    const int Dk = (int)a.Dk;  // <= ROWS * RG (checked below)

    SM_DYNAMIC_SMEM(smem);
    if (blockDim.x != 32 || sm_cdiv(a.Dk, RG) > ROWS) sm_trap("recurrent: block shape does not cover Dk");
    if ((i64)sm_dynamic_smem_bytes() < 4 * rec_smem_floats(a.Dk, RG)) sm_trap("recurrent: shared memory too small");
    float* sq = smem;
    float* sk = sq + Dk;
    float* red = sk + a.Dk;

    const float g = (float)a.gamma[h];
    const float* s0 = (a.s0 != nullptr && col_ok) ? a.s0 + b * a.s0_sb + h * a.s0_sh + e * a.s0_se : nullptr;
    float s[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        const int d = ty + RG * i;
        s[i] = (s0 != nullptr && d < Dk) ? s0[d * a.s0_sd] : 0.f;
    }

    for (i64 t = 0; t < a.T; ++t) {
        const i64 qrow = sm_row(a.q, b, t, h), krow = sm_row(a.k, b, t, h);
        for (int d = tid; d < Dk; d += nthreads) {
            sq[d] = sm_load<DT>(a.q.p, qrow + d);
            sk[d] = sm_load<DT>(a.k.p, krow + d);
        }
        const float ve = col_ok ? sm_load<DT>(a.v.p, sm_row(a.v, b, t, h) + e) : 0.f;
        __syncthreads();  // q_t, k_t staged

        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const int d = ty + RG * i;
            if (d < Dk) {
                s[i] = g * s[i] + sk[d] * ve;
                acc += sq[d] * s[i];
            }
        }
        red[ty * 33 + tx] = acc;
        __syncthreads();  // partial read-outs in place
        if (ty == 0 && col_ok) {
            float sum = 0.f;
            for (int r = 0; r < RG; ++r) sum += red[r * 33 + tx];
            sm_store<DT>(a.o, b * a.o_sb + t * a.o_st + h * a.o_sh + e, sum);
        }
        // No barrier needed here: every read of q_t, k_t came before the last one, and the partial
        // sums are overwritten only after the next token's first barrier, which the summing threads
        // reach only when they are done.
    }

    if (a.sT != nullptr && col_ok) {
        float* sT = a.sT + (b * a.H + h) * a.Dk * a.Dv + e;
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const int d = ty + RG * i;
            if (d < Dk) sT[d * a.Dv] = s[i];
        }
    }
}

#define SM_REC_PARAMS                                                                                     \
    (const void* q, i64 q_sb, i64 q_st, i64 q_sh, const void* k, i64 k_sb, i64 k_st, i64 k_sh,           \
     const void* v, i64 v_sb, i64 v_st, i64 v_sh, void* o, i64 o_sb, i64 o_st, i64 o_sh, const float* s0, \
     i64 s0_sb, i64 s0_sh, i64 s0_sd, i64 s0_se, float* sT, const double* gamma, i64 B, i64 T, i64 H,     \
     i64 Dk, i64 Dv)

#define SM_REC_ARGS                                                                                   \
    (RecArgs{{q, q_sb, q_st, q_sh}, {k, k_sb, k_st, k_sh}, {v, v_sb, v_st, v_sh}, o, o_sb, o_st, o_sh, \
             s0, s0_sb, s0_sh, s0_sd, s0_se, sT, gamma, B, T, H, Dk, Dv})

SM_ENTRY(retention_recurrent_f32_r16, 512, SM_REC_PARAMS, SM_REC_ARGS, (recurrent<SM_F32, 16>))
SM_ENTRY(retention_recurrent_f16_r16, 512, SM_REC_PARAMS, SM_REC_ARGS, (recurrent<SM_F16, 16>))
SM_ENTRY(retention_recurrent_bf16_r16, 512, SM_REC_PARAMS, SM_REC_ARGS, (recurrent<SM_BF16, 16>))
SM_ENTRY(retention_recurrent_f32_r32, 512, SM_REC_PARAMS, SM_REC_ARGS, (recurrent<SM_F32, 32>))
SM_ENTRY(retention_recurrent_f16_r32, 512, SM_REC_PARAMS, SM_REC_ARGS, (recurrent<SM_F16, 32>))
SM_ENTRY(retention_recurrent_bf16_r32, 512, SM_REC_PARAMS, SM_REC_ARGS, (recurrent<SM_BF16, 32>))
