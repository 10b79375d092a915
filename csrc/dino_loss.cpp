// Fused DINO loss on CPU: teacher softmax targets, the student cross-entropy over every (teacher crop, student
// crop) pair, its gradient and the collapse statistics, in one parallel sweep over the images of the batch.
//
// Rows are crop-major: student row v*B + b is crop v of image b, teacher row i*B + b global crop i of image b.
// Per image, the teacher probabilities p_i = softmax((t_i - c) / tau_t) are built once in a per-thread scratch row;
// every student crop v of the image then needs only q = sum_{i != v} p_i, because
//   sum_{i != v} CE(p_i, s_v) = |q| * LSE(s_v / tau_s) - q . s_v / tau_s      (|q| = number of teacher crops i != v)
//   d/ds_v = (|q| * softmax(s_v / tau_s) - q) / tau_s, times 1 / (B * P) for the batch and pair means.
// Nothing of size (rows, K) is materialised besides the gradient itself. With Sinkhorn-Knopp centering the teacher
// rows are instead p = exp((t - shift) / tau_t - row_max) * row_inv_norm from the scalings that
// csrc/sinkhorn_knopp.cpp computed over all the teacher rows (the column shift comes in the center's place).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "teacher_targets.h"

namespace {

using dk::given_target;
using dk::softmax_target;
using dk::student_row;

struct Shape {
  int64_t batch, n_crops, n_global, k;
};

template <typename acc_t>
struct Scalars {
  acc_t inv_student_temp;
  double inv_teacher_temp;
  acc_t grad_scale;  // the stored gradient is (|q| softmax - q) * grad_scale (dino_loss.py picks it per dtype)
};

// Sinkhorn-Knopp targets' row scalings and entropies, per teacher row (all null: softmax centering).
template <typename acc_t>
struct SkRows {
  const acc_t* row_max;
  const acc_t* row_inv_norm;
  const acc_t* entropy;
};

// One image b: the teacher probabilities of its G global crops, then every student crop against its target.
// `scratch` holds (G + 3) rows of k: the G probability rows, the two kinds of target and the student row.
template <typename S, typename T, typename acc_t>
void dino_loss_image(int64_t b, const S* student, const T* teacher, const acc_t* center, S* grad, acc_t* row_loss,
                     acc_t* entropy, const Shape& shape, const Scalars<acc_t>& sc, const SkRows<acc_t>& sk,
                     acc_t* scratch) {
  const int64_t B = shape.batch, G = shape.n_global, k = shape.k;
  acc_t* prob = scratch;
  acc_t* q_all = prob + G * k;  // sum over every teacher crop: the target of each local crop
  acc_t* q_global = q_all + k;  // sum over the other teacher crops: the target of global crop v
  acc_t* x = q_global + k;
  for (int64_t i = 0; i < G; ++i) {
    const int64_t row = i * B + b;
    if (sk.row_max != nullptr) {
      given_target(teacher + row * k, center, sc.inv_teacher_temp, static_cast<double>(sk.row_max[row]),
                   sk.row_inv_norm[row], k, prob + i * k);
      entropy[row] = sk.entropy[row];
    } else {
      entropy[row] = softmax_target(teacher + row * k, center, sc.inv_teacher_temp, k, prob + i * k);
    }
  }
  std::fill(q_all, q_all + k, acc_t(0));
  for (int64_t i = 0; i < G; ++i) {
    const acc_t* p = prob + i * k;
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) q_all[j] += p[j];
  }
  for (int64_t v = 0; v < shape.n_crops; ++v) {
    const int64_t row = v * B + b;
    S* grad_row = grad == nullptr ? nullptr : grad + row * k;
    const acc_t* q = q_all;
    if (v < G) {
      if (G == 1) {  // the only teacher crop is this crop itself: no pair, no loss, no gradient
        row_loss[row] = 0;
        if (grad_row != nullptr) std::fill(grad_row, grad_row + k, static_cast<S>(0));
        continue;
      }
      // Summed afresh rather than as q_all - p_v, which would lose p_{i != v} under a large p_v.
      std::fill(q_global, q_global + k, acc_t(0));
      for (int64_t i = 0; i < G; ++i) {
        if (i == v) continue;
        const acc_t* p = prob + i * k;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) q_global[j] += p[j];
      }
      q = q_global;
    }
    const acc_t n_q = static_cast<acc_t>(v < G ? G - 1 : G);
    row_loss[row] = student_row(student + row * k, q, n_q, sc.inv_student_temp, sc.grad_scale, k, x, grad_row);
  }
}

