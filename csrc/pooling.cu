// Masked mean and max pooling, forward and backward, for the "cuda" backend of simcse_fast.
//
// Shapes: token embeddings x (B, L, H) with any batch/sequence strides and unit hidden stride,
// mask (B, L) as uint8 (non-zero = present) with any strides, pooled output (B, H) contiguous,
// argmax (B, H) int32 contiguous, token gradient (B, L, H) contiguous.
//
// Work split: one block per (sequence b, tile of LANES * VEC hidden columns); the block's
// GROUPS warps stride over the sequence, each thread owning VEC adjacent columns, so a warp
// reads 32 * 16 contiguous bytes per token when VEC * sizeof(T) == 16. The GROUPS partial
// results are combined in shared memory. Accumulation is fp32; offsets are int64 (B * L * H
// passes 2^31 at the batch sizes this library is for).

#include "pooling.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace simcse_fast {
namespace {

constexpr int LANES = 32;   // threads across the hidden dimension (one warp)
constexpr int GROUPS = 8;   // warps across the sequence
constexpr int THREADS = LANES * GROUPS;
constexpr int NO_TOKEN = INT_MAX;

template <typename T> __device__ __forceinline__ float to_float(T value);
template <> __device__ __forceinline__ float to_float<float>(float value) { return value; }
template <> __device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

template <typename T> __device__ __forceinline__ T from_float(float value);
template <> __device__ __forceinline__ float from_float<float>(float value) { return value; }
template <> __device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

// VEC elements moved as one access: 16 bytes when VEC * sizeof(T) == 16.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T values[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* source, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(source);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = to_float(pack.values[v]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* target, const float (&values)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int v = 0; v < VEC; ++v) pack.values[v] = from_float<T>(values[v]);
  *reinterpret_cast<Pack<T, VEC>*>(target) = pack;
}

// Number of present tokens of one sequence, counted by the whole block.
__device__ int block_token_count(const uint8_t* mask_row, int64_t seq_len, int64_t stride_mask_seq) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  int count = 0;
  for (int64_t l = threadIdx.x; l < seq_len; l += THREADS) count += mask_row[l * stride_mask_seq] != 0;
  atomicAdd(&total, count);  // integer sum: exact and order-independent
  __syncthreads();
  return total;
}

// out[b, h] = sum_l present[b, l] x[b, l, h] / max(1, sum_l present[b, l])
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS) masked_mean_pool_forward_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ mask, T* __restrict__ out, int64_t seq_len,
    int64_t hidden, int64_t stride_x_batch, int64_t stride_x_seq, int64_t stride_mask_batch,
    int64_t stride_mask_seq) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * LANES + lane) * VEC;
  const bool active = column < hidden;
  const T* x_row = x + row * stride_x_batch + column;
  const uint8_t* mask_row = mask + row * stride_mask_batch;
  float sum[VEC] = {};
  for (int64_t l = group; l < seq_len; l += GROUPS) {
    if (!active || mask_row[l * stride_mask_seq] == 0) continue;
    float values[VEC];
    load_pack<T, VEC>(x_row + l * stride_x_seq, values);
#pragma unroll
    for (int v = 0; v < VEC; ++v) sum[v] += values[v];
  }
  __shared__ float partial[GROUPS][LANES * VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) partial[group][lane * VEC + v] = sum[v];
  const int count = block_token_count(mask_row, seq_len, stride_mask_seq);  // synchronizes the block
  if (group != 0 || !active) return;
  const float inverse = 1.0f / static_cast<float>(count > 0 ? count : 1);
  float result[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    float total = 0.0f;
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) total += partial[g][lane * VEC + v];
    result[v] = total * inverse;
  }
  store_pack<T, VEC>(out + row * hidden + column, result);
}

// grad_x[b, l, h] = present[b, l] * grad_out[b, h] / max(1, sum_l present[b, l])
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS) masked_mean_pool_backward_kernel(
    const T* __restrict__ grad_out, const uint8_t* __restrict__ mask, T* __restrict__ grad_x,
    int64_t seq_len, int64_t hidden, int64_t stride_grad_batch, int64_t stride_grad_hidden,
    int64_t stride_mask_batch, int64_t stride_mask_seq) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * LANES + lane) * VEC;
  const uint8_t* mask_row = mask + row * stride_mask_batch;
  const int count = block_token_count(mask_row, seq_len, stride_mask_seq);
  if (column >= hidden) return;
  const float inverse = 1.0f / static_cast<float>(count > 0 ? count : 1);
  float grad[VEC], zeros[VEC] = {};
