// Chunkwise retention on the tensor cores (mma.sync m16n8k16, float32 accumulation) for bfloat16
// inputs; needs compute capability 8.0 or newer. See chunk.cuh for what one launch computes and how the
// grid is laid out.
//
// Only bfloat16: the float32 intermediates below enter the tensor cores as sums of 16-bit parts, which
// needs the 16-bit format to have float32's exponent range. float16's 5-bit exponent would turn small
// parts into subnormals (losing their precision) and large ones into infinities, so float16 inputs
// take the float32 CUDA-core kernel (retention_chunk_simt.cu) instead.
//
// Block: 128 threads, 4 warps; warp w owns the 16 chunk rows 16w .. 16w+15 of every product whose rows
// are chunk positions (scores A = Q K^T, output O), and the 16 key rows 16w .. 16w+15 of the state tile.
// Operands that come straight from the inputs (q, k, v) are exact in bfloat16. The float32 operands
// enter as sums of bfloat16 parts, one MMA per part, instead of being rounded to 8 significant bits:
// the state S and the decayed scores A as hi + lo (16 bits; what they feed is an output, rounded to
// bfloat16 in the end), and zeta * V, which accumulates into the float32 state chunk after chunk, as
// hi + mid + lo (24 bits: float32's own precision).
//
// Shared memory (all 16-bit tiles have rows of 64 + 8 elements, so that every fragment load below is a
// 32-bit word and a warp's 32 loads hit 32 different banks):
//   decay [68] f32 | Q [64][72] | K [64][72] | V^T [BV][72] | (zeta V)^T hi, mid, lo [3][BV][72]
//   | S^T hi, lo [BV][72] each (the current key tile of S) | S [Dk_pad][BV+4] f32 (the state itself)
// The decay table's padding holds two per-chunk flags (decay[65 + c % 2]): whether chunk c has a non-finite
// value. V^T holds the values with non-finite entries zeroed: a masked score is 0, but 0 * NaN in the
// 16-wide diagonal k-step would reach the earlier rows too. When the flag is set, each output element whose
// position or an earlier one has a non-finite value (read again from global memory) is replaced by their
// sum, so NaN and inf reach exactly the rows at and after them. (zeta V)^T, for the state, keeps them.
// Per chunk:
//   load V as V^T (non-finite entries zeroed) and (zeta V)^T in three parts;
//   for each 64-wide key tile: load Q, K tiles, split the tile of S into S^T hi/lo;  barrier;
//     phase 1 (chunk rows): A += Q K^T (only column tiles left of the diagonal), Oi += Q S_tile;
//     phase 2 (key rows):   S_tile = gamma^L S_tile + K^T (zeta V)   (reads no tile phase 1 writes,
//                           and writes only the float32 S, which phase 1 does not read);
//     barrier unless it was the last tile (the next tile's loads overwrite what both phases read);
//   phase 3 (chunk rows, in registers): A *= D, Oi *= xi, O = Oi + A V; store O through shared memory.
#include "chunk.cuh"

#define MMA_THREADS 128
#define MMA_LD (SM_BK + 8)  // row length (16-bit elements) of every 16-bit tile: 144 bytes
#define MMA_TILE (SM_CHUNK * MMA_LD)

#define MMA_ZPARTS 3  // bfloat16 parts of zeta * V
#define MMA_FLAGS (SM_CHUNK + 1)  // decay[MMA_FLAGS + c % 2]: chunk c has a non-finite value (table padding)

template <int BV>
SM_DEVICE i64 mma_smem_bytes(i64 Dk_pad) {
    return 4 * SM_DECAY_FLOATS + 2 * (2 * MMA_TILE + (3 + MMA_ZPARTS) * BV * MMA_LD) + 4 * Dk_pad * (BV + 4);
}

// dst[j][d] = x[b, time(p0 + j), h, c0 + d] for j < L and c0 + d < D, else 0; j < CHUNK, d < SM_BK.
// `vec`: x's base pointer is 16-byte aligned and its strides and D are multiples of 8, so rows can be
// copied 8 elements (16 bytes) at a time.
SM_DEVICE void mma_load_rows(u16* dst, const SmTensor& x, const ChunkArgs& a, i64 b, i64 h, i64 p0, int L, i64 c0,
                             i64 D, bool vec, int tid) {
    const u16* src = static_cast<const u16*>(x.p);
    if (vec) {
        for (int idx = tid; idx < SM_CHUNK * (SM_BK / 8); idx += MMA_THREADS) {
            const int j = idx / (SM_BK / 8), d = 8 * (idx % (SM_BK / 8));
            if (j < L && c0 + d < D) {
                sm_copy16(dst + j * MMA_LD + d, src + sm_row(x, b, sm_time(a, p0 + j), h) + c0 + d);
            } else {
                sm_zero16(dst + j * MMA_LD + d);
            }
        }
    } else {
        for (int idx = tid; idx < SM_CHUNK * SM_BK; idx += MMA_THREADS) {
            const int j = idx / SM_BK, d = idx % SM_BK;
            u16 e = 0;
            if (j < L && c0 + d < D) e = src[sm_row(x, b, sm_time(a, p0 + j), h) + c0 + d];
            dst[j * MMA_LD + d] = e;
        }
    }
}

