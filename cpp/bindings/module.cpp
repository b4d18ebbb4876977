// tiltsmc._core: the C++ kernels for Python. Argument checks and dtype dispatch live in
// python/tiltsmc/core.py; this layer takes raw pointers, releases the GIL and maps errors.
#include "common.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
    m.doc() = "tiltsmc C++ core kernels (use tiltsmc.core, which validates arguments)";
    tiltsmc::bindings::register_weights(m);
    tiltsmc::bindings::register_gather(m);
    tiltsmc::bindings::register_tokens(m);
    m.def("set_num_threads", &tiltsmc::set_num_threads, py::arg("num_threads"));
    m.def("get_num_threads", &tiltsmc::get_num_threads);
}
