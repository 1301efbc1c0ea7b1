// Chunkwise retention on the tensor cores (mma.sync m16n8k16, float32 accumulation) for float16 and
// bfloat16 inputs; needs compute capability 8.0 or newer. See chunk.cuh for what one launch computes
// and how the grid is laid out.
//
// Block: 128 threads, 4 warps; warp w owns the 16 chunk rows 16w .. 16w+15 of every product whose rows
// are chunk positions (scores A = Q K^T, output O), and the 16 key rows 16w .. 16w+15 of the state tile.
// Operands that come straight from the inputs (q, k, v) are exact in 16 bits. The two float32 operands,
// the decayed scores A and the state S (and zeta * V), enter as hi + lo pairs (sm_split), two MMAs each,
// so the result keeps about float32 accuracy instead of rounding those to 8 (bf16) or 11 (f16) bits.
//
// Shared memory:
//   decay [68] f32 | Q [64][72] 16-bit | K [64][72] | V [64][BV+8] | S [Dk_pad][BV+4] f32
// Row paddings make every fragment load below hit 32 different banks (or share words).
// Per chunk:  load V;  for each 64-wide key tile: load Q, K tiles;
//               phase 1 (chunk rows): A += Q K^T (only column tiles left of the diagonal), Oi += Q S_tile;
//               phase 2 (key rows):   S_tile = gamma^L S_tile + K^T (zeta * V);
//             phase 3 (chunk rows, registers): A *= D, Oi *= xi;  O = Oi + A V;  store O via shared memory.
#include "chunk.cuh"

#define MMA_THREADS 128
#define MMA_LDH (SM_BK + 8)  // row stride (16-bit elements) of the Q and K tiles: 144 bytes

template <int BV>
SM_DEVICE i64 mma_smem_bytes(i64 Dk_pad) {
    return 4 * SM_DECAY_FLOATS + 2 * (2 * SM_CHUNK * MMA_LDH + SM_CHUNK * (BV + 8)) + 4 * Dk_pad * (BV + 4);
}

// dst[j][d] = x[b, time(p0 + j), h, c0 + d] for j < L and c0 + d < D, else 0; j < CHUNK, d < width.
// `vec`: x's base pointer is 16-byte aligned and its strides and D are multiples of 8, so rows can be
// copied 8 elements (16 bytes) at a time.
SM_DEVICE void mma_load_tile(u16* dst, int ld, const SmTensor& x, const ChunkArgs& a, i64 b, i64 h, i64 p0, int L,
                             i64 c0, int width, i64 D, bool vec, int tid) {
    const u16* src = static_cast<const u16*>(x.p);
    if (vec) {
        const int per_row = width / 8;
        for (int idx = tid; idx < SM_CHUNK * per_row; idx += MMA_THREADS) {
            const int j = idx / per_row, d = 8 * (idx % per_row);
            if (j < L && c0 + d < D) {
                sm_copy16(dst + j * ld + d, src + sm_row(x, b, sm_time(a, p0 + j), h) + c0 + d);
            } else {
                sm_zero16(dst + j * ld + d);
            }
        }
    } else {
        for (int idx = tid; idx < SM_CHUNK * width; idx += MMA_THREADS) {
            const int j = idx / width, d = idx % width;
            u16 e = 0;
            if (j < L && c0 + d < D) e = src[sm_row(x, b, sm_time(a, p0 + j), h) + c0 + d];
            dst[j * ld + d] = e;
        }
    }
}

SM_DEVICE bool mma_vec_ok(const void* p, i64 sb, i64 st, i64 sh, i64 D) {
    return sm_aligned16(p) && sb % 8 == 0 && st % 8 == 0 && sh % 8 == 0 && D % 8 == 0;
}

