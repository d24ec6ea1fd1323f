// Masked (padded) and packed mean and max pooling, forward and backward, for the "cuda" backend
// of simcse_fast. Layouts and argument fields: pooling.h.
//
// Work split: one block per (sequence b, tile of LANES * VEC hidden columns); the block's
// GROUPS rows of LANES threads stride over the sequence, each thread owning VEC adjacent
// columns, so a row of threads reads LANES * 16 contiguous bytes per token when
// VEC * sizeof(T) == 16. Each step a thread issues the loads of UNROLL tokens (x under its
// bounds only, never under the mask's value: padding rows are in bounds) before it uses any, so
// UNROLL 16-byte loads per thread are in flight. The GROUPS partial results are combined in
// shared memory. 128 threads and 128-column tiles (half) give SimCSE's B = 512, H = 768 3072
// blocks, 2.9 waves of 8 blocks per SM on an H100. Accumulation is fp32; offsets are int64
// (B * L * H passes 2^31 at the batch sizes this library is for).

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

constexpr int LANES = 16;   // threads across the hidden dimension
constexpr int GROUPS = 8;   // rows of threads across the sequence
constexpr int THREADS = LANES * GROUPS;
constexpr int UNROLL = 4;   // tokens whose loads a thread issues before using any
// Blocks per SM each kernel is compiled to fit (__launch_bounds__ caps its registers at
// 65536 / (THREADS * blocks)): the most each holds without spilling on sm_90 (tests/test_cuda_build.py).
constexpr int MEAN_FORWARD_BLOCKS = 8, MEAN_BACKWARD_BLOCKS = 7, MAX_FORWARD_BLOCKS = 5, MAX_BACKWARD_BLOCKS = 8;
constexpr int SCALAR_MEAN_FORWARD_BLOCKS = 7;  // one element per access needs more address registers
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
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* source) {
  return *reinterpret_cast<const Pack<T, VEC>*>(source);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* target, const float (&values)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int v = 0; v < VEC; ++v) pack.values[v] = from_float<T>(values[v]);
  *reinterpret_cast<Pack<T, VEC>*>(target) = pack;
}

// Where sequence `row` lives: its first element in x, its first row in the contiguous
// gradient, and its length.
struct Span {
  int64_t x_offset, first_token, n_tokens;
};

__device__ __forceinline__ Span sequence(const PoolingArgs& a, int64_t row) {
  if (a.cu_seqlens != 0) {
    const int64_t* offsets = reinterpret_cast<const int64_t*>(a.cu_seqlens);
    const int64_t first = offsets[row];
    return {first * a.stride_x_seq, first, offsets[row + 1] - first};
  }
  return {row * a.stride_x_batch, row * a.seq_len, a.seq_len};
}

// Whether position l (< the sequence's length) of sequence `row` holds a token.
__device__ __forceinline__ bool present(const PoolingArgs& a, int64_t row, int64_t l) {
  if (a.cu_seqlens != 0) return true;
  return reinterpret_cast<const uint8_t*>(a.mask)[row * a.stride_mask_batch + l * a.stride_mask_seq] != 0;
}

// One step of a forward loop: the packs of x at positions base + u * GROUPS, u < UNROLL, all
// loaded before any is used (under their bounds only: padding rows are in bounds), and which of
// them hold a token the thread must take.
template <typename T, int VEC>
__device__ __forceinline__ void load_step(const PoolingArgs& a, int64_t row, const Span& span, const T* x_row,
                                          int64_t base, bool active, Pack<T, VEC> (&packs)[UNROLL],
                                          bool (&take)[UNROLL]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int64_t l = base + u * GROUPS;
    const bool in_sequence = l < span.n_tokens;
    if (active && in_sequence) packs[u] = load_pack<T, VEC>(x_row + l * a.stride_x_seq);
    take[u] = active && in_sequence && present(a, row, l);
  }
}

// max(1, number of present tokens of sequence `row`), counted by the whole block.
__device__ int block_token_count(const PoolingArgs& a, int64_t row, const Span& span) {
  if (a.cu_seqlens != 0) return span.n_tokens > 0 ? static_cast<int>(span.n_tokens) : 1;
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  int count = 0;
  for (int64_t l = threadIdx.x; l < span.n_tokens; l += THREADS) count += present(a, row, l);
  atomicAdd(&total, count);  // integer sum: exact and order-independent
  __syncthreads();
  return total > 0 ? total : 1;
}

