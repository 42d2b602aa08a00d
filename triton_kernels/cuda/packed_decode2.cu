// Decode attention over the packed KVQuant cache on tensor cores (sm_80+), one split per CTA: two phases per block.
//
// Same inputs, #defines and partial outputs as kvq_packed_decode (packed_decode.cu); the Triton merge kernel is shared.
// Each warp walks its token range in blocks of TB tokens, and each block in three phases:
//  1. keys: tiles of 16 tokens, S^T = K (A, m16 tokens x k16) x Qr^T (B, k16 x n8 query rows): 8 MMAs per tile;
//     pre-RoPE keys dequantized in half2 (magic-number codes, exact code, scale/zero) and rotated by R(j) from the
//     shared table (queries rotated once per block by R(P), P = the block's first position). Scores -> shared.
//  2. tokens (one lane per token): outlier slots as corrections (keys: delta * (R(pos)^T q)[idx] added to the
//     score; values: p * delta added to a per-warp shared accumulator), masking, the block's softmax (one running
//     max per query row and block), and the value probabilities P' = p * s_t * 2^-E (the per-token value scale
//     folded in; E = a running power of two that keeps P' in float16 range) -> shared, in float16.
//  3. values: O^T = V^T (A: raw magic-number codes, 1024 + f * code, no arithmetic) x P'^T (B): 8 MMAs per tile.
//     The offset and the in-place factor f come out at the end: O = 2^E (acc - 1024 sum P') / f + sum p z.
// No staging of dequantized tiles, no per-element outlier compares.

#ifndef MINB
#define MINB 1
#endif
#ifndef D
#define D 128
#endif
#define HALF (D / 2)
#ifndef TB
#define TB 128         // tokens per block (rotation table rows, per-warp score buffer)
#endif
#define TILE 16
#define PPL (TB / 32)  // block tokens per lane in phase 2
#define NEG_BIG (-1.0e30f)
#define MIN_SCALE 6.103515625e-05f
#define MAGIC 0x64006400u
#define KCPW (32 / KB)
#define KNI (16 / KB)
#define KNS (10 / KB)
#define KWT (HALF * KB / 128)
#define KR (HALF / 8)
#define VBT (D * VB / 64)
#define VCPB (8 / VB)
#define NMT (D / 16)
#define VW ((VBT + 3) / 4)
#define MRP (MR <= 4 ? 4 : 8)      // score row stride (floats) per token
#define KSX (KS > 0 ? KS : 1)
#define VSX (VS > 0 ? VS : 1)
#ifndef NOKSLOT
#define NOKSLOT 0  // timing variants only: skip the key / value slot corrections
#endif
#ifndef NOVSLOT
#define NOVSLOT 0
#endif
#ifndef NOVP4
#define NOVP4 0  // timing variants only: skip the value-slot loop (NOVP4), or its per-channel sums (NOVMATCH)
#endif
#ifndef NOVMATCH
#define NOVMATCH 0
#endif
#ifndef KSZS
#define KSZS 0
#endif
#ifndef PF
#define PF 1  // L2 prefetch of the next block
#endif
#ifndef KCH
#define KCH 2
#endif
static_assert(TB % 32 == 0 && TB % TILE == 0, "TB: a multiple of 32");

typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(8) U2 { u32 x, y; };

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
  u32 d; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
  u32 d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ u32 f2h2(float lo, float hi) {  // lo -> bits 0..15
  u32 d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ u16 f2h(float x) {
  u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h;
}
__device__ __forceinline__ float h2f(u16 h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
#ifndef BF16IN
#define BF16IN 0
#endif
__device__ __forceinline__ float in2f(u16 h) {
#if BF16IN
  return __uint_as_float(((u32)h) << 16);
#else
  return h2f(h);
#endif
}
__device__ __forceinline__ u32 hh(u32 x) { return (x & 0xFFFFu) | (x << 16); }
__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void cos_sin(float angle, float* c, float* s) {  // Cody-Waite to [-pi, pi], then MUFU
  float k = floorf(angle * 0.15915494309189535f + 0.5f);
  float r = fmaf(-k, 6.2831854820251465f, angle);
  r = fmaf(-k, -1.7484556000744883e-07f, r);
  r = fmaf(-k, -6.077099351908456e-15f, r);
  __sincosf(r, s, c);
}
// channel (0..D-1) of key register r (0..2*KR-1, first RoPE half then second) half l of thread tig
__device__ __forceinline__ int key_channel(int tig, int r, int l) {
  int h = r / KR, rr = r % KR;
  int j = rr / KNI, q = rr % KNI;
  return h * HALF + tig * (HALF / 4) + j * KCPW + q + l * KNI;
}
// token (0..15 in the tile) of PV k-index pair i (0..3) of thread tig: 2tig, 2tig+1, 2tig+8, 2tig+9
__device__ __forceinline__ int tokof(int tig, int i) { return 2 * tig + (i & 1) + 8 * (i >> 1); }
// value channel of PV A-row ar (0..15) in m-tile mt, for the thread whose gid = ar % 8
__device__ __forceinline__ int val_channel(int mt, int ar) { return (ar % 8) * (D / 8) + 2 * mt + ar / 8; }
// in-place factor of the value code of m-tile mt, row half rsel (the code sits at bits VB * pos of the fp16 mantissa)
__device__ __forceinline__ float val_factor(int mt, int rsel) { return (float)(1 << (VB * ((2 * mt + rsel) % VCPB))); }
__device__ __forceinline__ void l2_prefetch(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// code of channel c in a packed row (natural order: channel c at bits B * (c % (8 / B)) of byte c * B / 8)
template <int B>
__device__ __forceinline__ int code_at(const unsigned char* row, int c) {
  return (row[c * B / 8] >> (B * (c % (8 / B)))) & ((1 << B) - 1);
}

extern "C" __global__ void __launch_bounds__(NW * 32, MINB) kvq_packed_decode(
    const u16* __restrict__ q,
    const unsigned char* __restrict__ kc, const u16* __restrict__ kov, const unsigned char* __restrict__ koi,
    const unsigned char* __restrict__ vc, const u16* __restrict__ vsc, const u16* __restrict__ vze,
    const u16* __restrict__ vov, const unsigned char* __restrict__ voi,
    const float* __restrict__ kzero, const float* __restrict__ kscale,
    const int* __restrict__ pos, const float* __restrict__ inv_freq, const int* __restrict__ hist,
    const int* __restrict__ len_ptr,
    const float* __restrict__ klut, const float* __restrict__ vlut,
    const u32* __restrict__ kpair, const u32* __restrict__ vpair,
    float* __restrict__ o_part, float* __restrict__ lse_part,
    int L, int H, int NS, int GROUP,
    long long sqb, long long sqh, long long sql,
    long long skcb, long long skch, int skct,
    long long skvb, long long skvh, int skvt,
    long long skib, long long skih, int skit,
    long long svcb, long long svch, int svct,
    long long svsb, long long svsh, int svst,
    long long svzb, long long svzh, int svzt,
    long long svvb, long long svvh, int svvt,
    long long svib, long long svih, int svit,
    long long spb,
    float qk_scale, float k_a, float k_b, float v_a, float v_b) {
  extern __shared__ float smem[];
  // shared: R(j) table [TB][4 tig][3][KR] u32 | q [MR][D] f32 | kz, ks (folded) [D] | per warp: scores [TB][MRP] f32,
  //         P' [MR][TB] f16, corr [MR][D] f32 | wm, wl [NW][MR] | code tables
  u32* rtab = (u32*)smem;
  float* qs = smem + TB * 4 * 3 * KR;
  float* kzs = qs + MR * D;
  float* kss = kzs + D;
  float* wbase = kss + D;
  constexpr int PERW = TB * MRP + MR * TB / 2 + MR * D + D;
  float* wm = wbase + NW * PERW;
  float* wl = wm + NW * MR;
  float* ktf = wl + NW * MR;
  float* vtf = ktf + 16;
  u32* kpt = (u32*)(vtf + 16);
  u32* vpt = kpt + (1 << (2 * KB));
  u32* kszt = vpt + (1 << (2 * VB));  // KSZS: [4][KR][4] folded key scale / zero pairs

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // 0x64006400 in a register the compiler cannot fold (L >= 0): (x & mask) | magic is one LOP3 (two immediates take two)
  const u32 magic = MAGIC | ((u32)L >> 31);
  const int gid = lane / 4, tig = lane % 4;
  const int bh = blockIdx.x, split = blockIdx.y;
  const int h = bh % H, b = bh / H;
#if LEN_DEV
  L = *len_ptr;
#endif
  float* scs = wbase + warp * PERW;           // [TB][MRP] raw scores of the block
  u16* pvs = (u16*)(scs + TB * MRP);          // [MR][TB] float16 P'
  float* corr = scs + TB * MRP + MR * TB / 2;  // [MR][D] value-slot corrections, then the warp's result
  float2* cps = (float2*)(corr + MR * D);      // [HALF] cos / sin of the block's first position

  // ---- CTA setup ----
  for (int e = tid; e < TB * 4 * KR; e += NW * 32) {
    int j = e / (4 * KR), t = (e / KR) % 4, r = e % KR;
    float c0, s0, c1, s1;
    cos_sin((float)j * inv_freq[key_channel(t, r, 0)], &c0, &s0);
    cos_sin((float)j * inv_freq[key_channel(t, r, 1)], &c1, &s1);
    u32* row = rtab + (j * 4 + t) * 3 * KR;
    row[r] = f2h2(c0, c1);
    row[KR + r] = f2h2(s0, s1);
    row[2 * KR + r] = f2h2(-s0, -s1);
  }
  for (int e = tid; e < MR * D; e += NW * 32) {
    int m = e / D, ch = e % D;
    int hq = h * GROUP + m % GROUP, lq = m / GROUP;
    qs[e] = in2f(q[b * sqb + hq * sqh + lq * sql + ch]);
  }
  for (int e = lane; e < MR * D; e += 32) corr[e] = 0.f;
  for (int ch = tid; ch < D; ch += NW * 32) {
    float s = kscale[h * D + ch], z = kzero[h * D + ch];
    kzs[ch] = z + k_a * s;
    kss[ch] = s * k_b;
  }
  for (int c = tid; c < 16; c += NW * 32) {
    ktf[c] = (K_LUT && c < (1 << KB)) ? klut[c] : (float)c;
    vtf[c] = (V_LUT && c < (1 << VB)) ? vlut[c] : (float)c;
  }
#if K_LUT
  for (int e = tid; e < (1 << (2 * KB)); e += NW * 32) kpt[e] = kpair[e];
#endif
#if V_LUT
  for (int e = tid; e < (1 << (2 * VB)); e += NW * 32) vpt[e] = vpair[e];
#endif
  __syncthreads();

#if KSZS
  // folded key scale / zero of each lane's registers as half2 pairs in shared memory [4 tig][KR][KS2 r, KZ2 r,
  // KS2 r+1, KZ2 r+1] (32 registers fewer per thread; both tokens of a tile read the same entries)
  for (int e = tid; e < 4 * 2 * KR; e += NW * 32) {
    const int t = e / (2 * KR), r = e % (2 * KR);
    const int c0 = key_channel(t, r, 0), c1 = key_channel(t, r, 1);
    kszt[(t * KR + r / 2) * 4 + 2 * (r % 2)] = f2h2(kss[c0], kss[c1]);
    kszt[(t * KR + r / 2) * 4 + 2 * (r % 2) + 1] = f2h2(kzs[c0], kzs[c1]);
  }
  __syncthreads();
#define KSZ(r, which) kszt[(tig * KR + (r) / 2) * 4 + 2 * ((r) % 2) + (which)]
#else
  u32 KS2[2 * KR], KZ2[2 * KR];
#pragma unroll
  for (int r = 0; r < 2 * KR; ++r) {
    int c0 = key_channel(tig, r, 0), c1 = key_channel(tig, r, 1);
    KS2[r] = f2h2(kss[c0], kss[c1]);
    KZ2[r] = f2h2(kzs[c0], kzs[c1]);
  }
#define KSZ(r, which) ((which) ? KZ2[r] : KS2[r])
#endif

  // ---- this warp's token range ----
  int chunk = ((L + NS - 1) / NS + TB - 1) / TB * TB;
  int lo = split * chunk, hi = min(lo + chunk, L);
  int sub = ((chunk + NW - 1) / NW + TILE - 1) / TILE * TILE;
  int wlo = lo + warp * sub, whi = min(wlo + sub, hi);
  int vis = 0;
#if HAS_HIST
  vis = hist[b];
#endif
  if (wlo < vis) wlo = min(whi, wlo + (vis - wlo) / TILE * TILE);

  const unsigned char* kcb = kc + b * skcb + h * skch;
  const unsigned char* vcb = vc + b * svcb + h * svch;
  const u16* kovb = kov + b * skvb + h * skvh;
  const unsigned char* koib = koi + b * skib + h * skih;
  const u16* vovb = vov + b * svvb + h * svvh;
  const unsigned char* voib = voi + b * svib + h * svih;
  const u16* vsb = vsc + b * svsb + h * svsh;
  const u16* vzb = vze + b * svzb + h * svzh;
  const int* posb = pos + b * spb;

  // running state: per query row (all lanes hold all rows); lane partial sums of the block terms
  float m_run[MR], l_p[MR], sz_p[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) { m_run[m] = NEG_BIG; l_p[m] = 0.f; sz_p[m] = 0.f; }
  int E_run = 0;  // float exponent field of the running value-scale power of two (0: nothing accumulated yet)
  float acc[NMT][4];
#pragma unroll
  for (int i = 0; i < NMT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  u32 kwN[2][2][KWT], vwN[4][VW];
  auto load_k = [&](int t0) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const unsigned char* row = kcb + min(t0 + nt * 8 + gid, whi - 1) * skct;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int j = 0; j < KWT; ++j) kwN[nt][hf][j] = *(const u32*)(row + hf * (HALF * KB / 8) + (tig * KWT + j) * 4);
    }
  };
  auto load_v = [&](int t0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned char* row = vcb + min(t0 + tokof(tig, i), whi - 1) * svct + gid * VBT;
#pragma unroll
      for (int j = 0; j < VW; ++j) vwN[i][j] = *(const u32*)(row + 4 * j);
    }
  };
  int pN[PPL];
  auto load_pos = [&](int blk) {
#pragma unroll
    for (int i = 0; i < PPL; ++i) pN[i] = posb[min(blk + 32 * i + lane, whi - 1)];
  };
  if (wlo < whi) { load_k(wlo); load_pos(wlo); }
  // pre-RoPE key register r (0..2*KR-1) of a token from its words: half2 of channels key_channel(tig, r, 0/1)
  auto key_reg = [&](const u32 (&kwn)[2][KWT], int r, u32 ks2, u32 kz2) -> u32 {
    const int hf = r / KR, rr = r % KR, j = rr / KNI, qq = rr % KNI;
    const int shift = KB * KNS * (qq / KNS);
    const u32 mask = (((1u << KB) - 1u) << (KB * (qq % KNS))) * 0x10001u;
#if K_LUT
    const u32 y = (kwn[hf][j] >> (KB * qq)) & (((1u << KB) - 1u) * 0x10001u);
    const u32 x = kpt[(y & ((1u << KB) - 1u)) | (y >> (16 - KB))];
#else
    u32 x = ((kwn[hf][j] >> shift) & mask) | magic;
    const float f = (float)(1 << (KB * (qq % KNS)));
    x = hfma2(x, hh(f2h2(1.f / f, 0.f)), hh(f2h2(-1024.f / f, 0.f)));  // the code, exactly
#endif
    return hfma2(x, ks2, kz2);
  };

  for (int blk = wlo; blk < whi; blk += TB) {
    const int bend = min(blk + TB, whi);
    int pC[PPL];
#pragma unroll
    for (int i = 0; i < PPL; ++i) pC[i] = pN[i];
    if (blk + TB < whi) {
      load_pos(blk + TB);
#if PF
      // the next block's rows into L2 now (a warp's one-tile-ahead register loads alone keep too few bytes in flight)
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        const int tn = min(blk + TB + lane + 32 * i, whi - 1);
        l2_prefetch(kcb + tn * skct);
        l2_prefetch(vcb + tn * svct);
        if (i == 0) {  // per-token side arrays: a few bytes per token, one line covers many tokens
          l2_prefetch(vsb + tn * svst);
          l2_prefetch(vzb + tn * svzt);
          if (KS > 0) { l2_prefetch(koib + tn * skit); l2_prefetch(kovb + tn * skvt); }
          if (VS > 0) { l2_prefetch(voib + tn * svit); l2_prefetch(vovb + tn * svvt); }
        }
      }
#endif
    }
    int P = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int u = lane + 32 * i, t = blk + u;
      if (t < bend && t >= vis) P = min(P, pC[i] - u);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) P = min(P, __shfl_xor_sync(0xffffffffu, P, o));
    bool okA = true;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int u = lane + 32 * i, t = blk + u;
      if (t < bend && t >= vis && pC[i] - u != P) okA = false;
    }
    const bool modeA = __all_sync(0xffffffffu, okA);
    if (!modeA) P = 0;
    // phase-2 inputs of this lane's tokens (blk + lane + 32 i), loaded now so that phase 1 hides their latency:
    // key-slot channels and exact values, value scale and zero, and the value-slot channels (byte s = slot s) whose
    // code bytes are loaded before phase 3
    int kiP[PPL][KSX];
    u16 kvP[PPL][KSX], vsP[PPL], vzP[PPL];
    u32 viW[PPL];
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int tc = min(blk + lane + 32 * i, whi - 1);
#pragma unroll
      for (int s2 = 0; s2 < KSX; ++s2) {
        kiP[i][s2] = KS > 0 ? (int)koib[tc * skit + s2] : 255;
        kvP[i][s2] = KS > 0 ? kovb[tc * skvt + s2] : (u16)0;
      }
      vsP[i] = vsb[tc * svst];
      vzP[i] = vzb[tc * svzt];
      u32 w = 0xFFFFFFFFu;
