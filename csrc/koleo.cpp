// DINOv2's KoLeo loss on CPU, fused: z = x / max(|x|, eps) per row, each row's nearest neighbour (the other row of
// largest z_i . z_j, the diagonal counting as -1, ties to the lowest index), d_i = |z_i - z_nn + 1e-8| and
// loss = -mean_i log(d_i + eps); and its gradient with the neighbours held fixed.
//
// The neighbour search is a blocked Gram sweep that keeps only a running max/argmax per row: a task takes
// kTaskRows rows and walks the column panels on and above the diagonal, computing kRows x kCols tiles of dots in
// registers, each dot offered to both of its rows (the Gram matrix is symmetric); the B x B matrix never exists.
// Each dot accumulates over k in order, one product at a time, whatever the tile position, so equal rows give
// bitwise-equal dots and exact ties really go to the lowest index. Math in fp32 for fp32/fp16/bf16
// features, in fp64 for fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

constexpr int64_t kRows = 4;        // rows of a Gram tile
constexpr int64_t kCols = 32;       // columns of a Gram tile (a panel): two AVX-512 vectors of fp32
constexpr int64_t kTaskRows = 16;   // rows of one task: each panel is read once per kTaskRows rows, from cache
constexpr int64_t kLanes = 16;      // partial sums of the row reductions
constexpr int64_t kThreadWork = int64_t(1) << 23;  // dots x D per thread of the Gram sweep: ~150 us of one core
constexpr double kShift = 1e-8;     // the official distance adds 1e-8 to z_i - z_nn

// Sum over k < d of f(k), accumulated in kLanes partial sums that are added in a fixed order: the result depends on
// the values only, never on the addresses (an `omp simd` reduction may peel a few elements for alignment), so equal
// rows get equal norms wherever they are stored.
template <typename acc_t, typename F>
DK_INLINE acc_t lane_sum(int64_t d, F f) {
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += f(k + l);
  }
  for (int64_t l = 0; k + l < d; ++l) lanes[l] += f(k + l);
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Row i: its norm, and z_i = x_i / max(norm, eps) written to `z` (row-major, d columns) and to its column of the
// packed panels (panel p holds rows p*kCols .. p*kCols + kCols - 1 as d x kCols, k-major).
template <typename T, typename acc_t>
DK_VECTOR_CLONES void normalise_row(const T* x, int64_t i, int64_t d, acc_t eps, acc_t* norms, acc_t* z,
                                    acc_t* panels) {
  const T* row = x + i * d;
  const acc_t norm = std::sqrt(lane_sum<acc_t>(d, [&](int64_t k) {
    const acc_t v = static_cast<acc_t>(row[k]);
    return v * v;
  }));
  norms[i] = norm;
  const acc_t denom = std::max(norm, eps);  // torch.nn.functional.normalize: x / clamp_min(norm, eps)
  acc_t* z_row = z + i * d;
  acc_t* panel = panels + (i / kCols) * d * kCols + (i % kCols);
  for (int64_t k = 0; k < d; ++k) {
    const acc_t v = static_cast<acc_t>(row[k]) / denom;
    z_row[k] = v;
    panel[k * kCols] = v;
  }
}