// out[b, h] = sum over present l of x[b, l, h] / max(1, number present)
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, VEC == 1 ? SCALAR_MEAN_FORWARD_BLOCKS : MEAN_FORWARD_BLOCKS)
    mean_pool_forward_kernel(const PoolingArgs a) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * LANES + lane) * VEC;
  const bool active = column < a.hidden;
  const Span span = sequence(a, row);
  const T* x_row = reinterpret_cast<const T*>(a.x) + span.x_offset + column;
  float sum[VEC] = {};
  for (int64_t base = group; base < span.n_tokens; base += GROUPS * UNROLL) {
    Pack<T, VEC> packs[UNROLL];
    bool take[UNROLL];
    load_step<T, VEC>(a, row, span, x_row, base, active, packs, take);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (!take[u]) continue;  // padding never reaches the sum, NaN included
#pragma unroll
      for (int v = 0; v < VEC; ++v) sum[v] += to_float(packs[u].values[v]);
    }
  }
  __shared__ float partial[GROUPS][LANES * VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) partial[group][lane * VEC + v] = sum[v];
  const int count = block_token_count(a, row, span);  // synchronizes the block
  if (group != 0 || !active) return;
  const float inverse = 1.0f / static_cast<float>(count);
  float result[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    float total = 0.0f;
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) total += partial[g][lane * VEC + v];
    result[v] = total * inverse;
  }
  store_pack<T, VEC>(reinterpret_cast<T*>(a.out) + row * a.hidden + column, result);
}

// grad_x[b, l, h] = present[b, l] * grad_out[b, h] / max(1, number present)
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, MEAN_BACKWARD_BLOCKS) mean_pool_backward_kernel(const PoolingArgs a) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * LANES + lane) * VEC;
  const Span span = sequence(a, row);
  const int count = block_token_count(a, row, span);
  if (column >= a.hidden) return;
  const T* grad_out = reinterpret_cast<const T*>(a.grad_out) + row * a.stride_grad_batch;
  const float inverse = 1.0f / static_cast<float>(count);
  float grad[VEC], zeros[VEC] = {};
#pragma unroll
  for (int v = 0; v < VEC; ++v) grad[v] = to_float(grad_out[(column + v) * a.stride_grad_hidden]) * inverse;
  T* grad_row = reinterpret_cast<T*>(a.grad_x) + span.first_token * a.hidden + column;
  for (int64_t base = group; base < span.n_tokens; base += GROUPS * UNROLL) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t l = base + u * GROUPS;
      if (l < span.n_tokens) store_pack<T, VEC>(grad_row + l * a.hidden, present(a, row, l) ? grad : zeros);
    }
  }
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
// for a sequence without present tokens).
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, MAX_FORWARD_BLOCKS) max_pool_forward_kernel(const PoolingArgs a) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * LANES + lane) * VEC;
  const bool active = column < a.hidden;
  const Span span = sequence(a, row);
  const T* x_row = reinterpret_cast<const T*>(a.x) + span.x_offset + column;
  float best[VEC];
  int best_position[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    best[v] = -INFINITY;
    best_position[v] = NO_TOKEN;
  }
  for (int64_t base = group; base < span.n_tokens; base += GROUPS * UNROLL) {
    Pack<T, VEC> packs[UNROLL];
    bool take[UNROLL];
    load_step<T, VEC>(a, row, span, x_row, base, active, packs, take);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (!take[u]) continue;
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        take_if_better(to_float(packs[u].values[v]), static_cast<int>(base + u * GROUPS), best[v], best_position[v]);
    }
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
  int32_t* argmax = reinterpret_cast<int32_t*>(a.argmax) + row * a.hidden + column;
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
    argmax[v] = has_token ? position : -1;
  }
  store_pack<T, VEC>(reinterpret_cast<T*>(a.out) + row * a.hidden + column, result);
}

