// tiltsmc._core: the C++ kernels for Python. Most argument checks and the dtype dispatch live in
// python/tiltsmc/core.py; this layer takes raw pointers, releases the GIL and maps errors. The per-step
// calls of the models and samplers (bind_tokens.cpp, smc_reweight) check their arrays here instead: a
// Python check costs several times more between model runs, when the CPU's caches are cold.
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
