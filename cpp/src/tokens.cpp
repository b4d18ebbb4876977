// Token-sequence bookkeeping for the ONNX models: growing trajectories, the inputs of a cached decoding
// step, right-padded prefix batches for scoring models, and reading scores as log-values.
#include <algorithm>
#include <cmath>
#include <limits>

#include "tiltsmc/kernels.hpp"
#include "tiltsmc/read_once.hpp"

namespace tiltsmc {
namespace {
constexpr double kInfinity = std::numeric_limits<double>::infinity();
}  // namespace

Status append_tokens(std::int64_t* tokens, std::int64_t rows, std::int64_t capacity, std::int64_t* lengths,
                     std::uint8_t* finished, const std::int64_t* new_tokens, const std::uint8_t* active,
                     const std::int64_t* stop_ids, std::int64_t num_stop, std::int64_t max_length,
                     std::uint8_t* still, std::int64_t* num_still) {
    if (rows < 0 || capacity < 0 || num_stop < 0 || max_length < 1) return {StatusCode::bad_size, -1, -1};
    const std::int64_t limit = std::min(capacity, max_length);
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t length = read_once(lengths + r);
        if (read_once(active + r) != 0 && !(length >= 0 && length < limit))
            return {StatusCode::index_out_of_range, r, length};
    }
    std::int64_t going = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        still[r] = 0;
        if (read_once(active + r) == 0) continue;
        // Read once and checked again where it is used (another thread may have changed it since).
        const std::int64_t length = read_once(lengths + r);
        if (!(length >= 0 && length < limit)) return {StatusCode::input_changed, r, length};
        const std::int64_t token = new_tokens[r];
        tokens[r * capacity + length] = token;
        lengths[r] = length + 1;
        const bool stops =
            length + 1 >= max_length || std::find(stop_ids, stop_ids + num_stop, token) != stop_ids + num_stop;
        if (stops) finished[r] = 1;
        still[r] = finished[r] != 0 ? 0 : 1;
        going += still[r];
    }
    *num_still = going;
    return {};
}

void decode_inputs(const std::int64_t* mask, std::int64_t rows, std::int64_t width, const std::uint8_t* still,
                   const std::int64_t* new_tokens, std::int64_t pad, std::int64_t* input_ids,
                   std::int64_t* next_mask, std::int64_t* positions) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t* row = mask + r * width;
        std::int64_t* next = next_mask + r * (width + 1);
        std::int64_t seen = 0;  // the nonzero entries (a mask of other values than 0/1 cannot overflow it)
        for (std::int64_t j = 0; j < width; ++j) {
            next[j] = row[j];
            seen += row[j] != 0;
        }
        const bool fed = still[r] != 0;
        next[width] = fed ? 1 : 0;
        positions[r] = seen;
        input_ids[r] = fed ? new_tokens[r] : pad;
    }
}

void decode_inputs_right_padded(const std::int64_t* mask, std::int64_t rows, std::int64_t width,
                                const std::uint8_t* still, const std::int64_t* new_tokens, std::int64_t pad,
                                std::int64_t* input_ids, std::int64_t* feed_mask, std::int64_t* next_mask,
                                std::int64_t* positions) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t* row = mask + r * width;
        std::int64_t length = 0;  // at most width: the columns below stay within width + 1
        for (std::int64_t j = 0; j < width; ++j) length += row[j] != 0;
        const bool fed = still[r] != 0;
        std::int64_t* feed = feed_mask + r * (width + 1);
        std::int64_t* next = next_mask + r * (width + 1);
        for (std::int64_t j = 0; j <= width; ++j) {
            feed[j] = j <= length ? 1 : 0;
            next[j] = j < length + (fed ? 1 : 0) ? 1 : 0;
        }
        positions[r] = length;
        input_ids[r] = fed ? new_tokens[r] : pad;
    }
}

