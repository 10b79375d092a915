// Plain-C interface between the C++ op wrappers (built against torch) and the CUDA sources (built by nvcc with
// CUDA headers only). Every launcher returns a cudaError_t value as int (0 = success).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types understood by the launchers.
enum DkDtype { DK_FLOAT32 = 0, DK_FLOAT64 = 1, DK_FLOAT16 = 2, DK_BFLOAT16 = 3 };

const char* dk_cuda_error_string(int error);

// Multi-tensor EMA, teacher <- m * teacher + (1 - m) * student, for one (teacher dtype, student dtype) group.
// `device`: the CUDA device index of every tensor and of `stream`; the launch is made with it current, and the
// caller's current device is restored afterwards.
// `tensors` (device memory): n_tensors rows of {teacher address, student address, numel}.
// `chunks` (device memory): n_chunks rows of {tensor row, first element}; each chunk covers `chunk_size` elements.
int dk_ema_cuda(int device, const int64_t* tensors, const int64_t* chunks, int64_t n_chunks, int64_t chunk_size,
                double momentum, int teacher_dtype, int student_dtype, int grid_size, void* stream);

#ifdef __cplusplus
}
#endif