template <int DT, int BV>
SM_DEVICE void chunk_mma(const ChunkArgs& a) {
    constexpr int NT = BV / 8;  // value n-tiles of 8 columns
    constexpr int LDV = BV + 8;
    constexpr int LDS = BV + 4;
    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;  // fragment coordinates (see sm_mma)
    const int r0 = 16 * warp;               // this warp's first chunk row / state-tile row
    const i64 n_vtiles = sm_cdiv(a.Dv, BV);
    const i64 bh = blockIdx.x / n_vtiles;
    const i64 b = bh / a.H, h = bh % a.H;
    const i64 v0 = (blockIdx.x % n_vtiles) * BV;
    const i64 Dk_pad = sm_cdiv(a.Dk, SM_BK) * SM_BK;
    const int delta = (int)a.delta;

    SM_DYNAMIC_SMEM(smem);
    if ((i64)sm_dynamic_smem_bytes() < mma_smem_bytes<BV>(Dk_pad)) sm_trap("chunk_mma: shared memory too small");
    float* decay = smem;
    u16* sQ = reinterpret_cast<u16*>(decay + SM_DECAY_FLOATS);
    u16* sK = sQ + SM_CHUNK * MMA_LDH;
    u16* sV = sK + SM_CHUNK * MMA_LDH;
    float* sS = reinterpret_cast<float*>(sV + SM_CHUNK * LDV);

    const bool vec_q = mma_vec_ok(a.q.p, a.q.sb, a.q.st, a.q.sh, a.Dk);
    const bool vec_k = mma_vec_ok(a.k.p, a.k.sb, a.k.st, a.k.sh, a.Dk);
    const bool vec_v = mma_vec_ok(a.v.p, a.v.sb, a.v.st, a.v.sh, a.Dv);
    const bool vec_o = mma_vec_ok(a.o, a.o_sb, a.o_st, a.o_sh, a.Dv);

    sm_fill_decay_table(decay, a.gamma[h], tid);
    sm_load_state(a, sS, LDS, BV, Dk_pad, b, h, v0, tid, MMA_THREADS);
    __syncthreads();

    const i64 n_chunks = sm_cdiv(a.T, SM_CHUNK);
    for (i64 c = 0; c < n_chunks; ++c) {
        const i64 p0 = c * SM_CHUNK;
        const int L = (int)sm_min(SM_CHUNK, a.T - p0);
        mma_load_tile(sV, LDV, a.v, a, b, h, p0, L, v0, BV, a.Dv, vec_v, tid);

        float acc_a[8][4];   // scores, rows r0 + g (+8), columns 8 nt + 2 t4 (+1)
        float acc_o[NT][4];  // output, rows r0 + g (+8), value columns 8 nt + 2 t4 (+1)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) acc_a[nt][i] = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) acc_o[nt][i] = 0.f;
        }

        for (i64 k0 = 0; k0 < a.Dk; k0 += SM_BK) {
            const int kw = (int)sm_min(SM_BK, a.Dk - k0);
            mma_load_tile(sQ, MMA_LDH, a.q, a, b, h, p0, L, k0, SM_BK, a.Dk, vec_q, tid);
            mma_load_tile(sK, MMA_LDH, a.k, a, b, h, p0, L, k0, SM_BK, a.Dk, vec_k, tid);
            __syncthreads();  // Q, K tiles (and, in the first tile, V) are in place

            // Phase 1: this warp's 16 chunk rows against the key tile.
#pragma unroll
            for (int ks = 0; ks < SM_BK / 16; ++ks) {
                if (16 * ks >= kw) continue;  // all-zero key columns
                const int kc = 16 * ks + 2 * t4;
                u32 aq[4];
                aq[0] = sm_ld32(sQ + (r0 + g) * MMA_LDH + kc);
                aq[1] = sm_ld32(sQ + (r0 + g + 8) * MMA_LDH + kc);
                aq[2] = sm_ld32(sQ + (r0 + g) * MMA_LDH + kc + 8);
                aq[3] = sm_ld32(sQ + (r0 + g + 8) * MMA_LDH + kc + 8);
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    if (nt >= 2 * warp + 2) continue;  // right of the diagonal: masked to zero anyway
                    const u16* kr = sK + (8 * nt + g) * MMA_LDH + kc;  // B[k][n] = K[n][k]
                    sm_mma<DT>(acc_a[nt], aq, sm_ld32(kr), sm_ld32(kr + 8));
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const float* s = sS + (k0 + kc) * LDS + 8 * nt + g;  // B[k][n] = S[k0 + k][n]
                    u16 h0, l0, h1, l1, h2, l2, h3, l3;
                    sm_split<DT>(s[0], h0, l0);
                    sm_split<DT>(s[LDS], h1, l1);
                    sm_split<DT>(s[8 * LDS], h2, l2);
                    sm_split<DT>(s[9 * LDS], h3, l3);
                    sm_mma<DT>(acc_o[nt], aq, sm_pack(h0, h1), sm_pack(h2, h3));
                    sm_mma<DT>(acc_o[nt], aq, sm_pack(l0, l1), sm_pack(l2, l3));
                }
            }
            __syncthreads();  // every warp is done reading this state tile before it is updated

            // Phase 2: this warp's 16 rows of the state tile, S = gamma^L S + K^T (zeta * V).
            if (k0 + r0 < a.Dk) {
                float* srow = sS + (k0 + r0 + g) * LDS + 2 * t4;
                const float chunk_decay = decay[L];
                float acc_s[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    acc_s[nt][0] = chunk_decay * srow[8 * nt];
                    acc_s[nt][1] = chunk_decay * srow[8 * nt + 1];
                    acc_s[nt][2] = chunk_decay * srow[8 * LDS + 8 * nt];
                    acc_s[nt][3] = chunk_decay * srow[8 * LDS + 8 * nt + 1];
                }
#pragma unroll
                for (int ks = 0; ks < SM_CHUNK / 16; ++ks) {
                    if (16 * ks >= L) continue;  // positions past the chunk's end
                    const int j = 16 * ks + 2 * t4;
                    // A[d][j'] = K[j'][k0 + d] for d = r0 + g (+8), j' = j, j + 1 (+8).
                    const u16* kcol = sK + r0 + g;
                    u32 ak[4];
                    ak[0] = sm_pack(kcol[j * MMA_LDH], kcol[(j + 1) * MMA_LDH]);
                    ak[1] = sm_pack(kcol[j * MMA_LDH + 8], kcol[(j + 1) * MMA_LDH + 8]);
                    ak[2] = sm_pack(kcol[(j + 8) * MMA_LDH], kcol[(j + 9) * MMA_LDH]);
                    ak[3] = sm_pack(kcol[(j + 8) * MMA_LDH + 8], kcol[(j + 9) * MMA_LDH + 8]);
                    // zeta_j = gamma^(L - delta - j), and 0 past the chunk's end (where V is zero too).
                    const float z0 = j < L ? decay[L - delta - j] : 0.f;
                    const float z1 = j + 1 < L ? decay[L - delta - j - 1] : 0.f;
                    const float z8 = j + 8 < L ? decay[L - delta - j - 8] : 0.f;
                    const float z9 = j + 9 < L ? decay[L - delta - j - 9] : 0.f;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const u16* vc = sV + j * LDV + 8 * nt + g;  // B[j'][n] = zeta_j' V[j'][n]
                        u16 h0, l0, h1, l1, h2, l2, h3, l3;
                        sm_split<DT>(z0 * sm_to_float<DT>(vc[0]), h0, l0);
                        sm_split<DT>(z1 * sm_to_float<DT>(vc[LDV]), h1, l1);
                        sm_split<DT>(z8 * sm_to_float<DT>(vc[8 * LDV]), h2, l2);
                        sm_split<DT>(z9 * sm_to_float<DT>(vc[9 * LDV]), h3, l3);
                        sm_mma<DT>(acc_s[nt], ak, sm_pack(h0, h1), sm_pack(h2, h3));
                        sm_mma<DT>(acc_s[nt], ak, sm_pack(l0, l1), sm_pack(l2, l3));
                    }
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    srow[8 * nt] = acc_s[nt][0];
                    srow[8 * nt + 1] = acc_s[nt][1];
                    srow[8 * LDS + 8 * nt] = acc_s[nt][2];
                    srow[8 * LDS + 8 * nt + 1] = acc_s[nt][3];
                }
            }
            if (k0 + SM_BK < a.Dk) __syncthreads();  // phase 2 read K; the next tile overwrites it
        }
        if (a.Dk == 0) __syncthreads();  // (no key tile, hence no barrier yet after loading V)

        // Phase 3: A[r][j] *= gamma^(r-j) for j <= r (else 0); Oi[r] *= gamma^(r+delta); O = Oi + A V.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = r0 + g + (i >= 2 ? 8 : 0);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const int col = 8 * nt + 2 * t4 + (i & 1);
                acc_a[nt][i] = col <= r ? acc_a[nt][i] * decay[r - col] : 0.f;
            }
            const float xi = decay[r + delta];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) acc_o[nt][i] *= xi;
        }
