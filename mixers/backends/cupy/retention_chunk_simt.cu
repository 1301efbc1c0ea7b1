// Chunkwise retention on the CUDA cores, in float32 throughout: the kernel for float32 and float16
// inputs, and for bfloat16 on GPUs without bf16 tensor cores (compute capability < 8.0). See chunk.cuh
// for what one launch computes and how the grid is laid out.
//
// Block: 256 threads as a 16 x 16 grid (ty, tx). Every 64-row output the block forms (scores, output,
// state tile) is split the same way: thread (ty, tx) owns rows ty + 16i (i < 4) and columns tx + 16j,
// so a warp reads one or two rows of the left operand (broadcast) and 16 consecutive columns of the
// right one (consecutive banks).
//
// Shared memory (float32), rows padded by one float against bank conflicts:
//   decay [68] | Q [64][65] | K [64][65] | A [64][65] | V [64][BV+1] | S [Dk_pad][BV+1]
// Per chunk:  load V;  for each 64-wide key tile: load Q, K tiles; A += Q K^T; Oi += Q S_tile;
//             S_tile = gamma^L S_tile + K^T (zeta * V);   then O = (A * D) V + xi * Oi, where row r of
//             (A * D) V reads the values of positions j <= r only (a NaN or inf at a later one stays out).
#include "chunk.cuh"

#define SIMT_THREADS 256
#define SIMT_LD (SM_BK + 1)  // row stride of the Q, K and A tiles (SM_BK == SM_CHUNK == 64)

template <int BV>
SM_DEVICE i64 simt_smem_floats(i64 Dk_pad) {
    return SM_DECAY_FLOATS + 3 * SM_CHUNK * SIMT_LD + SM_CHUNK * (BV + 1) + Dk_pad * (BV + 1);
}

template <int DT, int BV>
SM_DEVICE void chunk_simt(const ChunkArgs& a) {
    constexpr int NB = BV / 16;  // value columns per thread
    constexpr int LDV = BV + 1;
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const i64 n_vtiles = sm_cdiv(a.Dv, BV);
    const i64 bh = blockIdx.x / n_vtiles;
    const i64 b = bh / a.H, h = bh % a.H;
    const i64 v0 = (blockIdx.x % n_vtiles) * BV;
    const i64 Dk_pad = sm_cdiv(a.Dk, SM_BK) * SM_BK;

    SM_DYNAMIC_SMEM(smem);
    if ((i64)sm_dynamic_smem_bytes() < 4 * simt_smem_floats<BV>(Dk_pad)) sm_trap("chunk_simt: shared memory too small");
    float* decay = smem;
    float* sQ = decay + SM_DECAY_FLOATS;
    float* sK = sQ + SM_CHUNK * SIMT_LD;
    float* sA = sK + SM_CHUNK * SIMT_LD;
    float* sV = sA + SM_CHUNK * SIMT_LD;
    float* sS = sV + SM_CHUNK * LDV;

    sm_fill_decay_table(decay, a.gamma[h], tid);
    sm_load_state(a, sS, LDV, BV, Dk_pad, b, h, v0, tid, SIMT_THREADS);
    __syncthreads();

    const i64 n_chunks = sm_cdiv(a.T, SM_CHUNK);
    for (i64 c = 0; c < n_chunks; ++c) {
        const i64 p0 = c * SM_CHUNK;
        const int L = (int)sm_min(SM_CHUNK, a.T - p0);  // positions in this chunk (< CHUNK for the tail)

        // V chunk [CHUNK][BV], zero past L and past Dv.
        for (int idx = tid; idx < SM_CHUNK * BV; idx += SIMT_THREADS) {
            const int j = idx / BV, e = idx % BV;
            float x = 0.f;
            if (j < L && v0 + e < a.Dv) x = sm_load<DT>(a.v.p, sm_row(a.v, b, sm_time(a, p0 + j), h) + v0 + e);
            sV[j * LDV + e] = x;
        }

        float acc_a[4][4];   // scores Q K^T at rows ty + 16i, columns tx + 16j
        float acc_o[4][NB];  // Q S_in at rows ty + 16i, value columns tx + 16j
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) acc_a[i][j] = 0.f;
#pragma unroll
            for (int j = 0; j < NB; ++j) acc_o[i][j] = 0.f;
        }

        for (i64 k0 = 0; k0 < a.Dk; k0 += SM_BK) {
            const int kw = (int)sm_min(SM_BK, a.Dk - k0);  // key dimensions in this tile
            for (int idx = tid; idx < SM_CHUNK * SM_BK; idx += SIMT_THREADS) {
                const int j = idx / SM_BK, d = idx % SM_BK;
                float xq = 0.f, xk = 0.f;
                if (j < L && d < kw) {
                    const i64 t = sm_time(a, p0 + j);
                    xq = sm_load<DT>(a.q.p, sm_row(a.q, b, t, h) + k0 + d);
                    xk = sm_load<DT>(a.k.p, sm_row(a.k, b, t, h) + k0 + d);
                }
                sQ[j * SIMT_LD + d] = xq;
                sK[j * SIMT_LD + d] = xk;
            }
            __syncthreads();  // Q, K tiles (and, in the first tile, V) are in place

            const float* sS_tile = sS + k0 * LDV;
            for (int d = 0; d < kw; ++d) {
                float qa[4], kb[4], sb[NB];
#pragma unroll
                for (int i = 0; i < 4; ++i) qa[i] = sQ[(ty + 16 * i) * SIMT_LD + d];
#pragma unroll
                for (int j = 0; j < 4; ++j) kb[j] = sK[(tx + 16 * j) * SIMT_LD + d];
#pragma unroll
                for (int j = 0; j < NB; ++j) sb[j] = sS_tile[d * LDV + tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc_a[i][j] += qa[i] * kb[j];
#pragma unroll
                    for (int j = 0; j < NB; ++j) acc_o[i][j] += qa[i] * sb[j];
                }
            }
            __syncthreads();  // every thread is done reading this state tile before it is updated

            // S_tile[d][e] = gamma^L S_tile[d][e] + sum_{j < L} zeta_j K[j][d] V[j][e], zeta_j = gamma^(L-delta-j).
            float acc_s[4][NB];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < NB; ++j) acc_s[i][j] = 0.f;
            }
            for (int j = 0; j < L; ++j) {
                const float zeta = decay[L - (int)a.delta - j];
                float kz[4], vb[NB];
#pragma unroll
                for (int i = 0; i < 4; ++i) kz[i] = sK[j * SIMT_LD + ty + 16 * i] * zeta;
#pragma unroll
                for (int e = 0; e < NB; ++e) vb[e] = sV[j * LDV + tx + 16 * e];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int e = 0; e < NB; ++e) acc_s[i][e] += kz[i] * vb[e];
                }
            }
            const float chunk_decay = decay[L];
            float* sS_rows = sS + k0 * LDV;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int e = 0; e < NB; ++e) {
                    float* s = &sS_rows[(ty + 16 * i) * LDV + tx + 16 * e];
                    *s = chunk_decay * *s + acc_s[i][e];
                }
            }
            if (k0 + SM_BK < a.Dk) __syncthreads();  // the update read K; the next tile overwrites it
        }

        // Mask and decay the scores: A[r][j] *= gamma^(r-j) for j <= r, else 0. Rows r >= L are never
        // stored; columns j >= L are already zero (K was zero-filled there).
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = ty + 16 * i;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = tx + 16 * j;
                sA[r * SIMT_LD + col] = col <= r ? acc_a[i][j] * decay[r - col] : 0.f;
            }
            const float xi = decay[r + (int)a.delta];  // gamma^(r+delta): how much S_in reaches row r
