// Decode attention over the packed KVQuant cache on tensor cores (sm_80+), one split per CTA.
//
// Compiled at first use with NVRTC (torch.cuda._compile_kernel's machinery, see cuda_decode.py); the
// configuration comes in as #defines written by cuda_decode.source(): D (head_dim, 128), KB/VB (key/value bits, 2 or
// 4), KS/VS (outlier slots per token), MR (query rows per KV head = q_len * group, <= 8), NW (warps per CTA),
// HAS_HIST, LEN_DEV, K_LUT/V_LUT, BF16IN, VEC, TB, and the constants shared with the Triton kernels (NEG_BIG,
// MIN_SCALE: kvquant_hf.quant). No CUDA headers: half2 math through inline PTX on 32-bit registers.
//
// Same inputs and partial outputs as kvquant_hf.kernels.decode_kernel.packed_decode_kernel (the Triton merge
// kernel combines the splits and the exact block). Mirrors the torch reference
// kvquant_hf.attention.packed_attention_torch (dequantization and outlier slots: kvquant_hf/quant.py);
// docs/kernels.md describes the design.
// Work split: CTA = one (batch, kv head, split); each warp takes a contiguous quarter of the split; blocks of
// TB = 128 tokens share one rotation of the queries by R(P) (P = the block's first position), the keys are rotated
// by R(j) (j = 0..TB-1) from a shared table: q.R(P+j)k = (R(P)^T q).R(j)k.
// Tiles of 16 tokens: scores S[m][t] = Qr (A, m16 x k16, rows >= MR zero) x K^T (B, k16 x n8 per 8 tokens);
// the score fragment is directly the B operand of O^T = V^T (A, 16 channels x 16 tokens) x P^T.
// Codes become fp16 by the magic-number trick ((w & mask) | 0x6400 = 1024 + f*code, one fma with powers of two
// gives the code exactly), then one fma applies the (affine-folded) scale and zero.

