// Host interface of the CUDA pooling kernels (pooling.cu), called by the Python bindings.
#pragma once

#include <cstdint>
#include <string>

namespace simcse_fast {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Raw device pointers (as integers), sizes and element strides of one pooling call, bound to
// Python once (bindings.cpp) and passed by value to the kernels. Layout: padded when
// cu_seqlens is 0 (x (B, L, H), mask (B, L) uint8), packed otherwise (x (T, H) with row stride
// stride_x_seq, cu_seqlens (B + 1,) int64, no mask). Unused fields stay zero: the forward passes
// read x and the layout and write out (and argmax for max); the backward passes read grad_out
// and the layout (mean) or argmax (max) and write grad_x, contiguous (B, L, H) or (T, H).
struct PoolingArgs {
  std::uintptr_t x = 0, mask = 0, cu_seqlens = 0, out = 0, argmax = 0, grad_out = 0, grad_x = 0;
  int64_t batch = 0, seq_len = 0, hidden = 0;
  int64_t stride_x_batch = 0, stride_x_seq = 0;
  int64_t stride_mask_batch = 0, stride_mask_seq = 0;
  int64_t stride_grad_batch = 0, stride_grad_hidden = 0;
  DType dtype = DType::Float32;
  std::uintptr_t stream = 0;  // cudaStream_t
};

// Launches kernel `kind` ("mean_forward", "mean_backward", "max_forward" or "max_backward");
// throws std::invalid_argument for an unknown kind or sizes one launch cannot cover, and
// std::runtime_error naming the kernel if the launch fails.
void launch(const std::string& kind, const PoolingArgs& args);

// Whether this build holds a kernel image (or PTX to JIT) that runs on CUDA device `device`.
bool kernels_available(int device);

}  // namespace simcse_fast