SM_DEVICE bool mma_vec_ok(const void* p, i64 sb, i64 st, i64 sh, i64 D) {
    return sm_aligned16(p) && sb % 8 == 0 && st % 8 == 0 && sh % 8 == 0 && D % 8 == 0;
}

// The chunk's values, transposed: vt[e][j] = V[j][e], or 0 where that is not finite, and the sum over
// parts p of z[p][e][j] is zeta_j V[j][e] with zeta_j = gamma^(L-delta-j); zero for j >= L or v0 + e >= Dv.
// Sets *nonfinite to 1 if it met a non-finite value. Each thread does two positions j, j+1 of one or eight
// columns, so that it writes whole 32-bit words.
template <int BV>
SM_DEVICE void mma_load_values(u16* vt, u16* z, float* nonfinite, const float* decay, const ChunkArgs& a, i64 b,
                               i64 h, i64 p0, int L, i64 v0, bool vec, int tid) {
    bool seen = false;
    const u16* src = static_cast<const u16*>(a.v.p);
    const int cols = vec ? 8 : 1;  // value columns per thread
    for (int idx = tid; idx < (SM_CHUNK / 2) * (BV / cols); idx += MMA_THREADS) {
        const int j = 2 * (idx / (BV / cols)), e0 = cols * (idx % (BV / cols));
        sm_vec16 raw0{0u, 0u, 0u, 0u}, raw1{0u, 0u, 0u, 0u};  // V[j][e0 .. e0+7], V[j+1][e0 .. e0+7]
        if (v0 + e0 < a.Dv) {  // (vec: Dv is a multiple of 8, so the 8 columns are all in or all out)
            if (j < L) {
                const u16* row = src + sm_row(a.v, b, sm_time(a, p0 + j), h) + v0 + e0;
                if (vec) {
                    sm_copy16(&raw0, row);
                } else {
                    raw0.x = row[0];
                }
            }
            if (j + 1 < L) {
                const u16* row = src + sm_row(a.v, b, sm_time(a, p0 + j + 1), h) + v0 + e0;
                if (vec) {
                    sm_copy16(&raw1, row);
                } else {
                    raw1.x = row[0];
                }
            }
        }
        const u32 w0[4] = {raw0.x, raw0.y, raw0.z, raw0.w}, w1[4] = {raw1.x, raw1.y, raw1.z, raw1.w};
        const float z0 = j < L ? decay[L - (int)a.delta - j] : 0.f;
        const float z1 = j + 1 < L ? decay[L - (int)a.delta - j - 1] : 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            if (c >= cols) break;
            const u16 x0 = (u16)(w0[c / 2] >> (16 * (c % 2))), x1 = (u16)(w1[c / 2] >> (16 * (c % 2)));
            const int at = (e0 + c) * MMA_LD + j;
            const bool f0 = sm_bf16_finite(x0), f1 = sm_bf16_finite(x1);
            seen = seen || !f0 || !f1;
            sm_st32(vt + at, sm_pack(f0 ? x0 : (u16)0, f1 ? x1 : (u16)0));
            float r0 = z0 * sm_bf16_to_float(x0), r1 = z1 * sm_bf16_to_float(x1);  // what is left to represent
#pragma unroll
            for (int p = 0; p < MMA_ZPARTS; ++p) {
                const u16 p0_ = sm_float_to_bf16(r0), p1_ = sm_float_to_bf16(r1);
                r0 -= sm_bf16_to_float(p0_);  // exact: the rounding error of a float32 rounded to bfloat16
                r1 -= sm_bf16_to_float(p1_);
                sm_st32(z + p * BV * MMA_LD + at, sm_pack(p0_, p1_));
            }
        }
    }
    if (seen) *nonfinite = 1.f;  // (every thread that writes, writes the same value)
}

