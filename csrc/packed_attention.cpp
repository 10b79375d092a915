// Packed block-diagonal attention on CPU, forward and backward: each (sequence, head) of the packed (T, H, D)
// tokens is one task, and a thread does the whole of a task, so that no two threads ever write the same row.
//
// A task first copies its sequence's q, k, v rows of its head into per-thread scratch in the accumulation type
// (fp32 for fp16/bf16/fp32, fp64 for fp64): this reads strided views such as qkv.unbind(1) and half types once,
// and lays K (and V in the backward) out transposed, (D, n), so that every product is one small matrix product,
// `matmul`, whose micro-kernel runs over contiguous, zero-padded tiles of kCols columns. Queries then go kBlockRows
// at a time through
//   S = Q K^T (kBlockRows x n), full rows: sequences are at most a few hundred tokens, so the block's scores stay in
//   L1 and their softmax needs no online rescaling: m = max_j S_ij, P_ij = exp((S_ij - m) scale) (the difference of
//   unscaled scores first, exact when they are close), l_i = sum_j P_ij, O_i = (P V)_i / l_i, LSE_i = m scale +
//   log l_i;
// and in the backward, with P recomputed from the saved LSE (and renormalised, see backward_task),
//   P = exp(S scale - LSE), dP = dO V^T, delta_i = sum_j P_ij dP_ij, dS = P * (dP - delta), dV += P^T dO,
//   dK += dS^T Q, dQ = dS K scale
// (P^T and dS^T are transposed into scratch, and dK is scaled once at the end). Nothing of size (n, n) is
// materialised.
//
// Tasks are handed out longest sequence first from a shared counter, so the few long global crops start at once
// and the many short local crops fill in behind them, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_math.h"

namespace {

using dk::exp_acc;

// Query rows handled per block: their scores (kBlockRows, n) stay in L1, and so does the slice of K^T (or of V)
// that the block's micro-kernel calls share.
constexpr int64_t kBlockRows = 16;
// Rows of one micro-kernel call: their kRows x kCols accumulators stay in registers while a row of the right-hand
// matrix is read once for all of them.
constexpr int kRows = 4;
// Columns of a micro-kernel tile: one AVX-512 register of fp32 (two of AVX2). Scratch rows are zero-padded to a
// multiple of it, so the innermost loops have a fixed trip count and no tail.
constexpr int64_t kCols = 16;

inline int64_t round_up(int64_t x) { return (x + kCols - 1) / kCols * kCols; }

// One head of a (T, H, D) tensor whose last dim is contiguous, from token `start` on: row i is data + i * stride.
template <typename T>
struct Rows {
  T* data;
  int64_t stride;
  T* operator[](int64_t i) const { return data + i * stride; }
};

template <typename T>
Rows<T> head_rows(const at::Tensor& t, int64_t start, int64_t head) {
  return {static_cast<T*>(t.data_ptr()) + start * t.stride(0) + head * t.stride(1), t.stride(0)};
}

// (n, dims) rows -> dst (n, dims_pad), columns past dims zero.
template <typename T, typename acc_t>
DK_INLINE void load_rows(const Rows<const T>& src, int64_t n, int64_t dims, int64_t dims_pad, acc_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const T* in = src[i];
    acc_t* row = dst + i * dims_pad;
#pragma omp simd
    for (int64_t d = 0; d < dims; ++d) row[d] = static_cast<acc_t>(in[d]);
    std::fill(row + dims, row + dims_pad, acc_t(0));
  }
}

// (n, dims) rows -> dst (dims, cols_pad) transposed, columns past n zero.
template <typename T, typename acc_t>
DK_INLINE void load_transposed(const Rows<const T>& src, int64_t n, int64_t dims, int64_t cols_pad, acc_t* dst) {
  for (int64_t d = 0; d < dims; ++d) std::fill(dst + d * cols_pad + n, dst + (d + 1) * cols_pad, acc_t(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* in = src[i];
    for (int64_t d = 0; d < dims; ++d) dst[d * cols_pad + i] = static_cast<acc_t>(in[d]);
  }
}

// dst (cols, rows) = src (rows, cols) transposed; strides ld_src and ld_dst.
template <typename acc_t>
DK_INLINE void transpose(const acc_t* src, int64_t ld_src, int64_t rows, int64_t cols, acc_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + r] = src[r * ld_src + j];
  }
}

