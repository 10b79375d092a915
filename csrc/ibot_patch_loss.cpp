// Fused iBOT masked-patch loss on CPU: per masked patch row m, the teacher target p_m, the cross-entropy
// CE_m = -sum_k p_mk log softmax(s_m / tau_s)_k and its gradient, in one parallel sweep over the rows.
//
// The targets are either the row's own centred softmax p = softmax((t - c) / tau_t) (their entropy is computed on
// the way) or given in the form p_k = exp((t_k - shift_k) / tau_t - row_max) * row_inv_norm (the Sinkhorn-Knopp
// targets, whose scalings need every row and come from dino_kernels.sinkhorn_knopp). With sum_k p_k = 1,
//   CE_m = LSE(s_m / tau_s) - p_m . s_m / tau_s,    d CE_m / d s_m = (softmax(s_m / tau_s) - p_m) / tau_s,
// and the stored gradient row is (softmax - p) * grad_weight[m], grad_weight folding in w_m / (tau_s n_images)
// (ibot_patch_loss.py picks it per dtype). Only two scratch rows of K per thread; nothing of size (M, K) besides the
// gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "teacher_targets.h"

namespace {

using dk::given_target;
using dk::softmax_target;
using dk::student_row;

template <typename acc_t>
struct Rows {
  const acc_t* shift;        // (k,) center (softmax targets) or column shift (given targets)
  const acc_t* grad_weight;  // (rows,) the stored gradient row's factor
  const acc_t* row_max;      // (rows,) given targets; null for softmax targets
  const acc_t* row_inv_norm;
  acc_t* row_loss;  // (rows,) CE of each row
  acc_t* entropy;   // (rows,) entropy of each softmax target row (unused for given targets)
};

template <typename S, typename T, typename acc_t>
void ibot_patch_loss_kernel(const S* student, const T* teacher, S* grad, const Rows<acc_t>& r, int64_t rows,
                            int64_t k, acc_t inv_student_temp, double inv_teacher_temp) {
  // Rows are handed out from a shared counter rather than in one fixed range per thread: a thread that the OS
  // preempts (a busy or shared machine) then delays the call by one row, not by its whole share.
  std::atomic<int64_t> next_row{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), rows), 1, [&](int64_t, int64_t) {
    std::vector<acc_t> scratch(static_cast<size_t>(2 * k));
    acc_t* prob = scratch.data();
    acc_t* x = prob + k;
    for (int64_t row = next_row++; row < rows; row = next_row++) {
      const T* t = teacher + row * k;
      if (r.row_max == nullptr) {
        r.entropy[row] = softmax_target(t, r.shift, inv_teacher_temp, k, prob);
      } else {
        given_target(t, r.shift, inv_teacher_temp, static_cast<double>(r.row_max[row]), r.row_inv_norm[row], k, prob);
      }
      // The target sums to 1 (n_q = 1), and the gradient row's factor is the row's own weight.
      r.row_loss[row] = student_row(student + row * k, prob, acc_t(1), inv_student_temp, r.grad_weight[row], k, x,
                                    grad == nullptr ? nullptr : grad + row * k);
    }
  });
}

// Python (dino_kernels/ibot_patch_loss.py) validates shapes, dtypes and devices, makes the logits contiguous and
// passes column_shift, grad_weight and the given-target scalings in the accumulation dtype (fp64 if a logits tensor
// is fp64, else fp32). Returns (row_loss (M,), entropy (M,), or (0,) for given targets, grad (M, K), or (0,) unless
// compute_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ibot_patch_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& column_shift,
    const at::Tensor& grad_weight, const std::optional<at::Tensor>& row_max,
    const std::optional<at::Tensor>& row_inv_norm, double student_temp, double teacher_temp, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2 && column_shift.dim() == 1 && grad_weight.dim() == 1,
              "ibot_patch_loss_cpu: bad ranks");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous() && column_shift.is_contiguous() &&
                  grad_weight.is_contiguous(),
              "ibot_patch_loss_cpu: inputs must be contiguous");
  const int64_t rows = student.size(0), k = student.size(1);
  TORCH_CHECK(teacher.sizes() == student.sizes() && column_shift.size(0) == k && grad_weight.size(0) == rows,
              "ibot_patch_loss_cpu: shape mismatch");
  const auto acc_type = column_shift.scalar_type();
  TORCH_CHECK(acc_type == at::kFloat || acc_type == at::kDouble,
              "ibot_patch_loss_cpu: column_shift must be float or double");
  TORCH_CHECK(grad_weight.scalar_type() == acc_type, "ibot_patch_loss_cpu: grad_weight must have column_shift's dtype");
  const bool given = row_max.has_value();
  TORCH_CHECK(given == row_inv_norm.has_value(), "ibot_patch_loss_cpu: row_max and row_inv_norm go together");
  if (given) {
    for (const at::Tensor* t : {&*row_max, &*row_inv_norm}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->is_contiguous() && t->scalar_type() == acc_type,
                  "ibot_patch_loss_cpu: row_max and row_inv_norm must be contiguous (M,) in column_shift's dtype");
    }
  }
  const auto acc_options = column_shift.options();
  at::Tensor grad = compute_grad ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor row_loss = at::empty({rows}, acc_options);
  at::Tensor entropy = at::empty({given ? 0 : rows}, acc_options);
  if (rows == 0 || k == 0) return {row_loss, entropy, grad};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ibot_patch_loss_student", [&] {
    using student_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "ibot_patch_loss_teacher", [&] {
      using teacher_t = scalar_t;
      auto run = [&](auto acc_zero) {
        using acc_t = decltype(acc_zero);
        const Rows<acc_t> r{column_shift.const_data_ptr<acc_t>(), grad_weight.const_data_ptr<acc_t>(),
                            given ? row_max->const_data_ptr<acc_t>() : nullptr,
                            given ? row_inv_norm->const_data_ptr<acc_t>() : nullptr, row_loss.data_ptr<acc_t>(),
                            given ? nullptr : entropy.data_ptr<acc_t>()};
        ibot_patch_loss_kernel(student.const_data_ptr<student_t>(), teacher.const_data_ptr<teacher_t>(),
                               compute_grad ? grad.data_ptr<student_t>() : nullptr, r, rows, k,
                               static_cast<acc_t>(1.0 / student_temp), 1.0 / teacher_temp);
      };
      if (acc_type == at::kDouble) {
        run(double(0));
      } else {
        run(float(0));
      }
    });
  });
  return {row_loss, entropy, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_kernels_C, m) {
  m.def(
      "ibot_patch_loss_cpu(Tensor student, Tensor teacher, Tensor column_shift, Tensor grad_weight, "
      "Tensor? row_max, Tensor? row_inv_norm, float student_temp, float teacher_temp, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dino_kernels_C, CPU, m) { m.impl("ibot_patch_loss_cpu", &ibot_patch_loss_cpu); }
