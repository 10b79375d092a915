// Stochastic depth's row kernels on CPU, the twins of the Triton kernels in dino_kernels/stochastic_depth.py:
//
//   gather_rows_cpu:    out[j] = alpha * scaling * src[index[j]], and with `other` also
//                       partial = sum_j sum_tokens src[index[j]] * other[j]   (the gradient of scaling, per feature);
//   index_add_rows_cpu: out[b] = x[b] + alpha * scaling * sum_{j: index[j] = b} src[j]   (zeros instead of x when x is
//                       absent).
//
// Every tensor is rows of (tokens, width) elements, one row per sample; `scaling` (width,) is LayerScale (absent: 1).
// Math in fp32 (fp64 for fp64), rounded once to the output dtype; an index may be absent (the identity: row j is
// row b). The index-add sums a row's contributions in index order (a counting sort, stable), so duplicates give the
// same result whatever the thread count, and `partial` is summed over fixed chunks of rows, then over the chunks in
// order: deterministic too. Each output row is written by one thread, in one pass that also copies x (the rows nobody
// adds to): the torch ops this replaces took a copy, an index_add_ and a dtype conversion.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu_math.h"

namespace {

// Rows per chunk of the gather's `partial` sums (fixed, so the summation order does not depend on the threads).
constexpr int64_t kPartialChunkRows = 16;
// Elements per unit of parallel work, so that small rows are handed out many at a time.
constexpr int64_t kGrainElements = 1 << 14;

int64_t grain_rows(int64_t row_numel) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row_numel, 1));
}

// The source row of output row j: index[j], or j without an index.
struct RowIndex {
  const void* data = nullptr;
  bool is_int32 = false;
  int64_t stride = 1;
  int64_t operator[](int64_t j) const {
    if (data == nullptr) return j;
    return is_int32 ? static_cast<const int32_t*>(data)[j * stride] : static_cast<const int64_t*>(data)[j * stride];
  }
};

RowIndex row_index(const std::optional<at::Tensor>& index) {
  if (!index.has_value()) return {};
  return {index->data_ptr(), index->scalar_type() == at::kInt, index->stride(0)};
}

void check_index(const std::optional<at::Tensor>& index, int64_t length, int64_t rows, const char* op) {
  if (!index.has_value()) return;
  TORCH_CHECK(index->device().is_cpu() && index->dim() == 1 &&
                  (index->scalar_type() == at::kLong || index->scalar_type() == at::kInt),
              op, ": index must be a 1-d int64 or int32 CPU tensor");
  TORCH_CHECK(index->size(0) == length, op, ": index must have one entry per src row");
  const RowIndex at = row_index(index);
  for (int64_t j = 0; j < length; ++j) {
    const int64_t row = at[j];
    TORCH_CHECK(row >= 0 && row < rows, op, ": index holds a row number out of range");
  }
}

// (width,) scaling in the accumulation dtype, or absent.
void check_scaling(const std::optional<at::Tensor>& scaling, at::ScalarType acc_type, const char* op) {
  if (!scaling.has_value()) return;
  TORCH_CHECK(scaling->device().is_cpu() && scaling->dim() == 1 && scaling->is_contiguous() &&
                  scaling->scalar_type() == acc_type && scaling->size(0) > 0,
              op, ": scaling must be a contiguous 1-d CPU tensor in the accumulation dtype (float32, float64 for "
              "float64 rows)");
}

at::ScalarType acc_type_of(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// Row length (elements per sample) of a tensor with at least one dim: the product of its trailing dims.
int64_t row_numel(const at::Tensor& t) {
  int64_t numel = 1;
  for (int64_t i = 1; i < t.dim(); ++i) numel *= t.size(i);
  return numel;
}

// Output rows [j0, j1) of the gather; with `other`, their product sums into `part` (width,).
template <typename T, typename acc_t>
DK_VECTOR_CLONES void gather_rows(const T* src, RowIndex index, T* out, const acc_t* scaling, const T* other,
                                  acc_t* part, int64_t j0, int64_t j1, int64_t tokens, int64_t width, acc_t alpha) {
  const int64_t numel = tokens * width;
  if (part != nullptr) std::fill(part, part + width, acc_t(0));
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t m = 0; m < tokens; ++m) {
      const T* in = src + index[j] * numel + m * width;
      T* dst = out + j * numel + m * width;
      if (scaling != nullptr) {
#pragma omp simd
        for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<T>(alpha * scaling[d] * static_cast<acc_t>(in[d]));
      } else {
#pragma omp simd
        for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<T>(alpha * static_cast<acc_t>(in[d]));
      }
      if (part != nullptr) {
        const T* other_m = other + j * numel + m * width;
#pragma omp simd
        for (int64_t d = 0; d < width; ++d) part[d] += static_cast<acc_t>(in[d]) * static_cast<acc_t>(other_m[d]);
      }
    }
  }
}