#pragma unroll
      for (int s2 = 0; s2 < VS; ++s2) w = (w & ~(0xFFu << (8 * s2))) | ((u32)voib[tc * svit + s2] << (8 * s2));
      viW[i] = w;
    }
    u32 QA[2 * KR];  // B fragments of the rotated queries (column gid = query row; rows >= MR are zero)
    for (int i = lane; i < HALF; i += 32) {  // each angle once per warp
      float c = 1.f, sn = 0.f;
      if (modeA) cos_sin((float)P * inv_freq[i], &c, &sn);
      cps[i] = make_float2(c, sn);
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < KR; ++r) {
      float lo2[2], hi2[2];
#pragma unroll
      for (int l = 0; l < 2; ++l) {
        const int i = key_channel(tig, r, l);
        const float2 cs = cps[i];
        const float c = cs.x, sn = cs.y;
        const float qa = gid < MR ? qs[gid * D + i] : 0.f, qb = gid < MR ? qs[gid * D + HALF + i] : 0.f;
        lo2[l] = qa * c + qb * sn;
        hi2[l] = qb * c - qa * sn;
      }
      QA[r] = f2h2(lo2[0], lo2[1]);
      QA[KR + r] = f2h2(hi2[0], hi2[1]);
    }

    // ---------------- phase 1: scores of the block ----------------
    // one tile: MODEA = consecutive positions (R(j) from the shared table), else per-token angles
    // (called with a constant MODEA from two loops: inlined, each loop keeps only its branch)
    auto key_tile = [&](int t0, const bool MODEA) {
      const int jb = t0 - blk;
      u32 kw[2][2][KWT];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
          for (int j = 0; j < KWT; ++j) kw[nt][hf][j] = kwN[nt][hf][j];
      if (t0 + TILE < bend) load_k(t0 + TILE); else load_v(blk);
      float ptk[2] = {0.f, 0.f};  // mode B: the two tokens' positions
      if (!MODEA) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) ptk[nt] = (float)posb[min(t0 + nt * 8 + gid, whi - 1)];
      }
      // k-steps s (registers 2s, 2s+1 of the first RoPE half) and s + KR/2 (their partners in the second half)
      float sc[4] = {0.f, 0.f, 0.f, 0.f}, sc2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int s = 0; s < KR / 2; ++s) {
        u32 lo[2][2], hi[2][2];  // [token][register 2s + i] first half, second half
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          u32 C[2], S[2], NS[2];  // cos / sin / -sin of registers 2s, 2s+1 of this token
          if (MODEA) {
            const u32* tr = rtab + ((jb + nt * 8 + gid) * 4 + tig) * 3 * KR + 2 * s;
            const U2 c = *(const U2*)tr, sn = *(const U2*)(tr + KR), ns = *(const U2*)(tr + 2 * KR);
            C[0] = c.x; C[1] = c.y; S[0] = sn.x; S[1] = sn.y; NS[0] = ns.x; NS[1] = ns.y;
          } else {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              float c0, s0, c1, s1;
              cos_sin(ptk[nt] * inv_freq[key_channel(tig, 2 * s + i, 0)], &c0, &s0);
              cos_sin(ptk[nt] * inv_freq[key_channel(tig, 2 * s + i, 1)], &c1, &s1);
              C[i] = f2h2(c0, c1); S[i] = f2h2(s0, s1); NS[i] = f2h2(-s0, -s1);
            }
          }
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int r = 2 * s + i;
            const u32 a = key_reg(kw[nt], r, KSZ(r, 0), KSZ(r, 1)), bb = key_reg(kw[nt], KR + r, KSZ(KR + r, 0), KSZ(KR + r, 1));
            lo[nt][i] = hfma2(bb, NS[i], hmul2(a, C[i]));  // RoPE by R(j): a' = a c - b s, b' = b c + a s
            hi[nt][i] = hfma2(a, S[i], hmul2(bb, C[i]));
          }
        }
        mma16816(sc, lo[0][0], lo[1][0], lo[0][1], lo[1][1], QA[2 * s], QA[2 * s + 1]);
        mma16816(KCH == 2 ? sc2 : sc, hi[0][0], hi[1][0], hi[0][1], hi[1][1], QA[KR + 2 * s], QA[KR + 2 * s + 1]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[i] += sc2[i];
      // S^T fragment: (token gid, rows 2tig, 2tig+1), (token gid + 8, same rows)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 2 * tig + (i & 1), u = jb + gid + 8 * (i >> 1);
        if (m < MR) scs[u * MRP + m] = sc[i];
      }
    };
    if (modeA) {
      for (int t0 = blk; t0 < bend; t0 += TILE) key_tile(t0, true);
    } else {
      for (int t0 = blk; t0 < bend; t0 += TILE) key_tile(t0, false);
    }
    __syncwarp();

    // ---------------- phase 2: one lane per token ----------------
    float sv[PPL][MR];
    float scl[PPL], zer[PPL];
    int ebits = 0;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int u = lane + 32 * i, t = blk + u;
      const bool valid = t < bend && t >= vis;
      const int tc = min(t, whi - 1);
