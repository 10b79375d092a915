// Python entry point of dino_kernels._C and the library that every op file extends with TORCH_LIBRARY_FRAGMENT.
// Importing the module loads this shared library, whose static registrars define the ops under
// torch.ops.dino_kernels_C; the public, documented ops live in Python (dino_kernels/<op>.py).
#include <Python.h>
#include <torch/library.h>

namespace {

bool cuda_compiled() {
#ifdef DINO_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(dino_kernels_C, m) {
  m.def("cuda_compiled() -> bool", &cuda_compiled);
}

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dino_kernels compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
