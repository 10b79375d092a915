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
// Sequences of at most kShortSeq tokens (DINO's small crops at coarse patches: 2 to 10 tokens) skip all that: the
// copies, transposes and 16-column padding would cost more than their n^2 products. They go through
// forward_short / backward_short instead, which read the rows in place, keep a sequence's scores (n x n) on the
// stack and vectorise over the head dim; a task there is a chunk of consecutive short sequences, all heads.
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

// Longest sequence of the short path, and the tokens its tasks gather (consecutive short sequences, all heads), so
// that a task is long enough for the shared counter's cost not to matter.
constexpr int64_t kShortSeq = 16;
constexpr int64_t kShortChunkTokens = 128;

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

// A (T, H, D) tensor with a contiguous last dim (or lse (H, T), as token and head strides) as a raw pointer and
// strides, taken once per call: a tensor accessor per short sequence would cost as much as its arithmetic.
template <typename T>
struct HeadView {
  T* data;
  int64_t token_stride, head_stride;
  T* row(int64_t token, int64_t head) const { return data + token * token_stride + head * head_stride; }
};

template <typename T>
HeadView<T> head_view(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1)};
}

template <typename acc_t>
HeadView<acc_t> lse_view(const at::Tensor& lse) {
  return {static_cast<acc_t*>(lse.data_ptr()), lse.stride(1), lse.stride(0)};
}

// Everything the short path reads and writes. `out` is the forward's output or the backward's dQ; grad_out, dk and
// dv are the backward's.
template <typename T, typename acc_t>
struct ShortOperands {
  HeadView<const T> q, k, v, grad_out;
  HeadView<T> out, dk, dv;
  HeadView<acc_t> lse;
  int64_t heads, dims;
  acc_t scale;
};

// sum_d a[d] * b[d] in the accumulation type, over two rows read in place.
template <typename T, typename acc_t>
DK_INLINE acc_t dot(const T* a, const T* b, int64_t dims) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dims; ++d) sum += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return sum;
}

// acc (dims) += weight * row (dims).
template <typename T, typename acc_t>
DK_INLINE void add_scaled(acc_t* acc, acc_t weight, const T* row, int64_t dims) {
#pragma omp simd
  for (int64_t d = 0; d < dims; ++d) acc[d] += weight * static_cast<acc_t>(row[d]);
}

// The forward of one short sequence (n <= kShortSeq tokens from `start`), every head, with the maths of
// forward_task: per query row, scores s_j = q . k_j, m = max_j s_j, p_j = exp((s_j - m) scale), out = (sum_j p_j
// v_j) / sum_j p_j, LSE = m scale + log sum_j p_j. kDims > 0 is the head dim known at compile time (the loops over
// it unroll and the output row stays in registers); 0 reads it from `a`, with the output row in scratch (dims).
template <int kDims, typename T, typename acc_t>
DK_INLINE void forward_short_dims(const ShortOperands<T, acc_t>& a, int64_t start, int64_t n, acc_t* scratch) {
  const int64_t dims = kDims > 0 ? kDims : a.dims;
  acc_t local[kDims > 0 ? kDims : 1];
  acc_t* o = kDims > 0 ? local : scratch;
  acc_t p[kShortSeq];
  for (int64_t head = 0; head < a.heads; ++head) {
    for (int64_t i = 0; i < n; ++i) {
      const T* q_i = a.q.row(start + i, head);
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        p[j] = dot<T, acc_t>(q_i, a.k.row(start + j, head), dims);
        m = std::max(m, p[j]);
      }
      acc_t sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = exp_acc((p[j] - m) * a.scale);
        sum += p[j];
      }
      std::fill(o, o + dims, acc_t(0));
      for (int64_t j = 0; j < n; ++j) add_scaled(o, p[j], a.v.row(start + j, head), dims);
      const acc_t inv_sum = acc_t(1) / sum;
      T* out_i = a.out.row(start + i, head);
#pragma omp simd
      for (int64_t d = 0; d < dims; ++d) out_i[d] = static_cast<T>(o[d] * inv_sum);
      *a.lse.row(start + i, head) = m * a.scale + std::log(sum);
    }
  }
}