#pragma unroll
      for (int m = 0; m < MR; ++m) sv[i][m] = scs[u * MRP + m];
#if KS > 0 && !NOKSLOT
#pragma unroll
      for (int s2 = 0; s2 < KS; ++s2) {
        int idx = valid ? kiP[i][s2] : 255;
#pragma unroll
        for (int s3 = s2 + 1; s3 < KS; ++s3)
          if (kiP[i][s3] == idx) idx = 255;  // the same channel twice: the later slot holds it
        if (idx < D) {  // the key row was read in phase 1: this byte comes from L1
          const float deq = ktf[code_at<KB>(kcb + tc * skct, idx)] * kss[idx] + kzs[idx];
          const float delta = in2f(kvP[i][s2]) - deq;
          const int i0 = idx % HALF;
          float c, sn;
          cos_sin((float)pC[i] * inv_freq[i0], &c, &sn);
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            const float qa = qs[m * D + i0], qb = qs[m * D + HALF + i0];
            sv[i][m] += delta * (idx < HALF ? qa * c + qb * sn : qb * c - qa * sn);
          }
        }
      }
#endif
#pragma unroll
      for (int m = 0; m < MR; ++m) sv[i][m] = valid ? sv[i][m] * qk_scale : __int_as_float(0xff800000);
      const float s = fmaxf(in2f(vsP[i]), MIN_SCALE), z = in2f(vzP[i]);
      scl[i] = valid ? s * v_b : 0.f;
      zer[i] = valid ? z + v_a * s : 0.f;
      ebits = max(ebits, (__float_as_int(scl[i]) >> 23) & 0xff);
    }
    // block maxima, rescale factors
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ebits = max(ebits, __shfl_xor_sync(0xffffffffu, ebits, o));
    const int E_new = max(E_run, ebits);
    const float fe = (E_run == 0 || E_new - E_run > 126) ? 0.f : __int_as_float((127 + E_run - E_new) << 23);  // 2^(E_run-E_new)
    const float pscale = __int_as_float((254 - max(E_new, 1)) << 23);  // 2^(127 - E_new)
    E_run = E_new;
    float alpha[MR];
    bool any_change = false;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      float bm = sv[0][m];
