// HSTU block-sparse attention, backward (CUDA), deterministic (no float atomics):
//   dA = dout * u (u absent: dout); each branch b sees g_b dA; per weight
//   w = silu(s) * m (m = mask / n times the branch indicator), dP(t, j) = dA_t . v_j:
//     dv_j += g w dA_t,  dS = alpha g m dP silu'(s),  dq_t += dS k_j,  dk_j += dS q_t,
//     dg_b(t) = dA_t . o_b(t) = sum_j w_b(t, j) dP(t, j),   du_t = dout_t * a_t.
// Kernels, in launch order:
//  1. bsa_dq_kernel, a CTA per 64 queries, the forward's tile walk (compressed tiles, then the
//     union of selected / window key tiles): dq, the three gate gradients (row sums reduced in
//     a fixed order over the quad), and, for each key tile it visited, its own bit in a
//     per-key-tile bitmap of query tiles (an OR: order-free).
//  2. bsa_dkdv_cmp_kernel, a CTA per 64 block means: dkbar, dvbar (fp32) over the query tiles
//     from the first that sees the blocks complete to the end.
//  3. bsa_dkdv_kernel, a CTA per 64 keys: dk, dv over the query tiles of its bitmap row and
//     the window band, plus dkbar / BS and dvbar / BS of the keys' complete blocks.
//  4. the forward without u gives a(t) for du = dout * a.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hstu_bsa/hstu_bsa_cuda.cuh"

namespace ssm_ext {
namespace hstu_bsa {
namespace {

// Query columns per step of the dk / dv kernels (32 at D = 128 keeps dK, dV, S, dP in registers).
template <int D>
constexpr int kQC = D >= 128 ? 32 : 64;

template <typename T, int D>
constexpr size_t dq_smem(int words) {
  return size_t(2 * kRows + 4 * kRows) * D * sizeof(T) + size_t(kWarps) * scratch_floats<T, kRows / 8>() * 4 +
         size_t(kRows) * kRows * 2 + size_t(words) * 4;
}
template <typename T, int D>
constexpr size_t dkdv_smem(int qwords) {
  return size_t(2 * kRows + 4 * kQC<D>) * D * sizeof(T) + size_t(kWarps) * scratch_floats<T, kQC<D> / 8>() * 4 +
         size_t(kQC<D>) * kRows * 2 + size_t(3 * kQC<D>) * 4 + size_t(qwords) * 4;
}

struct BwdBufs {
  uint32_t* bits;       // (B*H, n_tiles key tiles, qwords): query tiles that visit each key tile
  int qwords;           // ceil(n_tiles / 32)
  float* dkbar;         // (total blocks, H, D)
  float* dvbar;
};

// ---------------------------------------------------------------- 1. dq, dgates

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bsa_dq_kernel(const HstuParams p, const BsaOperands X, const BwdBufs G,
                                                          int n_tiles) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sA = sQ + kRows * D;
  T* sK = sA + kRows * D;       // 2 stages
  T* sV = sK + 2 * kRows * D;   // 2 stages
  float* scratch = reinterpret_cast<float*>(sV + 2 * kRows * D);
  uint16_t* mult = reinterpret_cast<uint16_t*>(scratch + kWarps * scratch_floats<T, kRows / 8>());
  uint32_t* bits = reinterpret_cast<uint32_t*>(mult + kRows * kRows);
  const int words = G.qwords;  // key tiles and query tiles have the same count
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int m = n_tiles - 1 - static_cast<int>(blockIdx.y);
  const int q0 = m * kRows;
  if (q0 >= len) return;
  float* wscratch = scratch + w * scratch_floats<T, kRows / 8>();
  const int bs = static_cast<int>(p.block_size);
  const int last = min(len, q0 + kRows) - 1;