// The backward of one short sequence, every head, with the maths of backward_task: P from the saved LSE and
// renormalised, dP_ij = dO_i . v_j, delta_i = sum_j P_ij dP_ij, dS = P * (dP - delta), then dQ_i = scale sum_j dS_ij
// k_j, dK_j = scale sum_i dS_ij q_i, dV_j = sum_i P_ij dO_i. kDims as in forward_short_dims; 0 needs 2 * dims of
// scratch.
template <int kDims, typename T, typename acc_t>
DK_INLINE void backward_short_dims(const ShortOperands<T, acc_t>& a, int64_t start, int64_t n, acc_t* scratch) {
  const int64_t dims = kDims > 0 ? kDims : a.dims;
  acc_t local[kDims > 0 ? 2 * kDims : 1];
  acc_t* acc_a = kDims > 0 ? local : scratch;
  acc_t* acc_b = acc_a + dims;
  acc_t p[kShortSeq][kShortSeq], ds[kShortSeq][kShortSeq];
  for (int64_t head = 0; head < a.heads; ++head) {
    for (int64_t i = 0; i < n; ++i) {
      const T* q_i = a.q.row(start + i, head);
      const T* do_i = a.grad_out.row(start + i, head);
      const acc_t lse_i = *a.lse.row(start + i, head);
      acc_t sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        p[i][j] = exp_acc(dot<T, acc_t>(q_i, a.k.row(start + j, head), dims) * a.scale - lse_i);
        sum += p[i][j];
      }
      const acc_t inv_sum = acc_t(1) / sum;
      acc_t delta = 0;
      for (int64_t j = 0; j < n; ++j) {
        p[i][j] *= inv_sum;
        ds[i][j] = dot<T, acc_t>(do_i, a.v.row(start + j, head), dims);
        delta += p[i][j] * ds[i][j];
      }
      for (int64_t j = 0; j < n; ++j) ds[i][j] = p[i][j] * (ds[i][j] - delta);
    }
    for (int64_t i = 0; i < n; ++i) {
      std::fill(acc_a, acc_a + dims, acc_t(0));
      for (int64_t j = 0; j < n; ++j) add_scaled(acc_a, ds[i][j], a.k.row(start + j, head), dims);
      T* dq_i = a.out.row(start + i, head);
#pragma omp simd
      for (int64_t d = 0; d < dims; ++d) dq_i[d] = static_cast<T>(acc_a[d] * a.scale);
    }
    for (int64_t j = 0; j < n; ++j) {
      std::fill(acc_a, acc_a + 2 * dims, acc_t(0));  // dK_j and dV_j
      for (int64_t i = 0; i < n; ++i) {
        add_scaled(acc_a, ds[i][j], a.q.row(start + i, head), dims);
        add_scaled(acc_b, p[i][j], a.grad_out.row(start + i, head), dims);
      }
      T* dk_j = a.dk.row(start + j, head);
      T* dv_j = a.dv.row(start + j, head);
#pragma omp simd
      for (int64_t d = 0; d < dims; ++d) {
        dk_j[d] = static_cast<T>(acc_a[d] * a.scale);
        dv_j[d] = static_cast<T>(acc_b[d]);
      }
    }
  }
}

// The short path's entry points, one per instruction-set clone: DINO's head dims 32 and 64 compiled for their size.
template <typename T, typename acc_t>
DK_VECTOR_CLONES void forward_short(const ShortOperands<T, acc_t>& a, int64_t start, int64_t n, acc_t* scratch) {
  switch (a.dims) {
    case 32: forward_short_dims<32>(a, start, n, scratch); break;
    case 64: forward_short_dims<64>(a, start, n, scratch); break;
    default: forward_short_dims<0>(a, start, n, scratch);
  }
}

template <typename T, typename acc_t>
DK_VECTOR_CLONES void backward_short(const ShortOperands<T, acc_t>& a, int64_t start, int64_t n, acc_t* scratch) {
  switch (a.dims) {
    case 32: backward_short_dims<32>(a, start, n, scratch); break;
    case 64: backward_short_dims<64>(a, start, n, scratch); break;
    default: backward_short_dims<0>(a, start, n, scratch);
  }
}

// The tasks of one call, from cu_seqlens (checked: 0 first, T last, non-decreasing): the non-empty sequences longer
// than kShortSeq as (start, length), longest first, a task per (sequence, head); the short ones in order, cut into
// chunks of about kShortChunkTokens tokens, a task per chunk (chunk c is short_seqs[chunk_starts[c]:chunk_starts[c +
// 1]]).
struct Plan {
  std::vector<std::pair<int64_t, int64_t>> long_seqs;
  std::vector<std::pair<int64_t, int64_t>> short_seqs;
  std::vector<int64_t> chunk_starts;
};

