// Sinkhorn-Knopp teacher targets on CPU (dino_kernels/sinkhorn_knopp.py drives the iterations and the all-reduces
// between them): the column pass, the row pass and the materialisation of p, never storing the (N, K) matrix.
//
// The targets are p_ik = exp(u_ik - row_max_i) * row_inv_norm_i with u_ik = (t_ik - column_shift_k) / tau_t:
// - column pass: column_shift_k += tau_t * log sum_i exp(u_ik - row_lse_i), row_lse_i = row_max_i - log(inv_norm_i)
//   (every column then sums to 1 over the rows: the prototype normalisation of the official code);
// - row pass: row_max_i = max_k u_ik and row_inv_norm_i = 1 / sum_k exp(u_ik - row_max_i) (the sample
//   normalisation), and the entropy of the row.
// u is formed in double, where (t - shift) * (1 / tau_t) carries no fp32 rounding of a number of size |u| (up to
// ~100 at tau_t = 0.04), and only u minus a max goes to acc_t for the exponential: fp32 math (fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "teacher_targets.h"

namespace {

using dk::exp_acc;
using dk::given_target;
using dk::kSumBlock;

// Columns per work item of the column pass: its max and sum rows stay in L1 while it walks down the rows.
constexpr int64_t kColumns = 256;

struct Dims {
  int64_t rows, cols;
};

// Columns [lo, lo + width) of the column pass.
template <typename T, typename acc_t>
DK_VECTOR_CLONES void column_chunk(const T* teacher, acc_t* shift, const acc_t* row_max, const acc_t* row_inv_norm,
                                   const Dims& d, int64_t lo, int64_t width, double inv_temp, double temp,
                                   double* col_max, acc_t* block_sum, double* col_sum) {
  std::fill(col_max, col_max + width, -std::numeric_limits<double>::infinity());
  for (int64_t i = 0; i < d.rows; ++i) {
    const T* t = teacher + i * d.cols + lo;
    const double row_lse = static_cast<double>(row_max[i]) - std::log(static_cast<double>(row_inv_norm[i]));
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const double u = (static_cast<double>(t[j]) - static_cast<double>(shift[lo + j])) * inv_temp - row_lse;
      col_max[j] = u > col_max[j] ? u : col_max[j];
    }
  }
  std::fill(col_sum, col_sum + width, 0.0);
  for (int64_t i0 = 0; i0 < d.rows; i0 += kSumBlock) {
    std::fill(block_sum, block_sum + width, acc_t(0));
    for (int64_t i = i0; i < std::min(d.rows, i0 + kSumBlock); ++i) {
      const T* t = teacher + i * d.cols + lo;
      const double row_lse = static_cast<double>(row_max[i]) - std::log(static_cast<double>(row_inv_norm[i]));
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const double u = (static_cast<double>(t[j]) - static_cast<double>(shift[lo + j])) * inv_temp - row_lse;
        block_sum[j] += exp_acc(static_cast<acc_t>(u - col_max[j]));
      }
    }
    for (int64_t j = 0; j < width; ++j) col_sum[j] += static_cast<double>(block_sum[j]);
  }
  for (int64_t j = 0; j < width; ++j) {
    shift[lo + j] = static_cast<acc_t>(static_cast<double>(shift[lo + j]) + temp * (col_max[j] + std::log(col_sum[j])));
  }
}

// Row i of the row pass.
template <typename T, typename acc_t>
DK_VECTOR_CLONES void row_pass(const T* t, const acc_t* shift, int64_t k, double inv_temp, acc_t* row_max,
                               acc_t* row_inv_norm, acc_t* entropy) {
  double max_u = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : max_u)
  for (int64_t j = 0; j < k; ++j) {
    const double u = (static_cast<double>(t[j]) - static_cast<double>(shift[j])) * inv_temp;
    max_u = u > max_u ? u : max_u;
  }
  // The stored max is the max rounded up to acc_t, and the normaliser is taken relative to that stored value: the
  // targets rebuilt from the stored scalings then sum to 1 and never exceed exp(0), even where |max| is large
  // (a row far below the others: -200 rounds to fp32 by up to 8e-6).
  acc_t stored_max = static_cast<acc_t>(max_u);
  if (static_cast<double>(stored_max) < max_u) {
    stored_max = std::nextafter(stored_max, std::numeric_limits<acc_t>::infinity());
  }
  const double m = static_cast<double>(stored_max);
  double z = 0, w = 0;
  for (int64_t lo = 0; lo < k; lo += kSumBlock) {
    const int64_t hi = std::min(k, lo + kSumBlock);
    acc_t z_block = 0, w_block = 0;
#pragma omp simd reduction(+ : z_block, w_block)
    for (int64_t j = lo; j < hi; ++j) {
      const double u = (static_cast<double>(t[j]) - static_cast<double>(shift[j])) * inv_temp;
      const acc_t shifted = static_cast<acc_t>(u - m);
      const acc_t e = exp_acc(shifted);
      z_block += e;
      w_block += e * shifted;
    }
    z += z_block;
    w += w_block;
  }
  *row_max = stored_max;
  *row_inv_norm = static_cast<acc_t>(1.0 / z);
  *entropy = static_cast<acc_t>(std::log(z) - w / z);
}

