// Bindings of gather, reorder_in_place, keep_survivors and concatenate_padded. The particle data (gather's x
// and out, reorder_in_place's arrays, concatenate_padded's parts and out) are any C-contiguous arrays, read
// as items of item_bytes bytes and copied with memcpy: they need no alignment (common.hpp). Their byte
// sizes are checked against those figures before any pointer is used.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "common.hpp"

namespace tiltsmc::bindings {
namespace {

// Whether `array` holds Python objects, alone or in fields of a structured dtype (kind 'V'): they cannot be
// copied as bytes (the copies would hold no references of their own).
bool holds_objects(const py::array& array) {
    const py::dtype dtype = array.dtype();
    return dtype.kind() == 'O' || (dtype.kind() == 'V' && dtype.attr("hasobject").cast<bool>());
}

void bind_gather(const py::array& x, const CArray<std::int64_t>& ancestors, py::array& out, std::int64_t rows,
                 std::int64_t n, std::int64_t item_bytes) {
    if (rows < 0 || n < 1 || item_bytes < 0) throw py::value_error("x: invalid rows, particles or item size");
    if (holds_objects(x)) throw py::type_error("x: holds Python objects, which gather cannot copy");
    if (holds_objects(out)) throw py::type_error("out: holds Python objects, which gather cannot copy");
    if (!(x.flags() & py::array::c_style)) throw py::value_error("x: must be C-contiguous");
    if (!(out.flags() & py::array::c_style) || !out.writeable())
        throw py::value_error("out: must be C-contiguous and writeable");
    const std::int64_t total = static_cast<std::int64_t>(ancestors.size());
    const std::int64_t m = rows == 0 ? 0 : total / rows;
    if (m * rows != total) throw py::value_error("ancestors: size is not a multiple of the rows of x");
    const auto x_bytes = checked_product({rows, n, item_bytes}), out_bytes = checked_product({rows, m, item_bytes});
    if (!x_bytes || static_cast<std::int64_t>(x.nbytes()) != *x_bytes)
        throw py::value_error("x: byte size does not match rows x particles x item size");
    if (!out_bytes || static_cast<std::int64_t>(out.nbytes()) != *out_bytes)
        throw py::value_error("out: byte size does not match rows x ancestors x item size");
    const auto* source = static_cast<const std::uint8_t*>(x.data());
    auto* target = static_cast<std::uint8_t*>(out.mutable_data());
    const bool in_place = source == target;
    if (in_place && m != n) throw py::value_error("out: in-place gather needs as many ancestors as particles");
    if (!in_place && rows > 0 && share_memory(x, out)) throw py::value_error("out: overlaps x without being x itself");
    // The ancestors are checked, then used while out is written: out must not overlap them.
    if (share_memory(ancestors, out))
        throw py::value_error(in_place ? "ancestors: shares memory with x, which is reordered in place (pass a copy)"
                                       : "out: shares memory with ancestors (pass separate arrays)");
    const std::int64_t* a = ancestors.data();
    Status status;
    {
        GilReleasedFor release(2 * rows * m * item_bytes);
        status = gather(source, rows, n, item_bytes, a, m, target);
    }
    check(status, "ancestors");
}

// Every array of `arrays` (each (rows, n, ...), C-contiguous, writeable) reordered in place by the same
// ancestors (rows, n): all arrays are checked here and the ancestors by the kernel, before any write. An
// array given twice (the same memory) is reordered once; arrays that otherwise overlap are refused. With
// `axes` (one per array: None, or the axis >= 2 of a right-padded sequence) and `used` ((rows, n) int64,
// each item's length along it), an array with an axis copies only the columns its ancestors use.
py::list bind_reorder_in_place(const py::list& given, const CArray<std::int64_t>& ancestors, bool skip_unwritable,
                               const py::object& used_object, const py::object& axes_object) {
    // A copy of the list: Python code runs in the first pass below (a skipped entry's shape, another thread
    // taking the GIL), and the caller's list may change meanwhile, past the axes counted against it.
    PyObject* copied = PySequence_List(given.ptr());
    if (copied == nullptr) throw py::error_already_set();
    const auto arrays = py::reinterpret_steal<py::list>(copied);
    if (ancestors.ndim() != 2) throw py::value_error("ancestors: expected shape (B, N)");
    const std::int64_t rows = ancestors.shape(0), n = ancestors.shape(1);
    if (n < 1) throw py::value_error("ancestors: rows must hold at least one particle");
    std::optional<py::array> used;
    std::vector<py::object> axes;
    if (!axes_object.is_none()) {
        if (used_object.is_none()) throw py::value_error("used: expected the items' lengths with axes");
        used = checked<std::int64_t>(used_object, "used");
        if (used->ndim() != 2 || used->shape(0) != rows || used->shape(1) != n)
            throw py::value_error("used: expected the ancestors' shape (B, N)");
        for (const py::handle axis : py::list(axes_object)) axes.push_back(py::reinterpret_borrow<py::object>(axis));
        if (axes.size() != arrays.size()) throw py::value_error("axes: expected one per array (None or an axis)");
    }
    // First pass: everything that may run Python code (a skipped entry's shape, an axis' __index__, a dtype's
    // attribute). That code can change any array (a property can free its buffer with __setstate__), so no
    // data pointer is taken before it is all done, and the second pass checks the arrays afresh.
    std::vector<std::optional<py::array>> entries(arrays.size());  // nullopt: a skipped non-array
    std::vector<py::object> dtypes(arrays.size());                 // each array's dtype, as checked
    std::vector<std::optional<py::ssize_t>> axis_of(arrays.size());
    // The checks of an array's layout, made in both passes: the first refuses the first bad entry in order, the
    // second the arrays as the kernel gets them. skipped_after_checks: whether the array is left alone
    // (skip_unwritable, and not C-contiguous and writeable).
    const auto check_axes = [&](const py::array& array, const std::string& name) {
        if (array.ndim() < 2 || array.shape(0) != rows || array.shape(1) != n)
            throw py::value_error(name + ": leading axes do not match the ancestors' (B, N)");
    };
    const auto skipped_after_checks = [&](const py::array& array, const std::string& name) {
        if ((array.flags() & py::array::c_style) && array.writeable()) return false;
        if (skip_unwritable) return true;
        throw py::value_error(name + ": must be C-contiguous and writeable to reorder in place");
    };
    for (std::size_t k = 0; k < arrays.size(); ++k) {
        const std::string name = "arrays[" + std::to_string(k) + "]";
        if (!py::isinstance<py::array>(arrays[k])) {
            if (!skip_unwritable) throw py::type_error(name + ": expected a numpy array");
            // Left to the caller, but its leading axes are checked here too, before anything is written.
            const py::tuple shape(arrays[k].attr("shape"));
            if (shape.size() < 2 || shape[0].cast<std::int64_t>() != rows || shape[1].cast<std::int64_t>() != n)
                throw py::value_error(name + ": leading axes do not match the ancestors' (B, N)");
            continue;
        }
        auto array = py::reinterpret_borrow<py::array>(arrays[k]);
        check_axes(array, name);
        if (holds_objects(array)) throw py::type_error(name + ": holds Python objects, which gather cannot copy");
        skipped_after_checks(array, name);
        dtypes[k] = array.dtype();
        if (!axes.empty() && !axes[k].is_none()) axis_of[k] = axes[k].cast<py::ssize_t>();
        entries[k] = std::move(array);
    }
    // Second pass, with no Python code run: the checks on the arrays as they are now, then their pointers.
    if (ancestors.ndim() != 2 || ancestors.shape(0) != rows || ancestors.shape(1) != n ||
        (used && (used->ndim() != 2 || used->shape(0) != rows || used->shape(1) != n)))
        throw py::value_error("ancestors: its shape or used's changed during the call");
    std::vector<py::array> held;  // the arrays written: alive until the kernel returns, whatever the list does
    std::vector<std::uint8_t*> data;
    std::vector<std::int64_t> item_bytes;
    std::vector<ItemPrefix> prefixes;
    std::vector<std::size_t> position;  // of data[j] in arrays
    py::list skipped;
    for (std::size_t k = 0; k < arrays.size(); ++k) {
        const std::string name = "arrays[" + std::to_string(k) + "]";
        if (!entries[k]) {
            skipped.append(k);
            continue;
        }
        py::array& array = *entries[k];
        if (!array.dtype().is(dtypes[k])) throw py::value_error(name + ": its dtype changed during the call");
        check_axes(array, name);
        if (skipped_after_checks(array, name)) {
            skipped.append(k);
            continue;
        }
        const std::int64_t count = rows * n;
        auto* begin = static_cast<std::uint8_t*>(array.mutable_data());
        const std::int64_t bytes = count == 0 ? 0 : static_cast<std::int64_t>(array.nbytes()) / count;
        bool repeated = false;
        for (std::size_t j = 0; j < data.size(); ++j) {
            const std::uint8_t* other = data[j];
            if (other == begin && item_bytes[j] == bytes) {
                repeated = true;
                break;
            }
            if (share_memory(begin, bytes * count, other, item_bytes[j] * count))
                throw py::value_error(name + ": overlaps arrays[" + std::to_string(position[j]) +
                                      "] without being the same memory");
        }
        if (repeated) continue;
        if (share_memory(begin, bytes * count, ancestors.data(), static_cast<std::int64_t>(ancestors.nbytes())))
            throw py::value_error("ancestors: shares memory with " + name + ", which is reordered in place (pass a copy)");
        if (used && share_memory(begin, bytes * count, used->data(), static_cast<std::int64_t>(used->nbytes())))
            throw py::value_error("used: shares memory with " + name + ", which is reordered in place (pass a copy)");
        ItemPrefix prefix;
        if (axis_of[k]) {
            const py::ssize_t axis = *axis_of[k];
            if (axis < 2 || axis >= array.ndim())
                throw py::value_error("axes[" + std::to_string(k) + "]: expected an axis after the leading (B, N) of " +
                                      name + "'s " + std::to_string(array.ndim()));
            prefix.blocks = 1;
            for (py::ssize_t d = 2; d < axis; ++d) prefix.blocks *= array.shape(d);
            prefix.width = array.shape(axis);
            prefix.column_bytes = array.itemsize();
            for (py::ssize_t d = axis + 1; d < array.ndim(); ++d) prefix.column_bytes *= array.shape(d);
            if (prefix.blocks * prefix.width * prefix.column_bytes == 0) prefix = ItemPrefix{};  // empty items
        }
        held.push_back(array);
        data.push_back(begin);
        item_bytes.push_back(bytes);
        prefixes.push_back(prefix);
        position.push_back(k);
    }
    const std::int64_t* a = ancestors.data();
    // The work: each item whose ancestor is another is copied (twice where saved first), in every array.
    std::int64_t moved = 0, bytes_per_item = 0;
    for (std::int64_t j = 0; j < rows * n; ++j) moved += a[j] != j % n;
    for (const std::int64_t bytes : item_bytes) bytes_per_item += bytes;
    Status status;
    {
        GilReleasedFor release(2 * moved * bytes_per_item);
        status = reorder_in_place(data.data(), item_bytes.data(), static_cast<std::int64_t>(data.size()), rows, n, a,
                                  prefixes.data(), used ? static_cast<const std::int64_t*>(used->data()) : nullptr);
    }
    check(status, "ancestors");
    return skipped;
}

// Survivors keep their slots (see keep_survivors), in place on a C-contiguous int64 (B, N) array.
void bind_keep_survivors(py::array& ancestors) {
    if (!has_dtype(ancestors, py::dtype::of<std::int64_t>()) || ancestors.ndim() != 2)
        throw py::type_error("ancestors: expected a 2-D int64 array");
    if (!(ancestors.flags() & py::array::c_style) || !ancestors.writeable())
        throw py::value_error("ancestors: must be C-contiguous and writeable");
    require_aligned(ancestors, "ancestors");
    const std::int64_t rows = ancestors.shape(0), n = ancestors.shape(1);
    if (n < 1)
        throw py::value_error("ancestors: rows must hold at least one particle, got shape (" + std::to_string(rows) +
                              ", 0)");
    auto* a = static_cast<std::int64_t*>(ancestors.mutable_data());
    Status status;
    {
        GilReleasedFor release(rows * n * 16);
        status = keep_survivors(a, rows, n);
    }
    check(status, "ancestors");
}

// Batches joined along their first axis, one inner axis padded on the left, or with pad_end on the right
// (concatenate_padded): part k
// (C-contiguous, out's dtype) read as (its first axis, blocks, lengths[k]) items of item_bytes bytes and out
// (C-contiguous, writeable) as (its first axis, blocks, width); every figure is checked against the arrays'
// byte sizes, and out against overlapping any part, before the kernel runs. `used` (None, or int64 with one
// count >= 0 per row of out; right padding only): each row copies only its first `used` kept items, the
// columns after left as they were; copied before the kernel reads it.
void bind_concatenate_padded(const py::list& parts, const std::vector<std::int64_t>& lengths,
                             const std::vector<std::int64_t>& skips, py::array& out, std::int64_t blocks,
                             std::int64_t item_bytes, bool pad_end, const py::object& used_object) {
    if (lengths.size() != parts.size() || skips.size() != parts.size())
        throw py::value_error("lengths, skips: expected one per part");
    if (blocks < 0 || item_bytes < 0) throw py::value_error("blocks, item_bytes: must not be negative");
    if (!(out.flags() & py::array::c_style) || !out.writeable())
        throw py::value_error("out: must be C-contiguous and writeable");
    if (holds_objects(out))
        throw py::type_error("out: holds Python objects, which cannot be copied");
    if (out.ndim() < 1) throw py::value_error("out: expected at least one axis");
    std::vector<PaddedPart> read(parts.size());
    std::vector<py::array> held(parts.size());  // the parts read: alive until the kernel returns, whatever the list does
    std::int64_t rows = 0;
    for (std::size_t k = 0; k < parts.size(); ++k) {
        const std::string name = "parts[" + std::to_string(k) + "]";
        if (!py::isinstance<py::array>(parts[k])) throw py::type_error(name + ": expected a numpy array");
        auto part = py::reinterpret_borrow<py::array>(parts[k]);
        if (!part.dtype().equal(out.dtype())) throw py::type_error(name + ": dtype differs from out's");
        if (!(part.flags() & py::array::c_style)) throw py::value_error(name + ": must be C-contiguous");
        if (part.ndim() < 1) throw py::value_error(name + ": expected at least one axis");
        const std::int64_t part_rows = part.shape(0), length = lengths[k], skip = skips[k];
        if (length < 0 || skip < 0 || skip > length)
            throw py::value_error(name + ": needs 0 <= skip <= length, got skip " + std::to_string(skip) +
                                  ", length " + std::to_string(length));
        const auto part_bytes = checked_product({part_rows, blocks, length, item_bytes});
        if (!part_bytes || static_cast<std::int64_t>(part.nbytes()) != *part_bytes)
            throw py::value_error(name + ": byte size does not match rows x blocks x length x item size");
        if (share_memory(part, out)) throw py::value_error("out: overlaps " + name);
        read[k] = {static_cast<const std::uint8_t*>(part.data()), part_rows, length, skip};
        held[k] = part;
        rows += part_rows;
    }
    if (out.shape(0) != rows) throw py::value_error("out: its first axis is not the parts' rows in all");
    std::vector<std::int64_t> used;
    if (!used_object.is_none()) {
        if (!pad_end) throw py::value_error("used: only with right padding (pad_end)");
        const py::array counts = checked<std::int64_t>(used_object, "used");
        if (counts.ndim() != 1 || counts.shape(0) != rows)
            throw py::value_error("used: expected one count per row of out (" + std::to_string(rows) + ")");
        const auto* first = static_cast<const std::int64_t*>(counts.data());
        used.assign(first, first + rows);
        for (std::int64_t r = 0; r < rows; ++r)
            if (used[static_cast<std::size_t>(r)] < 0)
                throw py::value_error("used: expected counts >= 0, got " + std::to_string(used[static_cast<std::size_t>(r)]) +
                                      " at row " + std::to_string(r));
    }
    const auto all_rows_bytes = checked_product({rows, blocks, item_bytes});  // out's bytes a column
    if (!all_rows_bytes) throw py::value_error("out: byte size is not rows x blocks x a width x item size");
    if (*all_rows_bytes == 0) {  // nothing to copy
        if (out.nbytes() != 0) throw py::value_error("out: expected no items for parts without any");
        return;
    }
    const std::int64_t width = static_cast<std::int64_t>(out.nbytes()) / *all_rows_bytes;
    if (width * *all_rows_bytes != static_cast<std::int64_t>(out.nbytes()))
        throw py::value_error("out: byte size is not rows x blocks x a width x item size");
    for (std::size_t k = 0; k < read.size(); ++k)
        if (read[k].length - read[k].skip > width)
            throw py::value_error("parts[" + std::to_string(k) + "]: longer than out's width after its skip");
    auto* target = static_cast<std::uint8_t*>(out.mutable_data());
    Status status;
    {
        GilReleasedFor release(2 * static_cast<std::int64_t>(out.nbytes()));
        status = concatenate_padded(read.data(), static_cast<std::int64_t>(read.size()), blocks, width, item_bytes,
                                    target, pad_end, used.empty() ? nullptr : used.data());
    }
    check(status, "parts");
}

}  // namespace

void register_gather(py::module_& m) {
    m.def("concatenate_padded", &bind_concatenate_padded, py::arg("parts"), py::arg("lengths"), py::arg("skips"),
          py::arg("out"), py::arg("blocks"), py::arg("item_bytes"), py::arg("pad_end"), py::arg("used") = py::none());
    m.def("reorder_in_place", &bind_reorder_in_place, py::arg("arrays"), py::arg("ancestors"),
          py::arg("skip_unwritable"), py::arg("used") = py::none(), py::arg("axes") = py::none());
    m.def("keep_survivors", &bind_keep_survivors, py::arg("ancestors"));
    m.def("gather", &bind_gather, py::arg("x"), py::arg("ancestors"), py::arg("out"), py::arg("rows"),
          py::arg("num_particles"), py::arg("item_bytes"));
}

}  // namespace tiltsmc::bindings
