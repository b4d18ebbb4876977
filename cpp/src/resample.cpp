// Resampling: systematic, stratified, multinomial and residual, each O(n + m) per row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "tiltsmc/kernels.hpp"
#include "tiltsmc/philox.hpp"
#include "tiltsmc/read_once.hpp"
#include "tiltsmc/row_weights.hpp"
#include "tiltsmc/systematic.hpp"

namespace tiltsmc {
namespace {

// Ancestors for ascending points p_0 <= p_1 <= ... (on the scale of the unnormalised cumulative
// weights C_i = w_0 + ... + w_i): ancestor(p) is the first i with C_i > p, never past last_positive,
// so weight-zero particles are never chosen.
// point(j) may read storage that out[j] overwrites: it is read before the write.
template <typename Points>
void walk_points(const double* w, std::int64_t last_positive, std::int64_t count, Points&& point,
                 std::int64_t* out) {
    std::int64_t i = 0;
    double cumulative = w[0];
    for (std::int64_t j = 0; j < count; ++j) {
        const double p = point(j);
        while (cumulative <= p && i < last_positive) cumulative += w[++i];
        out[j] = i;
    }
}

// Lane k gets the maximum of lanes 0..k of v (an in-register scan; `fill` is shifted in, e.g. -inf or 0).
template <typename V>
__attribute__((always_inline)) inline V lanes_running_max(V v, V fill) {
    V earlier = TILTSMC_SHUFFLE8(v, fill, 8, 0, 1, 2, 3, 4, 5, 6);
    v = v > earlier ? v : earlier;
    earlier = TILTSMC_SHUFFLE8(v, fill, 8, 8, 0, 1, 2, 3, 4, 5);
    v = v > earlier ? v : earlier;
    earlier = TILTSMC_SHUFFLE8(v, fill, 8, 8, 8, 8, 0, 1, 2, 3);
    return v > earlier ? v : earlier;
}

// Number of systematic points (j + u) / m * total, j in [0, m), lying below cumulative weight c:
// clamp(ceil(c * m / total - u), 0, m).
// The clamps map NaN to 0 (weights rewritten by another thread during the call can make the sums NaN):
// whatever the arithmetic gives, the count lies in [0, m].
inline std::int64_t points_below(double c, double scale, double u, std::int64_t m) {
    double x = c * scale - u;
    x = x > 0.0 ? x : 0.0;
    x = x < static_cast<double>(m) ? x : static_cast<double>(m);
    const double rounded = (x + 4503599627370496.0) - 4503599627370496.0;  // nearest integer (x < 2^52)
    return static_cast<std::int64_t>(rounded) + (rounded < x ? 1 : 0);
}

// points_below for the eight cumulative weights base + (inclusive prefix sums of w[0..8)), written as
// int64 over w itself; returns the last cumulative weight. Branch-free: an in-register scan and the
// 2^52 rounding trick for ceil.
TILTSMC_SIMD_CLONES void points_below_block(double* w, std::int64_t count, double base, double chunk_end,
                                            double scale, double u, std::int64_t m, double* last) {
    const Vec8 zero = splat(0.0), two52 = splat(4503599627370496.0), limit = splat(static_cast<double>(m));
    const Vec8 neg_inf = splat(-kInf);
    std::int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes) {
        const Vec8 weights = load8(w + i);
        Vec8 s = weights;
        s += TILTSMC_SHUFFLE8(s, zero, 8, 0, 1, 2, 3, 4, 5, 6);
        s += TILTSMC_SHUFFLE8(s, zero, 8, 8, 0, 1, 2, 3, 4, 5);
        s += TILTSMC_SHUFFLE8(s, zero, 8, 8, 8, 8, 0, 1, 2, 3);
        // The running total is the only dependency between iterations: keep it a scalar add (its
        // broadcast and the clamp to chunk_end are off that chain; clamping later changes nothing, as
        // the totals only grow).
        const Vec8 before = splat(base);
        Vec8 c = before + s;
        base += s[7];  // the same addition as c[7]
        // The scan adds in another order for each lane, so C_i and C_{i-1} may differ by an ulp even
        // where w_i = 0, and a point could then land on a zero-weight particle (rare, but by a rough
        // estimate once in ~1e5 calls on a 2^20 row with half its weights zero). As on the GPU: a
        // zero-weight particle takes the cumulative weight before it, and the sums are made
        // non-decreasing (a running maximum over the lanes, from the previous block's total).
        c = lanes_running_max(weights > zero ? c : neg_inf, neg_inf);
        c = c > before ? c : before;
        c = c < chunk_end ? c : splat(chunk_end);
        Vec8 x = c * scale - u;
        x = x > zero ? x : zero;
        x = x < limit ? x : limit;
        const Vec8 shifted = x + two52;
        const Vec8 rounded = shifted - two52;
        const Mask8 next =
            (same_bits<Mask8>(shifted) - std::int64_t{0x4330000000000000}) - (rounded < x);
        std::memcpy(w + i, &next, sizeof next);
    }
    base = std::min(base, chunk_end);
    for (; i < count; ++i) {
        base = std::min(base + w[i], chunk_end);
        const std::int64_t next = points_below(base, scale, u, m);
        std::memcpy(w + i, &next, sizeof next);
    }
    *last = base;
}

// Writes particle i into out[start_i, stop_i) for i in [begin, end), where stop_i is stored (as int64)
// over w[i], start_i = stop_{i-1}, and this chunk owns the slots [start, limit).
//
// Slot j's ancestor is the first i with stop_i > j, i.e. one more than the last i with stop_i <= j.
// So: clear the owned slots, write i + 1 at slot stop_i (later particles win), and take a running
// maximum, starting from `begin` (every earlier particle stops at or before `start`). No branch
// depends on the random child counts, and the running maximum is vectorised.
TILTSMC_SIMD_CLONES void write_children(const double* __restrict w, std::int64_t begin, std::int64_t end,
                                        std::int64_t start, std::int64_t limit, std::int64_t* __restrict out) {
    if (start >= limit) return;
    std::memset(out + start, 0, static_cast<std::size_t>(limit - start) * sizeof(std::int64_t));
    std::int64_t spill = 0;
    for (std::int64_t i = begin; i < end; ++i) {
        std::int64_t stop;
        std::memcpy(&stop, w + i, sizeof stop);
        *(static_cast<std::uint64_t>(stop) < static_cast<std::uint64_t>(limit) ? out + stop : &spill) = i + 1;
    }
    const Mask8 none = Mask8{};
    Mask8 running = none + begin;  // the running maximum, in every lane
    std::int64_t j = start;
    for (; j + kLanes <= limit; j += kLanes) {
        Mask8 v;
        std::memcpy(&v, out + j, sizeof v);
        v = lanes_running_max(v, none);
        // Only the maximum is carried from one block to the next (its broadcast is off that chain).
        const Mask8 top = TILTSMC_SHUFFLE8(v, v, 7, 7, 7, 7, 7, 7, 7, 7);
        v = v > running ? v : running;
        running = top > running ? top : running;
        std::memcpy(out + j, &v, sizeof v);
    }
    std::int64_t last = running[0];
    for (; j < limit; ++j) {
        last = out[j] > last ? out[j] : last;
        out[j] = last;
    }
}

}  // namespace

