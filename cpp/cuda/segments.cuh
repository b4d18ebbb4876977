// One long row split over many blocks ("segments" of kSegment particles): the per-segment figures, their
// combination into the row's figures and the cumulative weight at each segment's start. Used for rows
// too long for one block to read quickly (log_normalize, systematic and stratified resampling).
#pragma once

#include <string>

#include "device_common.cuh"
#include "launch.cuh"

namespace tiltsmc::cuda::device {

constexpr int kSegmentThreads = 256;
constexpr int kSegmentItems = 8;
constexpr std::int64_t kSegment = kSegmentThreads * kSegmentItems;

struct SegmentStats {
    double top;      // the segment's largest log-weight
    double sum;      // sum of exp(x - top) over the segment
    double squares;  // sum of exp(x - top)^2
    std::int64_t bad;  // first NaN or +inf (row index), kNoIndex if none
};

// Block (row * segments + s) computes the SegmentStats of segment s of its row in one read.
template <typename T>
__global__ void __launch_bounds__(kSegmentThreads)
    segment_stats(const T* x, std::int64_t n, std::int64_t segments, SegmentStats* stats) {
    const BlockGroup<kSegmentThreads> g;
    const std::int64_t row = blockIdx.x / segments, segment = blockIdx.x % segments;
    const T* xr = x + row * n;
    const std::int64_t begin = segment * kSegment;
    const std::int64_t end = begin + kSegment < n ? begin + kSegment : n;
    double v[kSegmentItems];
    double top = -kInf;
    std::int64_t bad = kNoIndex;
#pragma unroll
    for (int k = 0; k < kSegmentItems; ++k) {
        const std::int64_t i = begin + k * kSegmentThreads + g.rank();
        v[k] = i < end ? load(xr, i) : -kInf;
        if (!(v[k] < kInf)) {
            bad = bad < i ? bad : i;
            v[k] = -kInf;
        }
        top = v[k] > top ? v[k] : top;
    }
    bad = g.reduce(bad, Min());
    top = g.reduce(top, Max());
    double sum = 0.0, squares = 0.0;
    if (top > -kInf) {
#pragma unroll
        for (int k = 0; k < kSegmentItems; ++k) {
            const double w = exp_nonpositive(v[k] - top);
            sum += w;
            squares += w * w;
        }
    }
    sum = g.reduce(sum, Sum());
    squares = g.reduce(squares, Sum());
    if (g.rank() == 0) stats[blockIdx.x] = SegmentStats{top, sum, squares, bad};
}

constexpr int kCombineThreads = 1024;

// Block `row` combines its segments as the CPU combines chunks: the row's shift, sums rescaled to it,
// offsets[s] = cumulative weight before segment s (ascending; offsets[segments] = sum), the last
// positive weight. Writes figures[row]; log_mean_w and ess when given. Errors are recorded here.
// Each thread takes a contiguous run of segments (one block-wide scan in all, whatever their number).
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    combine_segments(const T* x, std::int64_t n, std::int64_t segments, const SegmentStats* stats,
                     bool allow_zero_rows, double* offsets, RowFigures* figures, double* log_mean_w, double* ess,
                     ErrorRecord* record) {
    __shared__ double thread_end[kCombineThreads];
    const BlockGroup<kCombineThreads> g;
    const std::int64_t row = blockIdx.x;
    const SegmentStats* s = stats + row * segments;
    const T* xr = x + row * n;
    double* offset = offsets + row * (segments + 1);
    const std::int64_t per = (segments + kCombineThreads - 1) / kCombineThreads;
    const std::int64_t first = g.rank() * per;
    const std::int64_t stop = first + per < segments ? first + per : segments;
    std::int64_t bad = kNoIndex;
    double top = -kInf;
    for (std::int64_t b = first; b < stop; ++b) {
        bad = s[b].bad < bad ? s[b].bad : bad;
        top = s[b].top > top ? s[b].top : top;
    }
    bad = g.reduce(bad, Min());
    top = g.reduce(top, Max());
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    if (bad != kNoIndex || top == -kInf) {
        if (g.rank() == 0) {
            const bool zero = bad == kNoIndex;
            if (!zero) record_error(record, row * n + bad, isnan(load(xr, bad)) ? nan_weight : positive_infinity);
            else if (!allow_zero_rows) record_error(record, row * n + n - 1, zero_row);
            figures[row] = RowFigures{-kInf, 0.0, 0.0, -1, zero ? row_zero : row_bad};
            if (log_mean_w) log_mean_w[row] = zero ? -kInf : nan;
            if (ess) ess[row] = zero ? 0.0 : nan;
        }
        return;
    }
    // A segment whose every weight is flushed to zero against the row's maximum (as the resampling
    // kernels compute them) gets no cumulative weight, so it can own no slots.
    auto rescaled_sum = [&](std::int64_t b) {
        return s[b].top - top >= -708.0 ? s[b].sum * exp(s[b].top - top) : 0.0;
    };
    double local = 0.0, squares = 0.0;
    std::int64_t last_segment = -1;
    for (std::int64_t b = first; b < stop; ++b) {
        if (s[b].top - top < -708.0) continue;
        const double rescale = exp(s[b].top - top);
        local += s[b].sum * rescale;
        squares += s[b].squares * rescale * rescale;
        last_segment = b;
    }
    // Offsets: the thread's own sums in order from the end of the threads before it, then raised to
    // the largest value any earlier thread wrote, so that they ascend across threads too.
    const double through = g.inclusive_scan(local, Sum());
    thread_end[g.rank()] = through;
    g.sync();
    const double base = g.rank() > 0 ? thread_end[g.rank() - 1] : 0.0;
    double c = base;
    for (std::int64_t b = first; b < stop; ++b) c += rescaled_sum(b);
    const double upto = g.inclusive_scan(c, Max());  // (its barriers: every thread has read base)
    thread_end[g.rank()] = upto;
    g.sync();
    const double floor_value = g.rank() > 0 ? thread_end[g.rank() - 1] : 0.0;
    c = base;
    for (std::int64_t b = first; b < stop; ++b) {
        c += rescaled_sum(b);
        offset[b + 1] = c > floor_value ? c : floor_value;
    }
    squares = g.reduce(squares, Sum());
    last_segment = g.reduce(last_segment, Max());
    std::int64_t last = -1;
    const std::int64_t begin = last_segment * kSegment;
    const std::int64_t end = begin + kSegment < n ? begin + kSegment : n;
    for (std::int64_t i = begin + g.rank(); i < end; i += kCombineThreads)
        if (load(xr, i) - top >= -708.0) last = i;
    last = g.reduce(last, Max());  // its barriers also make the offsets written above visible
    if (g.rank() == 0) {
        offset[0] = 0.0;
        const double sum = offset[segments];
        figures[row] = RowFigures{top, sum, squares, last, row_ok};
        if (log_mean_w) log_mean_w[row] = top + log(sum) - log(static_cast<double>(n));
        if (ess) ess[row] = sum * sum / squares;
    }
}

// normalised = x - log(sum) for segment s of a row (block row * segments + s).
template <typename T>
__global__ void __launch_bounds__(kSegmentThreads)
    normalize_segments(const T* logw, std::int64_t n, std::int64_t segments, const RowFigures* figures,
                       T* normalised) {
    const std::int64_t row = blockIdx.x / segments, segment = blockIdx.x % segments;
    const RowFigures f = figures[row];
    if (f.state == row_bad) return;
    const double log_sum = f.state == row_ok ? f.shift + log(f.sum) : kInf;  // zero rows: -inf throughout
    const std::int64_t begin = row * n + segment * kSegment;
    const std::int64_t end = row * n + (segment * kSegment + kSegment < n ? segment * kSegment + kSegment : n);
#pragma unroll
    for (int k = 0; k < kSegmentItems; ++k) {
        const std::int64_t e = begin + k * kSegmentThreads + threadIdx.x;
        if (e < end) normalised[e] = static_cast<T>(load(logw, e) - log_sum);
    }
}

}  // namespace tiltsmc::cuda::device