// grad_x[b, l, h] = grad_out[b, h] if l == argmax[b, h] else 0
template <typename T, int VEC>
__global__ void __launch_bounds__(THREADS, MAX_BACKWARD_BLOCKS) max_pool_backward_kernel(const PoolingArgs a) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * LANES + lane) * VEC;
  if (column >= a.hidden) return;
  const Span span = sequence(a, row);
  const T* grad_out = reinterpret_cast<const T*>(a.grad_out) + row * a.stride_grad_batch;
  const int32_t* argmax = reinterpret_cast<const int32_t*>(a.argmax) + row * a.hidden + column;
  float grad[VEC];
  int position[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    grad[v] = to_float(grad_out[(column + v) * a.stride_grad_hidden]);
    position[v] = argmax[v];
  }
  T* grad_row = reinterpret_cast<T*>(a.grad_x) + span.first_token * a.hidden + column;
  for (int64_t base = group; base < span.n_tokens; base += GROUPS * UNROLL) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t l = base + u * GROUPS;
      if (l >= span.n_tokens) continue;
      float values[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) values[v] = position[v] == l ? grad[v] : 0.0f;
      store_pack<T, VEC>(grad_row + l * a.hidden, values);
    }
  }
}

enum class Kind { MeanForward, MeanBackward, MaxForward, MaxBackward };

const char* kernel_name(Kind kind) {
  switch (kind) {
    case Kind::MeanForward: return "mean_pool_forward_kernel";
    case Kind::MeanBackward: return "mean_pool_backward_kernel";
    case Kind::MaxForward: return "max_pool_forward_kernel";
    case Kind::MaxBackward: return "max_pool_backward_kernel";
  }
  return "pooling kernel";
}

template <typename T, int VEC>
void launch_typed(Kind kind, const PoolingArgs& a) {
  const int64_t tiles = (a.hidden + LANES * VEC - 1) / (LANES * VEC);
  if (a.batch > INT_MAX || tiles > 65535) {
    throw std::invalid_argument("pooling: batch or hidden size too large for one launch");
  }
  const dim3 grid(static_cast<unsigned>(a.batch), static_cast<unsigned>(tiles));
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (kind) {
    case Kind::MeanForward: mean_pool_forward_kernel<T, VEC><<<grid, THREADS, 0, stream>>>(a); break;
    case Kind::MeanBackward: mean_pool_backward_kernel<T, VEC><<<grid, THREADS, 0, stream>>>(a); break;
    case Kind::MaxForward: max_pool_forward_kernel<T, VEC><<<grid, THREADS, 0, stream>>>(a); break;
    case Kind::MaxBackward: max_pool_backward_kernel<T, VEC><<<grid, THREADS, 0, stream>>>(a); break;
  }
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string(kernel_name(kind)) + ": " + cudaGetErrorString(error));
}

bool aligned(std::uintptr_t pointer) { return pointer % 16 == 0; }

// 16-byte vector access where every row start is 16-byte aligned (H and the strides multiples
// of the vector width), else one element at a time.
bool vectorizable(Kind kind, const PoolingArgs& a, int vec) {
  if (kind == Kind::MeanForward || kind == Kind::MaxForward) {
    return a.hidden % vec == 0 && a.stride_x_batch % vec == 0 && a.stride_x_seq % vec == 0 && aligned(a.x) &&
           aligned(a.out);
  }
  return a.hidden % vec == 0 && aligned(a.grad_x);
}

template <typename T, int VEC>
void dispatch_width(Kind kind, const PoolingArgs& a) {
  vectorizable(kind, a, VEC) ? launch_typed<T, VEC>(kind, a) : launch_typed<T, 1>(kind, a);
}

Kind parse_kind(const std::string& kind) {
  if (kind == "mean_forward") return Kind::MeanForward;
  if (kind == "mean_backward") return Kind::MeanBackward;
  if (kind == "max_forward") return Kind::MaxForward;
  if (kind == "max_backward") return Kind::MaxBackward;
  throw std::invalid_argument("kind must be mean_forward, mean_backward, max_forward or max_backward; got " + kind);
}

}  // namespace

void launch(const std::string& kind_name, const PoolingArgs& args) {
  const Kind kind = parse_kind(kind_name);
  if (args.batch <= 0 || args.hidden <= 0) return;
  switch (args.dtype) {
    case DType::Float32: return dispatch_width<float, 4>(kind, args);
    case DType::Float16: return dispatch_width<__half, 8>(kind, args);
    case DType::BFloat16: return dispatch_width<__nv_bfloat16, 8>(kind, args);
  }
  throw std::invalid_argument("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

bool kernels_available(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  cudaFuncAttributes attributes;
  // Fails with "no kernel image is available" when neither a cubin nor PTX fits the device.
  const cudaError_t error = cudaFuncGetAttributes(&attributes, mean_pool_forward_kernel<float, 4>);
  cudaSetDevice(previous);
  cudaGetLastError();
  return error == cudaSuccess;
}

}  // namespace simcse_fast