  const T* gQ = static_cast<const T*>(X.q.ptr) + start * X.q.st + h * X.q.hs;
  const T* gA = static_cast<const T*>(X.da.ptr) + start * X.da.st + h * X.da.hs;
  const T* gK = static_cast<const T*>(X.k.ptr) + start * X.k.st + h * X.k.hs;
  const T* gV = static_cast<const T*>(X.v.ptr) + start * X.v.st + h * X.v.hs;
  const int64_t mst = p.heads * D;
  const T* gKb = static_cast<const T*>(X.kbar) + X.cblk[b] * mst + h * D;
  const T* gVb = static_cast<const T*>(X.vbar) + X.cblk[b] * mst + h * D;
  load_tile<T, D, kRows>(sQ, gQ + q0 * X.q.st, X.q.st, len - q0, X.q.cols, X.q.ptr, tid);
  load_tile<T, D, kRows>(sA, gA + q0 * X.da.st, X.da.st, len - q0, X.da.cols, X.da.ptr, tid);
  mma::cp_async_commit();
  build_key_tiles(p, start, h, len, q0, kRows, bits, words, tid);
  {  // publish: this query tile visits these key tiles
    uint32_t* row0 = G.bits + static_cast<int64_t>(blockIdx.x) * n_tiles * G.qwords;
    for (int wd = tid; wd < words; wd += kThreads) {
      uint32_t bw = bits[wd];
      while (bw) {
        const int kt = wd * 32 + __ffs(bw) - 1;
        bw &= bw - 1;
        atomicOr(&row0[static_cast<int64_t>(kt) * G.qwords + (m >> 5)], 1u << (m & 31));
      }
    }
  }

  const float alpha = static_cast<float>(p.alpha), inv_n = 1.f / static_cast<float>(p.n);
  const bool has_mask = p.mask.ptr != nullptr;
  const int wnd = static_cast<int>(min(p.window_size, int64_t(len)));
  float gc[2], gs[2], gw[2], dg[3][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int t = q0 + w * 16 + (lane >> 2) + 8 * i;
    gc[i] = gs[i] = gw[i] = 0.f;
    dg[0][i] = dg[1][i] = dg[2][i] = 0.f;
    if (t < len) {
      gc[i] = gate_at(p, p.gates, start + t, h, 0);
      gs[i] = gate_at(p, p.gates, start + t, h, 1);
      gw[i] = wnd > 0 ? gate_at(p, p.gates, start + t, h, 2) : 0.f;
    }
  }
  float dq[D / 8][4];
  zero(dq);