#if !defined(D) || !defined(TB) || !defined(NEG_BIG) || !defined(MIN_SCALE)
#error "the configuration #defines come from kvquant_hf.kernels.cuda_decode.source()"
#endif
#define HALF (D / 2)
#define TILE 16        // tokens per MMA tile
#define PPL (TB / 32)  // block positions per lane
#define MAGIC 0x64006400u
#define KCPW (32 / KB)             // codes per 32-bit word
#define KNI (16 / KB)              // half2 registers per word (codes i and i + KNI)
#define KNS (10 / KB)              // codes per shift (in-place masks inside the fp16 mantissa)
#define KWT (HALF * KB / 128)      // words per thread per RoPE half (4 threads per token)
#define KR (HALF / 8)              // half2 key registers per RoPE half per thread (= KWT * KNI)
#define VBT (D * VB / 64)          // value bytes per thread (8 threads per token)
#define VCPB (8 / VB)              // value codes per byte
#define NMT (D / 16)               // PV m-tiles (16 channels each)
#define VW ((VBT + 3) / 4)         // value words per thread per token
#define KROW (D * KB / 8)          // packed key bytes per token
#define VROW (D * VB / 8)
#define KSX (KS > 0 ? KS : 1)
// Outlier slots: each tile's dequantized pre-RoPE keys and scaled values go through a per-warp shared-memory copy
// of the lanes' MMA fragments, where one lane per (token, slot) overwrites its outlier element with the exact value;
// then every lane reloads its fragments.
// KCH: the score MMAs of an 8-token half accumulate in KCH independent chains (summed at the end).
#define KCH 2
// The R(j) table holds cos and sin only (the minus sign is an operand modifier of HFMA2), rows padded to RW =
// 2 KR + 4 words so the 128-bit loads of 8 consecutive rows hit distinct banks.
#define RW (2 * KR + 4)
// VEC=1 (the host sets it when code rows are 8-byte aligned): 64-bit loads of a lane's key and value code words.
#ifndef VEC
#define VEC 0
#endif
// query rows in shared memory are QROW = D + 1 floats apart: the per-block query rotation reads row gid of every lane
// (rows D floats apart would be an 8-way bank conflict); QWORDS keeps what follows 16-byte aligned
#define QROW (D + 1)
#define QWORDS ((MR * QROW + 3) / 4 * 4)
#define KPAD (2 * KR + 4)          // staged key words per lane and 8-token half (padding: conflict-free 128-bit)
#define VPAD (4 * NMT + 4)         // staged value words per lane
#define VSX (VS > 0 ? VS : 1)
static_assert(KS <= 2 && VS <= 2, "one lane per (token, slot): at most 2 slots per token (lanes 0-15, 16-31)");

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 hfma2n(u32 a, u32 b, u32 c) {  // c - a * b
  u32 d; asm("{ .reg .b32 t; neg.f16x2 t, %1; fma.rn.f16x2 %0, t, %2, %3; }" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
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
struct alignas(16) U4 { u32 x, y, z, w; };
struct alignas(8) U2 { u32 x, y; };
__device__ __forceinline__ float h2f(u16 h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
// model-dtype inputs (queries, slot values, value scale/zero): float16, or bfloat16 with BF16IN (the kernel still
// dequantizes and multiplies in float16: bf16 models whose keys/values exceed the fp16 range must not use it)
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
__device__ __forceinline__ u32 hh(u32 x) {  // half2 (x, x) from the fp16 bits in x's low half
  return (x & 0xFFFFu) | (x << 16);
}
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
// factor f of key register (in-place mask position): code * f lies in the mantissa
__device__ __forceinline__ float key_factor(int r) {
  int q = (r % KR) % KNI;
  return (float)(1 << (KB * (q % KNS)));
}
// token (0..15 in the tile) of PV k-index pair i (0..3) of thread tig: 2tig, 2tig+1, 2tig+8, 2tig+9
__device__ __forceinline__ int tokof(int tig, int i) { return 2 * tig + (i & 1) + 8 * (i >> 1); }
// value channel of PV A-row ar (0..15) in m-tile mt, for the thread whose gid = ar % 8
__device__ __forceinline__ int val_channel(int mt, int ar) {
  return (ar % 8) * (D / 8) + 2 * mt + ar / 8;
}

// reference: kvquant_hf.attention.packed_attention_torch (dequantization and outlier slots: kvquant_hf/quant.py)
extern "C" __global__ void __launch_bounds__(NW * 32, 1) kvq_packed_decode(
    const u16* __restrict__ q,          // fp16 (BF16IN: bf16) [B, Hq, Lq, D], RoPE applied
    const unsigned char* __restrict__ kc, const u16* __restrict__ kov, const unsigned char* __restrict__ koi,
    const unsigned char* __restrict__ vc, const u16* __restrict__ vsc, const u16* __restrict__ vze,
    const u16* __restrict__ vov, const unsigned char* __restrict__ voi,
    const float* __restrict__ kzero, const float* __restrict__ kscale,  // [H, D]
    const int* __restrict__ pos, const float* __restrict__ inv_freq, const int* __restrict__ hist,
    const int* __restrict__ len_ptr,
    const float* __restrict__ klut, const float* __restrict__ vlut,  // signposts (float32, 2**bits)
    const u32* __restrict__ kpair, const u32* __restrict__ vpair,    // half2 pair tables (K_LUT / V_LUT)
    float* __restrict__ o_part, float* __restrict__ lse_part,  // [B, H, NS, 16, D], [B, H, NS, 16]
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
  // shared layout: R(j) table [TB][4 tig][RW] u32 (cos [KR], sin [KR], padding) | q [MR][QROW] f32 (QWORDS) |
  //                kz, ks (folded) [D] f32 each | per warp (below) | wm, wl [NW][MR] | code tables
  u32* rtab = (u32*)smem;
  float* qs = smem + TB * 4 * RW;
  float* kzs = qs + QWORDS;
  float* kss = kzs + D;
  float* wbase = kss + D;
  // per warp: key fragments [2][32][KPAD] u32 (its result corr [MR][D] f32 after the loop) | values [32][VPAD] u32
  const int PERW = 2 * 32 * KPAD + 32 * VPAD;
  static_assert(MR * D <= 2 * 32 * KPAD, "corr must fit in the key staging area");
  float* wm = wbase + NW * PERW;
  float* wl = wm + NW * MR;
  float* ktf = wl + NW * MR;  // code -> signpost (affine grids: the code itself; scale/zero carry the grid)
  float* vtf = ktf + 16;
  u32* kpt = (u32*)(vtf + 16);  // half2 signposts of code pairs (K_LUT / V_LUT)
  u32* vpt = kpt + (1 << (2 * KB));

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int bh = blockIdx.x, split = blockIdx.y;
  const int h = bh % H, b = bh / H;
#if LEN_DEV
  L = *len_ptr;
#endif
  float* corr = wbase + warp * PERW;
  u32* kst = (u32*)corr;
  u32* vst = kst + 2 * 32 * KPAD;

  // ---- CTA setup: R(j) table, queries (float32), folded key scale/zero ----
  for (int e = tid; e < TB * 4 * KR; e += NW * 32) {
    int j = e / (4 * KR), t = (e / KR) % 4, r = e % KR;
    float c0, s0, c1, s1;
    cos_sin((float)j * inv_freq[key_channel(t, r, 0)], &c0, &s0);
    cos_sin((float)j * inv_freq[key_channel(t, r, 1)], &c1, &s1);
    u32* row = rtab + (j * 4 + t) * RW;
    row[r] = f2h2(c0, c1);
    row[KR + r] = f2h2(s0, s1);
  }
  for (int e = tid; e < MR * D; e += NW * 32) {
    int m = e / D, ch = e % D;
    int hq = h * GROUP + m % GROUP, lq = m / GROUP;
    qs[m * QROW + ch] = in2f(q[b * sqb + hq * sqh + lq * sql + ch]);
  }
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

  // folded key scale/zero of this thread's registers (half2) and the code factors
  u32 KS2[2 * KR], KZ2[2 * KR];
#pragma unroll
  for (int r = 0; r < 2 * KR; ++r) {
    int c0 = key_channel(tig, r, 0), c1 = key_channel(tig, r, 1);
    KS2[r] = f2h2(kss[c0], kss[c1]);
    KZ2[r] = f2h2(kzs[c0], kzs[c1]);
  }

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

  float m_run = NEG_BIG, l_run = 0.f;  // row gid (quad-consistent)
  float acc[NMT][4];
#pragma unroll
  for (int i = 0; i < NMT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  // ---- one tile's raw data, loaded one tile ahead (registers) ----
  const int su = lane % TILE, ss = lane / TILE;  // this lane's (token, slot) in the slot corrections
  u32 kwN[2][2][KWT], vwN[4][VW];
  u16 vsN[4], vzN[4];
  int kiN[KSX], viN[VSX];
  u16 kvN = 0, vvN = 0;
  auto load_tile = [&](int t0) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const unsigned char* row = kcb + min(t0 + nt * 8 + gid, whi - 1) * skct;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#if VEC
        if (KWT == 2) {
          const U2 w = *(const U2*)(row + hf * (HALF * KB / 8) + tig * 8);
          kwN[nt][hf][0] = w.x; kwN[nt][hf][KWT - 1] = w.y;
        } else
#endif
#pragma unroll
        for (int j = 0; j < KWT; ++j) kwN[nt][hf][j] = *(const u32*)(row + hf * (HALF * KB / 8) + (tig * KWT + j) * 4);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tt = min(t0 + tokof(tig, i), whi - 1);
      const unsigned char* row = vcb + tt * svct + gid * VBT;
#if VEC
      if (VW == 2) {
        const U2 w = *(const U2*)row;
        vwN[i][0] = w.x; vwN[i][VW - 1] = w.y;
      } else
#endif
#pragma unroll
      for (int j = 0; j < VW; ++j) vwN[i][j] = *(const u32*)(row + 4 * j);
      vsN[i] = vsb[tt * svst];
      vzN[i] = vzb[tt * svzt];
    }
    const int ts = min(t0 + su, whi - 1);
#pragma unroll
    for (int s2 = 0; s2 < KSX; ++s2) kiN[s2] = KS > 0 ? (int)koib[ts * skit + s2] : 255;
#pragma unroll
    for (int s2 = 0; s2 < VSX; ++s2) viN[s2] = VS > 0 ? (int)voib[ts * svit + s2] : 255;
    if (ss < KS) kvN = kovb[ts * skvt + ss];
    if (ss < VS) {
      vvN = vovb[ts * svvt + ss];
    }
  };
  int pN[PPL];  // positions of this lane's tokens lane + 32 i of a block (TB / 32 each)
  auto load_pos = [&](int blk) {
#pragma unroll
    for (int i = 0; i < PPL; ++i) pN[i] = posb[min(blk + 32 * i + lane, whi - 1)];
  };
  if (wlo < whi) { load_tile(wlo); load_pos(wlo); }
  // pre-RoPE keys of token gid of an 8-token half (words kwn) as 2 * KR half2 registers
  auto key_regs = [&](const u32 (&kwn)[2][KWT], u32* kreg) {
#pragma unroll
    for (int r = 0; r < 2 * KR; ++r) {
      const int hf = r / KR, rr = r % KR, j = rr / KNI, qq = rr % KNI;
      const int shift = KB * KNS * (qq / KNS);
      const u32 mask = (((1u << KB) - 1u) << (KB * (qq % KNS))) * 0x10001u;
#if K_LUT
      const u32 y = (kwn[hf][j] >> (KB * qq)) & (((1u << KB) - 1u) * 0x10001u);
      const u32 x = kpt[(y & ((1u << KB) - 1u)) | (y >> (16 - KB))];  // signposts of codes qq, qq + KNI
#else
      u32 x = ((kwn[hf][j] >> shift) & mask) | MAGIC;
      const float f = (float)(1 << (KB * (qq % KNS)));
      const u32 inv = hh(f2h2(1.f / f, 0.f)), off = hh(f2h2(-1024.f / f, 0.f));
      x = hfma2(x, inv, off);              // the code, exactly
#endif
      kreg[r] = hfma2(x, KS2[r], KZ2[r]);  // pre-RoPE key
    }
  };
  // per-token value scale / zero of this thread's 4 tokens as half2 pairs (0 for tokens outside the range)
  auto val_scales = [&](int t0, const u16* vsC, const u16* vzC, u32* SC, u32* ZE) {
    float scl[4], zer[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = t0 + tokof(tig, i);
      const bool valid = t < whi && t >= vis;
      const float s = fmaxf(in2f(vsC[i]), MIN_SCALE), z = in2f(vzC[i]);
      scl[i] = valid ? s * v_b : 0.f;
      zer[i] = valid ? z + v_a * s : 0.f;
    }
    SC[0] = f2h2(scl[0], scl[1]); SC[1] = f2h2(scl[2], scl[3]);
    ZE[0] = f2h2(zer[0], zer[1]); ZE[1] = f2h2(zer[2], zer[3]);
  };
  // value A fragments of m-tile mt: a0 (ch row gid, tok 2tig..), a1 (row gid+8, ..), a2 (row gid, tok 2tig+8..), a3
  auto val_regs = [&](int mt, const u32 (&vw)[4][VW], const u32* SC, const u32* ZE, u32* a) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // token pairs (0,1) -> a0/a1, (2,3) -> a2/a3
#pragma unroll
      for (int rsel = 0; rsel < 2; ++rsel) {  // local channel 2mt + rsel
        const int cl = 2 * mt + rsel;
        const int byte = cl / VCPB, pos_in = cl % VCPB;
        const u32 sel = (byte % 4) | ((byte % 4) << 4) | ((4 + byte % 4) << 8) | ((4 + byte % 4) << 12);
        const u32 pr = __byte_perm(vw[2 * half][byte / 4], vw[2 * half + 1][byte / 4], sel);
#if V_LUT
        const u32 y = (pr >> (VB * pos_in)) & (((1u << VB) - 1u) * 0x10001u);
        const u32 x = vpt[(y & ((1u << VB) - 1u)) | (y >> (16 - VB))];
#else
        const u32 mask = (((1u << VB) - 1u) << (VB * pos_in)) * 0x10001u;
        u32 x = (pr & mask) | MAGIC;
        const float f = (float)(1 << (VB * pos_in));
        x = hfma2(x, hh(f2h2(1.f / f, 0.f)), hh(f2h2(-1024.f / f, 0.f)));
#endif
        a[2 * half + rsel] = hfma2(x, SC[half], ZE[half]);
      }
    }
  };

  for (int blk = wlo; blk < whi; blk += TB) {
    // positions: consecutive from P in this block (mode A) or not (mode B: per-token angles, queries unrotated)
    int pC[PPL];
#pragma unroll
    for (int i = 0; i < PPL; ++i) pC[i] = pN[i];
    if (blk + TB < whi) load_pos(blk + TB);
    int P = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int u = lane + 32 * i, t = blk + u;
      if (t < whi && t >= vis) P = min(P, pC[i] - u);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) P = min(P, __shfl_xor_sync(0xffffffffu, P, o));
    bool okA = true;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int u = lane + 32 * i, t = blk + u;
      if (t < whi && t >= vis && pC[i] - u != P) okA = false;
    }
    const bool modeA = __all_sync(0xffffffffu, okA);
    if (!modeA) P = 0;
    u32 QA[2 * KR];  // A fragments of the rotated queries (row gid; rows >= MR and gid + 8 are zero)
