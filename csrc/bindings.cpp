// simcse_fast._C: the CUDA pooling kernels for Python. Functions take raw device pointers,
// sizes, element strides and the CUDA stream as integers (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream): the module links the CUDA runtime statically and
// nothing of PyTorch, so it builds with nvcc alone and does not depend on torch's CUDA version.
#include <pybind11/pybind11.h>

#include "pooling.h"

namespace py = pybind11;
using simcse_fast::DType;
using simcse_fast::PoolingArgs;

namespace {

PoolingArgs common(int64_t batch, int64_t seq_len, int64_t hidden, int dtype, std::uintptr_t stream) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  PoolingArgs args;
  args.batch = batch;
  args.seq_len = seq_len;
  args.hidden = hidden;
  args.dtype = static_cast<DType>(dtype);
  args.stream = reinterpret_cast<cudaStream_t>(stream);
  return args;
}

void mean_forward(std::uintptr_t x, std::uintptr_t mask, std::uintptr_t out, int64_t batch, int64_t seq_len,
                  int64_t hidden, int64_t stride_x_batch, int64_t stride_x_seq, int64_t stride_mask_batch,
                  int64_t stride_mask_seq, int dtype, std::uintptr_t stream) {
  PoolingArgs args = common(batch, seq_len, hidden, dtype, stream);
  args.x = x, args.mask = mask, args.out = out;
  args.stride_x_batch = stride_x_batch, args.stride_x_seq = stride_x_seq;
  args.stride_mask_batch = stride_mask_batch, args.stride_mask_seq = stride_mask_seq;
  py::gil_scoped_release release;
  simcse_fast::masked_mean_pool_forward(args);
}

void mean_backward(std::uintptr_t grad_out, std::uintptr_t mask, std::uintptr_t grad_x, int64_t batch,
                   int64_t seq_len, int64_t hidden, int64_t stride_grad_batch, int64_t stride_grad_hidden,
                   int64_t stride_mask_batch, int64_t stride_mask_seq, int dtype, std::uintptr_t stream) {
  PoolingArgs args = common(batch, seq_len, hidden, dtype, stream);
  args.grad_out = grad_out, args.mask = mask, args.grad_x = grad_x;
  args.stride_grad_batch = stride_grad_batch, args.stride_grad_hidden = stride_grad_hidden;
  args.stride_mask_batch = stride_mask_batch, args.stride_mask_seq = stride_mask_seq;
  py::gil_scoped_release release;
  simcse_fast::masked_mean_pool_backward(args);
}

void max_forward(std::uintptr_t x, std::uintptr_t mask, std::uintptr_t out, std::uintptr_t argmax, int64_t batch,
                 int64_t seq_len, int64_t hidden, int64_t stride_x_batch, int64_t stride_x_seq,
                 int64_t stride_mask_batch, int64_t stride_mask_seq, int dtype, std::uintptr_t stream) {
  PoolingArgs args = common(batch, seq_len, hidden, dtype, stream);
  args.x = x, args.mask = mask, args.out = out, args.argmax = argmax;
  args.stride_x_batch = stride_x_batch, args.stride_x_seq = stride_x_seq;
  args.stride_mask_batch = stride_mask_batch, args.stride_mask_seq = stride_mask_seq;
  py::gil_scoped_release release;
  simcse_fast::masked_max_pool_forward(args);
}

void max_backward(std::uintptr_t grad_out, std::uintptr_t argmax, std::uintptr_t grad_x, int64_t batch,
                  int64_t seq_len, int64_t hidden, int64_t stride_grad_batch, int64_t stride_grad_hidden, int dtype,
                  std::uintptr_t stream) {
  PoolingArgs args = common(batch, seq_len, hidden, dtype, stream);
  args.grad_out = grad_out, args.argmax = argmax, args.grad_x = grad_x;
  args.stride_grad_batch = stride_grad_batch, args.stride_grad_hidden = stride_grad_hidden;
  py::gil_scoped_release release;
  simcse_fast::masked_max_pool_backward(args);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA pooling kernels of simcse_fast (raw pointers, sizes, element strides, stream)";
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("masked_mean_pool_forward", &mean_forward, "out (B, H) = mean of present x (B, L, H)", py::arg("x"),
        py::arg("mask"), py::arg("out"), py::arg("batch"), py::arg("seq_len"), py::arg("hidden"),
        py::arg("stride_x_batch"), py::arg("stride_x_seq"), py::arg("stride_mask_batch"),
        py::arg("stride_mask_seq"), py::arg("dtype"), py::arg("stream"));
  m.def("masked_mean_pool_backward", &mean_backward, "grad_x (B, L, H) of the masked mean", py::arg("grad_out"),
        py::arg("mask"), py::arg("grad_x"), py::arg("batch"), py::arg("seq_len"), py::arg("hidden"),
        py::arg("stride_grad_batch"), py::arg("stride_grad_hidden"), py::arg("stride_mask_batch"),
        py::arg("stride_mask_seq"), py::arg("dtype"), py::arg("stream"));
  m.def("masked_max_pool_forward", &max_forward, "out (B, H) = max of present x, argmax (B, H) int32",
        py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("argmax"), py::arg("batch"), py::arg("seq_len"),
        py::arg("hidden"), py::arg("stride_x_batch"), py::arg("stride_x_seq"), py::arg("stride_mask_batch"),
        py::arg("stride_mask_seq"), py::arg("dtype"), py::arg("stream"));
  m.def("masked_max_pool_backward", &max_backward, "grad_x (B, L, H) of the masked max", py::arg("grad_out"),
        py::arg("argmax"), py::arg("grad_x"), py::arg("batch"), py::arg("seq_len"), py::arg("hidden"),
        py::arg("stride_grad_batch"), py::arg("stride_grad_hidden"), py::arg("dtype"), py::arg("stream"));
}
