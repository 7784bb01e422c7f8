// CUDA backward kernels for causal conv1d. dz = dout * act'(pre) is recomputed from x;
// dx(s) = sum_k w[k] dz(s+W-1-k). dweight/dbias are written as per-block fp32 partials and
// summed in a fixed order afterwards (deterministic, no atomics).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_cuda.cuh"
#include "causal_conv1d/causal_conv1d_math.h"
#include "common/cuda_utils.cuh"
#include "common/mma.cuh"

namespace ssm_ext {
namespace conv1d {
namespace {

// Sums W+1 per-thread values over the block; thread 0 writes them as partial `part`.
template <int W, int kThreads>
__device__ __forceinline__ void write_block_partial(const ConvParams& p, int64_t part, int64_t d,
                                                    float (&v)[W + 1]) {
  __shared__ float red[kThreads / 32][W + 1];
#pragma unroll
  for (int k = 0; k <= W; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int k = 0; k <= W; ++k) red[warp][k] = v[k];
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k <= W; ++k) {
      float s = 0.f;
      for (int i = 0; i < kThreads / 32; ++i) s += red[i][k];
      if (k < W) p.dweight_part[(part * p.dim + d) * W + k] = s;
      else p.dbias_part[part * p.dim + d] = s;
    }
  }
}

// d silu(v) / dv, with the sigmoid at the precision of io dtype T (mma::sigmoid_io): for 16-bit
// dx one tanh.approx instead of an exp and a reciprocal, where the kernel is issue-bound.
template <typename T>
__device__ __forceinline__ float dsilu_io(float v) {
  const float s = mma::sigmoid_io<T>(v);
  return s * (1.f + v * (1.f - s));
}

// a[i] for a lane-dependent i in [0, K), by selects (a dynamic index would go to local memory).
template <int K, typename V>
__device__ __forceinline__ V pick(const V* a, int i) {
  V r = a[0];
#pragma unroll
  for (int m = 1; m < K; ++m) r = i == m ? a[m] : r;
  return r;
}

// ---- channel-first: one block per row (see CfLoads). The W-1 dz values after a thread's
// vector come from the next lane by shuffle; lane 31's from lanes 0 .. W-2, which compute them
// from the vectors after the warp's.
// dweight/dbias accumulate over the row and are reduced once, so the partials are per batch.
template <typename T, int W, bool kHasSeq, bool kSilu>
__global__ __launch_bounds__(kCfThreads, 8) void bwd_cf_kernel(ConvParams p) {
  constexpr int E = kVecElems<T>;
  constexpr int kChunk = kCfThreads * E;
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim;
  const int L = static_cast<int>(p.seqlen);
  const int lane = threadIdx.x & 31;
  const bool last_lane = lane == 31;
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + d * p.x.sd;
  const T* dout = static_cast<const T*>(p.dout.ptr) + b * p.dout.sb + d * p.dout.sd;
  const int* seq = p.seq_idx + b * p.seqlen;
  T* dx_row = static_cast<T*>(p.dx.ptr) + b * p.dx.sb + d * p.dx.sd;

  CfLoads<T, W, kHasSeq> cur;
  cf_load_own<T, W, kHasSeq, true>(p, x, dout, seq, int(threadIdx.x) * E, cur);
  cf_load_neighbours<T, W, kHasSeq, true>(p, x, dout, seq, int(threadIdx.x) * E, cur);
  float w[W], bias, init[W - 1];
  load_weights_fixed<W>(p, d, w, bias);
#pragma unroll
  for (int j = 0; j < W - 1; ++j) init[j] = threadIdx.x == 0 ? state_at<T, float>(p.initial_states, b, d, j) : 0.f;
  const int s_last = kHasSeq ? seq[L - 1] : 0;
  float part[W + 1];
#pragma unroll
  for (int k = 0; k <= W; ++k) part[k] = 0.f;

  for (int c0 = 0; c0 < L; c0 += kChunk) {
    const int t = c0 + int(threadIdx.x) * E;
    CfLoads<T, W, kHasSeq> nxt;  // the next chunk, loaded while this one is computed
    cf_load_own<T, W, kHasSeq, true>(p, x, dout, seq, t + kChunk, nxt);
    cf_load_neighbours<T, W, kHasSeq, true>(p, x, dout, seq, t + kChunk, nxt);
    float xv[W - 1 + E];
    int sq[kHasSeq ? W - 1 + E : 1];
    cf_window<T, W, kHasSeq>(cur, t, init, xv, sq);

    // dz[i] = dz(t+i) for i < E + W - 1; sqr[j] = seq(t+E+j)
    float dz[E + W - 1];
    int sqr[W - 1];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float pre = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) pre += (!kHasSeq || sq[i + k] == sq[W - 1 + i]) ? w[k] * xv[i + k] : 0.f;
      const float gi = (kHasSeq && sq[W - 1 + i] < 0) ? 0.f : unpack_one<T>(cur.g[0], i);
      dz[i] = kSilu ? gi * dsilu_io<T>(pre) : gi;
    }
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      dz[E + j] = __shfl_down_sync(0xffffffffu, dz[j], 1);
      sqr[j] = kHasSeq ? __shfl_down_sync(0xffffffffu, sq[W - 1 + j], 1) : 0;
    }
    // dz at the W-1 steps after the warp (T, the next warp's first steps; 0 past the end, where
    // x_next and g_next are 0): lane j < W-1 computes dz(T + j) from lane 31's last x and the
    // vectors at T, and lane 31 collects them (one dz per lane instead of W-1 on lane 31).
    float win[2 * (W - 1)];  // x(T-(W-1)) .. x(T+W-2)
    int wsq[kHasSeq ? 2 * (W - 1) : 1];