#pragma unroll
    for (int r = 0; r < KR; ++r) {
      float lo[2], hi[2];
#pragma unroll
      for (int l = 0; l < 2; ++l) {
        const int i = key_channel(tig, r, l);  // first-half channel; its pair is i + HALF
        float c = 1.f, sn = 0.f;
        if (modeA) cos_sin((float)P * inv_freq[i], &c, &sn);
        const float qa = gid < MR ? qs[gid * QROW + i] : 0.f, qb = gid < MR ? qs[gid * QROW + HALF + i] : 0.f;
        lo[l] = qa * c + qb * sn;
        hi[l] = qb * c - qa * sn;
      }
      QA[r] = f2h2(lo[0], lo[1]);
      QA[KR + r] = f2h2(hi[0], hi[1]);
    }

    for (int t0 = blk; t0 < min(blk + TB, whi); t0 += TILE) {
      const int jb = t0 - blk;
      // this tile's data (loaded one tile ahead), then the next tile's loads
      u32 kw[2][2][KWT], vw[4][VW];
      u16 vsC[4], vzC[4];
      int ki[KSX], vi[VSX];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
          for (int j = 0; j < KWT; ++j) kw[nt][hf][j] = kwN[nt][hf][j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < VW; ++j) vw[i][j] = vwN[i][j];
        vsC[i] = vsN[i]; vzC[i] = vzN[i];
      }
