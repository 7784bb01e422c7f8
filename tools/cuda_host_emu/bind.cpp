#include <torch/extension.h>
namespace ssm_ext { namespace issm {
using OT = c10::optional<at::Tensor>;
std::tuple<at::Tensor, at::Tensor, at::Tensor> emu_issm_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OT&, const OT&, const OT&, const OT&, const OT&, const OT&, bool, double, double, bool);
std::vector<at::Tensor> emu_issm_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OT&, const OT&, const OT&, const OT&, const OT&, const OT&, bool, double, double, const at::Tensor&, const OT&, const OT&);
}}
namespace ssm_ext { namespace norm {
using OT = c10::optional<at::Tensor>;
std::tuple<at::Tensor, at::Tensor> emu_norm_fwd(const at::Tensor&, const at::Tensor&, const OT&, const OT&, double, int64_t, bool);
std::vector<at::Tensor> emu_norm_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OT&, const OT&, const at::Tensor&, int64_t, bool);
}}
namespace ssm_ext { namespace scan {
using OT = c10::optional<at::Tensor>;
std::vector<at::Tensor> emu_scan_strips_fwd(const at::Tensor&, const at::Tensor&, const OT&, const OT&, const OT&, bool, const std::string&, bool);
bool emu_strips_tile_walk(int64_t, int64_t, int64_t);
}}
namespace ssm_ext { namespace hstu_bsa {
using OT = c10::optional<at::Tensor>;
at::Tensor emu_hstu_attn_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, const OT&);
std::vector<at::Tensor> emu_hstu_attn_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, const OT&, const at::Tensor&);
}}
namespace emu { void set_device(int n_sms, int hide); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("issm_fwd", &ssm_ext::issm::emu_issm_fwd);
  m.def("issm_bwd", &ssm_ext::issm::emu_issm_bwd);
  m.def("norm_fwd", &ssm_ext::norm::emu_norm_fwd);
  m.def("norm_bwd", &ssm_ext::norm::emu_norm_bwd);
  m.def("scan_strips_fwd", &ssm_ext::scan::emu_scan_strips_fwd);
  m.def("strips_tile_walk", &ssm_ext::scan::emu_strips_tile_walk);
  m.def("hstu_attn_fwd", &ssm_ext::hstu_bsa::emu_hstu_attn_fwd);
  m.def("hstu_attn_bwd", &ssm_ext::hstu_bsa::emu_hstu_attn_bwd);
  m.def("set_device", &emu::set_device);  // (n_sms, hide_states): see inc/cuda_runtime.h
}
