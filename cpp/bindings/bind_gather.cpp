// Binding of gather on byte views: x (B, N, item_bytes), ancestors (B, M), out (B, M, item_bytes).
#include <cstdint>

#include "common.hpp"

namespace tiltsmc::bindings {
namespace {

void bind_gather(const CArray<std::uint8_t>& x, const CArray<std::int64_t>& ancestors,
                 CArray<std::uint8_t>& out) {
    if (x.ndim() != 3 || ancestors.ndim() != 2 || out.ndim() != 3)
        throw py::value_error("x: expected byte views of shape (B, N, item) and (B, M, item)");
    const std::int64_t rows = x.shape(0), n = x.shape(1), item = x.shape(2), m = ancestors.shape(1);
    if (ancestors.shape(0) != rows || out.shape(0) != rows || out.shape(1) != m || out.shape(2) != item)
        throw py::value_error("out: shape does not match x and ancestors");
    const std::uint8_t* source = x.data();
    std::uint8_t* target = out.mutable_data();
    const bool in_place = source == target;
    if (in_place && m != n) throw py::value_error("out: in-place gather needs as many ancestors as particles");
    if (!in_place) {
        const std::uint8_t* source_end = source + x.nbytes();
        const std::uint8_t* target_end = target + out.nbytes();
        if (source < target_end && target < source_end)
            throw py::value_error("out: overlaps x without being x itself");
    }
    const std::int64_t* a = ancestors.data();
    Status status;
    {
        py::gil_scoped_release release;
        status = gather(source, rows, n, item, a, m, target);
    }
    check(status, "ancestors");
}

}  // namespace

void register_gather(py::module_& m) {
    m.def("gather", &bind_gather, py::arg("x"), py::arg("ancestors"), py::arg("out"));
}

}  // namespace tiltsmc::bindings