#pragma unroll
      for (int s2 = 0; s2 < KSX; ++s2) ki[s2] = kiN[s2];
#pragma unroll
      for (int s2 = 0; s2 < VSX; ++s2) vi[s2] = viN[s2];
      const u16 kv1 = kvN, vv1 = vvN;
      if (t0 + TILE < whi) load_tile(t0 + TILE);
      u32 SC[2], ZE[2];
      val_scales(t0, vsC, vzC, SC, ZE);
#if KS > 0 || VS > 0
      // this lane's fragments into its staging rows (it alone reads them back; slot lanes patch them in between)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        u32 kreg[2 * KR];
        key_regs(kw[nt], kreg);
        U4* dst = (U4*)(kst + (nt * 32 + lane) * KPAD);
#pragma unroll
        for (int g = 0; g < KR / 2; ++g) dst[g] = U4{kreg[4 * g], kreg[4 * g + 1], kreg[4 * g + 2], kreg[4 * g + 3]};
      }
#pragma unroll
      for (int mt = 0; mt < NMT; ++mt) {
        u32 a[4];
        val_regs(mt, vw, SC, ZE, a);
        *(U4*)(vst + lane * VPAD + 4 * mt) = U4{a[0], a[1], a[2], a[3]};
      }
      __syncwarp();
      // outlier slots: the lane of (token su, slot ss) writes the exact value over that element's fragment half
      {
        const int t = t0 + su;
        const bool valid = t < whi && t >= vis;
#if KS > 0
        if (ss < KS) {
          // a register select: indexing ki[ss] would put ki in local memory
          int idx = valid ? (ss == 0 ? ki[0] : ki[KSX - 1]) : 255;
#pragma unroll
          for (int s2 = 0; s2 < KSX; ++s2)
            if (s2 > ss && ki[s2] == idx) idx = 255;  // the same channel twice: the later slot holds it
          if (idx < D) {  // channel idx = key_channel(tg, r, l) of lane (su % 8) * 4 + tg, half su / 8
            const int hh_ = idx / HALF, rem = idx % HALF, tg = rem / (HALF / 4), r2 = rem % (HALF / 4);
            const int j = r2 / KCPW, qq = r2 % KCPW, l = qq / KNI, qn = qq % KNI;
            const int r = hh_ * KR + j * KNI + qn;
            ((u16*)kst)[(((su / 8) * 32 + (su % 8) * 4 + tg) * KPAD + r) * 2 + l] = f2h(in2f(kv1));
          }
        }
#endif
#if VS > 0
        if (ss < VS) {
          int idx = valid ? (ss == 0 ? vi[0] : vi[VSX - 1]) : 255;
#pragma unroll
          for (int s2 = 0; s2 < VSX; ++s2)
            if (s2 > ss && vi[s2] == idx) idx = 255;
          if (idx < D) {  // channel idx = val_channel(mt, row) of gid idx / (D / 8); token su of tig (su % 8) / 2
            const int go = idx / (D / 8), rem = idx % (D / 8), mt = rem / 2, rs = rem % 2;
            const int ln = go * 4 + (su % 8) / 2, k = 2 * (su / 8) + rs;
            ((u16*)vst)[(ln * VPAD + 4 * mt + k) * 2 + (su % 2)] = f2h(in2f(vv1));
          }
        }
#endif
      }
      __syncwarp();