// Output rows [b0, b1) of the index-add; `sum` is scratch of a row's length (for rows with several contributions).
template <typename T, typename acc_t>
DK_VECTOR_CLONES void index_add_rows(const T* x, const int64_t* seg_start, const int64_t* seg_rows, const T* src,
                                     T* out, const acc_t* scaling, int64_t b0, int64_t b1, int64_t tokens,
                                     int64_t width, acc_t alpha, acc_t* sum) {
  const int64_t numel = tokens * width;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = seg_start == nullptr ? b : seg_start[b];
    const int64_t end = seg_start == nullptr ? b + 1 : seg_start[b + 1];
    const T* x_b = x != nullptr ? x + b * numel : nullptr;
    T* out_b = out + b * numel;
    if (end == begin) {  // nobody adds to this row: a copy of x, or zeros
      if (x_b != nullptr) {
        std::copy(x_b, x_b + numel, out_b);
      } else {
        std::fill(out_b, out_b + numel, T(0));
      }
      continue;
    }
    const T* added = nullptr;  // the one row added, or nullptr when `sum` holds several
    if (end - begin == 1) {
      added = src + (seg_rows == nullptr ? begin : seg_rows[begin]) * numel;
    } else {
      const T* first = src + seg_rows[begin] * numel;
#pragma omp simd
      for (int64_t e = 0; e < numel; ++e) sum[e] = static_cast<acc_t>(first[e]);
      for (int64_t p = begin + 1; p < end; ++p) {
        const T* next = src + seg_rows[p] * numel;
#pragma omp simd
        for (int64_t e = 0; e < numel; ++e) sum[e] += static_cast<acc_t>(next[e]);
      }
    }
    for (int64_t m = 0; m < tokens; ++m) {
      const int64_t o = m * width;
#pragma omp simd
      for (int64_t d = 0; d < width; ++d) {
        const acc_t update = added != nullptr ? static_cast<acc_t>(added[o + d]) : sum[o + d];
        const acc_t scaled = alpha * (scaling != nullptr ? scaling[d] * update : update);
        out_b[o + d] = static_cast<T>(x_b != nullptr ? static_cast<acc_t>(x_b[o + d]) + scaled : scaled);
      }
    }
  }
}

// Returns (out (k, *src.shape[1:]) in src's dtype, partial (width,) in the accumulation dtype, or (0,) without
// `other`). src and other contiguous; index absent for the identity.
std::tuple<at::Tensor, at::Tensor> gather_rows_cpu(const at::Tensor& src, const std::optional<at::Tensor>& index,
                                                   double alpha, const std::optional<at::Tensor>& scaling,
                                                   const std::optional<at::Tensor>& other, int64_t width) {
  const char* op = "gather_rows_cpu";
  TORCH_CHECK(src.device().is_cpu() && src.dim() >= 1 && src.is_contiguous(), op,
              ": src must be a contiguous CPU tensor");
  const int64_t n_out = index.has_value() ? index->size(0) : src.size(0);
  check_index(index, n_out, src.size(0), op);
  const at::ScalarType acc_type = acc_type_of(src.scalar_type());
  check_scaling(scaling, acc_type, op);
  const int64_t numel = row_numel(src);
  TORCH_CHECK(width > 0 && numel % width == 0 && (!scaling.has_value() || scaling->size(0) == width), op,
              ": width must divide the row length (and be the length of scaling)");
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[0] = n_out;
  at::Tensor out = at::empty(shape, src.options());
  if (other.has_value()) {
    TORCH_CHECK(other->sizes() == out.sizes() && other->scalar_type() == src.scalar_type() &&
                    other->device().is_cpu() && other->is_contiguous(),
                op, ": other must be a contiguous CPU tensor shaped like the output, in src's dtype");
  }
  const int64_t n_chunks = (n_out + kPartialChunkRows - 1) / kPartialChunkRows;
  // One row of partial sums per chunk of kPartialChunkRows output rows (the parallel unit).
  at::Tensor partials = at::zeros({other.has_value() ? n_chunks : 0, width}, src.options().dtype(acc_type));
  if (n_out > 0 && numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_rows_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* other_data = other.has_value() ? other->const_data_ptr<scalar_t>() : nullptr;
      acc_t* partial_data = other.has_value() ? partials.data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t chunk = c0; chunk < c1; ++chunk) {
          gather_rows<scalar_t, acc_t>(src.const_data_ptr<scalar_t>(), row_index(index), out.data_ptr<scalar_t>(),
                                       scaling.has_value() ? scaling->const_data_ptr<acc_t>() : nullptr, other_data,
                                       partial_data != nullptr ? partial_data + chunk * width : nullptr,
                                       chunk * kPartialChunkRows, std::min(n_out, (chunk + 1) * kPartialChunkRows),
                                       numel / width, width, static_cast<acc_t>(alpha));
        }
      });
    });
  }
  if (!other.has_value()) return {out, partials.new_empty({0})};
  // The chunks' partial sums, added in chunk order (in place into the first chunk's row).
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "gather_rows_cpu_partial", [&] {
    scalar_t* rows = partials.data_ptr<scalar_t>();
    for (int64_t c = 1; c < partials.size(0); ++c) {
      for (int64_t d = 0; d < width; ++d) rows[d] += rows[c * width + d];
    }
  });
  return {out, partials.size(0) > 0 ? partials[0].clone() : partials.new_zeros({width})};
}