#pragma unroll
    for (int k = 0; k < W - 1; ++k) {
      win[k] = __shfl_sync(0xffffffffu, xv[E + k], 31);
      win[W - 1 + k] = unpack_one<T>(cur.x_next, k);
      if (kHasSeq) {
        wsq[k] = __shfl_sync(0xffffffffu, sq[E + k], 31);
        wsq[W - 1 + k] = cur.s_next[k];
      }
    }
    float dz_after = 0.f;
    int sq_after = 0;
    if (lane < W - 1) {  // dz(T + lane): window win[lane + k], k < W
      const int st = kHasSeq ? pick<W - 1>(wsq + W - 1, lane) : 0;
      float pre = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const int sm = kHasSeq ? pick<W - 1>(wsq + k, lane) : 0;
        pre += (sm == st) ? w[k] * pick<W - 1>(win + k, lane) : 0.f;
      }
      float gn[W - 1];
#pragma unroll
      for (int k = 0; k < W - 1; ++k) gn[k] = unpack_one<T>(cur.g_next, k);
      const float gj = (kHasSeq && st < 0) ? 0.f : pick<W - 1>(gn, lane);
      dz_after = kSilu ? gj * dsilu_io<T>(pre) : gj;
      sq_after = st;
    }
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      const float v = __shfl_sync(0xffffffffu, dz_after, j);
      const int sv = kHasSeq ? __shfl_sync(0xffffffffu, sq_after, j) : 0;
      if (last_lane) {
        dz[E + j] = v;
        sqr[j] = sv;
      }
    }

    if (t < L) {
      float dx[E];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int si = kHasSeq ? sq[W - 1 + i] : 0;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const int m = i + W - 1 - k;
          const int sm = !kHasSeq ? 0 : (m < E ? sq[W - 1 + m] : sqr[m - E]);
          acc += (sm == si) ? w[k] * dz[m] : 0.f;
        }
        dx[i] = acc;
