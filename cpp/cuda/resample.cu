// CUDA resampling (systematic, stratified, multinomial, residual) and the fused SMC step.
//
// Every scheme is the CPU's (cpp/src/resample.cpp) with the same draws of the row's Philox stream:
// systematic and stratified give particle i the slots between the number of points below its cumulative
// weights C_{i-1} and C_i; multinomial walks sorted uniforms (normalised exponential spacings) through
// C; residual takes floor(m w_i) copies and draws the rest multinomially from the residual weights.
// Cumulative weights come from parallel scans, made ascending (a running maximum) and flat across
// zero weights, so weight-zero particles are never chosen and ancestors always ascend.
#include "launch.cuh"
#include "segments.cuh"

namespace tiltsmc::cuda {
namespace device {
namespace {

// Particles tile + k (k < group size) own the output slots [stop_{k-1}, stop_k) with stop_{-1} = lo:
// each thread takes slots in turn and finds their owner by bisection. Returns the tile's last stop.
template <typename Group>
__device__ std::int64_t write_slots(const Group& g, std::int64_t tile, std::int64_t stop, std::int64_t lo,
                                    std::int64_t* stops, std::int64_t* out) {
    stops[g.rank()] = stop;
    g.sync();
    const std::int64_t hi = stops[Group::kSize - 1];
    for (std::int64_t j = lo + g.rank(); j < hi; j += Group::kSize) {
        int a = 0, b = Group::kSize;
        while (a < b) {
            const int mid = (a + b) / 2;
            if (stops[mid] > j) b = mid;
            else a = mid + 1;
        }
        out[j] = tile + a;
    }
    g.sync();  // stops is rewritten by the next tile
    return hi;
}

// Systematic and stratified resampling of one row (closed-form slot counts).
template <typename Group, typename T>
__device__ void closed_form_row(const Group& g, const T* x, std::int64_t n, const RowFigures& f, Scheme scheme,
                                std::int64_t m, const Philox4x32& gen, std::uint64_t row, std::int64_t* stops,
                                std::int64_t* out) {
    const double scale = static_cast<double>(m) / f.sum;
    const double u = scheme == Scheme::systematic ? philox_uniform_at(gen, row, 0) : 0.0;
    double carry = 0.0;
    std::int64_t lo = 0;
    for (std::int64_t tile = 0; tile < n && lo < m; tile += Group::kSize) {
        const std::int64_t i = tile + g.rank();
        const double w = i < n ? exp_nonpositive(load(x, i) - f.shift) : 0.0;
        double c = cumulative_weight(g, w, carry);
        c = c < f.sum ? c : f.sum;
        std::int64_t stop = m;
        if (i < f.last_positive)
            stop = scheme == Scheme::systematic ? points_below(c, scale, u, m) : strata_below(c, scale, m, gen, row);
        lo = write_slots(g, tile, stop, lo, stops, out);
    }
}

// `count` multinomial draws over cumulative weights c[0, last] (total `total`), ascending, into out:
// S_j = E_0 + ... + E_j with E_j = -log(1 - u_j), points S_j * total / (S_{count-1} + E_count).
template <typename Group>
__device__ void multinomial_points(const Group& g, const double* c, std::int64_t last, double total,
                                   std::int64_t count, const Philox4x32& gen, std::uint64_t row, std::int64_t* out) {
    double spacings = 0.0;
    for (std::int64_t j = g.rank(); j <= count; j += Group::kSize)
        spacings += -log(1.0 - philox_uniform_at(gen, row, static_cast<std::uint64_t>(j)));
    const double scale = total / g.reduce(spacings, Sum());
    double carry = 0.0;
    for (std::int64_t tile = 0; tile < count; tile += Group::kSize) {
        const std::int64_t j = tile + g.rank();
        const double e = j < count ? -log(1.0 - philox_uniform_at(gen, row, static_cast<std::uint64_t>(j))) : 0.0;
        double s = g.inclusive_scan(e, Sum()) + carry;
        s = g.inclusive_scan(s, Max());
        carry = g.last(s);
        if (j < count) out[j] = first_above(c, last, s * scale);
    }
}

// Multinomial resampling of one row; scratch holds n doubles.
template <typename Group, typename T>
__device__ void multinomial_row(const Group& g, const T* x, std::int64_t n, const RowFigures& f, std::int64_t m,
                                const Philox4x32& gen, std::uint64_t row, double* cumulative, std::int64_t* out) {
    double carry = 0.0;
    for (std::int64_t tile = 0; tile <= f.last_positive; tile += Group::kSize) {
        const std::int64_t i = tile + g.rank();
        const double w = i < n ? exp_nonpositive(load(x, i) - f.shift) : 0.0;
        const double c = cumulative_weight(g, w, carry);
        if (i < n) cumulative[i] = c;
    }
    g.sync();
    multinomial_points(g, cumulative, f.last_positive, f.sum, m, gen, row, out);
}

// Residual resampling of one row; scratch holds n doubles and 2 n int64.
template <typename Group, typename T>
__device__ void residual_row(const Group& g, const T* x, std::int64_t n, const RowFigures& f, std::int64_t m,
                             const Philox4x32& gen, std::uint64_t row, double* residual_cumulative,
                             std::int64_t* whole_stops, std::int64_t* drawn, std::int64_t* stops,
                             std::int64_t* out) {
    const double scale = static_cast<double>(m) / f.sum;
    std::int64_t whole_carry = 0, last_residual = -1;
    double residual_carry = 0.0;
    for (std::int64_t tile = 0; tile < n; tile += Group::kSize) {
        const std::int64_t i = tile + g.rank();
        const double expected = i < n ? exp_nonpositive(load(x, i) - f.shift) * scale : 0.0;
        const auto floor_expected = static_cast<std::int64_t>(floor(expected));
        // copies: floor(m w_i), capped so that the running total never exceeds m (as the CPU's loop)
        const std::int64_t through = g.inclusive_scan(floor_expected, Sum()) + whole_carry;
        const std::int64_t capped = through < m ? through : m;
        const std::int64_t before = through - floor_expected < m ? through - floor_expected : m;
        double residual = expected - static_cast<double>(capped - before);
        residual = residual > 0.0 && i <= f.last_positive ? residual : 0.0;
        if (residual > 0.0) last_residual = i;
        const double c = cumulative_weight(g, residual, residual_carry);
        if (i < n) {
            residual_cumulative[i] = c;
            whole_stops[i] = capped;
        }
        whole_carry = g.last(through);
    }
    last_residual = g.reduce(last_residual, Max());
    const std::int64_t remaining = m - (whole_carry < m ? whole_carry : m);
    g.sync();
    if (remaining > 0 && last_residual >= 0)
        multinomial_points(g, residual_cumulative, last_residual, residual_cumulative[last_residual], remaining, gen,
                           row, drawn);
    g.sync();
    std::int64_t lo = 0;
    for (std::int64_t tile = 0; tile < n && lo < m; tile += Group::kSize) {
        const std::int64_t i = tile + g.rank();
        std::int64_t stop = m;
        if (i < n) {
            stop = whole_stops[i];
            if (remaining > 0) {
                if (last_residual >= 0) stop += count_at_most(drawn, remaining, i);
                else if (i >= f.last_positive) stop += remaining;  // rounding left no residual weight
            }
        }
        lo = write_slots(g, tile, stop, lo, stops, out);
    }
}

// Scratch words (8 bytes) per row that a scheme needs.
__host__ __device__ inline std::int64_t scratch_words(Scheme scheme, std::int64_t n) {
    return scheme == Scheme::multinomial ? n : scheme == Scheme::residual ? 3 * n : 0;
}

template <typename Group, typename T>
__device__ void draw_row(const Group& g, const T* x, std::int64_t n, const RowFigures& f, Scheme scheme,
                         std::int64_t m, std::uint64_t key, std::int64_t row, void* scratch, std::int64_t* stops,
                         std::int64_t* out) {
    const Philox4x32 gen(key);
    const auto stream_row = static_cast<std::uint64_t>(row);
    auto* words = static_cast<double*>(scratch) + row * scratch_words(scheme, n);
    switch (scheme) {
        case Scheme::systematic:
        case Scheme::stratified:
            closed_form_row(g, x, n, f, scheme, m, gen, stream_row, stops, out);
            break;
        case Scheme::multinomial:
            multinomial_row(g, x, n, f, m, gen, stream_row, words, out);
            break;
        case Scheme::residual:
            residual_row(g, x, n, f, m, gen, stream_row, words, reinterpret_cast<std::int64_t*>(words + n),
                         reinterpret_cast<std::int64_t*>(words + 2 * n), stops, out);
            break;
    }
}

template <typename Group, typename T>
__global__ void __launch_bounds__(detail::GroupLayout<Group>::kBlockThreads)
    resample_rows(const T* logw, std::int64_t rows, std::int64_t n, Scheme scheme, std::int64_t m,
                  std::uint64_t key, std::int64_t* ancestors, void* scratch, ErrorRecord* record) {
    __shared__ std::int64_t shared_stops[detail::GroupLayout<Group>::kBlockThreads];
    const Group g;
    const std::int64_t row = detail::GroupLayout<Group>::row();
    if (row >= rows) return;
    const T* x = logw + row * n;
    const RowFigures f = row_figures(g, x, n, row, record, true);
    if (f.state != row_ok) return;
    draw_row(g, x, n, f, scheme, m, key, row, scratch, shared_stops + detail::GroupLayout<Group>::shared_base(),
             ancestors + row * m);
}

// Every weight of x[0, total) checked for NaN and +inf, each recorded at its position: the record keeps the
// lowest, the error row_figures would record first. smc_step launches it before smc_step_rows, which resets
// rows in place, so that a refused step writes no row.
template <typename T>
__global__ void check_weights(const T* x, std::int64_t total, ErrorRecord* record) {
    for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const double v = load(x, e);
        if (!(v < kInf)) record_error(record, e, isnan(v) ? nan_weight : positive_infinity);
    }
}

template <typename Group, typename T>
__global__ void __launch_bounds__(detail::GroupLayout<Group>::kBlockThreads)
    smc_step_rows(T* log_w, std::int64_t rows, std::int64_t n, double threshold, Scheme scheme, std::uint64_t key,
                  std::int64_t* ancestors, std::uint8_t* resampled, double* log_mean_w, double* ess,
                  std::int64_t* unique, void* scratch, ErrorRecord* record) {
    __shared__ std::int64_t shared_stops[detail::GroupLayout<Group>::kBlockThreads];
    const Group g;
    const std::int64_t row = detail::GroupLayout<Group>::row();
    if (row >= rows || !record_clear(record)) return;  // check_weights found a bad weight: nothing written
    T* x = log_w + row * n;
    std::int64_t* a = ancestors + row * n;
    const RowFigures f = row_figures(g, x, n, row, record, false);  // zero rows are reported, not errors
    bool draw = f.state == row_ok;
    if (draw) {
        const double row_ess = f.sum * f.sum / f.sum_squares;
        draw = threshold >= 1.0 || row_ess < threshold * static_cast<double>(n);
        if (g.rank() == 0) {
            log_mean_w[row] = f.shift + log(f.sum) - log(static_cast<double>(n));
            ess[row] = row_ess;
        }
    } else if (g.rank() == 0) {  // zero rows are reported; bad rows (recorded) show as NaN
        const bool zero = f.state == row_zero;
        log_mean_w[row] = zero ? -kInf : __longlong_as_double(0x7ff8000000000000LL);
        ess[row] = zero ? 0.0 : __longlong_as_double(0x7ff8000000000000LL);
    }
    if (!draw) {
        for (std::int64_t i = g.rank(); i < n; i += Group::kSize) a[i] = i;
        if (g.rank() == 0) {
            resampled[row] = 0;
            unique[row] = n;
        }
        return;
    }
    draw_row(g, x, n, f, scheme, n, key, row, scratch, shared_stops + detail::GroupLayout<Group>::shared_base(), a);
    g.sync();
    std::int64_t distinct = 0;
    for (std::int64_t i = g.rank(); i < n; i += Group::kSize) {
        distinct += (i == 0 || a[i] != a[i - 1]) ? 1 : 0;
        x[i] = T(0);
    }
    distinct = g.reduce(distinct, Sum());
    if (g.rank() == 0) {
        resampled[row] = 1;
        unique[row] = distinct;
    }
}

// Systematic or stratified resampling of segment s of a long row (block row * segments + s), from the
// row's figures and the cumulative weight at the segment's start; writes the slots the segment owns.
template <typename T>
__global__ void __launch_bounds__(kSegmentThreads)
    resample_segments(const T* logw, std::int64_t n, std::int64_t segments, const double* offsets,
                      const RowFigures* figures, Scheme scheme, std::int64_t m, std::uint64_t key,
                      std::int64_t* ancestors) {
    __shared__ double tile[kSegment];  // weights, then (as int64) the particles' stops
    __shared__ double thread_last[kSegmentThreads];
    const BlockGroup<kSegmentThreads> g;
    const std::int64_t row = blockIdx.x / segments, segment = blockIdx.x % segments;
    const RowFigures f = figures[row];
    const std::int64_t begin = segment * kSegment;
    if (f.state != row_ok || begin > f.last_positive) return;  // errors were recorded by combine_segments
    const std::int64_t len = begin + kSegment < n ? kSegment : n - begin;
    const T* x = logw + row * n + begin;
    const double start = offsets[row * (segments + 1) + segment];
    const double end = offsets[row * (segments + 1) + segment + 1];
    for (int k = 0; k < kSegmentItems; ++k) {
        const std::int64_t local = k * kSegmentThreads + g.rank();
        tile[local] = local < len ? exp_nonpositive(load(x, local) - f.shift) : 0.0;
    }
    g.sync();
    // Each thread takes kSegmentItems consecutive particles: sums within the thread, a scan across threads.
    double w[kSegmentItems], running[kSegmentItems];
    double run = 0.0;
#pragma unroll
    for (int k = 0; k < kSegmentItems; ++k) {
        w[k] = tile[g.rank() * kSegmentItems + k];
        run += w[k];
        running[k] = run;
    }
    const double through = g.inclusive_scan(run, Sum());
    thread_last[g.rank()] = through;
    g.sync();
    const double base = start + (g.rank() > 0 ? thread_last[g.rank() - 1] : 0.0);
    double top = start;
#pragma unroll
    for (int k = 0; k < kSegmentItems; ++k) top = w[k] > 0.0 && base + running[k] > top ? base + running[k] : top;
    const double upto = g.inclusive_scan(top, Max());  // ascending across threads whatever the rounding
    g.sync();
    thread_last[g.rank()] = upto;
    g.sync();
    double c = g.rank() > 0 ? thread_last[g.rank() - 1] : start;
    const double scale = static_cast<double>(m) / f.sum;
    const Philox4x32 gen(key);
    const double u = scheme == Scheme::systematic ? philox_uniform_at(gen, static_cast<std::uint64_t>(row), 0) : 0.0;
    auto below = [&](double value) {
        return scheme == Scheme::systematic ? points_below(value, scale, u, m)
                                            : strata_below(value, scale, m, gen, static_cast<std::uint64_t>(row));
    };
    std::int64_t stop[kSegmentItems];
    std::int64_t last_positive_local = -1;
#pragma unroll
    for (int k = 0; k < kSegmentItems; ++k) {
        const std::int64_t local = g.rank() * kSegmentItems + k;
        if (w[k] > 0.0) {
            last_positive_local = local;
            if (base + running[k] > c) c = base + running[k];
        }
        stop[k] = begin + local >= f.last_positive ? m : below(c < end ? c : end);
    }
    last_positive_local = g.reduce(last_positive_local, Max());
    g.sync();  // tile now holds the stops
    auto* stops = reinterpret_cast<std::int64_t*>(tile);
#pragma unroll
    for (int k = 0; k < kSegmentItems; ++k) stops[g.rank() * kSegmentItems + k] = stop[k];
    g.sync();
    // The segment owns the slots between the counts at its start and end cumulative weights (the next
    // segment starts where this one ends, whatever this segment's own sums give); slots past its last
    // particle's stop, a rounding surplus, go to its last positive weight.
    const std::int64_t lo = segment == 0 ? 0 : below(start);
    const std::int64_t hi = begin + len > f.last_positive ? m : below(end);
    std::int64_t* out = ancestors + row * m;
    for (std::int64_t j = lo + g.rank(); j < hi; j += kSegmentThreads) {
        std::int64_t a = 0, b = len;
        while (a < b) {
            const std::int64_t mid = (a + b) / 2;
            if (stops[mid] > j) b = mid;
            else a = mid + 1;
        }
        out[j] = begin + (a < len ? a : last_positive_local);
    }
}

}  // namespace
}  // namespace device