// kRows x kCols dots: rows a[r * d ...] of z against one panel. Each dot is a plain sum over k in order.
template <typename acc_t>
DK_VECTOR_CLONES void gram_tile(const acc_t* a, const acc_t* panel, int64_t d, acc_t (&out)[kRows][kCols]) {
  acc_t acc[kRows][kCols] = {};
  for (int64_t k = 0; k < d; ++k) {
    const acc_t* b = panel + k * kCols;
    for (int64_t r = 0; r < kRows; ++r) {
      const acc_t ar = a[r * d + k];
#pragma omp simd
      for (int64_t c = 0; c < kCols; ++c) acc[r][c] += ar * b[c];
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

// A running best (largest dot, lowest index on equal dots) per row. The rule is order-free, so the result does not
// depend on which thread met which pair first.
template <typename acc_t>
struct Best {
  std::vector<acc_t> dot;
  std::vector<int64_t> index;

  explicit Best(int64_t batch)
      : dot(static_cast<size_t>(batch), -std::numeric_limits<acc_t>::infinity()),
        index(static_cast<size_t>(batch), batch) {}

  void offer(int64_t row, acc_t value, int64_t candidate) {
    if (value > dot[row] || (value == dot[row] && candidate < index[row])) {
      dot[row] = value;
      index[row] = candidate;
    }
  }
};

// The pairs i < j with i in rows [row0, row_end): the Gram matrix is symmetric, so each dot is computed once, for
// the panels from the one holding row0 onwards, and offered to both rows.
template <typename acc_t>
void neighbour_task(const acc_t* z, const acc_t* panels, int64_t batch, int64_t d, int64_t row0, int64_t row_end,
                    Best<acc_t>& best) {
  acc_t tile[kRows][kCols];
  const int64_t n_panels = (batch + kCols - 1) / kCols;
  for (int64_t p = row0 / kCols; p < n_panels; ++p) {
    const acc_t* panel = panels + p * d * kCols;
    for (int64_t t = row0; t < row_end; t += kRows) {  // z has whole tiles of rows (zero-padded)
      if (t >= (p + 1) * kCols) break;  // this tile and the next ones lie below the diagonal of the panel
      gram_tile(z + t * d, panel, d, tile);
      for (int64_t r = 0; r < kRows && t + r < batch; ++r) {
        const int64_t i = t + r;
        for (int64_t c = std::max<int64_t>(0, i + 1 - p * kCols); c < kCols && p * kCols + c < batch; ++c) {
          const int64_t j = p * kCols + c;
          best.offer(i, tile[r][c], j);
          best.offer(j, tile[r][c], i);
        }
      }
    }
  }
}

// |z_i - z_nn + 1e-8|.
template <typename acc_t>
DK_VECTOR_CLONES acc_t distance(const acc_t* zi, const acc_t* zn, int64_t d) {
  const acc_t shift = static_cast<acc_t>(kShift);
  return std::sqrt(lane_sum<acc_t>(d, [&](int64_t k) {
    const acc_t w = zi[k] - zn[k] + shift;
    return w * w;
  }));
}

// Rows per chunk of the O(B D) loops: ATen's grain (32,768 elements), so that a small batch runs on the calling
// thread rather than paying for a parallel region.
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / d); }

template <typename T, typename acc_t>
void koleo_forward_kernel(const T* x, int64_t batch, int64_t d, acc_t eps, acc_t* norms, acc_t* z,
                          int64_t* neighbours, acc_t* distances, acc_t* row_log) {
  const int64_t padded_rows = (batch + kRows - 1) / kRows * kRows;
  const int64_t n_panels = (batch + kCols - 1) / kCols;
  std::vector<acc_t> panels(static_cast<size_t>(n_panels * kCols * d), acc_t(0));
  at::parallel_for(0, batch, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) normalise_row(x, i, d, eps, norms, z, panels.data());
  });
  // Tasks of kTaskRows rows, handed out from a shared counter (the triangle makes the first ones the longest, and a
  // thread that the OS preempts then delays the call by one task, not by its whole share); each thread keeps its
  // own running bests, merged at the end by the same order-free rule.
  // A thread joins only with kThreadWork dots' worth of work: below that, the parallel region's own cost (and on a
  // shared machine the wait for a preempted thread at its barrier) would outweigh what it saves.
  const int64_t n_tasks = (padded_rows + kTaskRows - 1) / kTaskRows;
  const int64_t work = batch * batch / 2 * d;
  const int64_t n_threads =
      std::clamp<int64_t>(work / kThreadWork, 1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  std::vector<Best<acc_t>> bests(static_cast<size_t>(n_threads), Best<acc_t>(batch));
  std::atomic<int64_t> next_task{0};
  auto drain = [&](int64_t slot) {
    for (int64_t task = next_task++; task < n_tasks; task = next_task++) {
      const int64_t row0 = task * kTaskRows;
      neighbour_task(z, panels.data(), batch, d, row0, std::min(padded_rows, row0 + kTaskRows), bests[slot]);
    }
  };
  if (n_threads == 1) {
    drain(0);
  } else {
    at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) drain(slot);
    });
  }
  Best<acc_t>& merged = bests[0];
  for (int64_t i = 0; i < batch; ++i) {
    merged.offer(i, acc_t(-1), i);  // the official fill_diagonal_(-1): B = 1 gives the row itself
    for (int64_t t = 1; t < n_threads; ++t) merged.offer(i, bests[t].dot[i], bests[t].index[i]);
    neighbours[i] = merged.index[i];
  }
  at::parallel_for(0, batch, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t dist = distance(z + i * d, z + neighbours[i] * d, d);
      distances[i] = dist;
      row_log[i] = std::log(dist + eps);
    }
  });
}

