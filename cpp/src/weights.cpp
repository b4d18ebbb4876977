// Weight normalisation, pool selection and Metropolis-Hastings acceptance.
#include <algorithm>
#include <cmath>
#include <vector>

#include "tiltsmc/kernels.hpp"
#include "tiltsmc/philox.hpp"
#include "tiltsmc/read_once.hpp"
#include "tiltsmc/row_weights.hpp"

namespace tiltsmc {
namespace {

template <typename T>
TILTSMC_SIMD_CLONES void subtract(const T* x, std::int64_t len, double shift, T* out) {
    for (std::int64_t i = 0; i < len; ++i) out[i] = static_cast<T>(static_cast<double>(x[i]) - shift);
}

// Per-thread scratch of the row kernels, made once per range of rows (no thread-local lookups per row).
struct RowScratch {
    RowWeights rw;
    std::vector<double> weights;  // w_i = exp(x_i - max) of a row, vectorised once
    std::vector<double> scores;   // a row converted to float64 (sample_logits)
};

template <typename T>
Status normalize_row(const T* x, std::int64_t n, std::int64_t row, bool allow_zero_rows, bool split,
                     T* normalised, double* log_mean_w, double* ess, RowWeights& rw) {
    row_weights(x, n, row, nullptr, split, rw);
    if (rw.status.code == StatusCode::zero_row && allow_zero_rows) {
        if (normalised) std::fill(normalised, normalised + n, static_cast<T>(-kInf));
        *log_mean_w = -kInf;
        *ess = 0.0;
        return {};
    }
    if (!rw.status.ok()) return rw.status;
    const double log_sum = rw.shift + std::log(rw.sum);
    *log_mean_w = log_sum - std::log(static_cast<double>(n));
    *ess = rw.sum * rw.sum / rw.sum_squares;
    if (!normalised) return {};
    const std::int64_t chunks = static_cast<std::int64_t>(rw.chunk_offset.size()) - 1;
    auto chunk = [&](std::int64_t c) {
        const std::int64_t begin = c * kChunk;
        subtract(x + begin, std::min(kChunk, n - begin), log_sum, normalised + begin);
    };
    if (split) {
        parallel_for(chunks, n, [&](std::int64_t b, std::int64_t e) {
            for (std::int64_t c = b; c < e; ++c) chunk(c);
        });
    } else {
        for (std::int64_t c = 0; c < chunks; ++c) chunk(c);
    }
    return {};
}

// One index of x[0, n) drawn with probability w_i from the stream (key, row), and log mean w.
template <typename T>
Status select_row(const T* x, std::int64_t n, std::int64_t row, std::uint64_t key, std::uint64_t counter,
                  double log_n, RowScratch& scratch, std::int64_t* index, double* log_mean_w) {
    RowWeights& rw = scratch.rw;
    std::vector<double>& w = scratch.weights;
    w.resize(static_cast<std::size_t>(n));
    row_weights(x, n, row, w.data(), false, rw);
    if (!rw.status.ok()) return rw.status;
    *log_mean_w = rw.shift + std::log(rw.sum) - log_n;
    UniformStream stream(key, counter);
    const double target = stream.next() * rw.sum;
    double cumulative = 0.0;
    std::int64_t i = 0;
    for (; i < rw.last_positive; ++i) {
        cumulative += w[static_cast<std::size_t>(i)];
        if (cumulative > target) break;
    }
    *index = i;
    return {};
}

// body(r, scratch) for every row, over threads for large work; the first row's error is returned.
template <typename Body>
Status for_rows(std::int64_t rows, std::int64_t work, const Body& body) {
    std::vector<Status> statuses(static_cast<std::size_t>(rows));
    parallel_for(rows, work, [&](std::int64_t begin, std::int64_t end) {
        RowScratch scratch;
        for (std::int64_t r = begin; r < end; ++r) statuses[static_cast<std::size_t>(r)] = body(r, scratch);
    });
    for (const Status& status : statuses)
        if (!status.ok()) return status;
    return {};
}

}  // namespace

template <typename T>
Status log_normalize(const T* logw, std::int64_t rows, std::int64_t n, bool allow_zero_rows, T* normalised,
                     double* log_mean_w, double* ess) {
    if (rows < 0 || n < 1) return {StatusCode::bad_size, -1, -1};
    if (rows == 1) {
        RowWeights rw;
        return normalize_row(logw, n, 0, allow_zero_rows, true, normalised, log_mean_w, ess, rw);
    }
    return for_rows(rows, rows * n, [&](std::int64_t r, RowScratch& scratch) {
        return normalize_row(logw + r * n, n, r, allow_zero_rows, false, normalised ? normalised + r * n : nullptr,
                             log_mean_w + r, ess + r, scratch.rw);
    });
}

template <typename T>
Status pool_select(const T* logw, std::int64_t rows, std::int64_t n, std::uint64_t key, std::int64_t* index,
                   double* log_mean_w, const std::uint64_t* keys, const std::uint64_t* counters) {
    if (rows < 0 || n < 1) return {StatusCode::bad_size, -1, -1};
    const double log_n = std::log(static_cast<double>(n));  // once, not per row
    return for_rows(rows, rows * n, [&](std::int64_t r, RowScratch& scratch) {
        const RowStream stream = row_stream(keys, counters, key, r);
        return select_row(logw + r * n, n, r, stream.key, stream.counter, log_n, scratch, index + r, log_mean_w + r);
    });
}

namespace {

// Sum of w[begin, end), eight lanes at a time.
TILTSMC_SIMD_CLONES double sum_range(const double* w, std::int64_t begin, std::int64_t end) {
    Vec8 lanes = splat(0.0);
    std::int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) lanes += load8(w + i);
    double total = 0.0;
    for (int k = 0; k < kLanes; ++k) total += lanes[k];
    for (; i < end; ++i) total += w[i];
    return total;
}

// log p(v) for scores s whose weights w = exp(s - shift) and figures rw select_row has just computed:
// (s_v - shift) - log(sum), where sum >= 1 (the maximum's weight is exp(0) = 1) and s_v <= shift, so never
// positive. Where v is a maximum (s_v = shift) and sum < 2, log(sum) would have lost the digits of the
// other terms below the last bit of 1: -log1p(the other terms, summed apart) keeps them.
double log_probability(const double* s, const double* w, std::int64_t n, const RowWeights& rw, std::int64_t v) {
    const double d = s[v] - rw.shift;
    if (d == 0.0 && rw.sum < 2.0) {
        const double rest = sum_range(w, 0, v) + sum_range(w, v + 1, n);
        return rest > 0.0 ? -std::log1p(rest) : 0.0;
    }
    return d - std::log(rw.sum);
}

}  // namespace