using detail::check_launch;
using detail::grid_size;

template <typename T>
void resample(const T* logw, std::int64_t rows, std::int64_t n, Scheme scheme, std::int64_t m, std::uint64_t key,
              std::int64_t* ancestors, ErrorRecord* record, cudaStream_t stream) {
    if (rows < 0 || n < 1 || m < 1) throw std::invalid_argument("resample: bad sizes");
    if (rows == 0) return;
    const bool closed_form = scheme == Scheme::systematic || scheme == Scheme::stratified;
    const detail::Layout layout = detail::choose_layout(n, closed_form);
    if (layout == detail::Layout::segments) {
        const detail::SegmentedRows segmented(logw, rows, n, false, nullptr, nullptr, record, stream, "resample");
        device::resample_segments<T><<<grid_size(rows * segmented.segments), device::kSegmentThreads, 0, stream>>>(
            logw, n, segmented.segments, segmented.offsets(), segmented.figures(), scheme, m, key, ancestors);
        check_launch("tiltsmc::cuda::resample_segments");
        return;
    }
    detail::Scratch scratch(sizeof(double) * rows * device::scratch_words(scheme, n), stream);
    detail::launch_rows(layout, rows, [&](auto group, std::int64_t blocks, int threads) {
        using Group = decltype(group);
        device::resample_rows<Group, T><<<grid_size(blocks), threads, 0, stream>>>(
            logw, rows, n, scheme, m, key, ancestors, scratch.as<void>(), record);
    });
    check_launch("tiltsmc::cuda::resample_rows");
}