namespace detail {

// Systematic: particle i owns output slots [points_below(C_{i-1}), points_below(C_i)). Chunk c covers
// its particles and the slots their cumulative range owns, so chunks run independently. First the
// slot boundaries of the whole chunk (vectorised, stored over w), then the writes.
void systematic_row(double* w, std::int64_t n, const RowWeights& rw, std::int64_t m, double u,
                    std::int64_t* out, bool split) {
    const std::int64_t chunks = static_cast<std::int64_t>(rw.chunk_offset.size()) - 1;
    const double scale = static_cast<double>(m) / rw.sum;
    auto chunk = [&](std::int64_t c) {
        const std::int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
        if (begin > rw.last_positive) return;  // owns no slots
        const double chunk_start = rw.chunk_offset[static_cast<std::size_t>(c)];
        const double chunk_end = rw.chunk_offset[static_cast<std::size_t>(c + 1)];
        // The chunk's sums and its scan add in different orders, so the scan may stop an ulp short of
        // chunk_end. That gap belongs to the chunk's last positive particle, never to a zero-weight
        // one after it (found before the boundaries overwrite w).
        std::int64_t last_in_chunk = end - 1;
        while (last_in_chunk > begin && w[last_in_chunk] == 0.0) --last_in_chunk;
        double last;
        points_below_block(w + begin, end - begin, chunk_start, chunk_end, scale, u, m, &last);
        auto next = [&](std::int64_t i) {  // the boundaries, stored over w
            std::int64_t value;
            std::memcpy(&value, w + i, sizeof value);
            return value;
        };
        auto set_next = [&](std::int64_t i, std::int64_t value) { std::memcpy(w + i, &value, sizeof value); };
        // The chunk ends exactly at its offset; the last positive particle takes every slot left.
        const bool owns_tail = rw.last_positive < end;
        if (!owns_tail) {
            const std::int64_t chunk_stop = points_below(chunk_end, scale, u, m);
            for (std::int64_t i = last_in_chunk; i < end; ++i) set_next(i, chunk_stop);
        }
        for (std::int64_t i = std::max(begin, rw.last_positive); i < end; ++i) set_next(i, m);
        const std::int64_t limit = owns_tail ? m : next(end - 1);
        write_children(w, begin, end, points_below(chunk_start, scale, u, m), limit, out);
    };
    if (split) {
        parallel_for(chunks, n + m, [&](std::int64_t b, std::int64_t e) {
            for (std::int64_t c = b; c < e; ++c) chunk(c);
        });
    } else {
        for (std::int64_t c = 0; c < chunks; ++c) chunk(c);
    }
}

}  // namespace detail

