// Shared by the CPU kernels of the DINO-family losses (dino_loss.cpp, ibot_patch_loss.cpp) and sinkhorn_knopp.cpp:
// the teacher target rows, centred softmax or given by Sinkhorn-Knopp scalings, and the student cross-entropy row
// that consumes them. Rows of length k; fp32 math for fp32/fp16/bf16 inputs (acc_t = float), fp64 for fp64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_math.h"

namespace dk {

// Sums over a row run in blocks: the vector lanes accumulate kSumBlock elements in acc_t, and the block totals are
// added in double, so the rounding error does not grow with the length summed (K, 262,144 columns and beyond; N
// rows in the column pass of sinkhorn_knopp.cpp).
constexpr int64_t kSumBlock = 1024;

// 1 if `condition` else 0, built from bits for the same reason as the mask in exp_acc: a bool-to-float conversion
// of a float comparison would not vectorise.
template <typename acc_t>
DK_INLINE acc_t indicator(bool condition);

template <>
DK_INLINE float indicator<float>(bool condition) {
  const int32_t bits = 0x3f800000 & -static_cast<int32_t>(condition);
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <>
DK_INLINE double indicator<double>(bool condition) {
  const int64_t bits = 0x3ff0000000000000LL & -static_cast<int64_t>(condition);
  double out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// The centred softmax target p = softmax((t - c) / tau_t) of one row, written to `prob`; returns its entropy. With
// u = (t - c) / tau_t, m = max u and e = exp(u - m), entropy = log z - sum_k e_k (u_k - m) / z: two terms >= 0. A
// sharp teacher (|u| up to ~100 at tau_t = 0.04, entropy -> 0) needs more care than the loss:
// - u is formed in double, where (t - c) * (1 / tau_t) carries no fp32 rounding of a number of size |u|, and only
//   u - m goes to acc_t for the exponential;
// - z = 1 + (tiny) is summed as n_max + rest (the e_k at the maximum are exactly 1) and
//   log z = log(n_max) + log1p(rest / n_max), so the fp32 rounding of z ~ 1 does not swamp the entropy.
template <typename T, typename acc_t>
DK_VECTOR_CLONES acc_t softmax_target(const T* t, const acc_t* c, double inv_temp, int64_t k, acc_t* prob) {
  double m = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < k; ++j) {
    const double u = (static_cast<double>(t[j]) - static_cast<double>(c[j])) * inv_temp;
    m = u > m ? u : m;
  }
  double n_max = 0, rest = 0, w = 0;
  for (int64_t lo = 0; lo < k; lo += kSumBlock) {
    const int64_t hi = std::min(k, lo + kSumBlock);
    acc_t n_block = 0, rest_block = 0, w_block = 0;
#pragma omp simd reduction(+ : n_block, rest_block, w_block)
    for (int64_t j = lo; j < hi; ++j) {
      const double u = (static_cast<double>(t[j]) - static_cast<double>(c[j])) * inv_temp;
      const acc_t shifted = static_cast<acc_t>(u - m);
      const acc_t e = exp_acc(shifted);
      // u == m rather than shifted == 0: the compiler may fuse u - m into an FMA, leaving a residual of ~1e-16.
      const acc_t at_max = indicator<acc_t>(u == m);  // then e == 1 (exactly, or to that residual)
      prob[j] = e;
      n_block += at_max;
      rest_block += e - at_max;
      w_block += e * shifted;
    }
    n_max += n_block;
    rest += rest_block;
    w += w_block;
  }
  const double z = n_max + rest;
  const acc_t inv_z = static_cast<acc_t>(1.0 / z);
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) prob[j] *= inv_z;
  return static_cast<acc_t>(std::log(n_max) + std::log1p(rest / n_max) - w / z);
}

// The target given by Sinkhorn-Knopp scalings, p_j = exp((t_j - shift_j) / tau_t - row_max) * row_inv_norm, written
// to `prob`; the exponent is formed in double as above (and as sinkhorn_knopp.cpp formed it for the row's max and
// normaliser).
template <typename T, typename acc_t>
DK_VECTOR_CLONES void given_target(const T* t, const acc_t* shift, double inv_temp, double row_max,
                                   acc_t row_inv_norm, int64_t k, acc_t* prob) {
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) {
    const double u = (static_cast<double>(t[j]) - static_cast<double>(shift[j])) * inv_temp;
    prob[j] = exp_acc(static_cast<acc_t>(u - row_max)) * row_inv_norm;
  }
}

// One student row s against a target q that sums to n_q (the sum of n_q teacher probability rows): with
// x = s / tau_s, returns sum_i CE(p_i, s) = n_q * LSE(x) - q . x and, when `grad` is not null, writes
// (n_q softmax(x) - q) * grad_scale there. `x` is scratch of length k.
template <typename S, typename acc_t>
DK_VECTOR_CLONES acc_t student_row(const S* s, const acc_t* q, acc_t n_q, acc_t inv_student_temp, acc_t grad_scale,
                                   int64_t k, acc_t* x, S* grad) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  double dot = 0;
  for (int64_t lo = 0; lo < k; lo += kSumBlock) {
    const int64_t hi = std::min(k, lo + kSumBlock);
    acc_t dot_block = 0;
#pragma omp simd reduction(max : m) reduction(+ : dot_block)
    for (int64_t j = lo; j < hi; ++j) {
      const acc_t xj = static_cast<acc_t>(s[j]) * inv_student_temp;
      x[j] = xj;
      m = xj > m ? xj : m;
      dot_block += q[j] * xj;
    }
    dot += dot_block;
  }
  double z = 0;
  for (int64_t lo = 0; lo < k; lo += kSumBlock) {
    const int64_t hi = std::min(k, lo + kSumBlock);
    acc_t z_block = 0;
#pragma omp simd reduction(+ : z_block)
    for (int64_t j = lo; j < hi; ++j) {
      const acc_t e = exp_acc(x[j] - m);
      x[j] = e;
      z_block += e;
    }
    z += z_block;
  }
  if (grad != nullptr) {
    const acc_t softmax_coef = static_cast<acc_t>(n_q * grad_scale / z);
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) grad[j] = static_cast<S>(x[j] * softmax_coef - q[j] * grad_scale);
  }
  return static_cast<acc_t>(n_q * (m + std::log(z)) - dot);
}

}  // namespace dk