#pragma unroll
        for (int k = 0; k < W; ++k) part[k] += (!kHasSeq || sq[i + k] == si) ? dz[i] * xv[i + k] : 0.f;
        part[W] += dz[i];
      }
      // dfinal_states reach the last W-1 steps only: kept out of the per-element path
      if (t + E > L - (W - 1) && p.dfinal_states.ptr != nullptr) {
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const int j = t + i - L + W - 1;
          if (j >= 0 && (!kHasSeq || sq[W - 1 + i] == s_last)) dx[i] += state_at<T, float>(p.dfinal_states, b, d, j);
        }
      }
      store_vec(dx_row + t, dx);
      if (t == 0 && p.dinitial_states.ptr != nullptr) {
        const View3& di = p.dinitial_states;
#pragma unroll
        for (int s = -(W - 1); s < 0; ++s) {  // positions before x: they belong to seq(0)
          float acc = 0.f;
#pragma unroll
          for (int k = 0; k < W; ++k) {
            const int m = s + W - 1 - k;
            if (m >= 0) acc += (!kHasSeq || sq[W - 1 + m] == sq[W - 1]) ? w[k] * dz[m] : 0.f;
          }
          static_cast<T*>(di.ptr)[b * di.sb + d * di.sd + (W - 1 + s) * di.sl] = T(acc);
        }
      }
    }
    cur = nxt;
  }
  write_block_partial<W, kCfThreads>(p, b, d, part);
}

// ---- channel-last: a block owns kClBwdTileC channels (2 per thread) and kClBwdSteps steps,
// walked in tiles of kClBwdTileL steps. A tile's x (with W-1 steps of halo on each side) and
// dout (W-1 steps past the tile) arrive in shared memory by 16-byte cp.async, so a whole
// tile's loads are in flight at once; then each thread walks the tile's steps for its two
// channels, recomputing dz for the W-1 steps past the tile that its last dx values need.
// Shared memory per tile: x rows [t0-(W-1), t0+TL+W-1), dout rows [t0, t0+TL+W-1), seq rows like x.
template <typename T, int W>
struct ClBwdTile {
  static constexpr int kRowsX = kClBwdTileL + 2 * (W - 1), kRowsG = kClBwdTileL + W - 1;
  static constexpr int kVecsPerRow = kClBwdTileC / kVecElems<T>;
  static constexpr size_t kBytes = size_t(kRowsX + kRowsG) * kClBwdTileC * sizeof(T) + kRowsX * sizeof(int);
};

