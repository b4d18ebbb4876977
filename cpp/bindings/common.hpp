// Shared helpers of the thin pybind11 layer: array checks and Status -> Python exceptions.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <vector>

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
        case StatusCode::input_changed:
            throw py::value_error(std::string(name) + ": changed by another thread during the call (out of range at " +
                                  where + " when used); outputs may be partly written");
    }
    throw py::value_error(std::string(name) + ": invalid input");
}

// A host kernel releases the GIL only for work of at least this many bytes read or written (about a
// millisecond of copying). Taking the GIL back waits for whichever Python thread took it meanwhile, for as
// long as that thread holds it: for a serving step's small calls, with a server's event loop beside the
// engine's worker, 2 - 4x the kernel's own time (measured), on the path of every request in flight. A call
// this short gives another thread little time to use anyway; one that holds the GIL also cannot have its
// arguments rewritten by Python meanwhile.
constexpr std::int64_t kReleaseGilFromBytes = std::int64_t{8} << 20;

// Releases the GIL for its scope where the call's work (`bytes` read or written) reaches
// kReleaseGilFromBytes.
class GilReleasedFor {
public:
    explicit GilReleasedFor(std::int64_t bytes) {
        if (bytes >= kReleaseGilFromBytes) release_.emplace();
    }

private:
    std::optional<py::gil_scoped_release> release_;
};

inline void check(const Status& status, const char* name) {
    if (!status.ok()) raise_status(status, name);
}

// Alignment. The kernels read and write their arrays through typed pointers (double*, std::int64_t*, ...), whose
// targets must be aligned to the item's size; numpy allows views that are not
// (np.zeros(8 * n + 1, np.uint8)[1:].view(np.float64)). Every array argument is taken one of three ways:
//  - read only: as an aligned copy where it is not aligned. CArray<T> (pybind11's array_t with NPY_ARRAY_ALIGNED
//    among its flags, which PyArray_FromAny honours by copying an unaligned array; an aligned one passes through
//    on a flag test), checked<T>(object, name) and readable(array) for arrays taken untyped;
//  - written (in place, or an output the caller gives): refused where it is not aligned, with a ValueError naming
//    it (require_aligned, checked<T>(object, name, true)): a copy would lose the write;
//  - copied as bytes (the data of gather, reorder_in_place and concatenate_padded, through memcpy): no alignment
//    needed, taken as it is.
// An empty array counts as aligned: no item of it is read or written.
constexpr int kAlignedFlag = py::detail::npy_api::NPY_ARRAY_ALIGNED_;

inline bool is_aligned(const py::array& array) {
    return (array.flags() & kAlignedFlag) != 0 || array.size() == 0;
}

// A typed input the kernel only reads, C-contiguous and aligned (an unaligned one arrives as an aligned copy).
template <typename T>
using CArray = py::array_t<T, py::array::c_style | kAlignedFlag>;

// Refuses (ValueError naming it) an array the kernel writes whose items are not aligned to their size.
inline void require_aligned(const py::array& array, const std::string& name) {
    if (is_aligned(array)) return;
    const std::string size = std::to_string(array.itemsize());
    throw py::value_error(name + ": must be aligned to its item size (" + size +
                          " bytes), since it is written in place; its data starts at an address that is not a "
                          "multiple of " + size + " (a view at a byte offset): pass an aligned array, e.g. a copy");
}

// An aligned copy of a C-contiguous array that is not aligned (so not empty): the rare path of readable.
[[gnu::noinline, gnu::cold]] inline py::array aligned_copy(const py::array& array) {
    py::array copy(array.dtype(), std::vector<py::ssize_t>(array.shape(), array.shape() + array.ndim()));
    std::memcpy(copy.mutable_data(), array.data(), static_cast<std::size_t>(array.nbytes()));
    return copy;
}

// A C-contiguous array the kernel only reads: itself where aligned (a flag test), else an aligned copy of it.
inline py::array readable(const py::array& array) { return is_aligned(array) ? array : aligned_copy(array); }