#pragma unroll
  for (int v = 0; v < VEC; ++v)
    grad[v] = to_float(grad_out[row * stride_grad_batch + (column + v) * stride_grad_hidden]) * inverse;
  T* grad_row = grad_x + row * seq_len * hidden + column;
  for (int64_t l = group; l < seq_len; l += GROUPS)
    store_pack<T, VEC>(grad_row + l * hidden, mask_row[l * stride_mask_seq] != 0 ? grad : zeros);
}

// Keeps the first maximum of the positions it sees in increasing order; NaN ranks above every
// number and the first NaN wins (torch.max semantics).
__device__ __forceinline__ void take_if_better(float value, int position, float& best, int& best_position) {
  if (best != best) return;  // already NaN
  if (value != value || value > best || best_position == NO_TOKEN) {
    best = value;
    best_position = position;
  }
}

// out[b, h] = max over present l of x[b, l, h]; argmax[b, h] = the first such l (-1 and out = 0
// for a row without present tokens).
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS) masked_max_pool_forward_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ mask, T* __restrict__ out,
    int32_t* __restrict__ argmax, int64_t seq_len, int64_t hidden, int64_t stride_x_batch,
    int64_t stride_x_seq, int64_t stride_mask_batch, int64_t stride_mask_seq) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * LANES + lane) * VEC;
  const bool active = column < hidden;
  const T* x_row = x + row * stride_x_batch + column;
  const uint8_t* mask_row = mask + row * stride_mask_batch;
  float best[VEC];
  int best_position[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    best[v] = -INFINITY;
    best_position[v] = NO_TOKEN;
  }
  for (int64_t l = group; l < seq_len; l += GROUPS) {
    if (!active || mask_row[l * stride_mask_seq] == 0) continue;
    float values[VEC];
    load_pack<T, VEC>(x_row + l * stride_x_seq, values);
#pragma unroll
    for (int v = 0; v < VEC; ++v) take_if_better(values[v], static_cast<int>(l), best[v], best_position[v]);
  }
  __shared__ float partial_value[GROUPS][LANES * VEC];
  __shared__ int partial_position[GROUPS][LANES * VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    partial_value[group][lane * VEC + v] = best[v];
    partial_position[group][lane * VEC + v] = best_position[v];
  }
  __syncthreads();
  if (group != 0 || !active) return;
  float result[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    // Groups see interleaved positions: take the best value, ties (and NaNs) to the lowest position.
    float value = -INFINITY;
    int position = NO_TOKEN;
    bool is_nan = false;
    for (int g = 0; g < GROUPS; ++g) {
      const float candidate = partial_value[g][lane * VEC + v];
      const int candidate_position = partial_position[g][lane * VEC + v];
      if (candidate_position == NO_TOKEN) continue;
      const bool candidate_nan = candidate != candidate;
      const bool better = candidate_nan ? (!is_nan || candidate_position < position)
                                        : (!is_nan && (candidate > value || position == NO_TOKEN ||
                                                       (candidate == value && candidate_position < position)));
      if (better) {
        value = candidate;
        position = candidate_position;
        is_nan = candidate_nan;
      }
    }
    const bool has_token = position != NO_TOKEN;
    result[v] = has_token ? value : 0.0f;
    argmax[row * hidden + column + v] = has_token ? position : -1;
  }
  store_pack<T, VEC>(out + row * hidden + column, result);
}

// grad_x[b, l, h] = grad_out[b, h] if l == argmax[b, h] else 0
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS) masked_max_pool_backward_kernel(
    const T* __restrict__ grad_out, const int32_t* __restrict__ argmax, T* __restrict__ grad_x,
    int64_t seq_len, int64_t hidden, int64_t stride_grad_batch, int64_t stride_grad_hidden) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * LANES + lane) * VEC;
  if (column >= hidden) return;
  float grad[VEC];
  int position[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    grad[v] = to_float(grad_out[row * stride_grad_batch + (column + v) * stride_grad_hidden]);
    position[v] = argmax[row * hidden + column + v];
  }
  T* grad_row = grad_x + row * seq_len * hidden + column;
  for (int64_t l = group; l < seq_len; l += GROUPS) {
    float values[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) values[v] = position[v] == l ? grad[v] : 0.0f;
    store_pack<T, VEC>(grad_row + l * hidden, values);
  }
}

void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string(kernel) + ": " + cudaGetErrorString(error));
}

dim3 grid_for(int64_t batch, int64_t hidden, int vec) {
  const int64_t tiles = (hidden + LANES * vec - 1) / (LANES * vec);
  if (batch > INT_MAX || tiles > 65535) throw std::invalid_argument("pooling: batch or hidden size too large for one launch");
  return dim3(static_cast<unsigned>(batch), static_cast<unsigned>(tiles));
}

bool aligned(std::uintptr_t pointer) { return pointer % 16 == 0; }