#endif
      // ---------------- scores ----------------
      float sc[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
        const int u = nt * 8 + gid;  // token of this thread within the tile
        // cos / sin of this token (table in mode A, direct in mode B)
        u32 C[KR], S[KR];
        if (modeA) {
          const u32* tr = rtab + ((jb + u) * 4 + tig) * RW;
#pragma unroll
          for (int r = 0; r < KR; ++r) { C[r] = tr[r]; S[r] = tr[KR + r]; }
        } else {
          float pt = (float)posb[min(t0 + u, whi - 1)];
#pragma unroll
          for (int r = 0; r < KR; ++r) {
            float c0, s0, c1, s1;
            cos_sin(pt * inv_freq[key_channel(tig, r, 0)], &c0, &s0);
            cos_sin(pt * inv_freq[key_channel(tig, r, 1)], &c1, &s1);
            C[r] = f2h2(c0, c1); S[r] = f2h2(s0, s1);
          }
        }
        u32 kreg[2 * KR];
#if KS > 0 || VS > 0
        {
          const U4* src = (const U4*)(kst + (nt * 32 + lane) * KPAD);
#pragma unroll
          for (int g = 0; g < KR / 2; ++g) {
            const U4 v = src[g];
            kreg[4 * g] = v.x; kreg[4 * g + 1] = v.y; kreg[4 * g + 2] = v.z; kreg[4 * g + 3] = v.w;
          }
        }
#else
        key_regs(kw[nt], kreg);
#endif
#pragma unroll
        for (int r = 0; r < KR; ++r) {  // RoPE by R(j): a' = a c - b s, b' = b c + a s
          u32 a = kreg[r], bb = kreg[KR + r];
          kreg[r] = hfma2n(bb, S[r], hmul2(a, C[r]));
          kreg[KR + r] = hfma2(a, S[r], hmul2(bb, C[r]));
        }
        // KCH independent accumulation chains of the KR k-slices, summed at the end
        float scc[KCH][4];
#pragma unroll
        for (int c = 0; c < KCH; ++c) scc[c][0] = scc[c][1] = scc[c][2] = scc[c][3] = 0.f;
#pragma unroll
        for (int s = 0; s < KR; ++s)  // k-slices: registers (2s, 2s+1)
          mma16816(scc[s % KCH], QA[2 * s], 0u, QA[2 * s + 1], 0u, kreg[2 * s], kreg[2 * s + 1]);
#pragma unroll
        for (int c = 0; c < KCH; ++c)
#pragma unroll
          for (int i = 0; i < 4; ++i) sc[nt][i] += scc[c][i];
      }
      // ---------------- online softmax (row gid; log2 domain) ----------------
      float sv[4] = {sc[0][0], sc[0][1], sc[1][0], sc[1][1]};
      float tmax = NEG_BIG;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = t0 + tokof(tig, i);
        sv[i] = (t < whi && t >= vis && gid < MR) ? sv[i] * qk_scale : __int_as_float(0xff800000);
        tmax = fmaxf(tmax, sv[i]);
      }
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
      const float m_new = fmaxf(m_run, tmax);
      const float alpha = exp2f(m_run - m_new);
      m_run = m_new;
      float p[4], psum = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) { p[i] = exp2f(sv[i] - m_new); psum += p[i]; }
      l_run = l_run * alpha + psum;
      if (__any_sync(0xffffffffu, alpha != 1.f)) {
        // acc holds rows 2tig, 2tig+1 (C columns)
        const float a0 = __shfl_sync(0xffffffffu, alpha, (2 * tig) * 4);
        const float a1 = __shfl_sync(0xffffffffu, alpha, (2 * tig + 1) * 4);
#pragma unroll
        for (int i = 0; i < NMT; ++i) { acc[i][0] *= a0; acc[i][1] *= a1; acc[i][2] *= a0; acc[i][3] *= a1; }
      }
      // ---------------- values ----------------
      // P^T as B operand: (tokens 2tig, 2tig+1 ; row gid), (tokens 2tig+8, 2tig+9 ; row gid)
      const u32 pb0 = f2h2(p[0], p[1]), pb1 = f2h2(p[2], p[3]);
