#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
namespace emu {
static std::vector<char> g_smem;
static char* g_smem_base = nullptr;  // 1024-aligned, as the kernels' XOR address rule needs
static size_t g_smem_size = 0;
size_t smem_optin = 0;
static int g_sms = 1, g_hide = 0;
int sms() { return g_sms; }
int hide_states() { return g_hide; }
void set_device(int n_sms, int hide) {
  if (n_sms < 1 || hide < 0 || hide > 2) throw std::runtime_error("emu: set_device(n_sms >= 1, hide in 0..2)");
  g_sms = n_sms;
  g_hide = hide;
}
[[noreturn]] void unsupported(const char* what) {
  std::fprintf(stderr, "emu: %s is not emulated\n", what);
  std::abort();
}

// An error seen by a CTA thread, thrown by launch() once the CTA's threads have joined.
static std::mutex g_err_mu;
static std::string g_err;
static void fail(const std::string& m) {
  std::lock_guard<std::mutex> g(g_err_mu);
  if (g_err.empty()) g_err = m;
}

struct Copy { void* dst; const void* src; bool valid; };
thread_local std::vector<Copy> t_open;           // issued, not yet committed
thread_local std::deque<std::vector<Copy>> t_groups;  // committed, oldest first
void cp_async16(void* smem, const void* gmem, bool valid) {
  const auto s = reinterpret_cast<uintptr_t>(smem), base = reinterpret_cast<uintptr_t>(g_smem_base);
  if (s % 16 || (valid && reinterpret_cast<uintptr_t>(gmem) % 16))
    fail("emu: cp.async16 with an address not 16-byte aligned");
  if (s < base || s + 16 > base + g_smem_size) fail("emu: cp.async16 outside the dynamic shared memory");
  t_open.push_back({smem, gmem, valid});
}
void cp_async_commit() {
  t_groups.push_back(std::move(t_open));
  t_open.clear();
}
void cp_async_wait(int n) {  // all but the n most recent committed groups complete
  while (int(t_groups.size()) > n) {
    for (const Copy& c : t_groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    t_groups.pop_front();
  }
}
void spin() {
  thread_local long n = 0;
  if (++n > 2000000) {
    std::fprintf(stderr, "emu: a look-back spins for ever (block %u waits on a CTA that runs later?)\n", blockIdx.x);
    std::abort();
  }
}
uint32_t lookback_state(uint32_t st, const uint64_t* agg) {
  if (!g_hide || st == 0xFFFFFFFFu || uint32_t(ld_relaxed(agg)) == 0xFFFFFFFFu) return st;
  if (g_hide == 1) return 0xFFFFFFFFu;
  uint64_t h = reinterpret_cast<uintptr_t>(agg) / 8 * 0x9E3779B97F4A7C15ull;  // fixed per slot
  return (h >> 40) & 1 ? 0xFFFFFFFFu : st;
}
static std::unique_ptr<std::barrier<>> g_bar;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp;
static float g_x[32][32];
void* dyn_smem() { return g_smem_base; }
uint32_t smem_u32(const void* p) {  // the shared-window address: offset from the base
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(g_smem_base);
  if (a < base || a > base + g_smem_size) fail("emu: a shared address outside the dynamic shared memory");
  return uint32_t(a - base);
}
static const char* smem_at(uint32_t addr, uint32_t bytes) {
  if (addr + bytes > g_smem_size) {
    fail("emu: ldmatrix reads outside the dynamic shared memory");
    return g_smem_base;
  }
  return g_smem_base + addr;
}
// Warp-collective exchanges (ldmatrix, mma.sync): every lane posts its operands, the warp meets,
// each lane computes its own result from all posts, the warp meets again before the next post.
static uint32_t g_post[32][32][8];
static void warp_meet() { g_warp[threadIdx.x / 32]->arrive_and_wait(); }
void syncwarp() { warp_meet(); }
void ldmatrix(uint32_t* r, uint32_t addr, bool trans) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  g_post[w][l][0] = addr;
  warp_meet();
  for (int i = 0; i < 4; ++i) {  // matrix i: rows at the addresses of lanes 8i .. 8i + 7
    uint16_t h[2];
    for (int k = 0; k < 2; ++k) {
      // plain: row l / 4, columns 2 (l % 4) + k; trans: row 2 (l % 4) + k, column l / 4
      const int row = trans ? 2 * (l % 4) + k : l / 4, col = trans ? l / 4 : 2 * (l % 4) + k;
      std::memcpy(&h[k], smem_at(g_post[w][8 * i + row][0] + 2 * col, 2), 2);
    }
    r[i] = uint32_t(h[0]) | uint32_t(h[1]) << 16;
  }
  warp_meet();
}
static float half_bits(uint16_t v, bool bf16) {
  return bf16 ? float(c10::BFloat16(v, c10::BFloat16::from_bits())) : float(c10::Half(v, c10::Half::from_bits()));
}
uint32_t pack2(float lo, float hi, bool bf16) {
  const uint16_t a = bf16 ? c10::BFloat16(lo).x : c10::Half(lo).x, b = bf16 ? c10::BFloat16(hi).x : c10::Half(hi).x;
  return uint32_t(a) | uint32_t(b) << 16;
}
void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) g_post[w][l][i] = a[i];
  g_post[w][l][4] = b0;
  g_post[w][l][5] = b1;
  warp_meet();
  // Lane (g, q) = (l / 4, l % 4) holds A (g, 2q..) (g + 8, 2q..) (g, 2q + 8..) (g + 8, 2q + 8..),
  // B (k 2q.., n g) (k 2q + 8.., n g); C (g, 2q..) (g + 8, 2q..).
  float A[16][16], B[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln / 4, q = ln % 4;
    for (int h = 0; h < 2; ++h) {
      const auto lo = [&](uint32_t v) { return half_bits(uint16_t(v >> (16 * h)), bf16); };
      A[g][2 * q + h] = lo(g_post[w][ln][0]);
      A[g + 8][2 * q + h] = lo(g_post[w][ln][1]);
      A[g][2 * q + 8 + h] = lo(g_post[w][ln][2]);
      A[g + 8][2 * q + 8 + h] = lo(g_post[w][ln][3]);
      B[2 * q + h][g] = lo(g_post[w][ln][4]);
      B[2 * q + 8 + h][g] = lo(g_post[w][ln][5]);
    }
  }
  warp_meet();
  const int g = l / 4, q = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
    double s = c[e];
    for (int k = 0; k < 16; ++k) s += double(A[row][k]) * B[k][col];
    c[e] = float(s);
  }
}
void syncthreads() { g_bar->arrive_and_wait(); }
float shfl_xor(float v, int m) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  g_x[w][l] = v;
  g_warp[w]->arrive_and_wait();
  const float r = g_x[w][l ^ m];
  g_warp[w]->arrive_and_wait();
  return r;
}
void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = block;
  const unsigned nt = block.x;
  if (nt % 32 && nt > 32) throw std::runtime_error("emu: blockDim not a multiple of 32");
  if (smem > 48 * 1024 && smem > smem_optin) throw std::runtime_error("emu: dynamic smem over 48 KB without cudaFuncSetAttribute");
  if (smem > 227 * 1024) throw std::runtime_error("emu: dynamic smem over 227 KB");
  g_smem.assign(smem + 1024 + 16, char(0x7f));  // garbage-ish fill: reads of unwritten smem show up
  g_smem_base = g_smem.data() + (1024 - reinterpret_cast<uintptr_t>(g_smem.data()) % 1024) % 1024;
  g_smem_size = smem;
  g_err.clear();
  for (unsigned b = 0; b < grid.x * grid.y; ++b) {
    g_bar = std::make_unique<std::barrier<>>(nt);
    g_warp.clear();
    for (unsigned w = 0; w < (nt + 31) / 32; ++w) g_warp.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < nt; ++t)
      ts.emplace_back([&, t, b] {
        threadIdx = dim3(t);
        blockIdx = dim3(b % grid.x, b / grid.x);
        body();
        // a thread that returns early leaves the barriers (none of our kernels syncs after an early return)
        // (committed empty groups are fine: the HSTU K / V ring commits one per tile past the end)
        bool pending = !t_open.empty();
        for (const auto& g : t_groups) pending |= !g.empty();
        t_groups.clear();
        if (pending) fail("emu: a thread ended with cp.async copies not waited for");
      });
    for (auto& th : ts) th.join();
    if (!g_err.empty()) throw std::runtime_error(g_err);
  }
}
}  // namespace emu
