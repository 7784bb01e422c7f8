#include <cuda_runtime.h>
#include <mutex>
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
namespace emu {
static std::vector<char> g_smem;
static std::unique_ptr<std::barrier<>> g_bar;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp;
static float g_x[32][32];
void* dyn_smem() { return g_smem.data(); }
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
  g_smem.assign(smem + 16, char(0x7f));  // garbage-ish fill: reads of unwritten smem show up
  for (unsigned b = 0; b < grid.x; ++b) {
    g_bar = std::make_unique<std::barrier<>>(nt);
    g_warp.clear();
    for (unsigned w = 0; w < (nt + 31) / 32; ++w) g_warp.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < nt; ++t)
      ts.emplace_back([&, t, b] {
        threadIdx = dim3(t);
        blockIdx = dim3(b);
        body();
        // a thread that returns early leaves the barriers (none of our kernels syncs after an early return)
      });
    for (auto& th : ts) th.join();
  }
}
}  // namespace emu
