// Binding of gather: x and out are any C-contiguous arrays, read as rows x n (resp. m) items of
// item_bytes bytes; their byte sizes are checked against those figures before any pointer is used.
#include <cstdint>

#include "common.hpp"

namespace tiltsmc::bindings {
namespace {

void bind_gather(const py::array& x, const CArray<std::int64_t>& ancestors, py::array& out, std::int64_t rows,
                 std::int64_t n, std::int64_t item_bytes) {
    if (rows < 0 || n < 1 || item_bytes < 0) throw py::value_error("x: invalid rows, particles or item size");
    if (!(x.flags() & py::array::c_style)) throw py::value_error("x: must be C-contiguous");
    if (!(out.flags() & py::array::c_style) || !out.writeable())
        throw py::value_error("out: must be C-contiguous and writeable");
    const std::int64_t total = static_cast<std::int64_t>(ancestors.size());
    const std::int64_t m = rows == 0 ? 0 : total / rows;
    if (m * rows != total) throw py::value_error("ancestors: size is not a multiple of the rows of x");
    if (static_cast<std::int64_t>(x.nbytes()) != rows * n * item_bytes)
        throw py::value_error("x: byte size does not match rows x particles x item size");
    if (static_cast<std::int64_t>(out.nbytes()) != rows * m * item_bytes)
        throw py::value_error("out: byte size does not match rows x ancestors x item size");
    const auto* source = static_cast<const std::uint8_t*>(x.data());
    auto* target = static_cast<std::uint8_t*>(out.mutable_data());
    const bool in_place = source == target;
    if (in_place && m != n) throw py::value_error("out: in-place gather needs as many ancestors as particles");
    if (!in_place && rows > 0) {
        const std::uint8_t* source_end = source + x.nbytes();
        const std::uint8_t* target_end = target + out.nbytes();
        if (source < target_end && target < source_end)
            throw py::value_error("out: overlaps x without being x itself");
    }
    const std::int64_t* a = ancestors.data();
    Status status;
    {
        py::gil_scoped_release release;
        status = gather(source, rows, n, item_bytes, a, m, target);
    }
    check(status, "ancestors");
}

}  // namespace

void register_gather(py::module_& m) {
    m.def("gather", &bind_gather, py::arg("x"), py::arg("ancestors"), py::arg("out"), py::arg("rows"),
          py::arg("num_particles"), py::arg("item_bytes"));
}

}  // namespace tiltsmc::bindings