namespace {

// Stratified: point j is (j + u_j) / m * total. Below cumulative weight c (x = c m / total) lie the
// floor(x) strata wholly below x, plus stratum k = floor(x) when u_k < x - k. Particle i owns the
// slots between the counts at C_{i-1} and C_i, written as for systematic resampling.
void stratified_row(double* w, std::int64_t n, const RowWeights& rw, std::int64_t m, UniformStream& stream,
                    std::int64_t* out) {
    static thread_local std::vector<double> scratch_uniforms;
    std::vector<double>& u = scratch_uniforms;
    u.resize(static_cast<std::size_t>(m));
    stream.fill(u.data(), m);
    const double scale = static_cast<double>(m) / rw.sum;
    auto below = [&](double c) -> std::int64_t {
        double x = c * scale;  // clamped to [0, m], NaN to 0 (as in points_below): k indexes u below
        x = x > 0.0 ? x : 0.0;
        x = x < static_cast<double>(m) ? x : static_cast<double>(m);
        const auto k = static_cast<std::int64_t>(x);
        if (k >= m) return m;
        return k + (u[static_cast<std::size_t>(k)] < x - static_cast<double>(k) ? 1 : 0);
    };
    double cumulative = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
        cumulative += w[i];
        const std::int64_t next = i >= rw.last_positive ? m : below(std::min(cumulative, rw.sum));
        std::memcpy(w + i, &next, sizeof next);
    }
    write_children(w, 0, n, 0, m, out);
}

// Multinomial from sorted uniforms: with E_0..E_m iid Exp(1) and S_j = E_0 + ... + E_j, the points
// S_j / S_m (j < m) are distributed as m sorted iid uniforms. The partial sums are kept in the
// output buffer (as doubles) and overwritten by ancestors as the walk passes them.
void multinomial_draws(const double* w, std::int64_t last_positive, double total, std::int64_t m,
                       UniformStream& stream, std::int64_t* out) {
    static_assert(sizeof(double) == sizeof(std::int64_t), "uniforms are staged in the ancestor buffer");
    double* staged = reinterpret_cast<double*>(out);
    stream.fill(staged, m);
    exponentials_from_uniforms(staged, m);
    double running = 0.0;
    for (std::int64_t j = 0; j < m; ++j) {
        running += staged[j];
        staged[j] = running;
    }
    running += -std::log(stream.next_open_zero());
    const double scale = total / running;
    walk_points(
        w, last_positive, m,
        [&](std::int64_t j) {
            double s;
            std::memcpy(&s, out + j, sizeof s);
            return s * scale;
        },
        out);
}