Plan plan_tasks(const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.numel() >= 1,
              "packed_attention_cpu: cu_seqlens must be a 1-d int32 CPU tensor");
  const at::Tensor bounds_tensor = cu_seqlens.contiguous();
  const int32_t* bounds = bounds_tensor.const_data_ptr<int32_t>();
  const int64_t n_seqs = cu_seqlens.numel() - 1;
  TORCH_CHECK(bounds[0] == 0 && bounds[n_seqs] == total, "packed_attention_cpu: cu_seqlens must run from 0 to T");
  Plan plan;
  int64_t chunk_tokens = 0;
  for (int64_t i = 0; i < n_seqs; ++i) {
    TORCH_CHECK(bounds[i] <= bounds[i + 1], "packed_attention_cpu: cu_seqlens must be non-decreasing");
    const int64_t n = bounds[i + 1] - bounds[i];
    if (n > kShortSeq) {
      plan.long_seqs.emplace_back(bounds[i], n);
    } else if (n > 0) {
      if (chunk_tokens == 0) plan.chunk_starts.push_back(static_cast<int64_t>(plan.short_seqs.size()));
      plan.short_seqs.emplace_back(bounds[i], n);
      chunk_tokens += n;
      if (chunk_tokens >= kShortChunkTokens) chunk_tokens = 0;
    }
  }
  plan.chunk_starts.push_back(static_cast<int64_t>(plan.short_seqs.size()));
  std::stable_sort(plan.long_seqs.begin(), plan.long_seqs.end(),
                   [](const auto& a, const auto& b) { return a.second > b.second; });
  return plan;
}

// Runs long_task(start, n, head, scratch) for every (long sequence, head) and short_task(start, n, scratch) for every
// short sequence: one parallel region whose threads take tasks from a shared counter (long sequences first, longest
// first, then the chunks of short ones), each with its own scratch: long_scratch(longest n) elements, at least
// short_scratch.
template <typename acc_t, typename LongTask, typename ShortTask, typename ScratchSize>
void for_each_task(const Plan& plan, int64_t heads, const ScratchSize& long_scratch, int64_t short_scratch,
                   const LongTask& long_task, const ShortTask& short_task) {
  const int64_t n_long = static_cast<int64_t>(plan.long_seqs.size()) * heads;
  const int64_t n_tasks = n_long + static_cast<int64_t>(plan.chunk_starts.size()) - 1;
  if (n_tasks == 0) return;
  const int64_t scratch_size =
      std::max(short_scratch, plan.long_seqs.empty() ? int64_t(0) : long_scratch(plan.long_seqs.front().second));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_tasks), 1, [&](int64_t, int64_t) {
    std::vector<acc_t> scratch(static_cast<size_t>(scratch_size));
    for (int64_t t = next++; t < n_tasks; t = next++) {
      if (t < n_long) {
        const auto& [start, n] = plan.long_seqs[t / heads];
        long_task(start, n, t % heads, scratch.data());
        continue;
      }
      const int64_t chunk = t - n_long;
      for (int64_t i = plan.chunk_starts[chunk]; i < plan.chunk_starts[chunk + 1]; ++i) {
        short_task(plan.short_seqs[i].first, plan.short_seqs[i].second, scratch.data());
      }
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
  const Plan plan = plan_tasks(cu_seqlens, total);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({heads, total}, q.options().dtype(lse_type(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "packed_attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale_acc = static_cast<acc_t>(scale);
    const ShortOperands<scalar_t, acc_t> operands{head_view<const scalar_t>(q), head_view<const scalar_t>(k),
                                                  head_view<const scalar_t>(v), {},
                                                  head_view<scalar_t>(out), {}, {},
                                                  lse_view<acc_t>(lse), heads, dims, scale_acc};
    for_each_task<acc_t>(
        plan, heads, [&](int64_t n) { return forward_scratch(n, dims); }, dims,
        [&](int64_t start, int64_t n, int64_t head, acc_t* scratch) {
          forward_task<scalar_t, acc_t>(q, k, v, out, lse, start, n, head, scale_acc, scratch);
        },
        [&](int64_t start, int64_t n, acc_t* scratch) {
          forward_short<scalar_t, acc_t>(operands, start, n, scratch);
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
  const Plan plan = plan_tasks(cu_seqlens, total);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "packed_attention_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale_acc = static_cast<acc_t>(scale);
    const ShortOperands<scalar_t, acc_t> operands{head_view<const scalar_t>(q), head_view<const scalar_t>(k),
                                                  head_view<const scalar_t>(v), head_view<const scalar_t>(grad_out),
                                                  head_view<scalar_t>(dq), head_view<scalar_t>(dk),
                                                  head_view<scalar_t>(dv), lse_view<acc_t>(lse), heads, dims,
                                                  scale_acc};
    for_each_task<acc_t>(
        plan, heads, [&](int64_t n) { return backward_scratch(n, dims); }, 2 * dims,
        [&](int64_t start, int64_t n, int64_t head, acc_t* scratch) {
          backward_task<scalar_t, acc_t>(grad_out, q, k, v, lse, dq, dk, dv, start, n, head, scale_acc, scratch);
        },
        [&](int64_t start, int64_t n, acc_t* scratch) {
          backward_short<scalar_t, acc_t>(operands, start, n, scratch);
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