// The micro-kernel: c (R, kCols) = [c +] a (R, inner) @ b (inner, kCols); row strides lda, ldb, ldc.
template <int R, typename acc_t>
DK_INLINE void tile(const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, int64_t inner, acc_t* c, int64_t ldc,
                    bool accumulate) {
  acc_t acc[R][kCols];
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int64_t jj = 0; jj < kCols; ++jj) acc[r][jj] = accumulate ? c[r * ldc + jj] : acc_t(0);
  }
  for (int64_t x = 0; x < inner; ++x) {
    const acc_t* b_x = b + x * ldb;
    for (int r = 0; r < R; ++r) {
      const acc_t a_rx = a[r * lda + x];
#pragma omp simd
      for (int64_t jj = 0; jj < kCols; ++jj) acc[r][jj] += a_rx * b_x[jj];
    }
  }
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int64_t jj = 0; jj < kCols; ++jj) c[r * ldc + jj] = acc[r][jj];
  }
}

// c (m, cols) = [c +] a (m, inner) @ b (inner, cols), cols a multiple of kCols: every product of the attention, the
// scores S = Q K^T (b = K^T), P V, dS K, and the transposed ones dV = P^T dO, dK = dS^T Q (a = P^T, dS^T). Column
// tiles outermost, so that the kCols-wide slice of b is read from L1 by all the row groups.
template <typename acc_t>
DK_INLINE void matmul(int64_t m, int64_t cols, int64_t inner, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                      acc_t* c, int64_t ldc, bool accumulate) {
  for (int64_t j0 = 0; j0 < cols; j0 += kCols) {
    for (int64_t r0 = 0; r0 < m; r0 += kRows) {
      const acc_t* a_r = a + r0 * lda;
      acc_t* c_r = c + r0 * ldc + j0;
      switch (std::min<int64_t>(kRows, m - r0)) {  // the rows left below kRows at the end
        case 1: tile<1>(a_r, lda, b + j0, ldb, inner, c_r, ldc, accumulate); break;
        case 2: tile<2>(a_r, lda, b + j0, ldb, inner, c_r, ldc, accumulate); break;
        case 3: tile<3>(a_r, lda, b + j0, ldb, inner, c_r, ldc, accumulate); break;
        default: tile<kRows>(a_r, lda, b + j0, ldb, inner, c_r, ldc, accumulate);
      }
    }
  }
}
static_assert(kRows == 4, "matmul spells out the row counts below kRows");

// Scratch elements of a forward task over n tokens: Q, V (n, dims_pad), K^T (dims, cols_pad), scores
// (kBlockRows, cols_pad), output rows (kBlockRows, dims_pad).
inline int64_t forward_scratch(int64_t n, int64_t dims) {
  const int64_t dims_pad = round_up(dims), cols_pad = round_up(n);
  return 2 * n * dims_pad + dims * cols_pad + kBlockRows * (cols_pad + dims_pad);
}