// Residual: floor(m w_i) copies of i, then the remaining r = m - sum floor(m w_i) drawn multinomially
// from the residual weights m w_i - floor(m w_i).
void residual_row(double* w, std::int64_t n, const RowWeights& rw, std::int64_t m, UniformStream& stream,
                  std::int64_t* out) {
    const double scale = static_cast<double>(m) / rw.sum;
    static thread_local std::vector<std::int64_t> scratch_copies;
    std::vector<std::int64_t>& copies = scratch_copies;
    copies.assign(static_cast<std::size_t>(n), 0);
    std::int64_t assigned = 0;
    std::int64_t last_residual = -1;
    for (std::int64_t i = 0; i < n; ++i) {
        const double expected = w[i] * scale;
        // min(floor(expected), m - assigned) with expected clamped to [0, m] first (NaN to 0), so that the
        // conversion is defined: a NaN or huge value is possible only if another thread rewrote the weights.
        // (Clamping before the floor keeps floor-then-convert one inlined instruction pair; clamping after it
        // made GCC call floor and cost 70% on 1M particles.)
        double bounded = expected > 0.0 ? expected : 0.0;
        bounded = bounded < static_cast<double>(m) ? bounded : static_cast<double>(m);
        const std::int64_t whole = std::min(static_cast<std::int64_t>(std::floor(bounded)), m - assigned);
        copies[static_cast<std::size_t>(i)] = whole;
        assigned += whole;
        w[i] = std::max(expected - static_cast<double>(whole), 0.0);
        if (w[i] > 0.0 && i <= rw.last_positive) last_residual = i;
    }
    const std::int64_t remaining = m - assigned;
    if (remaining > 0) {
        if (last_residual < 0) {
            // Rounding left no residual mass: give the rest to the last positive particle.
            copies[static_cast<std::size_t>(std::max<std::int64_t>(rw.last_positive, 0))] += remaining;
        } else {
            double residual_total = 0.0;
            for (std::int64_t i = 0; i <= last_residual; ++i) residual_total += w[i];
            multinomial_draws(w, last_residual, residual_total, remaining, stream, out);
            for (std::int64_t j = 0; j < remaining; ++j) copies[static_cast<std::size_t>(out[j])] += 1;
        }
    }
    std::int64_t stop = 0;  // particle i owns slots [stop_{i-1}, stop_i), stored over w for the writes
    for (std::int64_t i = 0; i < n; ++i) {
        stop += copies[static_cast<std::size_t>(i)];
        std::memcpy(w + i, &stop, sizeof stop);
    }
    write_children(w, 0, n, 0, m, out);
}

void draw_ancestors(double* w, std::int64_t n, const RowWeights& rw, Scheme scheme, std::int64_t m,
                    std::uint64_t key, std::int64_t row, std::int64_t* out, bool split);

template <typename T>
Status resample_row(const T* x, std::int64_t n, Scheme scheme, std::int64_t m, std::uint64_t key,
                    std::int64_t row, std::int64_t* out, std::vector<double>& w, bool split) {
    w.resize(static_cast<std::size_t>(n));
    static thread_local RowWeights scratch;
    RowWeights& rw = scratch;
    row_weights(x, n, row, w.data(), split, rw);
    if (!rw.status.ok()) return rw.status;
    draw_ancestors(w.data(), n, rw, scheme, m, key, row, out, split);
    return {};
}

// Draws m ancestors of a row whose weights w = exp(x - shift) and figures rw are already computed.
void draw_ancestors(double* w, std::int64_t n, const RowWeights& rw, Scheme scheme, std::int64_t m,
                    std::uint64_t key, std::int64_t row, std::int64_t* out, bool split) {
    UniformStream stream(key, static_cast<std::uint64_t>(row));
    switch (scheme) {
        case Scheme::systematic:
            detail::systematic_row(w, n, rw, m, stream.next(), out, split);
            break;
        case Scheme::stratified:
            stratified_row(w, n, rw, m, stream, out);
            break;
        case Scheme::multinomial:
            multinomial_draws(w, rw.last_positive, rw.sum, m, stream, out);
            break;
        case Scheme::residual:
            residual_row(w, n, rw, m, stream, out);
            break;
    }
}

}  // namespace