Status prefix_width(const std::int64_t* prompt_offsets, std::int64_t batch, std::int64_t n, std::int64_t capacity,
                    const std::int64_t* lengths, const std::int64_t* selected, std::int64_t num_rows,
                    std::int64_t* width) {
    if (batch < 0 || n < 1 || capacity < 0 || num_rows < 0 || prompt_offsets[0] != 0)
        return {StatusCode::bad_size, -1, -1};
    for (std::int64_t b = 0; b < batch; ++b)
        if (prompt_offsets[b + 1] < prompt_offsets[b]) return {StatusCode::bad_size, b, -1};
    std::int64_t widest = 0;
    for (std::int64_t r = 0; r < num_rows; ++r) {
        const std::int64_t particle = selected ? selected[r] : r;
        if (particle < 0 || particle >= batch * n) return {StatusCode::index_out_of_range, r, particle};
        const std::int64_t generated = lengths[particle];
        if (generated < 0 || generated > capacity) return {StatusCode::index_out_of_range, r, generated};
        const std::int64_t b = particle / n;
        widest = std::max(widest, prompt_offsets[b + 1] - prompt_offsets[b] + generated);
    }
    *width = widest;
    return {};
}

void right_padded_prefixes(const std::int64_t* prompt_ids, const std::int64_t* prompt_offsets, std::int64_t n,
                           const std::int64_t* tokens, std::int64_t capacity, const std::int64_t* lengths,
                           const std::int64_t* selected, std::int64_t num_rows, std::int64_t width, std::int64_t pad,
                           std::int64_t* ids, std::int64_t* mask, std::int64_t* last, std::int64_t* positions) {
    for (std::int64_t r = 0; r < num_rows; ++r) {
        const std::int64_t particle = selected ? selected[r] : r;
        const std::int64_t b = particle / n;
        const std::int64_t prompt_length = prompt_offsets[b + 1] - prompt_offsets[b];
        const std::int64_t length = prompt_length + lengths[particle];
        std::int64_t* row = ids + r * width;
        std::copy(prompt_ids + prompt_offsets[b], prompt_ids + prompt_offsets[b + 1], row);
        std::copy(tokens + particle * capacity, tokens + particle * capacity + lengths[particle], row + prompt_length);
        std::fill(row + length, row + width, pad);
        std::int64_t* mask_row = mask + r * width;
        std::fill(mask_row, mask_row + length, std::int64_t{1});
        std::fill(mask_row + length, mask_row + width, std::int64_t{0});
        last[r] = length - 1;
        if (positions) {
            std::int64_t* position_row = positions + r * width;
            const std::int64_t final_position = std::max<std::int64_t>(length - 1, 0);
            for (std::int64_t j = 0; j < width; ++j) position_row[j] = std::min(j, final_position);
        }
    }
}

template <typename T>
Status read_log_values(const T* scores, std::int64_t rows, std::int64_t width, const std::int64_t* columns,
                       ScoreKind kind, double* log_values) {
    if (rows < 0 || width < 1) return {StatusCode::bad_size, -1, -1};
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t column = columns ? read_once(columns + r) : width - 1;
        if (!in_range(column, width)) return {StatusCode::index_out_of_range, r, column};
        const double score = static_cast<double>(scores[r * width + column]);
        if (std::isnan(score)) return {StatusCode::nan_weight, r, column};
        if (kind == ScoreKind::log_value && score == kInfinity) return {StatusCode::positive_infinity, r, column};
        if (kind == ScoreKind::prob && !(score >= 0.0 && score <= 1.0))
            return {StatusCode::outside_unit_interval, r, column};
    }
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t column = columns ? read_once(columns + r) : width - 1;  // checked again where used
        if (!in_range(column, width)) return {StatusCode::input_changed, r, column};
        const double score = static_cast<double>(scores[r * width + column]);
        if (kind == ScoreKind::prob) {
            log_values[r] = std::log(score);
        } else if (kind == ScoreKind::logit) {
            // log sigmoid(s) = -log(1 + exp(-s)) = -logaddexp(0, -s), evaluated as numpy's logaddexp does
            // (the same value to the last bit).
            const double y = -score;
            double softplus;
            if (y == 0.0) {
                softplus = 0.6931471805599453;  // log 2
            } else if (y > 0.0) {
                softplus = y + std::log1p(std::exp(-y));
            } else {
                softplus = std::log1p(std::exp(y));
            }
            log_values[r] = -softplus;
        } else {
            log_values[r] = score;
        }
    }
    return {};
}

template Status read_log_values<float>(const float*, std::int64_t, std::int64_t, const std::int64_t*, ScoreKind,
                                       double*);
template Status read_log_values<double>(const double*, std::int64_t, std::int64_t, const std::int64_t*, ScoreKind,
                                        double*);

}  // namespace tiltsmc