#pragma unroll
        for (int kk = 0; kk < SM_CHUNK / 16; ++kk) {
            if (kk > warp || 16 * kk >= L) continue;  // right of the diagonal, or past the chunk's end
            // The accumulators of column tiles 2kk, 2kk+1 are, element for element, the A operand of
            // the k-step covering columns 16kk .. 16kk+15 (compare the layouts in sm_mma).
            u16 ah[8], al[8];
            sm_split<DT>(acc_a[2 * kk][0], ah[0], al[0]);
            sm_split<DT>(acc_a[2 * kk][1], ah[1], al[1]);
            sm_split<DT>(acc_a[2 * kk][2], ah[2], al[2]);
            sm_split<DT>(acc_a[2 * kk][3], ah[3], al[3]);
            sm_split<DT>(acc_a[2 * kk + 1][0], ah[4], al[4]);
            sm_split<DT>(acc_a[2 * kk + 1][1], ah[5], al[5]);
            sm_split<DT>(acc_a[2 * kk + 1][2], ah[6], al[6]);
            sm_split<DT>(acc_a[2 * kk + 1][3], ah[7], al[7]);
            const u32 ph[4] = {sm_pack(ah[0], ah[1]), sm_pack(ah[2], ah[3]), sm_pack(ah[4], ah[5]),
                               sm_pack(ah[6], ah[7])};
            const u32 pl[4] = {sm_pack(al[0], al[1]), sm_pack(al[2], al[3]), sm_pack(al[4], al[5]),
                               sm_pack(al[6], al[7])};
            const int j = 16 * kk + 2 * t4;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const u16* vc = sV + j * LDV + 8 * nt + g;  // B[j'][n] = V[j'][n]
                const u32 b0 = sm_pack(vc[0], vc[LDV]);
                const u32 b1 = sm_pack(vc[8 * LDV], vc[9 * LDV]);
                sm_mma<DT>(acc_o[nt], ph, b0, b1);
                sm_mma<DT>(acc_o[nt], pl, b0, b1);
            }
        }

        // Store O: the warp writes its 16 rows, converted, into its own rows of the (now free) Q tile,
        // then copies them out row by row, so that global writes are whole rows.
        u16* stage = sQ + r0 * MMA_LDH;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int col = 8 * nt + 2 * t4;
            stage[g * MMA_LDH + col] = sm_from_float<DT>(acc_o[nt][0]);
            stage[g * MMA_LDH + col + 1] = sm_from_float<DT>(acc_o[nt][1]);
            stage[(g + 8) * MMA_LDH + col] = sm_from_float<DT>(acc_o[nt][2]);
            stage[(g + 8) * MMA_LDH + col + 1] = sm_from_float<DT>(acc_o[nt][3]);
        }
        sm_syncwarp();
        u16* out = static_cast<u16*>(a.o);
        if (vec_o) {
            for (int idx = lane; idx < 16 * (BV / 8); idx += 32) {
                const int r = idx / (BV / 8), col = 8 * (idx % (BV / 8));
                if (r0 + r < L && v0 + col < a.Dv)
                    sm_copy16(out + b * a.o_sb + sm_time(a, p0 + r0 + r) * a.o_st + h * a.o_sh + v0 + col,
                              stage + r * MMA_LDH + col);
            }
        } else {
            for (int idx = lane; idx < 16 * BV; idx += 32) {
                const int r = idx / BV, col = idx % BV;
                if (r0 + r < L && v0 + col < a.Dv)
                    out[b * a.o_sb + sm_time(a, p0 + r0 + r) * a.o_st + h * a.o_sh + v0 + col] =
                        stage[r * MMA_LDH + col];
            }
        }
        __syncthreads();  // the next chunk overwrites V and the Q tile
    }
    sm_store_state(a, sS, LDS, BV, b, h, v0, tid, MMA_THREADS);
}

SM_ENTRY(retention_chunk_mma_f16_bv64, MMA_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_mma<SM_F16, 64>))
SM_ENTRY(retention_chunk_mma_f16_bv32, MMA_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_mma<SM_F16, 32>))
SM_ENTRY(retention_chunk_mma_bf16_bv64, MMA_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_mma<SM_BF16, 64>))
SM_ENTRY(retention_chunk_mma_bf16_bv32, MMA_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_mma<SM_BF16, 32>))