template <typename T>
Status resample(const T* logw, std::int64_t rows, std::int64_t n, Scheme scheme, std::int64_t m,
                std::uint64_t key, std::int64_t* ancestors) {
    if (rows < 0 || n < 1 || m < 1) return {StatusCode::bad_size, -1, -1};
    // One long row: split its chunks over threads (systematic and the shared passes); many rows:
    // split the rows. Either way each row's arithmetic is the same, so results do not depend on it.
    if (rows == 1) {
        // Kept between calls: a fresh multi-megabyte buffer would cost a page fault per 4 KiB.
        static thread_local std::vector<double> w;
        return resample_row(logw, n, scheme, m, key, 0, ancestors, w, true);
    }
    std::vector<Status> statuses(static_cast<std::size_t>(rows));
    parallel_for(rows, rows * (n + m), [&](std::int64_t begin, std::int64_t end) {
        std::vector<double> w;
        for (std::int64_t r = begin; r < end; ++r)
            statuses[static_cast<std::size_t>(r)] =
                resample_row(logw + r * n, n, scheme, m, key, r, ancestors + r * m, w, false);
    });
    for (const Status& status : statuses)
        if (!status.ok()) return status;
    return {};
}

template <typename T>
Status smc_step(T* log_w, std::int64_t rows, std::int64_t n, double threshold, Scheme scheme, std::uint64_t key,
                bool survivors_stay, std::int64_t* ancestors, std::uint8_t* resampled, double* log_mean_w,
                double* ess, std::int64_t* unique, const RowSettings& per_row) {
    if (rows < 0 || n < 1) return {StatusCode::bad_size, -1, -1};
    std::vector<Status> statuses(static_cast<std::size_t>(rows));
    parallel_for(rows, rows * n * 2, [&](std::int64_t begin, std::int64_t end) {
        std::vector<double> w(static_cast<std::size_t>(n));
        static thread_local RowWeights scratch;
        RowWeights& rw = scratch;
        for (std::int64_t r = begin; r < end; ++r) {
            const T* x = log_w + r * n;
            std::int64_t* a = ancestors + r * n;
            row_weights(x, n, r, w.data(), false, rw);
            resampled[r] = 0;
            unique[r] = n;
            for (std::int64_t i = 0; i < n; ++i) a[i] = i;
            if (rw.status.code == StatusCode::zero_row) {  // collapsed: reported, never resampled
                log_mean_w[r] = -kInf;
                ess[r] = 0.0;
                continue;
            }
            if (!rw.status.ok()) {
                statuses[static_cast<std::size_t>(r)] = rw.status;
                continue;
            }
            log_mean_w[r] = rw.shift + std::log(rw.sum) - std::log(static_cast<double>(n));
            ess[r] = rw.sum * rw.sum / rw.sum_squares;
            const double row_threshold = per_row.thresholds ? per_row.thresholds[r] : threshold;  // decides, never indexes
            if (!(row_threshold >= 1.0 || ess[r] < row_threshold * static_cast<double>(n))) continue;
            Scheme row_scheme = scheme;
            if (per_row.schemes) {
                const std::uint8_t code = read_once(per_row.schemes + r);
                if (code > static_cast<std::uint8_t>(Scheme::residual)) {  // checked valid by the caller
                    statuses[static_cast<std::size_t>(r)] = {StatusCode::input_changed, r, -1};
                    continue;
                }
                row_scheme = static_cast<Scheme>(code);
            }
            const RowStream stream = row_stream(per_row.keys, per_row.counters, key, r);
            draw_ancestors(w.data(), n, rw, row_scheme, n, stream.key, static_cast<std::int64_t>(stream.counter), a,
                           false);
            resampled[r] = 1;
            std::int64_t distinct = 1;
            for (std::int64_t i = 1; i < n; ++i) distinct += a[i] != a[i - 1];
            unique[r] = distinct;
            if (survivors_stay) keep_survivors(a, 1, n);  // drawn indices: always in range
        }
    });
    // Every row is checked before any is reset: a refused call leaves log_w as it was.
    for (const Status& status : statuses)
        if (!status.ok()) return status;
    parallel_for(rows, rows * n / 4, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t r = begin; r < end; ++r)
            if (resampled[r]) std::fill(log_w + r * n, log_w + (r + 1) * n, T(0));
    });
    return {};
}

namespace {

// sqrt(sum_i (W_i G_i / e^l - W_i)^2) of one row: `before` and `after` are its log-weights before and after the
// potentials, log_total = logsumexp(before), increment = l = logsumexp(after) - log_total (see kernels.hpp).
double increment_standard_error(const double* before, const double* after, const std::uint8_t* live, std::int64_t n,
                                double log_total, double increment) {
    if (!(increment > -kInf)) return kInf;  // every potential 0: no reading
    bool extended = false;
    for (std::int64_t i = 0; i < n; ++i) extended = extended || live[i] != 0;
    if (!extended) return 0.0;  // no potential applied: the increment is exactly 0
    double sum = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
        const double difference = std::exp(after[i] - log_total - increment) - std::exp(before[i] - log_total);
        sum += difference * difference;
    }
    return std::sqrt(sum);
}

}  // namespace

