// Multi-tensor EMA of teacher weights on the GPU: one launch updates every tensor of a dtype group.
// CUDA headers only: this file compiles with nvcc whether or not torch was built with CUDA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_launch.h"

namespace {

constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ double from_acc_double(double x) { return x; }

template <typename T, typename A> __device__ __forceinline__ T store_value(A x) {
  if constexpr (sizeof(T) == 8) return from_acc_double(x); else return from_acc<T>(static_cast<float>(x));
}

// A register array that the compiler moves with one 16-byte (or 8-byte, 4-byte...) access.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

// Each block walks chunks in a grid-stride loop. Inside a chunk, a thread moves VEC teacher elements per access
// (16 bytes of teacher) when both addresses are aligned for it, and falls back to scalar accesses otherwise, so
// any size, offset or alignment is handled.
template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) ema_kernel(const int64_t* __restrict__ tensors,
                                                       const int64_t* __restrict__ chunks, int64_t n_chunks,
                                                       int64_t chunk_size, double momentum) {
  using A = typename Acc<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  const A m = static_cast<A>(momentum);
  const A one_minus_m = static_cast<A>(1.0 - momentum);

  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const int64_t row = chunks[2 * c];
    const int64_t begin = chunks[2 * c + 1];
    T* teacher = reinterpret_cast<T*>(tensors[3 * row]) + begin;
    const S* student = reinterpret_cast<const S*>(tensors[3 * row + 1]) + begin;
    const int64_t numel = tensors[3 * row + 2];
    const int64_t n = (numel - begin) < chunk_size ? (numel - begin) : chunk_size;

    const bool aligned = (reinterpret_cast<uintptr_t>(teacher) % (sizeof(T) * VEC) == 0) &&
                         (reinterpret_cast<uintptr_t>(student) % (sizeof(S) * VEC) == 0);
    int64_t done = 0;
    if (aligned) {
      const int64_t n_vec = n / VEC;
      auto* tv = reinterpret_cast<Pack<T, VEC>*>(teacher);
      const auto* sv = reinterpret_cast<const Pack<S, VEC>*>(student);
      for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
        Pack<T, VEC> t = tv[i];
        const Pack<S, VEC> s = sv[i];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          t.v[k] = store_value<T>(m * static_cast<A>(to_acc(t.v[k])) + one_minus_m * static_cast<A>(to_acc(s.v[k])));
        }
        tv[i] = t;
      }
      done = n_vec * VEC;
    }
    for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
      teacher[i] = store_value<T>(m * static_cast<A>(to_acc(teacher[i])) + one_minus_m * static_cast<A>(to_acc(student[i])));
    }
  }
}

template <typename T>
cudaError_t launch_for_teacher(int student_dtype, const int64_t* tensors, const int64_t* chunks, int64_t n_chunks,
                               int64_t chunk_size, double momentum, int grid, cudaStream_t stream) {
  switch (student_dtype) {
    case DK_FLOAT32: ema_kernel<T, float><<<grid, kThreads, 0, stream>>>(tensors, chunks, n_chunks, chunk_size, momentum); break;
    case DK_FLOAT64: ema_kernel<T, double><<<grid, kThreads, 0, stream>>>(tensors, chunks, n_chunks, chunk_size, momentum); break;
    case DK_FLOAT16: ema_kernel<T, __half><<<grid, kThreads, 0, stream>>>(tensors, chunks, n_chunks, chunk_size, momentum); break;
    case DK_BFLOAT16: ema_kernel<T, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(tensors, chunks, n_chunks, chunk_size, momentum); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch(const int64_t* tensors, const int64_t* chunks, int64_t n_chunks, int64_t chunk_size,
                   double momentum, int teacher_dtype, int student_dtype, int grid, cudaStream_t stream) {
  switch (teacher_dtype) {
    case DK_FLOAT32: return launch_for_teacher<float>(student_dtype, tensors, chunks, n_chunks, chunk_size, momentum, grid, stream);
    case DK_FLOAT64: return launch_for_teacher<double>(student_dtype, tensors, chunks, n_chunks, chunk_size, momentum, grid, stream);
    case DK_FLOAT16: return launch_for_teacher<__half>(student_dtype, tensors, chunks, n_chunks, chunk_size, momentum, grid, stream);
    case DK_BFLOAT16: return launch_for_teacher<__nv_bfloat16>(student_dtype, tensors, chunks, n_chunks, chunk_size, momentum, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" const char* dk_cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

extern "C" int dk_ema_cuda(int device, const int64_t* tensors, const int64_t* chunks, int64_t n_chunks,
                           int64_t chunk_size, double momentum, int teacher_dtype, int student_dtype, int grid_size,
                           void* stream_ptr) {
  if (n_chunks == 0) return 0;
  if (chunk_size % 8 != 0) return cudaErrorInvalidValue;  // chunks must keep 16-byte alignment of their tensor
  const int grid = static_cast<int>(n_chunks < grid_size ? n_chunks : grid_size);
  // A launch goes to the current device, which need not be the tensors' one (torch's CUDAGuard is not available
  // here: this file sees CUDA headers only). Switch to the tensors' device for the launch and switch back.
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  if (previous != device) {
    err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
  }
  err = launch(tensors, chunks, n_chunks, chunk_size, momentum, teacher_dtype, student_dtype, grid,
               static_cast<cudaStream_t>(stream_ptr));
  if (previous != device) {
    const cudaError_t restored = cudaSetDevice(previous);
    if (err == cudaSuccess) err = restored;
  }
  return err;
}