template <typename T, typename acc_t>
DK_VECTOR_CLONES void forward_task(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                   at::Tensor& lse, int64_t start, int64_t n, int64_t head, acc_t scale,
                                   acc_t* scratch) {
  const int64_t dims = q.size(2), dims_pad = round_up(dims), cols_pad = round_up(n);
  acc_t* q_s = scratch;
  acc_t* v_s = q_s + n * dims_pad;
  acc_t* k_t = v_s + n * dims_pad;
  acc_t* s = k_t + dims * cols_pad;
  acc_t* o = s + kBlockRows * cols_pad;
  load_rows(head_rows<const T>(q, start, head), n, dims, dims_pad, q_s);
  load_rows(head_rows<const T>(v, start, head), n, dims, dims_pad, v_s);
  load_transposed(head_rows<const T>(k, start, head), n, dims, cols_pad, k_t);
  const Rows<T> out_rows = head_rows<T>(out, start, head);
  acc_t* lse_row = lse.data_ptr<acc_t>() + head * lse.stride(0) + start * lse.stride(1);

  for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, n - i0);
    matmul(rows, cols_pad, dims, q_s + i0 * dims_pad, dims_pad, k_t, cols_pad, s, cols_pad, false);
    acc_t inv_sum[kBlockRows];
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* s_r = s + r * cols_pad;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) m = s_r[j] > m ? s_r[j] : m;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t e = exp_acc((s_r[j] - m) * scale);
        s_r[j] = e;
        sum += e;
      }
      inv_sum[r] = acc_t(1) / sum;
      lse_row[(i0 + r) * lse.stride(1)] = m * scale + std::log(sum);
    }
    matmul(rows, dims_pad, n, s, cols_pad, v_s, dims_pad, o, dims_pad, false);
    for (int64_t r = 0; r < rows; ++r) {
      T* out_r = out_rows[i0 + r];
      const acc_t* o_r = o + r * dims_pad;
#pragma omp simd
      for (int64_t d = 0; d < dims; ++d) out_r[d] = static_cast<T>(o_r[d] * inv_sum[r]);
    }
  }
}

// Scratch elements of a backward task over n tokens: Q, K, dO, dK, dV (n, dims_pad); K^T, V^T (dims, cols_pad);
// P, dS (kBlockRows, cols_pad); their transposes (n, kBlockRows); dQ rows (kBlockRows, dims_pad).
inline int64_t backward_scratch(int64_t n, int64_t dims) {
  const int64_t dims_pad = round_up(dims), cols_pad = round_up(n);
  return 5 * n * dims_pad + 2 * dims * cols_pad + kBlockRows * (2 * cols_pad + 2 * n + dims_pad);
}

