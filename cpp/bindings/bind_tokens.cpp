// Bindings of the token-sequence kernels. Each array's dtype, layout and shape is checked here against the
// sizes the kernel is given, so that no pointer is read or written past its array.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"

namespace tiltsmc::bindings {
namespace {

// A copy of a C-contiguous int64 array, taken with the GIL held.
std::vector<std::int64_t> snapshot(const py::array& array) {
    const auto* data = static_cast<const std::int64_t*>(array.data());
    return std::vector<std::int64_t>(data, data + size_of(array));
}

py::tuple bind_append_tokens(const py::handle& tokens_object, const py::handle& lengths_object,
                             const py::handle& finished_object, const py::handle& new_tokens_object,
                             const py::handle& active_object, const py::handle& stop_ids_object,
                             std::int64_t max_length) {
    py::array tokens = checked<std::int64_t>(tokens_object, "tokens", true);
    py::array lengths = checked<std::int64_t>(lengths_object, "lengths", true);
    py::array finished = checked<bool>(finished_object, "finished", true);
    py::array new_tokens = checked<std::int64_t>(new_tokens_object, "new_tokens");
    py::array active = checked<bool>(active_object, "active");
    py::array stop_ids = checked<std::int64_t>(stop_ids_object, "stop_ids");
    const std::int64_t rows = size_of(lengths);
    bool same_leading_axes = tokens.ndim() == lengths.ndim() + 1;
    for (py::ssize_t axis = 0; same_leading_axes && axis < lengths.ndim(); ++axis)
        same_leading_axes = tokens.shape(axis) == lengths.shape(axis);
    if (!same_leading_axes) throw py::value_error("tokens: expected lengths' shape followed by a capacity axis");
    const std::int64_t capacity = tokens.shape(tokens.ndim() - 1);
    for (const auto& [array, name] : {std::pair{&finished, "finished"}, std::pair{&new_tokens, "new_tokens"},
                                      std::pair{&active, "active"}})
        if (size_of(*array) != rows) throw py::value_error(std::string(name) + ": expected as many entries as lengths");
    if (max_length < 1) throw py::value_error("max_length: must be >= 1");
    check_disjoint({{&tokens, "tokens"}, {&lengths, "lengths"}, {&finished, "finished"}},
                   {{&new_tokens, "new_tokens"}, {&active, "active"}, {&stop_ids, "stop_ids"}});
    py::array_t<bool> still(lengths.request().shape);
    std::int64_t num_still = 0;
    Status status;
    {
        GilReleasedFor release(rows * 32);  // a token, a length and flags a row
        status = append_tokens(static_cast<std::int64_t*>(tokens.mutable_data()), rows, capacity,
                               static_cast<std::int64_t*>(lengths.mutable_data()),
                               static_cast<std::uint8_t*>(finished.mutable_data()),
                               static_cast<const std::int64_t*>(new_tokens.data()),
                               static_cast<const std::uint8_t*>(active.data()),
                               static_cast<const std::int64_t*>(stop_ids.data()), size_of(stop_ids), max_length,
                               reinterpret_cast<std::uint8_t*>(still.mutable_data()), &num_still);
    }
    if (status.code == StatusCode::index_out_of_range)
        throw py::value_error("lengths: trajectory " + std::to_string(status.row) + " is already " +
                              std::to_string(status.index) + " tokens long (at most " +
                              std::to_string(std::min(capacity, max_length)) + ")");
    check(status, status.code == StatusCode::input_changed ? "lengths" : "tokens");
    return py::make_tuple(still, num_still);
}

// A decoding step's arguments checked: the mask (rows, width), one still flag and one new token a row.
struct DecodeArguments {
    py::array mask, still, new_tokens;
    std::int64_t rows, width;
};

DecodeArguments decode_arguments(const py::handle& mask_object, const py::handle& still_object,
                                 const py::handle& new_tokens_object) {
    py::array mask = checked<std::int64_t>(mask_object, "mask");
    py::array still = checked<bool>(still_object, "still");
    py::array new_tokens = checked<std::int64_t>(new_tokens_object, "new_tokens");
    if (mask.ndim() != 2) throw py::value_error("mask: expected shape (rows, width)");
    const std::int64_t rows = mask.shape(0), width = mask.shape(1);
    if (size_of(still) != rows) throw py::value_error("still: expected one entry per row of mask");
    if (size_of(new_tokens) != rows) throw py::value_error("new_tokens: expected one entry per row of mask");
    return {mask, still, new_tokens, rows, width};
}

py::tuple bind_decode_inputs(const py::handle& mask_object, const py::handle& still_object,
                             const py::handle& new_tokens_object, std::int64_t pad) {
    const DecodeArguments a = decode_arguments(mask_object, still_object, new_tokens_object);
    py::array_t<std::int64_t> input_ids({a.rows, std::int64_t{1}});
    py::array_t<std::int64_t> next_mask({a.rows, a.width + 1});
    py::array_t<std::int64_t> positions({a.rows, std::int64_t{1}});
    {
        GilReleasedFor release(a.rows * (a.width + 1) * 16);  // the mask read, the next one written
        decode_inputs(static_cast<const std::int64_t*>(a.mask.data()), a.rows, a.width,
                      static_cast<const std::uint8_t*>(a.still.data()),
                      static_cast<const std::int64_t*>(a.new_tokens.data()), pad, input_ids.mutable_data(),
                      next_mask.mutable_data(), positions.mutable_data());
    }
    return py::make_tuple(input_ids, next_mask, positions);
}

py::tuple bind_decode_inputs_right_padded(const py::handle& mask_object, const py::handle& still_object,
                                          const py::handle& new_tokens_object, std::int64_t pad) {
    const DecodeArguments a = decode_arguments(mask_object, still_object, new_tokens_object);
    py::array_t<std::int64_t> input_ids({a.rows, std::int64_t{1}});
    py::array_t<std::int64_t> feed_mask({a.rows, a.width + 1});
    py::array_t<std::int64_t> next_mask({a.rows, a.width + 1});
    py::array_t<std::int64_t> positions({a.rows, std::int64_t{1}});
    {
        GilReleasedFor release(a.rows * (a.width + 1) * 24);  // the mask read, two written
        decode_inputs_right_padded(static_cast<const std::int64_t*>(a.mask.data()), a.rows, a.width,
                                   static_cast<const std::uint8_t*>(a.still.data()),
                                   static_cast<const std::int64_t*>(a.new_tokens.data()), pad,
                                   input_ids.mutable_data(), feed_mask.mutable_data(), next_mask.mutable_data(),
                                   positions.mutable_data());
    }
    return py::make_tuple(input_ids, feed_mask, positions, next_mask);
}

py::tuple bind_right_padded_prefixes(const py::handle& prompt_ids_object, const py::handle& prompt_offsets_object,
                                     const py::handle& tokens_object, const py::handle& lengths_object,
                                     const py::object& selected_object, std::int64_t pad, bool with_positions) {
    py::array prompt_ids = checked<std::int64_t>(prompt_ids_object, "prompt_ids");
    py::array offsets = checked<std::int64_t>(prompt_offsets_object, "prompt_offsets");
    py::array tokens = checked<std::int64_t>(tokens_object, "tokens");
    py::array lengths = checked<std::int64_t>(lengths_object, "lengths");
    if (lengths.ndim() != 2) throw py::value_error("lengths: expected shape (B, N)");
    const std::int64_t batch = lengths.shape(0), n = lengths.shape(1);
    if (n < 1) throw py::value_error("lengths: expected at least one particle per prompt");
    if (tokens.ndim() != 3 || tokens.shape(0) != batch || tokens.shape(1) != n)
        throw py::value_error("tokens: expected shape (B, N, capacity) with lengths' (B, N)");
    const std::int64_t capacity = tokens.shape(2);
    if (offsets.ndim() != 1 || offsets.shape(0) != batch + 1)
        throw py::value_error("prompt_offsets: expected B + 1 offsets");
    // The offsets, the selection and the lengths are copied before they are checked: the kernel then uses
    // exactly the values checked, whatever another thread does to the arrays meanwhile (B * N + B + 1 + rows
    // integers, against the rows x width ids, mask and positions written).
    const std::vector<std::int64_t> offset = snapshot(offsets);
    if (offset[static_cast<std::size_t>(batch)] != size_of(prompt_ids))
        throw py::value_error("prompt_offsets: the last offset must be the number of prompt tokens");
    std::vector<std::int64_t> selection;
    const std::int64_t* selection_data = nullptr;
    std::int64_t num_rows = batch * n;
    if (!selected_object.is_none()) {
        const py::array selected = checked<std::int64_t>(selected_object, "selected");
        selection = snapshot(selected);
        selection_data = selection.data();
        num_rows = size_of(selected);
    }
    const std::vector<std::int64_t> generated = snapshot(lengths);
    std::int64_t width = 0;
    Status status =
        prefix_width(offset.data(), batch, n, capacity, generated.data(), selection_data, num_rows, &width);
    if (status.code == StatusCode::bad_size)
        throw py::value_error("prompt_offsets: expected offsets ascending from 0");
    if (status.code == StatusCode::index_out_of_range) {
        const std::int64_t r = status.row;
        if (selection_data && (selection_data[r] < 0 || selection_data[r] >= batch * n))
            throw py::value_error("selected: particle " + std::to_string(selection_data[r]) + " at row " +
                                  std::to_string(r) + " is outside [0, B * N)");
        throw py::value_error("lengths: " + std::to_string(status.index) + " tokens at row " + std::to_string(r) +
                              " is outside [0, " + std::to_string(capacity) + "]");
    }
    check(status, "lengths");
    py::array_t<std::int64_t> ids({num_rows, width});
    py::array_t<std::int64_t> mask({num_rows, width});
    py::array_t<std::int64_t> last(num_rows);
    py::object positions = py::none();
    std::int64_t* position_data = nullptr;
    if (with_positions) {
        py::array_t<std::int64_t> position_array({num_rows, width});
        position_data = position_array.mutable_data();
        positions = position_array;
    }
    {
        GilReleasedFor release(num_rows * width * (with_positions ? 24 : 16));  // ids, mask (positions) written
        right_padded_prefixes(static_cast<const std::int64_t*>(prompt_ids.data()), offset.data(), n,
                              static_cast<const std::int64_t*>(tokens.data()), capacity, generated.data(), selection_data,
                              num_rows, width, pad, ids.mutable_data(), mask.mutable_data(), last.mutable_data(),
                              position_data);
    }
    return py::make_tuple(ids, mask, last, positions);
}

template <typename T>
py::array_t<double> read_typed(const py::array& scores, std::int64_t rows, std::int64_t width,
                               const std::int64_t* columns, int kind) {
    py::array_t<double> log_values(rows);
    Status status;
    {
        GilReleasedFor release(rows * 24);  // a column, a score and a log-value a row
        status = read_log_values(static_cast<const T*>(scores.data()), rows, width, columns,
                                 static_cast<ScoreKind>(kind), log_values.mutable_data());
    }
    const std::string where = "row " + std::to_string(status.row) + ", column " + std::to_string(status.index);
    if (status.code == StatusCode::nan_weight) throw py::value_error("scores: NaN at " + where);
    if (status.code == StatusCode::positive_infinity)
        throw py::value_error("scores: a log-value of +inf at " + where + " (log-values must be finite or -inf)");
    if (status.code == StatusCode::outside_unit_interval)
        throw py::value_error("scores: a probability outside [0, 1] at " + where);
    if (status.code == StatusCode::index_out_of_range) throw py::value_error("columns: out of range at " + where);
    check(status, status.code == StatusCode::input_changed ? "columns" : "scores");
    return log_values;
}

py::array_t<double> bind_read_log_values(const py::handle& scores_object, std::int64_t rows,
                                         const py::object& columns_object, int kind) {
    if (!py::isinstance<py::array>(scores_object)) throw py::type_error("scores: expected a numpy array");
    auto scores = py::reinterpret_borrow<py::array>(scores_object);
    if (!(scores.flags() & py::array::c_style)) throw py::value_error("scores: must be C-contiguous");
    if (kind < 0 || kind > 2) throw py::value_error("kind: expected 0 (log_value), 1 (prob) or 2 (logit)");
    if (rows < 1) throw py::value_error("rows: expected at least one row, got " + std::to_string(rows));
    if (size_of(scores) % rows != 0)
        throw py::value_error("scores: expected rows x width scores, got " + std::to_string(size_of(scores)) +
                              " scores for " + std::to_string(rows) + " rows");
    const std::int64_t width = size_of(scores) / rows;
    if (width < 1)
        throw py::value_error("scores: no score per row (width 0): expected at least one score for each of the " +
                              std::to_string(rows) + " rows");
    std::optional<py::array> columns;
    const std::int64_t* column_data = nullptr;
    if (!columns_object.is_none()) {
        columns = checked<std::int64_t>(columns_object, "columns");
        if (size_of(*columns) != rows) throw py::value_error("columns: expected one column per row");
        column_data = static_cast<const std::int64_t*>(columns->data());
    }
    if (has_dtype(scores, py::dtype::of<float>()))
        return read_typed<float>(readable(scores), rows, width, column_data, kind);
    if (has_dtype(scores, py::dtype::of<double>()))
        return read_typed<double>(readable(scores), rows, width, column_data, kind);
    throw py::type_error("scores: expected float32 or float64, got " + std::string(py::str(scores.dtype())));
}

}  // namespace

void register_tokens(py::module_& m) {
    m.def("append_tokens", &bind_append_tokens, py::arg("tokens"), py::arg("lengths"), py::arg("finished"),
          py::arg("new_tokens"), py::arg("active"), py::arg("stop_ids"), py::arg("max_length"));
    m.def("decode_inputs", &bind_decode_inputs, py::arg("mask"), py::arg("still"), py::arg("new_tokens"),
          py::arg("pad"));
    m.def("decode_inputs_right_padded", &bind_decode_inputs_right_padded, py::arg("mask"), py::arg("still"),
          py::arg("new_tokens"), py::arg("pad"));
    m.def("right_padded_prefixes", &bind_right_padded_prefixes, py::arg("prompt_ids"), py::arg("prompt_offsets"),
          py::arg("tokens"), py::arg("lengths"), py::arg("selected"), py::arg("pad"), py::arg("with_positions"));
    m.def("read_log_values", &bind_read_log_values, py::arg("scores"), py::arg("rows"), py::arg("columns"),
          py::arg("kind"));
}

}  // namespace tiltsmc::bindings
