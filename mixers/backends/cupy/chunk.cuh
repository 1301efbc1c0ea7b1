// What the two chunkwise retention kernels (retention_chunk_simt.cu, retention_chunk_mma.cu) share:
// their arguments and the chunk geometry.
//
// One launch computes, for every (b, h), with "position" p = 0 .. T-1 in processing order
// (t = p, or t = T-1-p when `reverse`):
//     o_p = sum_{p' <= p} gamma^(p-p') (q_p . k_p') v_p' + gamma^(p+delta) q_p S_in
//     S_out = gamma^T S_in + sum_p gamma^(T-delta-p) k_p^T v_p
// delta = 1 is retention itself (S_in decays once before the first token). delta = 0 with `reverse` is
// what the backward pass needs (see _retention.py): the gradient state enters the last token undecayed.
// Every decay power used has an exponent between 0 and CHUNK, taken from a table of gamma^e; nothing
// like gamma^(-t) is ever formed.
//
// Grid: B * H * ceil(Dv / BV) blocks in x (value tiles of one (b, h) adjacent, so they share Q and K
// in L2; x also has no 65535 limit). Block (b, h, value tile) walks the chunks of CHUNK positions in order,
// keeping the float32 state S[0:Dk, v0:v0+BV] in shared memory; the tail chunk has L < CHUNK positions,
// and loads past L (or past Dk, Dv) read as zero so every product stays exact.
#pragma once
#include "common.cuh"

#define SM_CHUNK 64  // positions per chunk
#define SM_BK 64     // key dimensions per shared-memory tile

struct ChunkArgs {
    SmTensor q, k, v;     // [B, T, H, Dk], [B, T, H, Dk], [B, T, H, Dv]
    void* o;              // [B, T, H, Dv] output, same element type as q
    i64 o_sb, o_st, o_sh;
    const float* s0;      // S_in [B, H, Dk, Dv] (any strides), or null for zeros
    i64 s0_sb, s0_sh, s0_sd, s0_se;
    float* sT;            // S_out [B, H, Dk, Dv] contiguous, or null when not wanted
    const double* gamma;  // [H]
    i64 B, T, H, Dk, Dv, reverse, delta;
};

#define SM_CHUNK_PARAMS                                                                                   \
    (const void* q, i64 q_sb, i64 q_st, i64 q_sh, const void* k, i64 k_sb, i64 k_st, i64 k_sh,           \
     const void* v, i64 v_sb, i64 v_st, i64 v_sh, void* o, i64 o_sb, i64 o_st, i64 o_sh, const float* s0, \
     i64 s0_sb, i64 s0_sh, i64 s0_sd, i64 s0_se, float* sT, const double* gamma, i64 B, i64 T, i64 H,     \
     i64 Dk, i64 Dv, i64 reverse, i64 delta)

#define SM_CHUNK_ARGS                                                                                  \
    (ChunkArgs{{q, q_sb, q_st, q_sh}, {k, k_sb, k_st, k_sh}, {v, v_sb, v_st, v_sh}, o, o_sb, o_st, o_sh, \
               s0, s0_sb, s0_sh, s0_sd, s0_se, sT, gamma, B, T, H, Dk, Dv, reverse, delta})

// gamma^e for e = 0 .. CHUNK, from log(gamma) in float64: exp(0 * log gamma) = 1 even when gamma is
// tiny, and exp(e * log gamma) underflows cleanly to 0. The table is padded to a multiple of 16 bytes
// (retention_chunk_mma.cu keeps two flags in the padding).
#define SM_DECAY_FLOATS 68

SM_DEVICE void sm_fill_decay_table(float* decay, double gamma, int tid) {
    if (tid <= SM_CHUNK) decay[tid] = (float)exp((double)tid * log(gamma));
}

// The time index of position p.
SM_DEVICE i64 sm_time(const ChunkArgs& a, i64 p) { return a.reverse ? a.T - 1 - p : p; }

// The state tile S[0:Dk_pad, v0:v0+BV] (row stride lds) from S_in, zero outside [Dk, Dv] or without S_in.
SM_DEVICE void sm_load_state(const ChunkArgs& a, float* sS, int lds, int BV, i64 Dk_pad, i64 b, i64 h, i64 v0,
                             int tid, int nthreads) {
    for (i64 idx = tid; idx < Dk_pad * BV; idx += nthreads) {
        const i64 d = idx / BV, e = idx % BV;
        float x = 0.f;
        if (a.s0 != nullptr && d < a.Dk && v0 + e < a.Dv)
            x = a.s0[b * a.s0_sb + h * a.s0_sh + d * a.s0_sd + (v0 + e) * a.s0_se];
        sS[d * lds + e] = x;
    }
}

// S_out[b, h, 0:Dk, v0:v0+BV] from the state tile.
SM_DEVICE void sm_store_state(const ChunkArgs& a, const float* sS, int lds, int BV, i64 b, i64 h, i64 v0, int tid,
                              int nthreads) {
    if (a.sT == nullptr) return;
    for (i64 idx = tid; idx < a.Dk * BV; idx += nthreads) {
        const i64 d = idx / BV, e = idx % BV;
        if (v0 + e < a.Dv) a.sT[((b * a.H + h) * a.Dk + d) * a.Dv + v0 + e] = sS[d * lds + e];
    }
}