Status smc_reweight(double* log_w, std::int64_t rows, std::int64_t n, const double* log_v, double* log_v_prev,
                    const std::uint8_t* live, double log_n, double threshold, Scheme scheme, std::uint64_t key,
                    double* log_total, double* log_z, std::uint8_t* collapsed, std::int64_t* ancestors,
                    std::uint8_t* resampled, double* ess, std::int64_t* unique, double* log_z_increment,
                    double* increment_se, const RowSettings& per_row) {
    if (rows < 0 || n < 1) return {StatusCode::bad_size, -1, -1};
    for (std::int64_t k = 0; k < rows * n; ++k) {  // everything checked before anything is written
        const bool extended = live[k] != 0;
        for (const double value : {log_w[k], extended ? log_v[k] : 0.0, extended ? log_v_prev[k] : 0.0}) {
            if (std::isnan(value)) return {StatusCode::nan_weight, k / n, k % n};
            if (value == kInf) return {StatusCode::positive_infinity, k / n, k % n};
        }
        // The updated log-weight too (log_v - log_v_prev may overflow to +inf, and -inf + inf is NaN): the
        // same expression as below, so the same value.
        if (extended && !(log_w[k] + (log_v_prev[k] == -kInf ? -kInf : log_v[k] - log_v_prev[k]) < kInf))
            return {StatusCode::positive_infinity, k / n, k % n};
    }
    // the log-weights before and after the potentials, for the increments' standard errors
    std::vector<double> before, after;
    if (increment_se != nullptr) before.assign(log_w, log_w + rows * n);
    for (std::int64_t k = 0; k < rows * n; ++k) {
        if (live[k] == 0) continue;
        // log G = log Vh_t - log Vh_{t-1}; a particle with Vh_{t-1} = 0 already has weight zero and keeps it
        log_w[k] += log_v_prev[k] == -kInf ? -kInf : log_v[k] - log_v_prev[k];
        log_v_prev[k] = log_v[k];
    }
    if (increment_se != nullptr) after.assign(log_w, log_w + rows * n);
    std::vector<double> log_mean_w(static_cast<std::size_t>(rows));
    const Status status = smc_step(log_w, rows, n, threshold, scheme, key, true, ancestors, resampled, log_mean_w.data(),
                                   ess, unique, per_row);
    if (!status.ok()) return status;
    for (std::int64_t r = 0; r < rows; ++r) {
        // log sum_i W_{t-1,i} G_{t,i} = logsumexp(log_w_t) - logsumexp(log_w_{t-1}), the latter log N after a reset
        const double new_total = log_mean_w[static_cast<std::size_t>(r)] + log_n;
        const double increment = log_total[r] == -kInf ? -kInf : new_total - log_total[r];
        log_z_increment[r] = increment;
        if (increment_se != nullptr)
            increment_se[r] = increment_standard_error(before.data() + r * n, after.data() + r * n, live + r * n, n,
                                                       log_total[r], increment);
        log_total[r] = resampled[r] ? log_n : new_total;
        log_z[r] = log_z[r] + increment;
        if (ess[r] == 0.0) collapsed[r] = 1;
    }
    return {};
}

template Status smc_step<float>(float*, std::int64_t, std::int64_t, double, Scheme, std::uint64_t, bool,
                                std::int64_t*, std::uint8_t*, double*, double*, std::int64_t*, const RowSettings&);
template Status smc_step<double>(double*, std::int64_t, std::int64_t, double, Scheme, std::uint64_t, bool,
                                 std::int64_t*, std::uint8_t*, double*, double*, std::int64_t*, const RowSettings&);

template Status resample<float>(const float*, std::int64_t, std::int64_t, Scheme, std::int64_t, std::uint64_t,
                                std::int64_t*);
template Status resample<double>(const double*, std::int64_t, std::int64_t, Scheme, std::int64_t,
                                 std::uint64_t, std::int64_t*);

}  // namespace tiltsmc