// Python (dino_kernels/koleo.py) validates the features (2-d, B >= 1, D >= 1, a float dtype) and eps (> 0, finite).
// Returns (loss, neighbours (B,) int64, norms (B,), distances (B,), z (B, D)), the floats in the accumulation dtype
// (fp64 for fp64 features, else fp32): what the backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> koleo_cpu(const at::Tensor& features,
                                                                                double eps) {
  TORCH_CHECK(features.dim() == 2 && features.size(0) >= 1 && features.size(1) >= 1,
              "koleo_cpu: features must be (B, D) with B, D >= 1");
  TORCH_CHECK(eps > 0, "koleo_cpu: eps must be > 0");
  const at::Tensor x = features.contiguous();
  const int64_t batch = x.size(0), d = x.size(1);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = x.options().dtype(acc_type);
  at::Tensor norms = at::empty({batch}, acc_options);
  at::Tensor distances = at::empty({batch}, acc_options);
  at::Tensor row_log = at::empty({batch}, acc_options);
  at::Tensor neighbours = at::empty({batch}, x.options().dtype(at::kLong));
  // Whole tiles of kRows rows, the padding zero: the Gram tiles read them; the caller sees the first B rows.
  at::Tensor z = at::zeros({(batch + kRows - 1) / kRows * kRows, d}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "koleo_cpu", [&] {
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      koleo_forward_kernel(x.const_data_ptr<scalar_t>(), batch, d, static_cast<acc_t>(eps), norms.data_ptr<acc_t>(),
                           z.data_ptr<acc_t>(), neighbours.data_ptr<int64_t>(), distances.data_ptr<acc_t>(),
                           row_log.data_ptr<acc_t>());
    };
    if (acc_type == at::kDouble) {
      run(double(0));
    } else {
      run(float(0));
    }
  });
  // A B-element reduction, in fp64 and in row order so that the result is deterministic.
  const double loss = -row_log.to(at::kDouble).sum().item<double>() / static_cast<double>(batch);
  return {at::scalar_tensor(loss, acc_options), neighbours, norms, distances, z.narrow(0, 0, batch)};
}

// Row j of the gradient. With c_i = -grad_output / (B (d_i + eps) d_i) and w_i = z_i - z_nn(i) + 1e-8, the gradient
// w.r.t. z_j is g = c_j w_j - sum_{i : nn(i) = j} c_i w_i; through z_j = x_j / r_j (r_j = max(|x_j|, eps)) it is
// (g - z_j (z_j . g)) / r_j while |x_j| >= eps, and g / r_j where the clamp holds r_j at eps.
template <typename T, typename acc_t>
DK_VECTOR_CLONES void backward_row(int64_t j, const acc_t* z, const int64_t* neighbours, const acc_t* coef,
                                   const int64_t* seg_start, const int64_t* seg_rows, const acc_t* norms, acc_t eps,
                                   int64_t d, acc_t* g, T* grad) {
  const acc_t shift = static_cast<acc_t>(kShift);
  const acc_t* zj = z + j * d;
  const acc_t* zn = z + neighbours[j] * d;
  // A row that is its own neighbour (B = 1, or an antipodal tie) has a constant distance: its own term and its
  // entry in its segment cancel, and are both skipped so that the result is exactly 0 rather than a rounding residue.
  const acc_t cj = neighbours[j] == j ? acc_t(0) : coef[j];
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) g[k] = cj * (zj[k] - zn[k] + shift);
  for (int64_t s = seg_start[j]; s < seg_start[j + 1]; ++s) {
    const int64_t i = seg_rows[s];
    if (i == j) continue;
    const acc_t* zi = z + i * d;
    const acc_t ci = coef[i];
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) g[k] -= ci * (zi[k] - zj[k] + shift);
  }
  const acc_t projection = norms[j] >= eps ? lane_sum<acc_t>(d, [&](int64_t k) { return zj[k] * g[k]; }) : acc_t(0);
  const acc_t denom = std::max(norms[j], eps);
  T* out = grad + j * d;
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) out[k] = static_cast<T>((g[k] - zj[k] * projection) / denom);
}