template <typename T, typename acc_t>
DK_VECTOR_CLONES void backward_task(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& lse,
                                    at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int64_t start, int64_t n,
                                    int64_t head, acc_t scale, acc_t* scratch) {
  const int64_t dims = q.size(2), dims_pad = round_up(dims), cols_pad = round_up(n);
  acc_t* q_s = scratch;
  acc_t* k_s = q_s + n * dims_pad;
  acc_t* do_s = k_s + n * dims_pad;
  acc_t* dk_s = do_s + n * dims_pad;
  acc_t* dv_s = dk_s + n * dims_pad;
  acc_t* k_t = dv_s + n * dims_pad;
  acc_t* v_t = k_t + dims * cols_pad;
  acc_t* p = v_t + dims * cols_pad;
  acc_t* ds = p + kBlockRows * cols_pad;
  acc_t* p_t = ds + kBlockRows * cols_pad;
  acc_t* ds_t = p_t + n * kBlockRows;
  acc_t* dq_s = ds_t + n * kBlockRows;
  load_rows(head_rows<const T>(q, start, head), n, dims, dims_pad, q_s);
  load_rows(head_rows<const T>(k, start, head), n, dims, dims_pad, k_s);
  load_rows(head_rows<const T>(grad_out, start, head), n, dims, dims_pad, do_s);
  load_transposed(head_rows<const T>(k, start, head), n, dims, cols_pad, k_t);
  load_transposed(head_rows<const T>(v, start, head), n, dims, cols_pad, v_t);
  std::fill(dk_s, dk_s + 2 * n * dims_pad, acc_t(0));  // dK and dV
  const acc_t* lse_row = lse.const_data_ptr<acc_t>() + head * lse.stride(0) + start * lse.stride(1);
  const Rows<T> dq_rows = head_rows<T>(dq, start, head);

  for (int64_t i0 = 0; i0 < n; i0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, n - i0);
    const acc_t* q_block = q_s + i0 * dims_pad;
    const acc_t* do_block = do_s + i0 * dims_pad;
    matmul(rows, cols_pad, dims, q_block, dims_pad, k_t, cols_pad, p, cols_pad, false);    // S
    matmul(rows, cols_pad, dims, do_block, dims_pad, v_t, cols_pad, ds, cols_pad, false);  // dO V^T
    for (int64_t r = 0; r < rows; ++r) {
      // P from the saved LSE, then divided by its row sum: the LSE carries an fp32 rounding of its value (~1e-5
      // where scores are ~-200), and a P that sums to exactly 1 with delta = rowsum(P * dP) makes dS sum to 0 over
      // the row, as it must. rowsum(dO * O) would be the same delta from the stored O, but off by O's rounding, and
      // an error in a row of dS that does not sum to 0 is amplified in dQ = dS K whenever the keys share a large
      // common component.
      const acc_t lse_r = lse_row[(i0 + r) * lse.stride(1)];
      acc_t* p_r = p + r * cols_pad;
      acc_t* ds_r = ds + r * cols_pad;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t e = exp_acc(p_r[j] * scale - lse_r);
        p_r[j] = e;
        sum += e;
      }
      const acc_t inv_sum = acc_t(1) / sum;
      acc_t delta = 0;
#pragma omp simd reduction(+ : delta)
      for (int64_t j = 0; j < n; ++j) {
        p_r[j] *= inv_sum;
        delta += p_r[j] * ds_r[j];
      }
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ds_r[j] = p_r[j] * (ds_r[j] - delta);
    }
    transpose(p, cols_pad, rows, n, p_t, kBlockRows);
    transpose(ds, cols_pad, rows, n, ds_t, kBlockRows);
    matmul(n, dims_pad, rows, p_t, kBlockRows, do_block, dims_pad, dv_s, dims_pad, true);  // dV += P^T dO
    matmul(n, dims_pad, rows, ds_t, kBlockRows, q_block, dims_pad, dk_s, dims_pad, true);  // dK += dS^T Q
    matmul(rows, dims_pad, n, ds, cols_pad, k_s, dims_pad, dq_s, dims_pad, false);         // dQ = dS K
    for (int64_t r = 0; r < rows; ++r) {
      T* dq_r = dq_rows[i0 + r];
      const acc_t* dq_sr = dq_s + r * dims_pad;
#pragma omp simd
      for (int64_t d = 0; d < dims; ++d) dq_r[d] = static_cast<T>(dq_sr[d] * scale);
    }
  }
  const Rows<T> dk_rows = head_rows<T>(dk, start, head), dv_rows = head_rows<T>(dv, start, head);
  for (int64_t i = 0; i < n; ++i) {
    T* dk_r = dk_rows[i];
    T* dv_r = dv_rows[i];
    const acc_t* dk_sr = dk_s + i * dims_pad;
    const acc_t* dv_sr = dv_s + i * dims_pad;
#pragma omp simd
    for (int64_t d = 0; d < dims; ++d) {
      dk_r[d] = static_cast<T>(dk_sr[d] * scale);
      dv_r[d] = static_cast<T>(dv_sr[d]);
    }
  }
}

// The non-empty sequences as (start, length), longest first, from cu_seqlens (checked: 0 first, T last,
// non-decreasing).
std::vector<std::pair<int64_t, int64_t>> sequences_longest_first(const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.numel() >= 1,
              "packed_attention_cpu: cu_seqlens must be a 1-d int32 CPU tensor");
  const at::Tensor bounds_tensor = cu_seqlens.contiguous();
  const int32_t* bounds = bounds_tensor.const_data_ptr<int32_t>();
  const int64_t n_seqs = cu_seqlens.numel() - 1;
  TORCH_CHECK(bounds[0] == 0 && bounds[n_seqs] == total, "packed_attention_cpu: cu_seqlens must run from 0 to T");
  std::vector<std::pair<int64_t, int64_t>> seqs;
  for (int64_t i = 0; i < n_seqs; ++i) {
    TORCH_CHECK(bounds[i] <= bounds[i + 1], "packed_attention_cpu: cu_seqlens must be non-decreasing");
    if (bounds[i + 1] > bounds[i]) seqs.emplace_back(bounds[i], bounds[i + 1] - bounds[i]);
  }
  std::stable_sort(seqs.begin(), seqs.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  return seqs;
}