#pragma unroll
      for (int i = 1; i < PPL; ++i) bm = fmaxf(bm, sv[i][m]);
      bm = warp_max(bm);
      const float m_new = fmaxf(m_run[m], bm);
      alpha[m] = exp2f(m_run[m] - m_new);
      any_change |= alpha[m] != 1.f;
      m_run[m] = m_new;
      l_p[m] *= alpha[m];
      sz_p[m] *= alpha[m];
    }
#if VS > 0 && !NOVSLOT
    if (any_change) {  // the value-slot corrections follow the running maxima (warp-uniform)
#pragma unroll
      for (int k = 0; k < MR * D / 32; ++k) corr[lane + 32 * k] *= alpha[32 * k / D];  // row (32 k + lane) / D
    }
#endif
    float spb[MR];  // the block's sum of P' per row (this lane's tokens)
#pragma unroll
    for (int m = 0; m < MR; ++m) spb[m] = 0.f;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int u = lane + 32 * i;
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        const float p = exp2f(sv[i][m] - m_run[m]);
        const u16 ph = f2h(p * scl[i] * pscale);
        pvs[m * TB + u] = ph;
        spb[m] += h2f(ph);
        scs[u * MRP + m] = p;  // for the value slots (phase 4)
        l_p[m] += p;
        sz_p[m] += p * zer[i];
      }
    }
    // accumulator rows 2tig, 2tig + 1 (C columns) follow the running maxima and the value-scale exponent
    {
      float a0 = 1.f, a1 = 1.f;
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m == 2 * tig) a0 = alpha[m];
        if (m == 2 * tig + 1) a1 = alpha[m];
      }
      a0 *= fe; a1 *= fe;
      if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
        for (int i = 0; i < NMT; ++i) { acc[i][0] *= a0; acc[i][1] *= a1; acc[i][2] *= a0; acc[i][3] *= a1; }
      }
    }