template <typename T>
void smc_step(T* log_w, std::int64_t rows, std::int64_t n, double threshold, Scheme scheme, std::uint64_t key,
              std::int64_t* ancestors, std::uint8_t* resampled, double* log_mean_w, double* ess,
              std::int64_t* unique, ErrorRecord* record, cudaStream_t stream) {
    if (rows < 0 || n < 1) throw std::invalid_argument("smc_step: bad sizes");
    if (rows == 0) return;
    if (record != nullptr) {  // every row checked before any is reset
        device::check_weights<T><<<grid_size(detail::blocks_for(rows * n)), 256, 0, stream>>>(log_w, rows * n, record);
        check_launch("tiltsmc::cuda::check_weights (smc_step)");
    }
    detail::Scratch scratch(sizeof(double) * rows * device::scratch_words(scheme, n), stream);
    detail::launch_rows(detail::choose_layout(n, false), rows, [&](auto group, std::int64_t blocks, int threads) {
        using Group = decltype(group);
        device::smc_step_rows<Group, T><<<grid_size(blocks), threads, 0, stream>>>(
            log_w, rows, n, threshold, scheme, key, ancestors, resampled, log_mean_w, ess, unique, scratch.as<void>(),
            record);
    });
    check_launch("tiltsmc::cuda::smc_step_rows");
}

template void resample<float>(const float*, std::int64_t, std::int64_t, Scheme, std::int64_t, std::uint64_t,
                              std::int64_t*, ErrorRecord*, cudaStream_t);
template void resample<double>(const double*, std::int64_t, std::int64_t, Scheme, std::int64_t, std::uint64_t,
                               std::int64_t*, ErrorRecord*, cudaStream_t);
template void smc_step<float>(float*, std::int64_t, std::int64_t, double, Scheme, std::uint64_t, std::int64_t*,
                              std::uint8_t*, double*, double*, std::int64_t*, ErrorRecord*, cudaStream_t);
template void smc_step<double>(double*, std::int64_t, std::int64_t, double, Scheme, std::uint64_t, std::int64_t*,
                               std::uint8_t*, double*, double*, std::int64_t*, ErrorRecord*, cudaStream_t);

}  // namespace tiltsmc::cuda
