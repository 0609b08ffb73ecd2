// Makes the compiled library importable as bv_blend_ext._C; importing it runs the static
// TORCH_LIBRARY registrations. The module itself exposes nothing: the ops live in torch.ops.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
