// tiltsmc._core: the C++ kernels for Python. Argument checks and dtype dispatch live in
// python/tiltsmc/core.py; this layer takes raw pointers, releases the GIL and maps errors.
#include "common.hpp"

namespace tiltsmc::bindings {

void raise_status(const Status& status, const char* name) {
    const std::string where = "row " + std::to_string(status.row) + ", index " + std::to_string(status.index);
    switch (status.code) {
        case StatusCode::ok:
            return;
        case StatusCode::nan_weight:
            throw py::value_error(std::string(name) + ": NaN at " + where);
        case StatusCode::positive_infinity:
            throw py::value_error(std::string(name) + ": +inf at " + where +
                                  " (log-weights must be finite or -inf)");
        case StatusCode::zero_row:
            throw py::value_error(std::string(name) + ": every weight of row " + std::to_string(status.row) +
                                  " is zero (all log-weights are -inf)");
        case StatusCode::index_out_of_range:
            throw py::value_error(std::string(name) + ": index out of range at " + where);
        case StatusCode::bad_size:
            throw py::value_error(std::string(name) + ": inconsistent sizes");
    }
    throw py::value_error(std::string(name) + ": invalid input");
}

}  // namespace tiltsmc::bindings

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
    m.doc() = "tiltsmc C++ core kernels (use tiltsmc.core, which validates arguments)";
    tiltsmc::bindings::register_weights(m);
    tiltsmc::bindings::register_gather(m);
    m.def("set_num_threads", &tiltsmc::set_num_threads, py::arg("num_threads"));
    m.def("get_num_threads", &tiltsmc::get_num_threads);
}