// Runs task(start, n, head, scratch) for every (non-empty sequence, head): one parallel region whose threads take
// tasks from a shared counter (longest sequences first), each with its own scratch of scratch_size(n_max) elements.
template <typename acc_t, typename Task, typename ScratchSize>
void for_each_task(const std::vector<std::pair<int64_t, int64_t>>& seqs, int64_t heads, const ScratchSize& size,
                   const Task& task) {
  const int64_t n_tasks = static_cast<int64_t>(seqs.size()) * heads;
  if (n_tasks == 0) return;
  const int64_t scratch_size = size(seqs.front().second);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_tasks), 1, [&](int64_t, int64_t) {
    std::vector<acc_t> scratch(static_cast<size_t>(scratch_size));
    for (int64_t t = next++; t < n_tasks; t = next++) {
      const auto& [start, n] = seqs[t / heads];
      task(start, n, t % heads, scratch.data());
    }
  });
}

// q, k, v (and grad_out): (T, H, D) CPU tensors of one shape and dtype, each with a contiguous last dim.
void check_inputs(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor& q = **tensors.begin();
  TORCH_CHECK(q.dim() == 3, op, ": q must be (T, H, D)");
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type(), op,
                ": q, k, v (and grad_out) must have one shape and dtype");
    TORCH_CHECK(t->device().is_cpu(), op, ": all tensors must be on the CPU");
    TORCH_CHECK(t->stride(2) == 1 || t->size(2) <= 1, op, ": the last dim of every input must be contiguous");
  }
}

at::ScalarType lse_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// Returns (out (T, H, D) in the dtype of q, lse (H, T) in fp32, fp64 for fp64 inputs).
std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                            double scale) {
  check_inputs("packed_attention_fwd_cpu", {&q, &k, &v});
  const int64_t total = q.size(0), heads = q.size(1), dims = q.size(2);
  const auto seqs = sequences_longest_first(cu_seqlens, total);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({heads, total}, q.options().dtype(lse_type(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "packed_attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_task<acc_t>(
        seqs, heads, [&](int64_t n) { return forward_scratch(n, dims); },
        [&](int64_t start, int64_t n, int64_t head, acc_t* scratch) {
          forward_task<scalar_t, acc_t>(q, k, v, out, lse, start, n, head, static_cast<acc_t>(scale), scratch);
        });
  });
  return {out, lse};
}

// Returns (dq, dk, dv), (T, H, D) each in the dtype of q.
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    const at::Tensor& cu_seqlens, double scale) {
  check_inputs("packed_attention_bwd_cpu", {&q, &k, &v, &grad_out});
  const int64_t total = q.size(0), heads = q.size(1), dims = q.size(2);
  TORCH_CHECK(lse.device().is_cpu() && lse.dim() == 2 && lse.size(0) == heads && lse.size(1) == total &&
                  lse.scalar_type() == lse_type(q.scalar_type()),
              "packed_attention_bwd_cpu: lse must be (H, T), float32 (float64 for float64 inputs)");
  const auto seqs = sequences_longest_first(cu_seqlens, total);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "packed_attention_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_task<acc_t>(
        seqs, heads, [&](int64_t n) { return backward_scratch(n, dims); },
        [&](int64_t start, int64_t n, int64_t head, acc_t* scratch) {
          backward_task<scalar_t, acc_t>(grad_out, q, k, v, lse, dq, dk, dv, start, n, head,
                                         static_cast<acc_t>(scale), scratch);
        });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_kernels_C, m) {
  m.def("packed_attention_fwd_cpu(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale) -> (Tensor, Tensor)");
  m.def(
      "packed_attention_bwd_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor cu_seqlens, "
      "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dino_kernels_C, CPU, m) {
  m.impl("packed_attention_fwd_cpu", &packed_attention_fwd_cpu);
  m.impl("packed_attention_bwd_cpu", &packed_attention_bwd_cpu);
}
