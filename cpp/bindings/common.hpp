// Shared helpers of the thin pybind11 layer: array checks and Status -> Python exceptions.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "tiltsmc/kernels.hpp"

namespace tiltsmc::bindings {

namespace py = pybind11;

// Raises ValueError describing `status` for the argument `name`.
void raise_status(const Status& status, const char* name);

inline void check(const Status& status, const char* name) {
    if (!status.ok()) raise_status(status, name);
}

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

void register_weights(py::module_& m);
void register_gather(py::module_& m);

}  // namespace tiltsmc::bindings