// Returns out (rows, *src.shape[1:]) in src's dtype. x (rows, *src.shape[1:]) in src's dtype or absent (zeros);
// src contiguous, x contiguous; index absent for the identity (src has `rows` rows).
at::Tensor index_add_rows_cpu(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& index,
                              const at::Tensor& src, int64_t rows, double alpha,
                              const std::optional<at::Tensor>& scaling, int64_t width) {
  const char* op = "index_add_rows_cpu";
  TORCH_CHECK(src.device().is_cpu() && src.dim() >= 1 && src.is_contiguous() && rows >= 0, op,
              ": src must be a contiguous CPU tensor");
  const int64_t n_src = src.size(0);
  TORCH_CHECK(index.has_value() || n_src == rows, op, ": without an index, src must have `rows` rows");
  check_index(index, n_src, rows, op);
  const at::ScalarType acc_type = acc_type_of(src.scalar_type());
  check_scaling(scaling, acc_type, op);
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[0] = rows;
  if (x.has_value()) {
    TORCH_CHECK(x->sizes() == at::IntArrayRef(shape) && x->scalar_type() == src.scalar_type() &&
                    x->device().is_cpu() && x->is_contiguous(),
                op, ": x must be a contiguous CPU tensor of `rows` rows shaped like src's, in src's dtype");
  }
  const int64_t numel = row_numel(src);
  TORCH_CHECK(width > 0 && (numel == 0 || numel % width == 0) && (!scaling.has_value() || scaling->size(0) == width),
              op, ": width must divide the row length (and be the length of scaling)");
  at::Tensor out = at::empty(shape, src.options());
  if (rows == 0 || numel == 0) return out;
  // CSR segments of the index by a stable counting sort: row b sums src rows seg_rows[seg_start[b]:seg_start[b+1]].
  std::vector<int64_t> seg_start, seg_rows;
  if (index.has_value()) {
    const RowIndex at = row_index(index);
    seg_start.assign(static_cast<size_t>(rows + 1), 0);
    for (int64_t j = 0; j < n_src; ++j) ++seg_start[at[j] + 1];
    for (int64_t b = 0; b < rows; ++b) seg_start[b + 1] += seg_start[b];
    std::vector<int64_t> fill(seg_start.begin(), seg_start.end() - 1);
    seg_rows.resize(static_cast<size_t>(n_src));
    for (int64_t j = 0; j < n_src; ++j) seg_rows[fill[at[j]]++] = j;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "index_add_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.has_value() ? x->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* scaling_data = scaling.has_value() ? scaling->const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, rows, grain_rows(numel), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> sum(index.has_value() ? static_cast<size_t>(numel) : 0);
      index_add_rows<scalar_t, acc_t>(x_data, index.has_value() ? seg_start.data() : nullptr,
                                      index.has_value() ? seg_rows.data() : nullptr, src.const_data_ptr<scalar_t>(),
                                      out.data_ptr<scalar_t>(), scaling_data, b0, b1, numel / width, width,
                                      static_cast<acc_t>(alpha), sum.data());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_kernels_C, m) {
  m.def("gather_rows_cpu(Tensor src, Tensor? index, float alpha, Tensor? scaling, Tensor? other, int width) -> "
        "(Tensor, Tensor)");
  m.def("index_add_rows_cpu(Tensor? x, Tensor? index, Tensor src, int rows, float alpha, Tensor? scaling, "
        "int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(dino_kernels_C, CPU, m) {
  m.impl("gather_rows_cpu", &gather_rows_cpu);
  m.impl("index_add_rows_cpu", &index_add_rows_cpu);
}
