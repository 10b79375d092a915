// Fused multi-tensor EMA of teacher weights: CPU kernel and the C++ side of the CUDA launcher.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Python validates devices, dtypes, shapes and layouts; pairs share numel and strides, and are dense, so the
// update runs over their storage in memory order.
void ema_cpu_(at::TensorList teacher, at::TensorList student, double momentum) {
  TORCH_CHECK(teacher.size() == student.size(), "ema_cpu_: teacher and student lists differ in length");
  struct Chunk {
    size_t pair;
    int64_t begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t p = 0; p < teacher.size(); ++p) {
    const int64_t n = teacher[p].numel();
    for (int64_t b = 0; b < n; b += kCpuChunk) chunks.push_back({p, b, std::min(n, b + kCpuChunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& chunk = chunks[c];
      ema_pair(teacher[chunk.pair], student[chunk.pair], chunk.begin, chunk.end, momentum);
    }
  });
}

// `meta`: int64 CUDA tensor holding the tensor table then the chunk table (see cuda_launch.h).
void ema_cuda_launch(const at::Tensor& meta, int64_t n_tensors, int64_t n_chunks, int64_t chunk_size,
                     double momentum, int64_t teacher_dtype, int64_t student_dtype, int64_t grid_size,
                     int64_t stream) {
#ifdef DINO_KERNELS_WITH_CUDA
  const int64_t* table = meta.const_data_ptr<int64_t>();
  const int err = dk_ema_cuda(table, table + 3 * n_tensors, n_chunks, chunk_size, momentum,
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
  m.def("ema_cpu_(Tensor(a!)[] teacher, Tensor[] student, float momentum) -> ()");
  m.def(
      "ema_cuda_launch(Tensor meta, int n_tensors, int n_chunks, int chunk_size, float momentum, int teacher_dtype, "
      "int student_dtype, int grid_size, int stream) -> ()",
      &ema_cuda_launch);
}

TORCH_LIBRARY_IMPL(dino_kernels_C, CPU, m) { m.impl("ema_cpu_", &ema_cpu_); }