#if !V_LUT
    // the block's sum of P' for rows 2tig, 2tig + 1: phase 3 adds 1024 * sum P' to these accumulator columns
    float spr[2] = {0.f, 0.f};
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const float v = warp_sum(spb[m]);
      if (m == 2 * tig) spr[0] = v;
      if (m == 2 * tig + 1) spr[1] = v;
    }
#endif
    // phase-4 inputs (value slots: exact values and the code bytes of their channels), loaded now so that phase 3
    // hides their latency (the rows are not read yet)
    u16 vvP[PPL][VSX];
    u32 vcW[PPL];
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int tc = min(blk + lane + 32 * i, whi - 1);
      u32 cw = 0;
#pragma unroll
      for (int s2 = 0; s2 < VSX; ++s2) {
        vvP[i][s2] = VS > 0 ? vovb[tc * svvt + s2] : (u16)0;
        const int idx = min((int)((viW[i] >> (8 * s2)) & 0xFFu), D - 1);
        if (VS > 0) cw |= (u32)vcb[tc * svct + idx * VB / 8] << (8 * s2);
      }
      vcW[i] = cw;
    }
    __syncwarp();

    // ---------------- phase 3: values ----------------
    for (int t0 = blk; t0 < bend; t0 += TILE) {
      const int jb = t0 - blk;
      u32 vw[4][VW];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < VW; ++j) vw[i][j] = vwN[i][j];
      if (t0 + TILE < bend) load_v(t0 + TILE); else if (blk + TB < whi) load_k(blk + TB);
      const u32 pb0 = gid < MR ? *(const u32*)(pvs + gid * TB + jb + 2 * tig) : 0u;
      const u32 pb1 = gid < MR ? *(const u32*)(pvs + gid * TB + jb + 2 * tig + 8) : 0u;