// Columns [lo, hi) of the column means of the teacher rows (what the center update needs), summed in row order so
// that the result does not depend on the thread count.
template <typename T, typename acc_t>
void teacher_column_mean(const T* teacher, int64_t rows, int64_t k, int64_t lo, int64_t hi, acc_t* mean) {
  acc_t* out = mean + lo;
  std::fill(out, out + (hi - lo), acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* t = teacher + r * k + lo;
#pragma omp simd
    for (int64_t j = 0; j < hi - lo; ++j) out[j] += static_cast<acc_t>(t[j]);
  }
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
#pragma omp simd
  for (int64_t j = 0; j < hi - lo; ++j) out[j] *= inv_rows;
}

template <typename S, typename T, typename acc_t>
void dino_loss_kernel(const S* student, const T* teacher, const acc_t* center, S* grad, acc_t* row_loss,
                      acc_t* entropy, acc_t* mean, const Shape& shape, const Scalars<acc_t>& sc,
                      const SkRows<acc_t>& sk) {
  constexpr int64_t kMeanColumns = 1024;
  const int64_t n_chunks = (shape.k + kMeanColumns - 1) / kMeanColumns;
  const int64_t teacher_rows = shape.n_global * shape.batch;
  // One parallel region whose work items (the images, then column chunks of the teacher mean) are handed out from
  // shared counters rather than in one fixed range per thread: a thread that the OS preempts (a busy or shared
  // machine) then delays the call by one item, not by its whole share.
  std::atomic<int64_t> next_image{0}, next_chunk{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<acc_t> scratch(static_cast<size_t>((shape.n_global + 3) * shape.k));
    for (int64_t b = next_image++; b < shape.batch; b = next_image++) {
      dino_loss_image(b, student, teacher, center, grad, row_loss, entropy, shape, sc, sk, scratch.data());
    }
    for (int64_t chunk = next_chunk++; chunk < n_chunks; chunk = next_chunk++) {
      const int64_t lo = chunk * kMeanColumns;
      teacher_column_mean(teacher, teacher_rows, shape.k, lo, std::min(shape.k, lo + kMeanColumns), mean);
    }
  });
}