template <int BV>
SM_DEVICE void chunk_mma(const ChunkArgs& a) {
    constexpr int NT = BV / 8;  // value n-tiles of 8 columns
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
    u16* sK = sQ + MMA_TILE;
    u16* sVt = sK + MMA_TILE;
    u16* sZ = sVt + BV * MMA_LD;  // MMA_ZPARTS tiles
    u16* sSh = sZ + MMA_ZPARTS * BV * MMA_LD;
    u16* sSl = sSh + BV * MMA_LD;
    float* sS = reinterpret_cast<float*>(sSl + BV * MMA_LD);

    const bool vec_q = mma_vec_ok(a.q.p, a.q.sb, a.q.st, a.q.sh, a.Dk);
    const bool vec_k = mma_vec_ok(a.k.p, a.k.sb, a.k.st, a.k.sh, a.Dk);
    const bool vec_v = mma_vec_ok(a.v.p, a.v.sb, a.v.st, a.v.sh, a.Dv);
    const bool vec_o = mma_vec_ok(a.o, a.o_sb, a.o_st, a.o_sh, a.Dv);

    sm_fill_decay_table(decay, a.gamma[h], tid);
    if (tid < 2) decay[MMA_FLAGS + tid] = 0.f;
    sm_load_state(a, sS, LDS, BV, Dk_pad, b, h, v0, tid, MMA_THREADS);
    __syncthreads();

    const i64 n_chunks = sm_cdiv(a.T, SM_CHUNK);
    for (i64 c = 0; c < n_chunks; ++c) {
        const i64 p0 = c * SM_CHUNK;
        const int L = (int)sm_min(SM_CHUNK, a.T - p0);
        float* nonfinite = decay + MMA_FLAGS + (c & 1);
        // The next chunk's flag was last read before the previous chunk's final barrier, and is next set
        // after this chunk's.
        if (tid == 0) decay[MMA_FLAGS + ((c + 1) & 1)] = 0.f;
        mma_load_values<BV>(sVt, sZ, nonfinite, decay, a, b, h, p0, L, v0, vec_v, tid);

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
            mma_load_rows(sQ, a.q, a, b, h, p0, L, k0, a.Dk, vec_q, tid);
            mma_load_rows(sK, a.k, a, b, h, p0, L, k0, a.Dk, vec_k, tid);
            // S^T hi/lo of this key tile: sSh[n][k] + sSl[n][k] = S[k0 + k][n] (zero rows past Dk).
            for (int idx = tid; idx < (SM_BK / 2) * BV; idx += MMA_THREADS) {
                const int n = idx % BV, k = 2 * (idx / BV);
                u16 h0, l0, h1, l1;
                sm_split_bf16(sS[(k0 + k) * LDS + n], h0, l0);
                sm_split_bf16(sS[(k0 + k + 1) * LDS + n], h1, l1);
                sm_st32(sSh + n * MMA_LD + k, sm_pack(h0, h1));
                sm_st32(sSl + n * MMA_LD + k, sm_pack(l0, l1));
            }
            __syncthreads();  // Q, K, S^T tiles (and, in the first tile, the values) are in place

            // Phase 1: this warp's 16 chunk rows against the key tile.
#pragma unroll
            for (int ks = 0; ks < SM_BK / 16; ++ks) {
                if (16 * ks >= kw) continue;  // all-zero key columns
                const int kc = 16 * ks + 2 * t4;
                u32 aq[4];
                aq[0] = sm_ld32(sQ + (r0 + g) * MMA_LD + kc);
                aq[1] = sm_ld32(sQ + (r0 + g + 8) * MMA_LD + kc);
                aq[2] = sm_ld32(sQ + (r0 + g) * MMA_LD + kc + 8);
                aq[3] = sm_ld32(sQ + (r0 + g + 8) * MMA_LD + kc + 8);
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    if (nt >= 2 * warp + 2) continue;  // right of the diagonal: masked to zero anyway
                    const u16* kr = sK + (8 * nt + g) * MMA_LD + kc;  // B[k][n] = K[n][k]
                    sm_mma_bf16(acc_a[nt], aq, sm_ld32(kr), sm_ld32(kr + 8));
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int at = (8 * nt + g) * MMA_LD + kc;  // B[k][n] = S[k0 + k][n] = S^T[n][k]
                    sm_mma_bf16(acc_o[nt], aq, sm_ld32(sSh + at), sm_ld32(sSh + at + 8));
                    sm_mma_bf16(acc_o[nt], aq, sm_ld32(sSl + at), sm_ld32(sSl + at + 8));
                }
            }

            // Phase 2: this warp's 16 rows of the state tile, S = gamma^L S + K^T (zeta V).
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
                    ak[0] = sm_pack(kcol[j * MMA_LD], kcol[(j + 1) * MMA_LD]);
                    ak[1] = sm_pack(kcol[j * MMA_LD + 8], kcol[(j + 1) * MMA_LD + 8]);
                    ak[2] = sm_pack(kcol[(j + 8) * MMA_LD], kcol[(j + 9) * MMA_LD]);
                    ak[3] = sm_pack(kcol[(j + 8) * MMA_LD + 8], kcol[(j + 9) * MMA_LD + 8]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const u16* z = sZ + (8 * nt + g) * MMA_LD + j;  // B[j'][n] = (zeta V)^T[n][j']
#pragma unroll
                        for (int p = 0; p < MMA_ZPARTS; ++p)
                            sm_mma_bf16(acc_s[nt], ak, sm_ld32(z + p * BV * MMA_LD), sm_ld32(z + p * BV * MMA_LD + 8));
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
            if (k0 + SM_BK < a.Dk) __syncthreads();  // the next tile overwrites Q, K and S^T
        }
        if (a.Dk == 0) __syncthreads();  // (no key tile, hence no barrier yet after loading the values)

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
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                sm_split_bf16(acc_a[2 * kk][i], ah[i], al[i]);
                sm_split_bf16(acc_a[2 * kk + 1][i], ah[4 + i], al[4 + i]);
            }
            const u32 ph[4] = {sm_pack(ah[0], ah[1]), sm_pack(ah[2], ah[3]), sm_pack(ah[4], ah[5]),
                               sm_pack(ah[6], ah[7])};
            const u32 pl[4] = {sm_pack(al[0], al[1]), sm_pack(al[2], al[3]), sm_pack(al[4], al[5]),
                               sm_pack(al[6], al[7])};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int at = (8 * nt + g) * MMA_LD + 16 * kk + 2 * t4;  // B[j][n] = V^T[n][j]
                const u32 b0 = sm_ld32(sVt + at), b1 = sm_ld32(sVt + at + 8);
                sm_mma_bf16(acc_o[nt], ph, b0, b1);
                sm_mma_bf16(acc_o[nt], pl, b0, b1);
            }
        }

        // Store O: the warp writes its 16 rows, converted, into its own rows of the Q tile (which only
        // this warp reads), then copies them out row by row, so that global writes are whole rows.
        u16* stage = sQ + r0 * MMA_LD;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int col = 8 * nt + 2 * t4;
            stage[g * MMA_LD + col] = sm_float_to_bf16(acc_o[nt][0]);
            stage[g * MMA_LD + col + 1] = sm_float_to_bf16(acc_o[nt][1]);
            stage[(g + 8) * MMA_LD + col] = sm_float_to_bf16(acc_o[nt][2]);
            stage[(g + 8) * MMA_LD + col + 1] = sm_float_to_bf16(acc_o[nt][3]);
        }
        sm_syncwarp();
        if (*nonfinite != 0.f) {  // rare (and the same for the whole block): see the top of this file
            // A row's output is non-finite once a non-finite value of its own or an earlier position enters
            // it, whatever its finite part: so the sum of those values replaces it.
            const u16* src = static_cast<const u16*>(a.v.p);
            for (int idx = lane; idx < 16 * BV; idx += 32) {
                const int r = idx / BV, col = idx % BV;
                if (r0 + r >= L || v0 + col >= a.Dv) continue;
                float lost = 0.f;
                for (int j = 0; j <= r0 + r; ++j) {
                    const u16 x = src[sm_row(a.v, b, sm_time(a, p0 + j), h) + v0 + col];
                    if (!sm_bf16_finite(x)) lost += sm_bf16_to_float(x);
                }
                if (lost != 0.f) stage[r * MMA_LD + col] = sm_float_to_bf16(lost);
            }
            sm_syncwarp();
        }
        u16* out = static_cast<u16*>(a.o);
        if (vec_o) {
            for (int idx = lane; idx < 16 * (BV / 8); idx += 32) {
                const int r = idx / (BV / 8), col = 8 * (idx % (BV / 8));
                if (r0 + r < L && v0 + col < a.Dv)
                    sm_copy16(out + b * a.o_sb + sm_time(a, p0 + r0 + r) * a.o_st + h * a.o_sh + v0 + col,
                              stage + r * MMA_LD + col);
            }
        } else {
            for (int idx = lane; idx < 16 * BV; idx += 32) {
                const int r = idx / BV, col = idx % BV;
                if (r0 + r < L && v0 + col < a.Dv)
                    out[b * a.o_sb + sm_time(a, p0 + r0 + r) * a.o_st + h * a.o_sh + v0 + col] =
                        stage[r * MMA_LD + col];
            }
        }
        __syncthreads();  // the next chunk overwrites the values and the Q tile
    }
    sm_store_state(a, sS, LDS, BV, b, h, v0, tid, MMA_THREADS);
}

SM_ENTRY(retention_chunk_mma_bf16_bv64, MMA_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_mma<64>))
SM_ENTRY(retention_chunk_mma_bf16_bv32, MMA_THREADS, SM_CHUNK_PARAMS, SM_CHUNK_ARGS, (chunk_mma<32>))