template <typename T, typename acc_t>
void koleo_backward_kernel(const acc_t* z, const int64_t* neighbours, const acc_t* norms, const acc_t* distances,
                           int64_t batch, int64_t d, acc_t eps, double grad_output, T* grad) {
  // The rows whose neighbour is j, as CSR segments in increasing row order (a counting sort): a deterministic
  // gather in place of a scatter.
  std::vector<int64_t> seg_start(static_cast<size_t>(batch + 1), 0), seg_rows(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) ++seg_start[neighbours[i] + 1];
  for (int64_t j = 0; j < batch; ++j) seg_start[j + 1] += seg_start[j];
  std::vector<int64_t> fill(seg_start.begin(), seg_start.end() - 1);
  for (int64_t i = 0; i < batch; ++i) seg_rows[fill[neighbours[i]]++] = i;
  // c_i (see backward_row); 0 where d_i = 0, as the norm's own gradient at 0.
  std::vector<acc_t> coef(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) {
    const double dist = static_cast<double>(distances[i]);
    coef[i] = dist > 0 ? static_cast<acc_t>(-grad_output / (static_cast<double>(batch) *
                                                            (dist + static_cast<double>(eps)) * dist))
                       : acc_t(0);
  }
  at::parallel_for(0, batch, row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(static_cast<size_t>(d));
    for (int64_t j = begin; j < end; ++j) {
      backward_row(j, z, neighbours, coef.data(), seg_start.data(), seg_rows.data(), norms, eps, d, g.data(),
                   grad);
    }
  });
}

// d(grad_output * loss)/d(features) from what koleo_cpu saved (z, neighbours, norms, distances), in the dtype of
// `features` (only its dtype and shape are used).
at::Tensor koleo_backward_cpu(const at::Tensor& grad_output, const at::Tensor& features, const at::Tensor& z,
                              const at::Tensor& neighbours, const at::Tensor& norms, const at::Tensor& distances,
                              double eps) {
  TORCH_CHECK(features.dim() == 2 && features.size(0) >= 1 && features.size(1) >= 1,
              "koleo_backward_cpu: features must be (B, D) with B, D >= 1");
  const int64_t batch = features.size(0), d = features.size(1);
  const auto acc_type = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_output.numel() == 1, "koleo_backward_cpu: grad_output must hold one value");
  TORCH_CHECK(z.scalar_type() == acc_type && z.dim() == 2 && z.size(0) == batch && z.size(1) == d,
              "koleo_backward_cpu: z must be (B, D) in the accumulation dtype");
  TORCH_CHECK(neighbours.scalar_type() == at::kLong && neighbours.dim() == 1 && neighbours.size(0) == batch,
              "koleo_backward_cpu: neighbours must be int64 (B,)");
  TORCH_CHECK(norms.scalar_type() == acc_type && distances.scalar_type() == acc_type && norms.dim() == 1 &&
                  distances.dim() == 1 && norms.size(0) == batch && distances.size(0) == batch,
              "koleo_backward_cpu: norms and distances must be (B,) in the accumulation dtype");
  const at::Tensor zc = z.contiguous(), nn = neighbours.contiguous(), n = norms.contiguous(),
                   dist = distances.contiguous();
  const int64_t* nn_data = nn.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(nn_data[i] >= 0 && nn_data[i] < batch, "koleo_backward_cpu: neighbour index out of range");
  }
  at::Tensor grad = at::empty({batch, d}, features.options());
  const double g = grad_output.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "koleo_backward_cpu", [&] {
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      koleo_backward_kernel(zc.const_data_ptr<acc_t>(), nn_data, n.const_data_ptr<acc_t>(),
                            dist.const_data_ptr<acc_t>(), batch, d, static_cast<acc_t>(eps), g,
                            grad.data_ptr<scalar_t>());
    };
    if (acc_type == at::kDouble) {
      run(double(0));
    } else {
      run(float(0));
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_kernels_C, m) {
  m.def("koleo_cpu(Tensor features, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "koleo_backward_cpu(Tensor grad_output, Tensor features, Tensor z, Tensor neighbours, Tensor norms, "
      "Tensor distances, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(dino_kernels_C, CPU, m) {
  m.impl("koleo_cpu", &koleo_cpu);
  m.impl("koleo_backward_cpu", &koleo_backward_cpu);
}