// Whether `array` holds `dtype`: the same descriptor (the usual case) or an equivalent one (an unpickled
// array carries its own; a byte-swapped one is not equivalent).
inline bool has_dtype(const py::array& array, const py::dtype& dtype) {
    const py::dtype own = array.dtype();
    return own.is(dtype) || own.equal(dtype);
}

// `object` as a C-contiguous array of `dtype`, else a TypeError/ValueError naming it. One the kernel writes
// (`written`) must be writeable and aligned; one it only reads comes back as an aligned copy where it is not
// aligned (see readable).
template <typename T>
py::array checked(const py::handle& object, const char* name, bool written = false) {
    if (!py::isinstance<py::array>(object)) throw py::type_error(std::string(name) + ": expected a numpy array");
    auto array = py::reinterpret_borrow<py::array>(object);
    if (!has_dtype(array, py::dtype::of<T>()))
        throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                             ", got " + std::string(py::str(array.dtype())));
    if (!(array.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
    if (!written) return readable(array);
    if (!array.writeable()) throw py::value_error(std::string(name) + ": must be writeable");
    require_aligned(array, name);
    return array;
}

inline std::int64_t size_of(const py::array& array) { return static_cast<std::int64_t>(array.size()); }

// The product of `factors` (each >= 0), or nullopt where it does not fit in int64: a size computed from
// figures Python hands over must not wrap around and so pass a check against an array's byte size.
inline std::optional<std::int64_t> checked_product(std::initializer_list<std::int64_t> factors) {
    for (const std::int64_t factor : factors)
        if (factor == 0) return 0;
    std::int64_t product = 1;
    for (const std::int64_t factor : factors) {
        if (factor < 0 || product > std::numeric_limits<std::int64_t>::max() / factor) return std::nullopt;
        product *= factor;
    }
    return product;
}

// Whether two C-contiguous arrays share memory: their byte ranges overlap (exact for contiguous arrays, as
// numpy.shares_memory; empty arrays share nothing).
inline bool share_memory(const void* a, std::int64_t a_bytes, const void* b, std::int64_t b_bytes) {
    if (a_bytes <= 0 || b_bytes <= 0) return false;
    const auto begin_a = reinterpret_cast<std::uintptr_t>(a), begin_b = reinterpret_cast<std::uintptr_t>(b);
    return begin_a < begin_b + static_cast<std::uintptr_t>(b_bytes) &&
           begin_b < begin_a + static_cast<std::uintptr_t>(a_bytes);
}

inline bool share_memory(const py::array& a, const py::array& b) {
    return share_memory(a.data(), static_cast<std::int64_t>(a.nbytes()), b.data(), static_cast<std::int64_t>(b.nbytes()));
}

// An argument for check_disjoint: the (C-contiguous) array and its name.
struct Named {
    const py::array* array;
    const char* name;
};

// Refuses (ValueError naming both) any array of `written` that shares memory with another array of
// `written` or with one of `read`: a kernel could otherwise overwrite what it has checked, or read what
// it has already written. Called before the kernel, with the GIL held.
inline void check_disjoint(std::initializer_list<Named> written, std::initializer_list<Named> read) {
    for (auto w = written.begin(); w != written.end(); ++w) {
        for (auto other = written.begin(); other != w; ++other)
            if (share_memory(*w->array, *other->array))
                throw py::value_error(std::string(w->name) + ": shares memory with " + other->name +
                                      " (both are written: pass separate arrays)");
        for (const Named& other : read)
            if (share_memory(*w->array, *other.array))
                throw py::value_error(std::string(w->name) + ": shares memory with " + other.name + " (" + w->name +
                                      " is written, " + other.name + " is read: pass separate arrays)");
    }
}

void register_weights(py::module_& m);
void register_gather(py::module_& m);
void register_tokens(py::module_& m);

}  // namespace tiltsmc::bindings