namespace tiltsmc::cuda::detail {

// The figures of `rows` long rows, from their segments: segment_stats, then combine_segments (which records
// input errors, and writes log_mean_w and ess where given), with the scratch they fill, given back on the
// stream when this goes out of scope. `caller` names the kernel in launch errors.
class SegmentedRows {
public:
    template <typename T>
    SegmentedRows(const T* logw, std::int64_t rows, std::int64_t n, bool allow_zero_rows, double* log_mean_w,
                  double* ess, ErrorRecord* record, cudaStream_t stream, const char* caller)
        : segments((n + device::kSegment - 1) / device::kSegment),
          stats_(sizeof(device::SegmentStats) * rows * segments, stream),
          offsets_(sizeof(double) * rows * (segments + 1), stream),
          figures_(sizeof(device::RowFigures) * rows, stream) {
        device::segment_stats<T><<<grid_size(rows * segments), device::kSegmentThreads, 0, stream>>>(
            logw, n, segments, stats_.as<device::SegmentStats>());
        check_launch(("tiltsmc::cuda::segment_stats (" + std::string(caller) + ")").c_str());
        device::combine_segments<T><<<grid_size(rows), device::kCombineThreads, 0, stream>>>(
            logw, n, segments, stats_.as<device::SegmentStats>(), allow_zero_rows, offsets(), figures(), log_mean_w,
            ess, record);
        check_launch(("tiltsmc::cuda::combine_segments (" + std::string(caller) + ")").c_str());
    }

    const std::int64_t segments;
    // offsets[row * (segments + 1) + s]: the cumulative weight before segment s of the row.
    double* offsets() const { return offsets_.as<double>(); }
    device::RowFigures* figures() const { return figures_.as<device::RowFigures>(); }

private:
    Scratch stats_, offsets_, figures_;
};

}  // namespace tiltsmc::cuda::detail