// Fills the tile starting at step t0 for channels [cb, cb + kClBwdTileC) of batch row b.
template <typename T, int W, bool kHasSeq>
__device__ __forceinline__ void load_cl_bwd_tile(const ConvParams& p, int64_t b, int64_t cb, int64_t t0, T* xs,
                                                 T* gs, int* ss) {
  using Tile = ClBwdTile<T, W>;
  constexpr int E = kVecElems<T>, VR = Tile::kVecsPerRow;
  const int64_t L = p.seqlen;
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb;
  const T* g = static_cast<const T*>(p.dout.ptr) + b * p.dout.sb;
  for (int v = threadIdx.x; v < (Tile::kRowsX + Tile::kRowsG) * VR; v += kClBwdThreads) {
    const bool is_x = v < Tile::kRowsX * VR;
    const int r = (is_x ? v : v - Tile::kRowsX * VR) / VR, cv = v % VR;
    const int64_t t = t0 + r - (is_x ? W - 1 : 0), c = cb + int64_t(cv) * E;
    T* dst = (is_x ? xs : gs) + r * kClBwdTileC + cv * E;
    if (c < p.dim && t >= 0 && t < L) {
      mma::cp_async16(dst, is_x ? x + t * p.x.sl + c : g + t * p.dout.sl + c, true);
    } else if (c < p.dim && t < 0) {  // only x rows reach t < 0: the initial states
#pragma unroll
      for (int i = 0; i < E; ++i) dst[i] = T(state_at<T, float>(p.initial_states, b, c + i, W - 1 + t));
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
  if (kHasSeq)
    for (int r = threadIdx.x; r < Tile::kRowsX; r += kClBwdThreads) {
      const int64_t t = t0 + r - (W - 1);
      ss[r] = t < L ? seq_at(p, b, t) : -1;
    }
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
}

template <typename T, int W, bool kHasSeq>
__global__ __launch_bounds__(kClBwdThreads) void bwd_cl_kernel(ConvParams p) {
  using Tile = ClBwdTile<T, W>;
  constexpr int TL = kClBwdTileL;
  extern __shared__ __align__(16) unsigned char tile_smem[];
  T* xs = reinterpret_cast<T*>(tile_smem);
  T* gs = xs + Tile::kRowsX * kClBwdTileC;
  int* ss = reinterpret_cast<int*>(gs + Tile::kRowsG * kClBwdTileC);

  const int64_t cb = int64_t(blockIdx.x) * kClBwdTileC, c = cb + 2 * threadIdx.x;
  const int64_t b = blockIdx.z, L = p.seqlen;
  const int64_t t_begin = int64_t(blockIdx.y) * kClBwdSteps, t_end = min(t_begin + kClBwdSteps, L);
  const bool active = c < p.dim;  // every thread loads and syncs; only these compute
  const int s_last = kHasSeq ? seq_at(p, b, L - 1) : 0;
  T* dx = static_cast<T*>(p.dx.ptr) + b * p.dx.sb + c;

  float w[W][2], bias[2], dw[W][2] = {}, db[2] = {};
  if (active) load_weights_block<W, 2>(p, c, w, bias);

  for (int64_t t0 = t_begin; t0 < t_end; t0 += TL) {
    __syncthreads();  // the previous tile is no longer read
    load_cl_bwd_tile<T, W, kHasSeq>(p, b, cb, t0, xs, gs, ss);
    __syncthreads();
    if (!active) continue;
    // Step i of the tile is t = t0 + i: dz(t) from x rows i..i+W-1 (row r is step t0-(W-1)+r),
    // dw/db for t < the tile's end, and dx(t-(W-1)) once dz up to t is known.
    auto walk = [&](auto checked) {
      constexpr bool kChecked = decltype(checked)::value;
      float xw[W][2], dzw[W][2] = {};
#pragma unroll
      for (int k = 0; k < W - 1; ++k) load_vec<T, 2>(xs + k * kClBwdTileC + 2 * threadIdx.x, xw[k + 1]);
#pragma unroll
      for (int i = 0; i < TL + W - 1; ++i) {
        const int64_t t = t0 + i, s = t - (W - 1);
#pragma unroll
        for (int k = 0; k < W - 1; ++k)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            xw[k][e] = xw[k + 1][e];
            dzw[k][e] = dzw[k + 1][e];
          }
        load_vec<T, 2>(xs + (i + W - 1) * kClBwdTileC + 2 * threadIdx.x, xw[W - 1]);
        float gv[2];
        load_vec<T, 2>(gs + i * kClBwdTileC + 2 * threadIdx.x, gv);
        const int st = kHasSeq ? ss[i + W - 1] : 0;
        bool same[W];
#pragma unroll
        for (int k = 0; k < W; ++k) same[k] = !kHasSeq || ss[i + k] == st;
        const bool live = !(kHasSeq && st < 0);  // rows past L hold dout = 0, so dz = 0 there
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float pre = bias[e];
#pragma unroll
          for (int k = 0; k < W; ++k) pre += same[k] ? w[k][e] * xw[k][e] : 0.f;
          const float gi = live ? gv[e] : 0.f;
          const float dz = p.silu ? gi * dsilu_io<float>(pre) : gi;  // fp32 sigmoid for every dtype here
          dzw[W - 1][e] = dz;
          if (i < TL) {
#pragma unroll
            for (int k = 0; k < W; ++k) dw[k][e] += same[k] ? dz * xw[k][e] : 0.f;
            db[e] += dz;
          }
        }
        // dx(s): s in this tile, or s < 0 in the first tile when dinitial_states is wanted
        const bool to_dinit = kChecked && s < 0 && p.dinitial_states.ptr != nullptr;
        if (i >= W - 1 || to_dinit) {
          if (kChecked && s >= L) continue;
          const int ss_s = kHasSeq ? ss[i] : 0;
          float out[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < W; ++k)
              acc += (!kHasSeq || ss[i + W - 1 - k] == ss_s) ? w[k][e] * dzw[W - 1 - k][e] : 0.f;
            const int64_t j = s - L + W - 1;
            if (kChecked && j >= 0 && ss_s == s_last) acc += state_at<T, float>(p.dfinal_states, b, c + e, j);
            out[e] = acc;
          }
          if (!to_dinit) {
            store_vec<T, 2>(dx + s * p.dx.sl, out);
          } else {
            const View3& di = p.dinitial_states;
#pragma unroll
            for (int e = 0; e < 2; ++e)
              static_cast<T*>(di.ptr)[b * di.sb + (c + e) * di.sd + (W - 1 + s) * di.sl] = T(out[e]);
          }
        }
      }
    };
    // Boundary tests only where dx reaches dinitial_states (first tile) or final states and L.
    if ((t0 == 0 && p.dinitial_states.ptr != nullptr) || t0 + TL + W - 1 > L) walk(std::true_type{});
    else walk(std::false_type{});
  }
  if (!active) return;
  const int64_t part = b * gridDim.y + blockIdx.y;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