#pragma unroll
      for (int mt = 0; mt < NMT; ++mt) {
        u32 a[4];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int rsel = 0; rsel < 2; ++rsel) {
            const int cl = 2 * mt + rsel;
            const int byte = cl / VCPB, pos_in = cl % VCPB;
            const u32 sel = (byte % 4) | ((byte % 4) << 4) | ((4 + byte % 4) << 8) | ((4 + byte % 4) << 12);
            const u32 pr = __byte_perm(vw[2 * half][byte / 4], vw[2 * half + 1][byte / 4], sel);
#if V_LUT
            const u32 y = (pr >> (VB * pos_in)) & (((1u << VB) - 1u) * 0x10001u);
            a[2 * half + rsel] = vpt[(y & ((1u << VB) - 1u)) | (y >> (16 - VB))];
#else
            const u32 mask = (((1u << VB) - 1u) << (VB * pos_in)) * 0x10001u;
            a[2 * half + rsel] = (pr & mask) | magic;  // 1024 + f * code (the 1024 comes out after the block)
#endif
          }
        }
        mma16816(acc[mt], a[0], a[1], a[2], a[3], pb0, pb1);
      }
    }
#if !V_LUT
    // out with the magic offset once per block (the accumulators never grow to 1024 x the signal: fp32 keeps it)
