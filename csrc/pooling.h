// Host interface of the CUDA pooling kernels (pooling.cu), called by the Python bindings.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace simcse_fast {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Raw device pointers (as integers), sizes and element strides of one pooling call. Unused
// fields stay zero: the forward passes use x, mask, out (and argmax for max); the backward
// passes use grad_out, grad_x and mask (mean) or argmax (max).
struct PoolingArgs {
  std::uintptr_t x = 0, mask = 0, out = 0, argmax = 0, grad_out = 0, grad_x = 0;
  int64_t batch = 0, seq_len = 0, hidden = 0;
  int64_t stride_x_batch = 0, stride_x_seq = 0;
  int64_t stride_mask_batch = 0, stride_mask_seq = 0;
  int64_t stride_grad_batch = 0, stride_grad_hidden = 0;
  DType dtype = DType::Float32;
  cudaStream_t stream = nullptr;
};

// Each throws std::runtime_error naming the kernel if its launch fails.
void masked_mean_pool_forward(const PoolingArgs& args);
void masked_mean_pool_backward(const PoolingArgs& args);
void masked_max_pool_forward(const PoolingArgs& args);
void masked_max_pool_backward(const PoolingArgs& args);

}  // namespace simcse_fast