#pragma unroll
      for (int mt = 0; mt < NMT; ++mt) {
        u32 a[4];
#if KS > 0 || VS > 0
        const U4 v = *(const U4*)(vst + lane * VPAD + 4 * mt);
        a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
#else
        val_regs(mt, vw, SC, ZE, a);
#endif
        mma16816(acc[mt], a[0], a[1], a[2], a[3], pb0, pb1);
      }
    }
  }

  // ---- warp result: corr[row][ch] += acc (unnormalized, relative to m_run of the row) ----
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  __syncwarp();
  for (int e = lane; e < MR * D; e += 32) corr[e] = 0.f;
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt) {
    const int r0 = 2 * tig, r1 = 2 * tig + 1;
    const int cA = val_channel(mt, gid), cB = val_channel(mt, gid + 8);
    if (r0 < MR) { corr[r0 * D + cA] += acc[mt][0]; corr[r0 * D + cB] += acc[mt][2]; }
    if (r1 < MR) { corr[r1 * D + cA] += acc[mt][1]; corr[r1 * D + cB] += acc[mt][3]; }
  }
  if (tig == 0 && gid < MR) { wm[warp * MR + gid] = m_run; wl[warp * MR + gid] = l_run; }
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
        o += wbase[w * PERW + m * D + ch] * wt;
      }
      o = Lsum > 0.f ? o / Lsum : 0.f;
      if (ch == 0) lse_part[part + m] = Lsum > 0.f ? M + log2f(Lsum) : NEG_BIG;
    } else if (ch == 0) {
      lse_part[part + m] = NEG_BIG;
    }
    o_part[(part + m) * D + ch] = o;
  }
}