// Dispatch on the element type, and on 16-byte vector access where every row start is
// 16-byte aligned (H and the strides multiples of the vector width), else one element at a time.
template <template <typename, int> class Launch, typename... Args>
void dispatch(DType dtype, bool vectorizable, Args... args) {
  switch (dtype) {
    case DType::Float32:
      vectorizable ? Launch<float, 4>::run(args...) : Launch<float, 1>::run(args...);
      return;
    case DType::Float16:
      vectorizable ? Launch<__half, 8>::run(args...) : Launch<__half, 1>::run(args...);
      return;
    case DType::BFloat16:
      vectorizable ? Launch<__nv_bfloat16, 8>::run(args...) : Launch<__nv_bfloat16, 1>::run(args...);
      return;
  }
  throw std::invalid_argument("pooling: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

int vector_width(DType dtype) { return dtype == DType::Float32 ? 4 : 8; }

template <typename T, int VEC>
struct MeanForward {
  static void run(const PoolingArgs& a) {
    masked_mean_pool_forward_kernel<T, VEC><<<grid_for(a.batch, a.hidden, VEC), THREADS, 0, a.stream>>>(
        reinterpret_cast<const T*>(a.x), reinterpret_cast<const uint8_t*>(a.mask), reinterpret_cast<T*>(a.out),
        a.seq_len, a.hidden, a.stride_x_batch, a.stride_x_seq, a.stride_mask_batch, a.stride_mask_seq);
    check_launch("masked_mean_pool_forward_kernel");
  }
};

template <typename T, int VEC>
struct MeanBackward {
  static void run(const PoolingArgs& a) {
    masked_mean_pool_backward_kernel<T, VEC><<<grid_for(a.batch, a.hidden, VEC), THREADS, 0, a.stream>>>(
        reinterpret_cast<const T*>(a.grad_out), reinterpret_cast<const uint8_t*>(a.mask),
        reinterpret_cast<T*>(a.grad_x), a.seq_len, a.hidden, a.stride_grad_batch, a.stride_grad_hidden,
        a.stride_mask_batch, a.stride_mask_seq);
    check_launch("masked_mean_pool_backward_kernel");
  }
};

template <typename T, int VEC>
struct MaxForward {
  static void run(const PoolingArgs& a) {
    masked_max_pool_forward_kernel<T, VEC><<<grid_for(a.batch, a.hidden, VEC), THREADS, 0, a.stream>>>(
        reinterpret_cast<const T*>(a.x), reinterpret_cast<const uint8_t*>(a.mask), reinterpret_cast<T*>(a.out),
        reinterpret_cast<int32_t*>(a.argmax), a.seq_len, a.hidden, a.stride_x_batch, a.stride_x_seq,
        a.stride_mask_batch, a.stride_mask_seq);
    check_launch("masked_max_pool_forward_kernel");
  }
};

template <typename T, int VEC>
struct MaxBackward {
  static void run(const PoolingArgs& a) {
    masked_max_pool_backward_kernel<T, VEC><<<grid_for(a.batch, a.hidden, VEC), THREADS, 0, a.stream>>>(
        reinterpret_cast<const T*>(a.grad_out), reinterpret_cast<const int32_t*>(a.argmax),
        reinterpret_cast<T*>(a.grad_x), a.seq_len, a.hidden, a.stride_grad_batch, a.stride_grad_hidden);
    check_launch("masked_max_pool_backward_kernel");
  }
};

bool forward_vectorizable(const PoolingArgs& a) {
  const int vec = vector_width(a.dtype);
  return a.hidden % vec == 0 && a.stride_x_batch % vec == 0 && a.stride_x_seq % vec == 0 && aligned(a.x) &&
         aligned(a.out);
}

bool backward_vectorizable(const PoolingArgs& a) {
  return a.hidden % vector_width(a.dtype) == 0 && aligned(a.grad_x);
}

}  // namespace

void masked_mean_pool_forward(const PoolingArgs& args) {
  if (args.batch > 0 && args.hidden > 0) dispatch<MeanForward>(args.dtype, forward_vectorizable(args), args);
}

void masked_mean_pool_backward(const PoolingArgs& args) {
  if (args.batch > 0 && args.hidden > 0) dispatch<MeanBackward>(args.dtype, backward_vectorizable(args), args);
}

void masked_max_pool_forward(const PoolingArgs& args) {
  if (args.batch > 0 && args.hidden > 0) dispatch<MaxForward>(args.dtype, forward_vectorizable(args), args);
}

void masked_max_pool_backward(const PoolingArgs& args) {
  if (args.batch > 0 && args.hidden > 0) dispatch<MaxBackward>(args.dtype, backward_vectorizable(args), args);
}

}  // namespace simcse_fast
