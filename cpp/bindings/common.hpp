// Shared helpers of the thin pybind11 layer: array checks and Status -> Python exceptions.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "tiltsmc/kernels.hpp"

namespace tiltsmc::bindings {

namespace py = pybind11;

// Raises ValueError describing `status` for the argument `name` (shared by _core and _cuda).
inline void raise_status(const Status& status, const char* name) {
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
        case StatusCode::outside_unit_interval:
            throw py::value_error(std::string(name) + ": a probability outside [0, 1] at " + where);
    }
    throw py::value_error(std::string(name) + ": invalid input");
}

inline void check(const Status& status, const char* name) {
    if (!status.ok()) raise_status(status, name);
}

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

// `array` as a C-contiguous array of `dtype` (writeable if asked), else a TypeError/ValueError naming it.
template <typename T>
py::array checked(const py::handle& object, const char* name, bool writeable = false) {
    if (!py::isinstance<py::array>(object)) throw py::type_error(std::string(name) + ": expected a numpy array");
    auto array = py::reinterpret_borrow<py::array>(object);
    if (!array.dtype().is(py::dtype::of<T>()))
        throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                             ", got " + std::string(py::str(array.dtype())));
    if (!(array.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
    if (writeable && !array.writeable()) throw py::value_error(std::string(name) + ": must be writeable");
    return array;
}

inline std::int64_t size_of(const py::array& array) { return static_cast<std::int64_t>(array.size()); }

void register_weights(py::module_& m);
void register_gather(py::module_& m);
void register_tokens(py::module_& m);

}  // namespace tiltsmc::bindings