// Python (dino_kernels/dino_loss.py) validates shapes, dtypes and devices, makes the inputs contiguous and passes
// the center in the accumulation dtype (fp64 if an input is fp64, else fp32). Returns (loss, grad, teacher_mean,
// entropy, kl), the scalars and the mean in the accumulation dtype; grad is empty unless compute_grad. Sinkhorn-Knopp
// centering passes the column shift as `center` and the (G * B,) row scalings and entropies, in that dtype too.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dino_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center, int64_t n_global,
    double student_temp, double teacher_temp, double grad_scale, bool compute_grad,
    const std::optional<at::Tensor>& sk_row_max, const std::optional<at::Tensor>& sk_row_inv_norm,
    const std::optional<at::Tensor>& sk_entropy) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2 && center.dim() == 1, "dino_loss_cpu: bad ranks");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous() && center.is_contiguous(),
              "dino_loss_cpu: inputs must be contiguous");
  const int64_t k = student.size(1);
  TORCH_CHECK(teacher.size(1) == k && center.size(0) == k, "dino_loss_cpu: K mismatch");
  TORCH_CHECK(n_global >= 1 && teacher.size(0) % n_global == 0, "dino_loss_cpu: bad n_global");
  const int64_t batch = teacher.size(0) / n_global;
  TORCH_CHECK(batch > 0 && k > 0 && student.size(0) % batch == 0, "dino_loss_cpu: bad row counts");
  const Shape shape{batch, student.size(0) / batch, n_global, k};
  TORCH_CHECK(shape.n_crops >= std::max<int64_t>(n_global, 2), "dino_loss_cpu: no (teacher, student) crop pairs");
  const auto acc_type = center.scalar_type();
  TORCH_CHECK(acc_type == at::kFloat || acc_type == at::kDouble, "dino_loss_cpu: center must be float or double");
  const auto acc_options = center.options();
  const bool sk = sk_row_max.has_value();
  TORCH_CHECK(sk == sk_row_inv_norm.has_value() && sk == sk_entropy.has_value(),
              "dino_loss_cpu: pass all three Sinkhorn-Knopp row tensors or none");
  if (sk) {
    for (const at::Tensor* r : {&*sk_row_max, &*sk_row_inv_norm, &*sk_entropy}) {
      TORCH_CHECK(r->dim() == 1 && r->size(0) == teacher.size(0) && r->is_contiguous() && r->scalar_type() == acc_type,
                  "dino_loss_cpu: Sinkhorn-Knopp row tensors must be contiguous (G * B,) in the center's dtype");
    }
  }

  at::Tensor grad = compute_grad ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor row_loss = at::empty({student.size(0)}, acc_options);
  at::Tensor entropy = at::empty({teacher.size(0)}, acc_options);
  at::Tensor mean = at::empty({k}, acc_options);
  const int64_t pairs = n_global * (shape.n_crops - 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "dino_loss_cpu_student", [&] {
    using student_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "dino_loss_cpu_teacher", [&] {
      using teacher_t = scalar_t;
      auto run = [&](auto acc_zero) {
        using acc_t = decltype(acc_zero);
        TORCH_CHECK(center.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                    "dino_loss_cpu: center dtype must be the accumulation dtype");
        const Scalars<acc_t> sc{static_cast<acc_t>(1.0 / student_temp), 1.0 / teacher_temp,
                                static_cast<acc_t>(grad_scale)};
        const SkRows<acc_t> rows = sk ? SkRows<acc_t>{sk_row_max->const_data_ptr<acc_t>(),
                                                      sk_row_inv_norm->const_data_ptr<acc_t>(),
                                                      sk_entropy->const_data_ptr<acc_t>()}
                                      : SkRows<acc_t>{nullptr, nullptr, nullptr};
        dino_loss_kernel(student.const_data_ptr<student_t>(), teacher.const_data_ptr<teacher_t>(),
                         center.const_data_ptr<acc_t>(), compute_grad ? grad.data_ptr<student_t>() : nullptr,
                         row_loss.data_ptr<acc_t>(), entropy.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), shape, sc,
                         rows);
      };
      if (acc_type == at::kDouble) {
        run(double(0));
      } else {
        run(float(0));
      }
    });
  });

  // Tiny reductions, in fp64 and in a fixed order so the result is deterministic.
  const at::Tensor row_loss64 = row_loss.to(at::kDouble);
  const at::Tensor entropy64 = entropy.to(at::kDouble);
  const double loss = row_loss64.sum().item<double>() / static_cast<double>(pairs * batch);
  const double mean_entropy = entropy64.mean().item<double>();
  // Each teacher crop meets n_crops - 1 student crops, so the pair mean of its entropy is the plain mean, and
  // mean KL(p_i || softmax(s_v)) over the pairs = mean cross-entropy - mean entropy.
  auto scalar = [&](double value) { return at::scalar_tensor(value, acc_options); };
  return {scalar(loss), grad, mean, scalar(mean_entropy), scalar(loss - mean_entropy)};
}

template <typename T>
DK_VECTOR_CLONES void scale_range(T* data, int64_t n, double factor) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const acc_t f = static_cast<acc_t>(factor);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) data[j] = static_cast<T>(static_cast<acc_t>(data[j]) * f);
}

// In-place backward rescale of the stored gradient: grad *= grad_output * scale, in fp32 math (fp64 for fp64).
// Skipped when that factor is exactly 1, the usual `loss.backward()` case.
void dino_loss_rescale_cpu_(at::Tensor& grad, const at::Tensor& grad_output, double scale) {
  TORCH_CHECK(grad.is_contiguous(), "dino_loss_rescale_cpu_: grad must be contiguous");
  const double factor = grad_output.item<double>() * scale;
  if (factor == 1.0 || grad.numel() == 0) return;
  constexpr int64_t kChunk = 1 << 15;
  const int64_t n = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dino_loss_rescale_cpu_", [&] {
    scalar_t* data = grad.data_ptr<scalar_t>();
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
      const int64_t lo = begin * kChunk, hi = std::min(n, end * kChunk);
      scale_range(data + lo, hi - lo, factor);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_kernels_C, m) {
  m.def(
      "dino_loss_cpu(Tensor student, Tensor teacher, Tensor center, int n_global, float student_temp, "
      "float teacher_temp, float grad_scale, bool compute_grad, Tensor? sk_row_max=None, "
      "Tensor? sk_row_inv_norm=None, Tensor? sk_entropy=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dino_loss_rescale_cpu_(Tensor(a!) grad, Tensor grad_output, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(dino_kernels_C, CPU, m) {
  m.impl("dino_loss_cpu", &dino_loss_cpu);
  m.impl("dino_loss_rescale_cpu_", &dino_loss_rescale_cpu_);
}