#pragma unroll
    for (int k = 0; k < W; ++k) p.dweight_part[(part * p.dim + c + e) * W + k] = dw[k][e];
    p.dbias_part[part * p.dim + c + e] = db[e];
  }
}

// ---- any width, any strides. dx: one thread per position; parameters: one thread per
// (batch, channel) row, so the partials are indexed by batch.
template <typename T>
__global__ void bwd_dx_generic_kernel(ConvParams p) {
  extern __shared__ float w_smem[];
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim, W = p.width;
  if (threadIdx.x == 0) load_row_weights(p, d, w_smem, &w_smem[W]);
  __syncthreads();
  auto dz = [&](int64_t t) { return dz_at<T, float>(p, b, d, t, w_smem, w_smem[W]); };
  for (int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x - (W - 1); i < p.seqlen;
       i += int64_t(gridDim.y) * blockDim.x) {
    if (i < 0 && p.dinitial_states.ptr == nullptr) continue;
    const float g = dxe_at<T, float>(p, b, d, i, w_smem, dz);
    const View3& v = i >= 0 ? p.dx : p.dinitial_states;
    const int64_t pos = i >= 0 ? i : W - 1 + i;
    static_cast<T*>(v.ptr)[b * v.sb + d * v.sd + pos * v.sl] = T(g);
  }
}

template <typename T>
__global__ void bwd_params_generic_kernel(ConvParams p) {
  extern __shared__ float smem[];  // W weights, the bias, then one partial sum per thread
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim, W = p.width;
  float* red = smem + W + 1;
  if (threadIdx.x == 0) load_row_weights(p, d, smem, &smem[W]);
  __syncthreads();
  for (int64_t k = 0; k <= W; ++k) {  // k == W: the bias
    float acc = 0.f;
    for (int64_t t = threadIdx.x; t < p.seqlen; t += blockDim.x) {
      const float g = dz_at<T, float>(p, b, d, t, smem, smem[W]);
      const int64_t i = t - (W - 1) + k;
      if (k == W) acc += g;
      else if (seq_at(p, b, i) == seq_at(p, b, t)) acc += g * xe_at<T, float>(p, b, d, i);
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (k < W) p.dweight_part[(b * p.dim + d) * W + k] = red[0];
      else p.dbias_part[b * p.dim + d] = red[0];
    }
    __syncthreads();
  }
}

// dweight (D, W) and dbias (D,) = sums over the n_part partials, in a fixed order, written
// in the weight's dtype: one launch instead of a sum and a cast for each.
template <typename WT>
__global__ void sum_partials_kernel(const float* dw_part, const float* db_part, int64_t n_part,
                                    int64_t n_w, int64_t dim, WT* dweight, WT* dbias) {
  const int64_t n = n_w + (dbias ? dim : 0);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const bool is_w = e < n_w;
    const float* src = is_w ? dw_part + e : db_part + (e - n_w);
    const int64_t stride = is_w ? n_w : dim;
    float acc = 0.f;
    for (int64_t k = 0; k < n_part; ++k) acc += src[k * stride];
    if (is_w) dweight[e] = WT(acc);
    else dbias[e - n_w] = WT(acc);
  }
}