#pragma unroll
            for (int j = 0; j < NB; ++j) acc_o[i][j] *= xi;
        }
        __syncthreads();  // A is in place

        // O[r] += sum_{j <= r} A[r][j] V[j]: row r never reads a later position's value. Multiplying it by
        // A's zero instead would still be NaN for a NaN or inf value, and poison every earlier row.
        for (int j = 0; j < L; ++j) {
            float ar[4], vb[NB];
#pragma unroll
            for (int i = 0; i < 4; ++i) ar[i] = sA[(ty + 16 * i) * SIMT_LD + j];
#pragma unroll
            for (int e = 0; e < NB; ++e) vb[e] = sV[j * LDV + tx + 16 * e];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (j > ty + 16 * i) continue;  // (a predicate on the FMAs, not a branch)
#pragma unroll
                for (int e = 0; e < NB; ++e) acc_o[i][e] += ar[i] * vb[e];
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = ty + 16 * i;
            if (r >= L) continue;
            const i64 row = b * a.o_sb + sm_time(a, p0 + r) * a.o_st + h * a.o_sh + v0;
#pragma unroll
            for (int e = 0; e < NB; ++e) {
                const int col = tx + 16 * e;
                if (v0 + col < a.Dv) sm_store<DT>(a.o, row + col, acc_o[i][e]);
            }
        }
        __syncthreads();  // the next chunk overwrites V and A
    }
    sm_store_state(a, sS, LDV, BV, b, h, v0, tid, SIMT_THREADS);
}

SM_ENTRY(retention_chunk_simt_f32_bv64, SIMT_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_simt<SM_F32, 64>))
SM_ENTRY(retention_chunk_simt_f32_bv32, SIMT_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_simt<SM_F32, 32>))
SM_ENTRY(retention_chunk_simt_f16_bv64, SIMT_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_simt<SM_F16, 64>))
SM_ENTRY(retention_chunk_simt_f16_bv32, SIMT_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_simt<SM_F16, 32>))
SM_ENTRY(retention_chunk_simt_bf16_bv64, SIMT_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_simt<SM_BF16, 64>))
SM_ENTRY(retention_chunk_simt_bf16_bv32, SIMT_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_simt<SM_BF16, 32>))