template <typename T>
Status sample_logits(const T* logits, std::int64_t rows, std::int64_t n, double temperature, std::uint64_t key,
                     const std::uint8_t* active, std::int64_t* index, double* log_prob, const std::uint64_t* keys,
                     const std::uint64_t* counters) {
    if (rows < 0 || n < 1 || !(temperature > 0.0)) return {StatusCode::bad_size, -1, -1};
    const double log_count = std::log(static_cast<double>(n));  // pool_select's log n in log_mean_w
    return for_rows(rows, rows * n, [&](std::int64_t r, RowScratch& scratch) {
        if (active && read_once(active + r) == 0) {
            index[r] = 0;
            log_prob[r] = 0.0;
            return Status{};
        }
        // the row's stream, read once (both draws below, if there are two, use the same)
        const RowStream stream = row_stream(keys, counters, key, r);
        std::vector<double>& scores = scratch.scores;
        scores.resize(static_cast<std::size_t>(n));
        const T* x = logits + r * n;
        for (std::int64_t i = 0; i < n; ++i) scores[static_cast<std::size_t>(i)] = static_cast<double>(x[i]);
        if (temperature != 1.0)
            for (double& s : scores) s /= temperature;
        std::int64_t v = 0;
        double log_mean_w = 0.0;
        Status status = select_row(scores.data(), n, r, stream.key, stream.counter, log_count, scratch, &v, &log_mean_w);
        if ((status.code == StatusCode::positive_infinity || status.code == StatusCode::zero_row) &&
            temperature < 1.0) {
            // Finite logits whose scores overflowed to +inf, or all to -inf? Then the scores are
            // (x - max x) / temperature <= 0 instead: the same law. The logits themselves are read once
            // more (the error reported, if any, is theirs).
            double top = -kInf;
            for (std::int64_t i = 0; i < n; ++i) {
                const double value = static_cast<double>(x[i]);
                if (std::isnan(value)) return Status{StatusCode::nan_weight, r, i};
                if (value == kInf) return Status{StatusCode::positive_infinity, r, i};
                scores[static_cast<std::size_t>(i)] = value;
                top = std::max(top, value);
            }
            if (top == -kInf) return Status{StatusCode::zero_row, r, -1};
            for (double& s : scores) s = (s - top) / temperature;
            status = select_row(scores.data(), n, r, stream.key, stream.counter, log_count, scratch, &v, &log_mean_w);
        }
        if (!status.ok()) return status;
        index[r] = v;
        log_prob[r] = log_probability(scores.data(), scratch.weights.data(), n, scratch.rw, v);
        return Status{};
    });
}

Status mh_accept(const double* log_z_current, const double* log_z_proposed, std::int64_t rows,
                 std::uint64_t key, std::uint8_t* accept) {
    if (rows < 0) return {StatusCode::bad_size, -1, -1};
    for (std::int64_t r = 0; r < rows; ++r) {
        for (int which = 0; which < 2; ++which) {
            const double v = which == 0 ? log_z_current[r] : log_z_proposed[r];
            if (std::isnan(v)) return {StatusCode::nan_weight, r, which};
            if (v == kInf) return {StatusCode::positive_infinity, r, which};
        }
    }
    for (std::int64_t r = 0; r < rows; ++r) {
        const double u = UniformStream(key, static_cast<std::uint64_t>(r)).next();
        const double current = log_z_current[r], proposed = log_z_proposed[r];
        bool take;
        if (current == -kInf) {
            take = true;
        } else if (proposed == -kInf) {
            take = false;
        } else {
            const double log_ratio = proposed - current;
            take = log_ratio >= 0.0 || u < std::exp(log_ratio);
        }
        accept[r] = take ? 1 : 0;
    }
    return {};
}

template Status log_normalize<float>(const float*, std::int64_t, std::int64_t, bool, float*, double*, double*);
template Status log_normalize<double>(const double*, std::int64_t, std::int64_t, bool, double*, double*,
                                      double*);
template Status pool_select<float>(const float*, std::int64_t, std::int64_t, std::uint64_t, std::int64_t*,
                                   double*, const std::uint64_t*, const std::uint64_t*);
template Status sample_logits<float>(const float*, std::int64_t, std::int64_t, double, std::uint64_t,
                                     const std::uint8_t*, std::int64_t*, double*, const std::uint64_t*,
                                     const std::uint64_t*);
template Status sample_logits<double>(const double*, std::int64_t, std::int64_t, double, std::uint64_t,
                                      const std::uint8_t*, std::int64_t*, double*, const std::uint64_t*,
                                      const std::uint64_t*);
template Status pool_select<double>(const double*, std::int64_t, std::int64_t, std::uint64_t, std::int64_t*,
                                    double*, const std::uint64_t*, const std::uint64_t*);

}  // namespace tiltsmc