std::tuple<at::Tensor, at::Tensor> sum_partials_cuda(const at::Tensor& dweight_part, const at::Tensor& dbias_part,
                                                     const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->scalar_type() != weight.scalar_type())
    return finish_param_grads(dweight_part, dbias_part, weight, bias);  // rare: two dtypes
  const int64_t n_part = dweight_part.size(0), dim = weight.size(0), n_w = dim * weight.size(1);
  at::Tensor dweight = at::empty({dim, weight.size(1)}, weight.options());
  at::Tensor dbias = at::empty({bias.has_value() ? dim : 0}, weight.options());
  const int64_t n = n_w + (bias.has_value() ? dim : 0);
  if (n == 0) return {dweight, dbias};
  const unsigned grid = std::min<unsigned>(ceil_div(n, 256), 4096);
  dispatch_io_dtype(weight.scalar_type(), "weight", [&](auto tag) {
    using WT = decltype(tag);
    sum_partials_kernel<WT><<<grid, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dweight_part.data_ptr<float>(), dbias_part.data_ptr<float>(), n_part, n_w, dim,
        static_cast<WT*>(dweight.data_ptr()), bias.has_value() ? static_cast<WT*>(dbias.data_ptr()) : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dweight, dbias};
}

template <typename T>
void launch_bwd(ConvParams& p, BwdArgs& a, at::Tensor& dweight_part, at::Tensor& dbias_part,
                cudaStream_t stream) {
  const int64_t rows = p.batch * p.dim;
  const int W = p.width;
  if (use_cf_fast_path<T>(p, {p.x, p.dout, p.dx})) {
    alloc_param_partials(a, p.batch, dweight_part, dbias_part);
    width_switch(W, [&](auto kW) {
      bool_switch(p.seq_idx != nullptr, [&](auto kSeq) {
        bool_switch(p.silu, [&](auto kSilu) {
          bwd_cf_kernel<T, decltype(kW)::value, decltype(kSeq)::value, decltype(kSilu)::value>
              <<<rows, kCfThreads, 0, stream>>>(a.p);
        });
      });
    });
  } else if (use_cl_fast_path<T>(p, {p.x, p.dout, p.dx})) {
    dim3 grid(ceil_div(p.dim, kClBwdTileC), ceil_div(p.seqlen, kClBwdSteps), p.batch);
    alloc_param_partials(a, p.batch * grid.y, dweight_part, dbias_part);
    width_switch(W, [&](auto kW) {
      constexpr int kWidth = decltype(kW)::value;
      constexpr size_t kSmem = ClBwdTile<T, kWidth>::kBytes;
      bool_switch(p.seq_idx != nullptr, [&](auto kSeq) {
        auto kernel = bwd_cl_kernel<T, kWidth, decltype(kSeq)::value>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
        kernel<<<grid, kClBwdThreads, kSmem, stream>>>(a.p);
      });
    });
  } else {
    alloc_param_partials(a, p.batch, dweight_part, dbias_part);
    dim3 grid(rows, std::min<unsigned>(ceil_div(p.seqlen + W - 1, 256), 65535));
    bwd_dx_generic_kernel<T><<<grid, 256, (W + 1) * sizeof(float), stream>>>(a.p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_params_generic_kernel<T><<<rows, 256, (W + 1 + 256) * sizeof(float), stream>>>(a.p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& initial_states,
    const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal_states, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  BwdArgs a = prepare_bwd(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu);
  at::Tensor dweight_part, dbias_part;
  if (a.dx.numel() == 0) {
    alloc_param_partials(a, 1, dweight_part, dbias_part);
    dweight_part.zero_();
    dbias_part.zero_();
  } else {
    dispatch_io_dtype(a.x.scalar_type(), "x", [&](auto tag) {
      launch_bwd<decltype(tag)>(a.p, a, dweight_part, dbias_part, c10::cuda::getCurrentCUDAStream());
    });
  }
  auto [dweight, dbias] = sum_partials_cuda(dweight_part, dbias_part, weight, bias);
  return {a.dx, dweight, dbias, a.dinitial_states};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("causal_conv1d_bwd", &bwd_cuda); }

}  // namespace conv1d
}  // namespace ssm_ext
