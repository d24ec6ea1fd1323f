// simcse_fast._C: the CUDA pooling kernels for Python. One argument struct, PoolingArgs (raw
// device pointers from tensor.data_ptr(), sizes, element strides and the stream from
// torch.cuda.current_stream().cuda_stream, all as integers), and one launch entry taking the
// kernel's kind: the module links the CUDA runtime statically and nothing of PyTorch, so it
// builds with nvcc alone and does not depend on torch's CUDA version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include "pooling.h"

namespace py = pybind11;
using simcse_fast::DType;
using simcse_fast::PoolingArgs;

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA pooling kernels of simcse_fast: PoolingArgs and launch(kind, args)";
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  py::class_<PoolingArgs>(m, "PoolingArgs", "Pointers, sizes, element strides and stream of one launch")
      .def(py::init<>())
      .def_readwrite("x", &PoolingArgs::x)
      .def_readwrite("mask", &PoolingArgs::mask)
      .def_readwrite("cu_seqlens", &PoolingArgs::cu_seqlens)
      .def_readwrite("out", &PoolingArgs::out)
      .def_readwrite("argmax", &PoolingArgs::argmax)
      .def_readwrite("grad_out", &PoolingArgs::grad_out)
      .def_readwrite("grad_x", &PoolingArgs::grad_x)
      .def_readwrite("batch", &PoolingArgs::batch)
      .def_readwrite("seq_len", &PoolingArgs::seq_len)
      .def_readwrite("hidden", &PoolingArgs::hidden)
      .def_readwrite("stride_x_batch", &PoolingArgs::stride_x_batch)
      .def_readwrite("stride_x_seq", &PoolingArgs::stride_x_seq)
      .def_readwrite("stride_mask_batch", &PoolingArgs::stride_mask_batch)
      .def_readwrite("stride_mask_seq", &PoolingArgs::stride_mask_seq)
      .def_readwrite("stride_grad_batch", &PoolingArgs::stride_grad_batch)
      .def_readwrite("stride_grad_hidden", &PoolingArgs::stride_grad_hidden)
      .def_readwrite("stream", &PoolingArgs::stream)
      .def_property(
          "dtype", [](const PoolingArgs& args) { return static_cast<int>(args.dtype); },
          [](PoolingArgs& args, int dtype) {
            if (dtype < 0 || dtype > 2) throw py::value_error("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
            args.dtype = static_cast<DType>(dtype);
          });
  m.def(
      "launch",
      [](const std::string& kind, const PoolingArgs& args) {
        py::gil_scoped_release release;
        simcse_fast::launch(kind, args);
      },
      "Launch kernel `kind` (mean_forward, mean_backward, max_forward, max_backward) on args.stream",
      py::arg("kind"), py::arg("args"));
  m.def("kernels_available", &simcse_fast::kernels_available,
        "Whether this build has a kernel image or PTX for CUDA device `device`", py::arg("device"));
}