#pragma unroll
    for (int mt = 0; mt < NMT; ++mt) {
      acc[mt][0] -= 1024.f * spr[0]; acc[mt][1] -= 1024.f * spr[1];
      acc[mt][2] -= 1024.f * spr[0]; acc[mt][3] -= 1024.f * spr[1];
    }
#endif
#if VS > 0 && !NOVSLOT && !NOVP4
    // ---------------- phase 4: value slots, p * (exact - dequantized) into corr (rows read in phase 3: L1) ----------------
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int u = lane + 32 * i, t = blk + u;
      const bool tv = t < bend && t >= vis;
      {
#pragma unroll
        for (int s2 = 0; s2 < VS; ++s2) {
          int idx = tv ? (int)((viW[i] >> (8 * s2)) & 0xFFu) : 255;
#pragma unroll
          for (int s3 = s2 + 1; s3 < VS; ++s3)
            if ((int)((viW[i] >> (8 * s3)) & 0xFFu) == idx) idx = 255;
          float delta = 0.f;
          if (idx < D) {
            const int code = (vcW[i] >> (8 * s2 + VB * (idx % (8 / VB)))) & ((1 << VB) - 1);
            delta = in2f(vvP[i][s2]) - (vtf[code] * scl[i] + zer[i]);
          }
          // lanes naming the same channel add up first (shared float atomics are CAS loops on sm_90: 75 us at 128K),
          // then the lowest lane of each channel writes: distinct channels, no races
#if NOVMATCH  // timing variant only (wrong when two lanes name one channel)
          const u32 g = 1u << lane;
#else
          const u32 g = __match_any_sync(0xffffffffu, idx < D ? idx : D + lane);
#endif
          const bool lead = (g & ((1u << lane) - 1u)) == 0u;
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            float v = scs[u * MRP + m] * delta;
            if (__popc(g) > 1) {
              float sum = 0.f;
              for (u32 r = g; r; r &= r - 1u) sum += __shfl_sync(g, v, __ffs(r) - 1);
              v = sum;
            }
            if (lead && idx < D) corr[m * D + idx] += v;
          }
        }
      }
    }
#endif
    __syncwarp();
  }

  // ---- warp result: corr[row][ch] += 2^E acc / f + sum p z ----
  float lsum[MR], szw[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) { lsum[m] = warp_sum(l_p[m]); szw[m] = warp_sum(sz_p[m]); }
  const float escale = __int_as_float(E_run << 23);  // 2^(E_run - 127); 0 when nothing was accumulated
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int m = 2 * tig + c;
      if (m < MR) {
        float sz = 0.f;
#pragma unroll
        for (int mm = 0; mm < MR; ++mm) if (mm == m) sz = szw[mm];
#pragma unroll
        for (int rsel = 0; rsel < 2; ++rsel) {
          const int ch = val_channel(mt, gid + 8 * rsel);
          const float f = V_LUT ? 1.f : val_factor(mt, rsel);
          corr[m * D + ch] += escale * acc[mt][2 * rsel + c] / f + sz;
        }
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < MR; ++m) { wm[warp * MR + m] = m_run[m]; wl[warp * MR + m] = lsum[m]; }
  }
  __syncthreads();

  // ---- CTA combine of the warps -> this split's normalized partial output and log-sum-exp ----
  const long long part = ((long long)bh * NS + split) * 16;
  for (int e = tid; e < 16 * D; e += NW * 32) {
    const int m = e / D, ch = e % D;
    float o = 0.f;
    if (m < MR) {
      float M = NEG_BIG;
      for (int w = 0; w < NW; ++w) M = fmaxf(M, wm[w * MR + m]);
      float Lsum = 0.f;
      for (int w = 0; w < NW; ++w) {
        const float wt = exp2f(wm[w * MR + m] - M);
        Lsum += wl[w * MR + m] * wt;
        o += wbase[w * PERW + TB * MRP + MR * TB / 2 + m * D + ch] * wt;
      }
      o = Lsum > 0.f ? o / Lsum : 0.f;
      if (ch == 0) lse_part[part + m] = Lsum > 0.f ? M + log2f(Lsum) : NEG_BIG;
    } else if (ch == 0) {
      lse_part[part + m] = NEG_BIG;
    }
    o_part[(part + m) * D + ch] = o;
  }
}