  // compressed branch
  const int n_cmp = (last + 1) / bs;
  const int n_ct = (n_cmp + kRows - 1) / kRows;
  auto load_means = [&](int ct, int st) {
    const int c0 = ct * kRows;
    load_tile<T, D, kRows>(sK + st * kRows * D, gKb + c0 * mst, mst, n_cmp - c0, D, X.kbar, tid);
    load_tile<T, D, kRows>(sV + st * kRows * D, gVb + c0 * mst, mst, n_cmp - c0, D, X.vbar, tid);
  };
  if (n_ct > 0) load_means(0, 0);
  mma::cp_async_commit();
  for (int ct = 0; ct < n_ct; ++ct) {
    if (ct + 1 < n_ct) {
      load_means(ct + 1, (ct + 1) & 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const int st = ct & 1, c0 = ct * kRows;
    float s[kRows / 8][4], dp[kRows / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, D, kRows / 8>(s, sQ, w * 16, sK + st * kRows * D, 0, lane);
    gemm_abt<T, D, kRows / 8>(dp, sA, w * 16, sV + st * kRows * D, 0, lane);
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = q0 + w * 16 + frag_row(lane, e), c = c0 + frag_col(lane, j, e);
        const float x = alpha * s[j][e];
        const float sg = mma::sigmoid_io<T>(x);
        const float mm = (c + 1) * bs <= t + 1 ? inv_n : 0.f;  // rows past the end have gate 0
        dg[0][e >> 1] += x * sg * mm * dp[j][e];
        s[j][e] = alpha * dp[j][e] * mm * gc[e >> 1] * sg * (1.f + x * (1.f - sg));
      }
    }
    gemm_pb<T, D, kRows / 8>(dq, s, sK + st * kRows * D, 0, wscratch, lane);
    __syncthreads();
  }

  // selected + window
  auto load_kv = [&](int kt, int st) {
    const int k0 = kt * kRows;
    load_tile<T, D, kRows>(sK + st * kRows * D, gK + k0 * X.k.st, X.k.st, len - k0, X.k.cols, X.k.ptr, tid);
    load_tile<T, D, kRows>(sV + st * kRows * D, gV + k0 * X.v.st, X.v.st, len - k0, X.v.cols, X.v.ptr, tid);
  };
  int cur = next_bit(bits, words, 0);
  if (cur >= 0) load_kv(cur, 0);
  mma::cp_async_commit();
  for (int i = 0; cur >= 0; ++i) {
    const int nxt = next_bit(bits, words, cur + 1);
    if (nxt >= 0) {
      load_kv(nxt, (i + 1) & 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    const int st = i & 1, k0 = cur * kRows;
    build_mult(p, start, h, len, q0, k0, kRows, mult, tid);
    __syncthreads();
    float s[kRows / 8][4], dp[kRows / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, D, kRows / 8>(s, sQ, w * 16, sK + st * kRows * D, 0, lane);
    gemm_abt<T, D, kRows / 8>(dp, sA, w * 16, sV + st * kRows * D, 0, lane);
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = w * 16 + frag_row(lane, e), t = q0 + r, kc = frag_col(lane, j, e), kj = k0 + kc;
        const float x = alpha * s[j][e];
        const float sg = mma::sigmoid_io<T>(x);
        float cs = 0.f, cw = 0.f, mm = 0.f;
        if (kj <= t && t < len) {
          cs = static_cast<float>(mult[r * kRows + kc]);
          cw = kj > t - wnd ? 1.f : 0.f;
          mm = inv_n;
          if (has_mask && (cs != 0.f || cw != 0.f)) mm *= mask_at(p, b, t, kj);
        }
        const float base = x * sg * mm * dp[j][e];
        dg[1][e >> 1] += cs * base;
        dg[2][e >> 1] += cw * base;
        s[j][e] = alpha * dp[j][e] * mm * (gs[e >> 1] * cs + gw[e >> 1] * cw) * sg * (1.f + x * (1.f - sg));
      }
    }
    gemm_pb<T, D, kRows / 8>(dq, s, sK + st * kRows * D, 0, wscratch, lane);
    __syncthreads();
    cur = nxt;
  }
  mma::cp_async_wait<0>();

  T* odq = static_cast<T*>(p.dq.ptr) + (start + q0) * p.dq.st + h * p.dim_qk * p.dq.sc;
  store_frag<T, D>(dq, odq, p.dq, w * 16, len - q0, static_cast<int>(p.dim_qk), 1.f, lane);
#pragma unroll
  for (int br = 0; br < 3; ++br) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float v = dg[br][i];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      const int t = q0 + w * 16 + (lane >> 2) + 8 * i;
      if ((lane & 3) == 0 && t < len)
        store_as<float>(p.dgates.ptr, p.gates_dtype, (start + t) * p.dgates.s0 + h * p.dgates.s1 + br * p.dgates.s2, v);
    }
  }
}

// ---------------------------------------------------------------- 2. dkbar, dvbar

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bsa_dkdv_cmp_kernel(const HstuParams p, const BsaOperands X,
                                                                const BwdBufs G) {
  constexpr int QC = kQC<D>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sK = reinterpret_cast<T*>(smem_raw);  // kbar rows
  T* sV = sK + kRows * D;                  // vbar rows
  T* sQ = sV + kRows * D;                  // 2 stages
  T* sA = sQ + 2 * QC * D;                 // 2 stages
  float* scratch = reinterpret_cast<float*>(sA + 2 * QC * D);
  float* sg_c = scratch + kWarps * scratch_floats<T, QC / 8>();  // g_cmp of the step's queries
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int bs = static_cast<int>(p.block_size);
  const int nb = len / bs;
  const int c0 = static_cast<int>(blockIdx.y) * kRows;
  if (c0 >= nb) return;
  float* wscratch = scratch + w * scratch_floats<T, QC / 8>();
  const int64_t mst = p.heads * D;
  const T* gKb = static_cast<const T*>(X.kbar) + X.cblk[b] * mst + h * D;
  const T* gVb = static_cast<const T*>(X.vbar) + X.cblk[b] * mst + h * D;
  const T* gQ = static_cast<const T*>(X.q.ptr) + start * X.q.st + h * X.q.hs;
  const T* gA = static_cast<const T*>(X.da.ptr) + start * X.da.st + h * X.da.hs;
  load_tile<T, D, kRows>(sK, gKb + c0 * mst, mst, nb - c0, D, X.kbar, tid);
  load_tile<T, D, kRows>(sV, gVb + c0 * mst, mst, nb - c0, D, X.vbar, tid);
  const int first = ((c0 + 1) * bs - 1) / QC, n_qt = (len + QC - 1) / QC;
  auto load_q = [&](int u, int st) {
    const int t0 = u * QC;
    load_tile<T, D, QC>(sQ + st * QC * D, gQ + t0 * X.q.st, X.q.st, len - t0, X.q.cols, X.q.ptr, tid);
    load_tile<T, D, QC>(sA + st * QC * D, gA + t0 * X.da.st, X.da.st, len - t0, X.da.cols, X.da.ptr, tid);
  };
  load_q(first, 0);
  mma::cp_async_commit();
  const float alpha = static_cast<float>(p.alpha), inv_n = 1.f / static_cast<float>(p.n);
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  for (int u = first, i = 0; u < n_qt; ++u, ++i) {
    if (u + 1 < n_qt) {
      load_q(u + 1, (i + 1) & 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    const int st = i & 1, t0 = u * QC;
    if (tid < QC) sg_c[tid] = t0 + tid < len ? gate_at(p, p.gates, start + t0 + tid, h, 0) : 0.f;
    __syncthreads();
    float s[QC / 8][4], dp[QC / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, D, QC / 8>(s, sK, w * 16, sQ + st * QC * D, 0, lane);
    gemm_abt<T, D, QC / 8>(dp, sV, w * 16, sA + st * QC * D, 0, lane);
#pragma unroll
    for (int j = 0; j < QC / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = c0 + w * 16 + frag_row(lane, e), tc = frag_col(lane, j, e), t = t0 + tc;
        const float x = alpha * s[j][e];
        const float sg = mma::sigmoid_io<T>(x);
        const float cf = (c + 1) * bs <= t + 1 && c < nb ? sg_c[tc] * inv_n : 0.f;  // t >= len: gate 0
        s[j][e] = x * sg * cf;
        dp[j][e] = alpha * dp[j][e] * cf * sg * (1.f + x * (1.f - sg));
      }
    }
    gemm_pb<T, D, QC / 8>(dv, s, sA + st * QC * D, 0, wscratch, lane);
    gemm_pb<T, D, QC / 8>(dk, dp, sQ + st * QC * D, 0, wscratch, lane);
    __syncthreads();
  }
  const int64_t o0 = X.cblk[b] + c0;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = w * 16 + frag_row(lane, e), col = frag_col(lane, dt, e);
      if (c0 + r < nb) {
        G.dkbar[((o0 + r) * p.heads + h) * D + col] = dk[dt][e];
        G.dvbar[((o0 + r) * p.heads + h) * D + col] = dv[dt][e];
      }
    }
  }
}

// ---------------------------------------------------------------- 3. dk, dv

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bsa_dkdv_kernel(const HstuParams p, const BsaOperands X, const BwdBufs G,
                                                            int n_tiles) {
  constexpr int QC = kQC<D>, R = kRows / QC;  // R steps per 64-query tile
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kRows * D;
  T* sQ = sV + kRows * D;   // 2 stages
  T* sA = sQ + 2 * QC * D;  // 2 stages
  float* scratch = reinterpret_cast<float*>(sA + 2 * QC * D);
  float* sg_s = scratch + kWarps * scratch_floats<T, QC / 8>();  // g_slc of the step's queries
  float* sg_w = sg_s + QC;                                      // g_swa
  uint16_t* mult = reinterpret_cast<uint16_t*>(sg_w + 2 * QC);  // [QC queries][kRows keys]
  uint32_t* qbits = reinterpret_cast<uint32_t*>(mult + QC * kRows);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int kt = static_cast<int>(blockIdx.y), k0 = kt * kRows;
  if (k0 >= len) return;
  float* wscratch = scratch + w * scratch_floats<T, QC / 8>();
  const int bs = static_cast<int>(p.block_size);
  const int wnd = static_cast<int>(min(p.window_size, int64_t(len)));

  const T* gQ = static_cast<const T*>(X.q.ptr) + start * X.q.st + h * X.q.hs;
  const T* gA = static_cast<const T*>(X.da.ptr) + start * X.da.st + h * X.da.hs;
  const T* gK = static_cast<const T*>(X.k.ptr) + start * X.k.st + h * X.k.hs;
  const T* gV = static_cast<const T*>(X.v.ptr) + start * X.v.st + h * X.v.hs;
  load_tile<T, D, kRows>(sK, gK + k0 * X.k.st, X.k.st, len - k0, X.k.cols, X.k.ptr, tid);
  load_tile<T, D, kRows>(sV, gV + k0 * X.v.st, X.v.st, len - k0, X.v.cols, X.v.ptr, tid);
  mma::cp_async_commit();

  // The 64-query tiles to visit: those that selected a block in this key tile (from the dq
  // kernel) and those whose window reaches it.
  const int qwords = G.qwords;
  const uint32_t* grow = G.bits + (static_cast<int64_t>(blockIdx.x) * n_tiles + kt) * qwords;
  for (int i = tid; i < qwords; i += kThreads) qbits[i] = grow[i];
  __syncthreads();
  if (wnd > 0) {
    const int a = k0 / kRows, z = min(len - 1, k0 + kRows - 1 + wnd - 1) / kRows;
    for (int mq = a + tid; mq <= z; mq += kThreads) atomicOr(&qbits[mq >> 5], 1u << (mq & 31));
  }
  __syncthreads();
  auto next_step = [&](int u) {  // steps are QC-query sub-tiles u of the 64-query tiles
    if ((u + 1) % R != 0) return u + 1;
    const int mq = next_bit(qbits, qwords, (u + 1) / R);
    return mq < 0 ? -1 : mq * R;
  };
  auto load_q = [&](int u, int st) {
    const int t0 = u * QC;
    load_tile<T, D, QC>(sQ + st * QC * D, gQ + t0 * X.q.st, X.q.st, len - t0, X.q.cols, X.q.ptr, tid);
    load_tile<T, D, QC>(sA + st * QC * D, gA + t0 * X.da.st, X.da.st, len - t0, X.da.cols, X.da.ptr, tid);
  };
  const int m0 = next_bit(qbits, qwords, 0);
  int cur = m0 < 0 ? -1 : m0 * R;
  if (cur >= 0) load_q(cur, 0);
  mma::cp_async_commit();

  const float alpha = static_cast<float>(p.alpha), inv_n = 1.f / static_cast<float>(p.n);
  const bool has_mask = p.mask.ptr != nullptr;
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  for (int i = 0; cur >= 0; ++i) {
    const int nxt = next_step(cur);
    if (nxt >= 0) {
      load_q(nxt, (i + 1) & 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    const int st = i & 1, t0 = cur * QC;
    build_mult(p, start, h, len, t0, k0, QC, mult, tid);
    if (tid < QC) {
      const bool ok = t0 + tid < len;
      sg_s[tid] = ok ? gate_at(p, p.gates, start + t0 + tid, h, 1) : 0.f;
      sg_w[tid] = ok && wnd > 0 ? gate_at(p, p.gates, start + t0 + tid, h, 2) : 0.f;
    }
    __syncthreads();
    float s[QC / 8][4], dp[QC / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, D, QC / 8>(s, sK, w * 16, sQ + st * QC * D, 0, lane);
    gemm_abt<T, D, QC / 8>(dp, sV, w * 16, sA + st * QC * D, 0, lane);
#pragma unroll
    for (int j = 0; j < QC / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kr = w * 16 + frag_row(lane, e), kj = k0 + kr, tc = frag_col(lane, j, e), t = t0 + tc;
        const float x = alpha * s[j][e];
        const float sg = mma::sigmoid_io<T>(x);
        float cf = 0.f;
        if (kj <= t && t < len) {
          cf = sg_s[tc] * static_cast<float>(mult[tc * kRows + kr]);
          if (kj > t - wnd) cf += sg_w[tc];
          if (has_mask && cf != 0.f) cf *= mask_at(p, b, t, kj);
        }
        cf *= inv_n;
        s[j][e] = x * sg * cf;
        dp[j][e] = alpha * dp[j][e] * cf * sg * (1.f + x * (1.f - sg));
      }
    }
    gemm_pb<T, D, QC / 8>(dv, s, sA + st * QC * D, 0, wscratch, lane);
    gemm_pb<T, D, QC / 8>(dk, dp, sQ + st * QC * D, 0, wscratch, lane);
    __syncthreads();
    cur = nxt;
  }
  mma::cp_async_wait<0>();

  // + the block means' gradients, spread evenly over their complete blocks.
  const int nbk = (len / bs) * bs;
  const float inv_bs = 1.f / static_cast<float>(bs);
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kj = k0 + w * 16 + frag_row(lane, e), col = frag_col(lane, dt, e);
      if (kj < nbk) {
        const int64_t at = ((X.cblk[b] + kj / bs) * p.heads + h) * D + col;
        dk[dt][e] += G.dkbar[at] * inv_bs;
        dv[dt][e] += G.dvbar[at] * inv_bs;
      }
    }
  }
  T* odk = static_cast<T*>(p.dk.ptr) + (start + k0) * p.dk.st + h * p.dim_qk * p.dk.sc;
  T* odv = static_cast<T*>(p.dv.ptr) + (start + k0) * p.dv.st + h * p.dim_v * p.dv.sc;
  store_frag<T, D>(dk, odk, p.dk, w * 16, len - k0, static_cast<int>(p.dim_qk), 1.f, lane);
  store_frag<T, D>(dv, odv, p.dv, w * 16, len - k0, static_cast<int>(p.dim_v), 1.f, lane);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bsa_bwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& u,
    const at::Tensor& gates, const at::Tensor& block_idx, const at::Tensor& x_offsets, int64_t n,
    int64_t num_heads, double alpha, int64_t block_size, int64_t window_size,
    const c10::optional<at::Tensor>& attn_mask, const at::Tensor& dout) {
  BsaBwdArgs r = prepare_bsa_bwd(q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha, block_size,
                                 window_size, attn_mask, dout);
  HstuParams& p = r.p;
  check_cuda_dims(p);
  check_cuda_bsa(p);
  const c10::cuda::CUDAGuard guard(q.device());
  if (p.total == 0 || p.batch == 0) return {r.dq, r.dk, r.dv, r.du, r.dgates};
  if (p.dim_v == 0) {  // no output: every gradient is 0
    r.dq.zero_();
    r.dk.zero_();
    r.dgates.zero_();
    return {r.dq, r.dk, r.dv, r.du, r.dgates};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  BsaInputs in(p, q, k, v, r.offsets, stream);
  const at::Tensor da = u.has_value() ? dout * *u : dout;
  at::Tensor keep_da;
  in.X.da = make_operand(da, p.heads, p.dim_v, keep_da);

  const int n_tiles = static_cast<int>((p.max_len + kRows - 1) / kRows);
  TORCH_CHECK(n_tiles <= 65535, msg("sequences up to ", 65535 * kRows, " rows on CUDA, got ", p.max_len));
  BwdBufs G;
  G.qwords = (n_tiles + 31) / 32;
  const at::Tensor bits = at::zeros({p.batch * p.heads * n_tiles * G.qwords}, q.options().dtype(at::kInt));
  G.bits = reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>());
  const at::Tensor dkbar = at::empty(in.kbar.sizes(), q.options().dtype(at::kFloat));
  const at::Tensor dvbar = at::empty(in.kbar.sizes(), q.options().dtype(at::kFloat));
  G.dkbar = dkbar.data_ptr<float>();
  G.dvbar = dvbar.data_ptr<float>();
  const int64_t max_nb = p.max_len / p.block_size;
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  dispatch_hstu(q.scalar_type(), in.D, [&](auto tv, auto dv) {
    using T = decltype(tv);
    constexpr int kD = decltype(dv)::value;
    const size_t s1 = dq_smem<T, kD>(G.qwords), s3 = dkdv_smem<T, kD>(G.qwords);
    const size_t s2 = dkdv_smem<T, kD>(0);
    TORCH_CHECK(s1 <= 227 * 1024 && s3 <= 227 * 1024,
                msg("hstu_bsa_bwd: sequences too long for the CUDA kernels' tile bitmaps (", p.max_len, " rows)"));
    set_smem(bsa_dq_kernel<T, kD>, s1);
    bsa_dq_kernel<T, kD><<<dim3(bh, n_tiles), kThreads, s1, stream>>>(p, in.X, G, n_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (max_nb > 0) {
      set_smem(bsa_dkdv_cmp_kernel<T, kD>, s2);
      bsa_dkdv_cmp_kernel<T, kD><<<dim3(bh, static_cast<unsigned>((max_nb + kRows - 1) / kRows)), kThreads, s2,
                                   stream>>>(p, in.X, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    set_smem(bsa_dkdv_kernel<T, kD>, s3);
    bsa_dkdv_kernel<T, kD><<<dim3(bh, n_tiles), kThreads, s3, stream>>>(p, in.X, G, n_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (u.has_value()) {  // du = dout * a, a = the gated attention without u
    HstuParams pa = p;
    pa.u = Mat();
    const at::Tensor a = at::empty_like(r.du);
    pa.out.ptr = a.data_ptr();
    pa.out.st = a.stride(0);
    pa.out.sc = a.stride(1);
    launch_bsa_fwd(pa, in.X, q.scalar_type(), in.D, stream);
    at::mul_out(r.du, dout, a);
  }
  return {r.dq, r.dk, r.dv, r.du, r.dgates};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("hstu_bsa_bwd", &bsa_bwd_cuda); }

}  // namespace hstu_bsa
}  // namespace ssm_ext