void check_args(const char* op, const at::Tensor& teacher, const at::Tensor& shift, const at::Tensor& row_max,
                const at::Tensor& row_inv_norm) {
  TORCH_CHECK(teacher.dim() == 2 && teacher.is_contiguous(), op, ": teacher must be a contiguous (N, K) tensor");
  TORCH_CHECK(teacher.size(0) > 0 && teacher.size(1) > 0, op, ": teacher must not be empty");
  const auto acc = shift.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, op, ": column_shift must be float or double");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == teacher.size(1) && shift.is_contiguous(), op,
              ": column_shift must be a contiguous (K,) tensor");
  for (const at::Tensor* r : {&row_max, &row_inv_norm}) {
    TORCH_CHECK(r->dim() == 1 && r->size(0) == teacher.size(0) && r->is_contiguous() && r->scalar_type() == acc, op,
                ": the row scalings must be contiguous (N,) tensors of column_shift's dtype");
  }
}

// Calls body(teacher's data, a zero of the accumulation type) for the teacher's dtype and column_shift's.
template <typename F>
void dispatch(const at::Tensor& teacher, const at::Tensor& shift, F&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "sinkhorn_knopp_cpu", [&] {
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    if (shift.scalar_type() == at::kDouble) {
      body(t, double(0));
    } else {
      body(t, float(0));
    }
  });
}

void sinkhorn_knopp_column_cpu_(const at::Tensor& teacher, at::Tensor& shift, const at::Tensor& row_max,
                                const at::Tensor& row_inv_norm, double teacher_temp) {
  check_args("sinkhorn_knopp_column_cpu_", teacher, shift, row_max, row_inv_norm);
  const Dims d{teacher.size(0), teacher.size(1)};
  const int64_t n_chunks = (d.cols + kColumns - 1) / kColumns;
  dispatch(teacher, shift, [&](const auto* t, auto acc_zero) {
    using acc_t = decltype(acc_zero);
    acc_t* s = shift.data_ptr<acc_t>();
    const acc_t* rm = row_max.const_data_ptr<acc_t>();
    const acc_t* rn = row_inv_norm.const_data_ptr<acc_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> col_max(kColumns), col_sum(kColumns);
      std::vector<acc_t> block_sum(kColumns);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t lo = c * kColumns;
        column_chunk(t, s, rm, rn, d, lo, std::min(kColumns, d.cols - lo), 1.0 / teacher_temp, teacher_temp,
                     col_max.data(), block_sum.data(), col_sum.data());
      }
    });
  });
}

void sinkhorn_knopp_row_cpu_(const at::Tensor& teacher, const at::Tensor& shift, at::Tensor& row_max,
                             at::Tensor& row_inv_norm, at::Tensor& entropy, double teacher_temp) {
  check_args("sinkhorn_knopp_row_cpu_", teacher, shift, row_max, row_inv_norm);
  TORCH_CHECK(entropy.sizes() == row_max.sizes() && entropy.is_contiguous() &&
                  entropy.scalar_type() == shift.scalar_type(),
              "sinkhorn_knopp_row_cpu_: entropy must be a contiguous (N,) tensor of column_shift's dtype");
  const int64_t k = teacher.size(1);
  dispatch(teacher, shift, [&](const auto* t, auto acc_zero) {
    using acc_t = decltype(acc_zero);
    const acc_t* s = shift.const_data_ptr<acc_t>();
    acc_t* rm = row_max.data_ptr<acc_t>();
    acc_t* rn = row_inv_norm.data_ptr<acc_t>();
    acc_t* h = entropy.data_ptr<acc_t>();
    at::parallel_for(0, teacher.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) row_pass(t + i * k, s, k, 1.0 / teacher_temp, rm + i, rn + i, h + i);
    });
  });
}

at::Tensor sinkhorn_knopp_write_cpu(const at::Tensor& teacher, const at::Tensor& shift, const at::Tensor& row_max,
                                    const at::Tensor& row_inv_norm, double teacher_temp) {
  check_args("sinkhorn_knopp_write_cpu", teacher, shift, row_max, row_inv_norm);
  at::Tensor out = at::empty(teacher.sizes(), shift.options());
  const int64_t k = teacher.size(1);
  dispatch(teacher, shift, [&](const auto* t, auto acc_zero) {
    using acc_t = decltype(acc_zero);
    const acc_t* s = shift.const_data_ptr<acc_t>();
    const acc_t* rm = row_max.const_data_ptr<acc_t>();
    const acc_t* rn = row_inv_norm.const_data_ptr<acc_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, teacher.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        given_target(t + i * k, s, 1.0 / teacher_temp, static_cast<double>(rm[i]), rn[i], k, o + i * k);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_kernels_C, m) {
  m.def("sinkhorn_knopp_column_cpu_(Tensor teacher, Tensor(a!) column_shift, Tensor row_max, Tensor row_inv_norm, "
        "float teacher_temp) -> ()");
  m.def("sinkhorn_knopp_row_cpu_(Tensor teacher, Tensor column_shift, Tensor(a!) row_max, Tensor(b!) row_inv_norm, "
        "Tensor(c!) entropy, float teacher_temp) -> ()");
  m.def("sinkhorn_knopp_write_cpu(Tensor teacher, Tensor column_shift, Tensor row_max, Tensor row_inv_norm, "
        "float teacher_temp) -> Tensor");
}

TORCH_LIBRARY_IMPL(dino_kernels_C, CPU, m) {
  m.impl("sinkhorn_knopp_column_cpu_", &sinkhorn_knopp_column_cpu_);
  m.impl("sinkhorn_knopp_row_cpu_", &sinkhorn_knopp_row_cpu_);
  m.impl("sinkhorn_knopp_write_cpu", &sinkhorn_knopp_write_cpu);
}
