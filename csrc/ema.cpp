// Fused multi-tensor EMA of teacher weights: CPU kernel and the C++ side of the CUDA launcher.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda_launch.h"

namespace {

// Elements per unit of parallel work: large enough to amortise scheduling, small enough to balance
// a parameter list of one huge embedding and many small biases across threads.
constexpr int64_t kCpuChunk = 1 << 15;

template <typename T, typename S>
void ema_range(T* teacher, const S* student, int64_t n, double momentum) {
  // fp32 math for every storage type (fp64 for fp64 teachers); the loop is a plain map so it vectorises.
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const acc_t m = static_cast<acc_t>(momentum);
  const acc_t one_minus_m = static_cast<acc_t>(1.0 - momentum);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    teacher[i] = static_cast<T>(m * static_cast<acc_t>(teacher[i]) + one_minus_m * static_cast<acc_t>(student[i]));
  }
}

void ema_pair(const at::Tensor& teacher, const at::Tensor& student, int64_t begin, int64_t end, double momentum) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "ema_cpu_teacher", [&] {
    using teacher_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ema_cpu_student", [&] {
      ema_range(teacher.data_ptr<teacher_t>() + begin, student.const_data_ptr<scalar_t>() + begin, end - begin,
                momentum);
    });
  });
}

bool is_float(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

// The checks below return what is wrong as integers, {problem, i, j} (empty when the inputs are fine), and Python
// words the error: on the GPU machines' build (g++ 13, torch 2.11+cu130) formatting a message in this library
// (c10::str, TORCH_CHECK_VALUE) crashed the process, while the same code built here raised cleanly. Keep string
// formatting out of this file's user-facing paths.
enum Problem : int64_t { kLength = 1, kTeacherDtype, kStudentDtype, kShape, kDevice, kStrides, kOverlap };

using Found = std::vector<int64_t>;

// Teacher tensors that share memory would be written by several threads at once, each reading what another may
// already have updated: reject them. Every tensor is dense (checked before), so it covers exactly the bytes
// [data_ptr, data_ptr + numel * element_size). Sorting those ranges by start finds any overlap in O(n log n):
// microseconds for the few hundred tensors of a ViT.
Found check_teachers_disjoint(at::TensorList teacher) {
  struct Range {
    uintptr_t begin, end;
    int64_t index;
  };
  std::vector<Range> ranges;
  ranges.reserve(teacher.size());
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const auto begin = reinterpret_cast<uintptr_t>(t.has_storage() ? t.data_ptr() : nullptr);
    if (t.numel() == 0 || begin == 0) continue;  // empty, or no memory behind it (meta tensors)
    ranges.push_back({begin, begin + static_cast<uintptr_t>(t.numel() * t.element_size()), static_cast<int64_t>(i)});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  // If range i overlaps a later range j, it overlaps range i + 1 too (which starts at or before j): checking
  // neighbours is enough.
  for (size_t r = 1; r < ranges.size(); ++r) {
    if (ranges[r].begin < ranges[r - 1].end) {
      return {kOverlap, std::min(ranges[r - 1].index, ranges[r].index), std::max(ranges[r - 1].index, ranges[r].index)};
    }
  }
  return {};
}

// Checks every pair once, in C++ because DINO calls this each step on hundreds of tensors and Python-side checks
// would cost as much as the update itself on a GPU.
Found ema_check(at::TensorList teacher, at::TensorList student) {
  if (teacher.size() != student.size()) return {kLength, 0, 0};
  for (size_t p = 0; p < teacher.size(); ++p) {
    const at::Tensor& t = teacher[p];
    const at::Tensor& s = student[p];
    const auto i = static_cast<int64_t>(p);
    if (!is_float(t)) return {kTeacherDtype, i, i};
    if (!is_float(s)) return {kStudentDtype, i, i};
    if (t.sizes() != s.sizes()) return {kShape, i, i};
    if (t.device() != s.device() || t.device() != teacher[0].device()) return {kDevice, i, i};
    // The kernels walk storage in memory order, which is the same element order for both tensors only when both
    // are dense with equal strides (any contiguous or channels-last pair qualifies).
    if (t.numel() != 0 && !(t.is_non_overlapping_and_dense() && t.strides() == s.strides())) return {kStrides, i, i};
  }
  return check_teachers_disjoint(teacher);
}

// Inputs passed ema_check: pairs share numel and strides and are dense, so the update runs over storage.
// The work is split over the concatenation of all tensors, so a list of many tiny tensors (biases, norms) is a few
// chunks rather than one parallel task each.
void ema_cpu_(at::TensorList teacher, at::TensorList student, double momentum) {
  std::vector<int64_t> offsets(teacher.size() + 1, 0);
  for (size_t p = 0; p < teacher.size(); ++p) offsets[p + 1] = offsets[p] + teacher[p].numel();
  const int64_t total = offsets.back();
  const int64_t n_chunks = (total + kCpuChunk - 1) / kCpuChunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
    int64_t begin = lo * kCpuChunk;
    const int64_t end = std::min(total, hi * kCpuChunk);
    size_t p = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; begin < end; ++p) {
      const int64_t stop = std::min(end, offsets[p + 1]);
      if (stop > begin) ema_pair(teacher[p], student[p], begin - offsets[p], stop - offsets[p], momentum);
      begin = stop;
    }
  });
}

// `meta`: int64 CUDA tensor holding the tensor table then the chunk table (see cuda_launch.h), on the device of the
// tensors it lists: the launch runs on that device, whichever is current.
void ema_cuda_launch(const at::Tensor& meta, int64_t n_tensors, int64_t n_chunks, int64_t chunk_size,
                     double momentum, int64_t teacher_dtype, int64_t student_dtype, int64_t grid_size,
                     int64_t stream) {
#ifdef DINO_KERNELS_WITH_CUDA
  const int64_t* table = meta.const_data_ptr<int64_t>();
  const int err = dk_ema_cuda(meta.get_device(), table, table + 3 * n_tensors, n_chunks, chunk_size, momentum,
                              static_cast<int>(teacher_dtype), static_cast<int>(student_dtype),
                              static_cast<int>(grid_size), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "dino_kernels EMA CUDA kernel failed: ", dk_cuda_error_string(err));
#else
  TORCH_CHECK(false, "dino_kernels was built without nvcc, so its CUDA kernels are missing; reinstall with nvcc on "
                     "PATH (or CUDA_HOME set): pip install --no-build-isolation -e .");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_kernels_C, m) {
  m.def("ema_check(Tensor[] teacher, Tensor[] student) -> int[]", &ema_check);
  m.def("ema_cpu_(Tensor(a!)[] teacher, Tensor[] student, float momentum) -> ()");
  m.def(
      "ema_cuda_launch(Tensor meta, int n_tensors, int n_chunks, int chunk_size, float momentum, int teacher_dtype, "
      "int student_dtype, int grid_size, int stream) -> ()",
      &ema_cuda_launch);
}

TORCH_LIBRARY_IMPL(dino_kernels_C, CPU, m) { m.impl("ema_cpu_", &ema_cpu_); }
