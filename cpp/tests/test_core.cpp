// Unit tests of the C++ core on its own (no Python), run under AddressSanitizer and
// UndefinedBehaviorSanitizer in CI: every kernel on edge sizes, bad input, chunk boundaries, threads.
#include <algorithm>
#include <array>
#include <functional>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <tuple>
#include <vector>

#include "tiltsmc/kernels.hpp"
#include "tiltsmc/philox.hpp"
#include "tiltsmc/row_weights.hpp"
#include "tiltsmc/systematic.hpp"

using namespace tiltsmc;

namespace {

int failures = 0;

#define EXPECT(condition)                                                        \
    do {                                                                         \
        if (!(condition)) {                                                      \
            std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #condition); \
            ++failures;                                                          \
        }                                                                        \
    } while (0)

constexpr double inf = std::numeric_limits<double>::infinity();
const Scheme schemes[] = {Scheme::multinomial, Scheme::stratified, Scheme::systematic, Scheme::residual};

// Checks ancestors are in range, ascending, and never pick a zero weight.
bool valid_ancestors(const std::vector<double>& logw, std::int64_t rows, std::int64_t n,
                     const std::vector<std::int64_t>& a, std::int64_t m) {
    for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t j = 0; j < m; ++j) {
            const std::int64_t i = a[r * m + j];
            if (i < 0 || i >= n) return false;
            if (logw[r * n + i] == -inf) return false;
            if (j > 0 && i < a[r * m + j - 1]) return false;
        }
    }
    return true;
}

void test_philox_known_answer() {
    // Random123's known-answer test for philox4x32_10 with counter and key all zero.
    Philox4x32 gen(0);
    std::uint32_t out[4];
    gen.block(0, 0, 0, 0, out);
    EXPECT(out[0] == 0x6627e8d5u && out[1] == 0xe169c58du && out[2] == 0xbc57ac4cu && out[3] == 0x9b00dbd8u);
    UniformStream stream(7, 3);
    for (int k = 0; k < 1000; ++k) {
        const double u = stream.next();
        EXPECT(u >= 0.0 && u < 1.0);
    }
    // The vectorised block path gives exactly the scalar stream, from any starting offset.
    for (int offset : {0, 1, 5}) {
        UniformStream scalar(0x0123456789abcdefULL, (1ULL << 32) + 9), bulk(0x0123456789abcdefULL, (1ULL << 32) + 9);
        std::vector<double> expected(100), got(100);
        for (int k = 0; k < offset; ++k) bulk.next(), scalar.next();
        for (auto& u : expected) u = scalar.next();
        bulk.fill(got.data(), 37);
        bulk.fill(got.data() + 37, 63);
        EXPECT(got == expected);
    }
}

void test_exponentials_from_uniforms() {
    // The vectorised -log(1 - u) against std::log, across the range, including u = 0 and 1 - 2^-53.
    std::mt19937_64 engine(3);
    std::vector<double> u(1001);
    for (std::size_t k = 0; k < u.size(); ++k) u[k] = static_cast<double>(engine() >> 11) * 0x1.0p-53;
    u[0] = 0.0;
    u[1] = 1.0 - 0x1.0p-53;
    u[2] = 0.5;
    std::vector<double> e = u;
    exponentials_from_uniforms(e.data(), static_cast<std::int64_t>(e.size()));
    double worst = 0.0;
    for (std::size_t k = 0; k < u.size(); ++k) {
        const double expected = -std::log(1.0 - u[k]);
        worst = std::max(worst, std::fabs(e[k] - expected) / std::max(std::fabs(expected), 1e-300));
    }
    EXPECT(e[0] == 0.0);
    EXPECT(worst < 1e-15);
}

// Distance in units in the last place of the expected value (0 when equal).
double ulps(double got, double expected) {
    if (got == expected) return 0.0;
    const double ulp = std::nextafter(std::fabs(expected), inf) - std::fabs(expected);
    return std::fabs(got - expected) / ulp;
}

// Values x <= 0 across the whole range exp_nonpositive handles: -inf, 0, -tiny, table and reduction
// boundaries, and the -708 flush (std::exp is correctly rounded to within 1 ulp on glibc).
std::vector<double> exp_test_points() {
    std::vector<double> x = {0.0, -0.0, -inf, -0x1.0p-1074, -1e-300, -1e-17, -1e-10, -0.5, -1.0,
                             -std::log(2.0), -std::log(2.0) / 32, -std::log(2.0) / 16, -700.0,
                             -707.9999999999, -708.0, std::nextafter(-708.0, -inf), -708.5, -709.0,
                             -709.78, -740.0, -745.0, -745.2, -746.0, -1e6, -1e300};
    std::mt19937_64 engine(17);
    std::uniform_real_distribution<double> range(-760.0, 0.0), small(-1.0, 0.0);
    for (int k = 0; k < 200000; ++k) x.push_back(range(engine));
    for (int k = 0; k < 50000; ++k) x.push_back(small(engine));
    for (int e = -1074; e <= 9; ++e) x.push_back(-std::ldexp(1.0, e) * 1.2345);  // every scale
    for (int k = -16 * 1022; k <= 0; k += 7) x.push_back(k * std::log(2.0) / 16);  // table entries
    while (x.size() % 8) x.push_back(-1.0);
    return x;
}

void check_exp(double (*fn)(double), const char* name) {
    double worst = 0.0;
    for (const double v : exp_test_points()) {
        const double expected = v < -708.0 ? 0.0 : std::exp(v);
        const double got = fn(v);
        worst = std::max(worst, ulps(got, expected));
        if (v < -708.0) EXPECT(got == 0.0);
    }
    if (worst > 2.0) std::fprintf(stderr, "%s: worst error %.2f ulp\n", name, worst);
    EXPECT(worst <= 2.0);
}

void test_exp_accuracy() {
    check_exp([](double v) { return exp_nonpositive(v); }, "exp_nonpositive");
    // The weights' exp as the kernels compute it (chunk_exp_sums stores them), portable and AVX-512.
    const std::vector<double> x = exp_test_points();
    const auto n = static_cast<std::int64_t>(x.size());
    for (const int simd : {0, 1}) {
        g_avx512_override = simd;
        std::vector<double> w(x.size());
        double sum = 0.0, squares = 0.0;
        chunk_exp_sums<true>(x.data(), n, 0.0, w.data(), &sum, &squares);
        double worst = 0.0;
        for (std::size_t k = 0; k < x.size(); ++k) {
            const double expected = x[k] < -708.0 ? 0.0 : std::exp(x[k]);
            worst = std::max(worst, ulps(w[k], expected));
            if (x[k] < -708.0) EXPECT(w[k] == 0.0);
            if (x[k] == 0.0) EXPECT(w[k] == 1.0);
        }
        if (worst > 2.0) std::fprintf(stderr, "chunk_exp_sums (avx512=%d): worst error %.2f ulp\n", simd, worst);
        EXPECT(worst <= 2.0);
        // A shifted row: exp(x - shift), float input, a partial last vector.
        std::vector<float> xf = {0.0f, -1.5f, -std::numeric_limits<float>::infinity(), -700.25f, -3.0f};
        std::vector<double> wf(xf.size());
        chunk_exp_sums<true>(xf.data(), static_cast<std::int64_t>(xf.size()), 1.0, wf.data(), &sum, &squares);
        for (std::size_t k = 0; k < xf.size(); ++k) {
            const double v = static_cast<double>(xf[k]) - 1.0;
            EXPECT(ulps(wf[k], v < -708.0 ? 0.0 : std::exp(v)) <= 2.0);
        }
        double expected_sum = 0.0;
        for (const double v : wf) expected_sum += v;
        EXPECT(std::fabs(sum - expected_sum) <= 1e-15 * expected_sum);
    }
    g_avx512_override = -1;
#if TILTSMC_HAVE_AVX512_PATH
    if (cpu_has_avx512()) std::printf("exp: AVX-512 path checked\n");
#endif
}

void test_log_normalize() {
    std::vector<double> logw = {0.0, std::log(3.0), -inf, 1e4, 1e4, -inf};
    std::vector<double> out(6), log_mean_w(2), ess(2);
    EXPECT(log_normalize(logw.data(), 2, 3, false, out.data(), log_mean_w.data(), ess.data()).ok());
    EXPECT(std::fabs(out[0] - std::log(0.25)) < 1e-12 && std::fabs(out[1] - std::log(0.75)) < 1e-12);
    EXPECT(out[2] == -inf);
    EXPECT(std::fabs(log_mean_w[0] - std::log(4.0 / 3.0)) < 1e-12);
    EXPECT(std::fabs(ess[0] - 1.0 / (0.0625 + 0.5625)) < 1e-12);
    EXPECT(std::fabs(log_mean_w[1] - (1e4 + std::log(2.0 / 3.0))) < 1e-9 && std::fabs(ess[1] - 2.0) < 1e-12);

    std::vector<double> zero = {-inf, -inf};
    Status status = log_normalize(zero.data(), 1, 2, false, out.data(), log_mean_w.data(), ess.data());
    EXPECT(status.code == StatusCode::zero_row && status.row == 0);
    EXPECT(log_normalize(zero.data(), 1, 2, true, out.data(), log_mean_w.data(), ess.data()).ok());
    EXPECT(log_mean_w[0] == -inf && ess[0] == 0.0 && out[0] == -inf);

    std::vector<double> bad = {0.0, 1.0, std::nan(""), 2.0};
    status = log_normalize(bad.data(), 2, 2, false, out.data(), log_mean_w.data(), ess.data());
    EXPECT(status.code == StatusCode::nan_weight && status.row == 1 && status.index == 0);
    bad[2] = inf;
    status = log_normalize(bad.data(), 2, 2, false, out.data(), log_mean_w.data(), ess.data());
    EXPECT(status.code == StatusCode::positive_infinity && status.row == 1 && status.index == 0);
    EXPECT(log_normalize(bad.data(), 1, 0, false, out.data(), log_mean_w.data(), ess.data()).code ==
           StatusCode::bad_size);

    // Statistics only (no normalised output), several rows, a zero row reported.
    std::vector<double> three = {0.0, std::log(3.0), -inf, -inf, 1.0, 1.0};
    std::vector<double> means(3), sizes(3);
    EXPECT(log_normalize<double>(three.data(), 3, 2, true, nullptr, means.data(), sizes.data()).ok());
    EXPECT(std::fabs(means[0] - std::log(2.0)) < 1e-12 && means[1] == -inf && sizes[1] == 0.0);
    EXPECT(std::fabs(sizes[2] - 2.0) < 1e-12);

    std::vector<float> single = {-3.5f};
    std::vector<float> single_out(1);
    EXPECT(log_normalize(single.data(), 1, 1, false, single_out.data(), log_mean_w.data(), ess.data()).ok());
    EXPECT(single_out[0] == 0.0f && ess[0] == 1.0);
}

void test_resample_edges() {
    std::mt19937_64 engine(1);
    std::uniform_real_distribution<double> uniform(-5.0, 5.0);
    for (const Scheme scheme : schemes) {
        for (std::int64_t n : {1, 2, 7, 64}) {
            for (std::int64_t m : {1, 3, 64, 200}) {
                const std::int64_t rows = 3;
                std::vector<double> logw(static_cast<std::size_t>(rows * n));
                for (auto& v : logw) v = uniform(engine) < -3.0 && n > 1 ? -inf : uniform(engine);
                for (std::int64_t r = 0; r < rows; ++r) logw[static_cast<std::size_t>(r * n)] = 0.0;
                std::vector<std::int64_t> a(static_cast<std::size_t>(rows * m), -7);
                EXPECT(resample(logw.data(), rows, n, scheme, m, 11, a.data()).ok());
                EXPECT(valid_ancestors(logw, rows, n, a, m));
            }
        }
        // One-hot weights, with the positive weight at the very end (after zero weights).
        std::vector<double> one_hot = {-inf, -inf, -inf, 2.0};
        std::vector<std::int64_t> a(5);
        EXPECT(resample(one_hot.data(), 1, 4, scheme, 5, 3, a.data()).ok());
        for (std::int64_t i : a) EXPECT(i == 3);
        one_hot = {2.0, -inf, -inf, -inf};
        EXPECT(resample(one_hot.data(), 1, 4, scheme, 5, 3, a.data()).ok());
        for (std::int64_t i : a) EXPECT(i == 0);
        // Huge magnitudes: only the differences matter.
        std::vector<double> big = {1e4, 1e4 - 1e3, -1e4};
        EXPECT(resample(big.data(), 1, 3, scheme, 5, 3, a.data()).ok());
        for (std::int64_t i : a) EXPECT(i == 0);
        // Bad input.
        std::vector<double> zero = {-inf, -inf, 0.0, 1.0};
        a.resize(8);
        const Status status = resample(zero.data(), 2, 2, scheme, 4, 1, a.data());
        EXPECT(status.code == StatusCode::zero_row && status.row == 0);
        std::vector<double> nan_row = {0.0, std::nan("")};
        EXPECT(resample(nan_row.data(), 1, 2, scheme, 4, 1, a.data()).code == StatusCode::nan_weight);
        EXPECT(resample(nan_row.data(), 1, 2, scheme, 0, 1, a.data()).code == StatusCode::bad_size);
    }
}

void test_systematic_floor_ceil_and_threads() {
    // A long row crossing many chunk boundaries: threads must not change a single ancestor, and every
    // particle gets floor or ceil of m w_i children.
    const std::int64_t n = 3 * 8192 + 77, m = n + 1000;
    std::mt19937_64 engine(5);
    std::normal_distribution<double> normal(0.0, 2.0);
    std::vector<double> logw(static_cast<std::size_t>(n));
    for (auto& v : logw) v = normal(engine);
    logw[100] = -inf;
    for (const Scheme scheme : schemes) {
        std::vector<std::int64_t> one(static_cast<std::size_t>(m)), two(static_cast<std::size_t>(m));
        set_num_threads(1);
        EXPECT(resample(logw.data(), 1, n, scheme, m, 99, one.data()).ok());
        set_num_threads(2);
        EXPECT(resample(logw.data(), 1, n, scheme, m, 99, two.data()).ok());
        EXPECT(one == two);
        EXPECT(valid_ancestors(logw, 1, n, one, m));
        if (scheme == Scheme::systematic) {
            double total = 0;
            for (double v : logw) total += std::exp(v);
            std::vector<std::int64_t> children(static_cast<std::size_t>(n), 0);
            for (std::int64_t i : one) ++children[static_cast<std::size_t>(i)];
            bool all_floor_or_ceil = true;
            for (std::int64_t i = 0; i < n; ++i) {
                const double expected = static_cast<double>(m) * std::exp(logw[static_cast<std::size_t>(i)]) / total;
                const auto c = static_cast<double>(children[static_cast<std::size_t>(i)]);
                all_floor_or_ceil &= c >= std::floor(expected - 1e-9) && c <= std::ceil(expected + 1e-9);
            }
            EXPECT(all_floor_or_ceil);
        }
    }
    set_num_threads(0);
}

void test_systematic_chunk_gap_goes_to_a_positive_particle() {
    // A chunk's offset comes from its weights summed in one order, its scan adds them in another, so
    // the scan can stop short of the next chunk's offset. Here the gap is made wide (0.5 of a weight
    // where rounding gives ~1e-16) so that points surely fall in it: they must go to the chunk's last
    // positive particle, not to the zero-weight particles after it.
    const std::int64_t n = 2 * kChunk, m = n, zeros = 3;
    for (const bool split : {false, true}) {
        for (const double u : {0.0, 0.25, 0.5, 0.999}) {
            std::vector<double> w(static_cast<std::size_t>(n), 1.0);
            for (std::int64_t i = kChunk - zeros; i < kChunk; ++i) w[static_cast<std::size_t>(i)] = 0.0;
            RowWeights rw;
            const double first = static_cast<double>(kChunk - zeros) + 0.5, second = static_cast<double>(kChunk);
            rw.chunk_offset = {0.0, first, first + second};
            rw.sum = first + second;
            rw.last_positive = n - 1;
            std::vector<std::int64_t> out(static_cast<std::size_t>(m), -1);
            detail::systematic_row(w.data(), n, rw, m, u, out.data(), split);
            bool valid = true;
            for (std::int64_t j = 0; j < m; ++j) {
                const std::int64_t a = out[static_cast<std::size_t>(j)];
                valid &= a >= 0 && a < n && (j == 0 || a >= out[static_cast<std::size_t>(j - 1)]);
                valid &= a < kChunk - zeros || a >= kChunk;
            }
            EXPECT(valid);
        }
    }
}

void test_pool_select_and_mh() {
    std::vector<double> logw = {-inf, 0.0, -inf, -inf, -inf, 5.0};
    std::vector<std::int64_t> index(2);
    std::vector<double> log_mean_w(2);
    for (std::uint64_t key = 0; key < 200; ++key) {
        EXPECT(pool_select(logw.data(), 2, 3, key, index.data(), log_mean_w.data()).ok());
        EXPECT(index[0] == 1 && index[1] == 2);
    }
    EXPECT(std::fabs(log_mean_w[0] - std::log(1.0 / 3.0)) < 1e-12);
    std::vector<double> zero = {-inf, -inf};
    EXPECT(pool_select(zero.data(), 1, 2, 1, index.data(), log_mean_w.data()).code == StatusCode::zero_row);

    // sample_logits: float logits / temperature, the draw pool_select makes on those scores, log p(v).
    const std::vector<float> logits = {0.5f, -1.25f, 2.0f, -std::numeric_limits<float>::infinity(), 1.0f, 0.0f};
    std::vector<double> scores(logits.begin(), logits.end());
    for (double& s : scores) s /= 0.7;
    std::vector<std::int64_t> drawn(2);
    std::vector<double> log_prob(2);
    for (std::uint64_t key = 0; key < 50; ++key) {
        EXPECT(sample_logits(logits.data(), 2, 3, 0.7, key, nullptr, drawn.data(), log_prob.data()).ok());
        EXPECT(pool_select(scores.data(), 2, 3, key, index.data(), log_mean_w.data()).ok());
        EXPECT(drawn == index && drawn[1] != 0);
        for (std::size_t r = 0; r < 2; ++r) {
            double log_sum = -inf;
            for (std::size_t v = 0; v < 3; ++v) {
                const double s = scores[3 * r + v];
                if (s > -inf) log_sum = log_sum > -inf ? std::max(log_sum, s) + std::log1p(std::exp(-std::fabs(log_sum - s))) : s;
            }
            EXPECT(std::fabs(log_prob[r] - (scores[3 * r + static_cast<std::size_t>(drawn[r])] - log_sum)) < 1e-12);
        }
    }
    EXPECT(sample_logits(logits.data(), 2, 3, 0.0, 1, nullptr, drawn.data(), log_prob.data()).code == StatusCode::bad_size);
    const std::vector<float> with_nan = {0.0f, std::nanf("")};
    EXPECT(sample_logits(with_nan.data(), 1, 2, 1.0, 1, nullptr, drawn.data(), log_prob.data()).code == StatusCode::nan_weight);

    std::vector<double> current = {0.0, 0.0, -inf, -inf, 1.0};
    std::vector<double> proposed = {1.0, -inf, -inf, 3.0, 1.0};
    std::vector<std::uint8_t> accept(5);
    EXPECT(mh_accept(current.data(), proposed.data(), 5, 4, accept.data()).ok());
    EXPECT(accept[0] == 1 && accept[1] == 0 && accept[2] == 1 && accept[3] == 1 && accept[4] == 1);
    proposed[1] = std::nan("");
    const Status status = mh_accept(current.data(), proposed.data(), 5, 4, accept.data());
    EXPECT(status.code == StatusCode::nan_weight && status.row == 1 && status.index == 1);
}

void test_smc_step() {
    // Row 0: unequal weights; row 1: all zero (reported, identity); row 2: equal weights.
    std::vector<double> log_w = {0.0, -3.0, 1.0, -inf, -inf, -inf, 2.0, 2.0, 2.0};
    std::vector<std::int64_t> ancestors(9, -1), unique(3);
    std::vector<std::uint8_t> resampled(3);
    std::vector<double> log_mean_w(3), ess(3);
    EXPECT(smc_step(log_w.data(), 3, 3, 0.9, Scheme::systematic, 5, false, ancestors.data(), resampled.data(),
                    log_mean_w.data(), ess.data(), unique.data())
               .ok());
    EXPECT(resampled[0] == 1 && resampled[1] == 0 && resampled[2] == 0);
    EXPECT(log_w[0] == 0.0 && log_w[1] == 0.0 && log_w[2] == 0.0 && log_w[3] == -inf && log_w[6] == 2.0);
    EXPECT(ess[1] == 0.0 && log_mean_w[1] == -inf && std::fabs(ess[2] - 3.0) < 1e-12);
    EXPECT(ancestors[3] == 0 && ancestors[4] == 1 && ancestors[5] == 2 && ancestors[6] == 0 && ancestors[8] == 2);
    EXPECT(unique[1] == 3 && unique[0] >= 1 && unique[0] <= 3);
    std::vector<double> bad = {0.0, std::nan("")};
    EXPECT(smc_step(bad.data(), 1, 2, 1.0, Scheme::systematic, 5, false, ancestors.data(), resampled.data(),
                    log_mean_w.data(), ess.data(), unique.data())
               .code == StatusCode::nan_weight);
}

void test_gather() {
    const std::int64_t rows = 2, n = 4, item = 3;
    std::vector<std::uint8_t> x(static_cast<std::size_t>(rows * n * item));
    for (std::size_t k = 0; k < x.size(); ++k) x[k] = static_cast<std::uint8_t>(k);
    const std::vector<std::int64_t> a = {3, 3, 0, 1, 0, 1, 2, 3};
    std::vector<std::uint8_t> out(x.size());
    EXPECT(gather(x.data(), rows, n, item, a.data(), n, out.data()).ok());
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < n; ++j)
            EXPECT(std::memcmp(&out[static_cast<std::size_t>((r * n + j) * item)],
                               &x[static_cast<std::size_t>((r * n + a[static_cast<std::size_t>(r * n + j)]) * item)],
                               static_cast<std::size_t>(item)) == 0);
    std::vector<std::uint8_t> in_place = x;
    EXPECT(gather(in_place.data(), rows, n, item, a.data(), n, in_place.data()).ok());
    EXPECT(in_place == out);
    // A cycle in place: every item both read and overwritten.
    const std::vector<std::int64_t> cycle = {1, 2, 3, 0, 3, 2, 1, 0};
    in_place = x;
    EXPECT(gather(x.data(), rows, n, item, cycle.data(), n, out.data()).ok());
    EXPECT(gather(in_place.data(), rows, n, item, cycle.data(), n, in_place.data()).ok());
    EXPECT(in_place == out);
    // Out-of-range ancestors: reported, nothing written.
    const std::vector<std::int64_t> bad = {0, 1, 2, 3, 0, 4, 0, 0};
    in_place = x;
    const Status status = gather(in_place.data(), rows, n, item, bad.data(), n, in_place.data());
    EXPECT(status.code == StatusCode::index_out_of_range && status.row == 1 && status.index == 1);
    EXPECT(in_place == x);
    const std::vector<std::int64_t> negative = {0, -1};
    EXPECT(gather(x.data(), 1, n, item, negative.data(), 2, out.data()).code == StatusCode::index_out_of_range);
    EXPECT(gather(in_place.data(), 1, n, item, negative.data(), 2, in_place.data()).code == StatusCode::bad_size);
    // m != n out of place, and zero-byte items.
    const std::vector<std::int64_t> many = {0, 0, 0, 0, 0, 0, 3};
    std::vector<std::uint8_t> wide(7 * static_cast<std::size_t>(item));
    EXPECT(gather(x.data(), 1, n, item, many.data(), 7, wide.data()).ok());
    EXPECT(wide[18] == x[9]);
    EXPECT(gather(x.data(), 1, n, 0, many.data(), 7, wide.data()).ok());
}

void test_concatenate_padded() {
    // Two parts of 2 blocks: part 0 has 2 rows of length 3 with its first column left out, part 1 one row of
    // length 1; items of 2 bytes, width 2: part 1's segments get one zero column before their item.
    std::vector<std::uint8_t> first(2 * 2 * 3 * 2), second(1 * 2 * 1 * 2);
    for (std::size_t k = 0; k < first.size(); ++k) first[k] = static_cast<std::uint8_t>(k + 1);
    for (std::size_t k = 0; k < second.size(); ++k) second[k] = static_cast<std::uint8_t>(100 + k);
    const PaddedPart parts[] = {{first.data(), 2, 3, 1}, {second.data(), 1, 1, 0}};
    std::vector<std::uint8_t> out(3 * 2 * 2 * 2, 0xAB);
    EXPECT(concatenate_padded(parts, 2, 2, 2, 2, out.data()).ok());
    for (std::int64_t segment = 0; segment < 4; ++segment)  // part 0: columns 1 and 2 of each segment
        EXPECT(std::memcmp(&out[static_cast<std::size_t>(segment * 4)], &first[static_cast<std::size_t>(segment * 6 + 2)],
                           4) == 0);
    for (std::int64_t segment = 0; segment < 2; ++segment) {  // part 1: a zero column, then its item
        const std::size_t at = static_cast<std::size_t>(16 + segment * 4);
        EXPECT(out[at] == 0 && out[at + 1] == 0);
        EXPECT(out[at + 2] == second[static_cast<std::size_t>(segment * 2)] &&
               out[at + 3] == second[static_cast<std::size_t>(segment * 2 + 1)]);
    }
    // Right padding: part 0 keeps the first two columns of each segment, part 1 its item then a zero column.
    std::vector<std::uint8_t> right(out.size(), 0xAB);
    EXPECT(concatenate_padded(parts, 2, 2, 2, 2, right.data(), true).ok());
    for (std::int64_t segment = 0; segment < 4; ++segment)
        EXPECT(std::memcmp(&right[static_cast<std::size_t>(segment * 4)], &first[static_cast<std::size_t>(segment * 6)],
                           4) == 0);
    for (std::int64_t segment = 0; segment < 2; ++segment) {
        const std::size_t at = static_cast<std::size_t>(16 + segment * 4);
        EXPECT(right[at] == second[static_cast<std::size_t>(segment * 2)] &&
               right[at + 1] == second[static_cast<std::size_t>(segment * 2 + 1)]);
        EXPECT(right[at + 2] == 0 && right[at + 3] == 0);
    }
    // Right padding with counts: row 0 takes one item of each segment, row 1 none, row 2 (part 1) its one
    // item (a count past its kept length is clamped); the columns after are left as they were.
    const std::int64_t counts[] = {1, 0, 5};
    std::vector<std::uint8_t> own(out.size(), 0xAB);
    EXPECT(concatenate_padded(parts, 2, 2, 2, 2, own.data(), true, counts).ok());
    for (std::int64_t segment = 0; segment < 2; ++segment) {
        const std::size_t at = static_cast<std::size_t>(segment * 4);
        EXPECT(std::memcmp(&own[at], &first[static_cast<std::size_t>(segment * 6)], 2) == 0);
        EXPECT(own[at + 2] == 0xAB && own[at + 3] == 0xAB);
    }
    for (std::size_t k = 8; k < 16; ++k) EXPECT(own[k] == 0xAB);
    EXPECT(own[16] == second[0] && own[17] == second[1] && own[18] == 0xAB && own[19] == 0xAB);
    // A negative count, or counts with left padding: refused, nothing written.
    const std::int64_t negative[] = {1, -1, 0};
    std::vector<std::uint8_t> kept_as_is(out.size(), 0xAB);
    EXPECT(concatenate_padded(parts, 2, 2, 2, 2, kept_as_is.data(), true, negative).code == StatusCode::bad_size);
    EXPECT(concatenate_padded(parts, 2, 2, 2, 2, kept_as_is.data(), false, counts).code == StatusCode::bad_size);
    EXPECT(kept_as_is == std::vector<std::uint8_t>(out.size(), 0xAB));
    // A part longer than the width after its skip, or a skip past its length: refused, nothing written.
    std::vector<std::uint8_t> untouched(out.size(), 0xCD), target = untouched;
    const PaddedPart too_long[] = {{first.data(), 2, 3, 0}, {second.data(), 1, 1, 0}};
    EXPECT(concatenate_padded(too_long, 2, 2, 2, 2, target.data()).code == StatusCode::bad_size);
    const PaddedPart bad_skip[] = {{first.data(), 2, 3, 4}};
    EXPECT(concatenate_padded(bad_skip, 1, 2, 2, 2, target.data()).code == StatusCode::bad_size);
    EXPECT(target == untouched);
    // Many rows over the thread pool equal the same rows on one thread.
    const std::int64_t rows = 700, blocks = 3, length = 40, skip = 5, width = 50, item = 8;
    std::vector<std::uint8_t> big(static_cast<std::size_t>(rows * blocks * length * item));
    for (std::size_t k = 0; k < big.size(); ++k) big[k] = static_cast<std::uint8_t>(k * 7 + 3);
    const PaddedPart pieces[] = {{big.data(), rows / 2, length, skip}, {big.data(), rows - rows / 2, length, 0}};
    std::vector<std::uint8_t> threaded(static_cast<std::size_t>(rows * blocks * width * item)), alone(threaded.size());
    const int threads = get_num_threads();
    set_num_threads(2);
    EXPECT(concatenate_padded(pieces, 2, blocks, width, item, threaded.data()).ok());
    set_num_threads(1);
    EXPECT(concatenate_padded(pieces, 2, blocks, width, item, alone.data()).ok());
    set_num_threads(threads);
    EXPECT(threaded == alone);
    EXPECT(threaded[0] == 0 && threaded[static_cast<std::size_t>((width - (length - skip)) * item)] == big[skip * item]);
}

void test_reorder_in_place_and_keep_survivors() {
    // Two arrays (items of 2 and 72 bytes) reordered by one call equal two separate gathers.
    const std::int64_t rows = 2, n = 4;
    std::vector<std::uint8_t> small(static_cast<std::size_t>(rows * n * 2)), large(static_cast<std::size_t>(rows * n * 72));
    for (std::size_t k = 0; k < small.size(); ++k) small[k] = static_cast<std::uint8_t>(3 * k + 1);
    for (std::size_t k = 0; k < large.size(); ++k) large[k] = static_cast<std::uint8_t>(k);
    const std::vector<std::int64_t> a = {3, 3, 0, 1, 1, 2, 2, 0};
    std::vector<std::uint8_t> small_want(small.size()), large_want(large.size());
    EXPECT(gather(small.data(), rows, n, 2, a.data(), n, small_want.data()).ok());
    EXPECT(gather(large.data(), rows, n, 72, a.data(), n, large_want.data()).ok());
    std::uint8_t* arrays[] = {small.data(), large.data()};
    const std::int64_t item_bytes[] = {2, 72};
    EXPECT(reorder_in_place(arrays, item_bytes, 2, rows, n, a.data()).ok());
    EXPECT(small == small_want && large == large_want);
    // A bad index in the last row: reported, neither array written; checked even with no arrays.
    const std::vector<std::int64_t> bad = {0, 1, 2, 3, 0, 1, 4, 3};
    const auto small_before = small, large_before = large;
    Status status = reorder_in_place(arrays, item_bytes, 2, rows, n, bad.data());
    EXPECT(status.code == StatusCode::index_out_of_range && status.row == 1 && status.index == 2);
    EXPECT(small == small_before && large == large_before);
    EXPECT(reorder_in_place(arrays, item_bytes, 0, rows, n, bad.data()).code == StatusCode::index_out_of_range);

    // With a prefix: items of 3 blocks x 8 columns x 4 bytes (96 bytes), of which item i uses used[i]
    // columns (clamped to [0, 8]). Item j takes the first used[a_j] columns of each block of item a_j, its
    // columns after stay as they were; a cycle (0 <-> 1) goes through the saved copies.
    const std::int64_t blocks = 3, width = 8, column = 4, item = blocks * width * column;
    std::vector<std::uint8_t> cache(static_cast<std::size_t>(rows * n * item));
    for (std::size_t k = 0; k < cache.size(); ++k) cache[k] = static_cast<std::uint8_t>(7 * k + 5);
    const std::vector<std::int64_t> cycle = {1, 0, 2, 2, 0, 1, 2, 3};
    const std::vector<std::int64_t> used = {2, 5, 0, 99, 8, -4, 3, 1};
    const auto before = cache;
    std::uint8_t* cache_arrays[] = {cache.data()};
    const std::int64_t cache_bytes[] = {item};
    const ItemPrefix prefix{blocks, width, column};
    EXPECT(reorder_in_place(cache_arrays, cache_bytes, 1, rows, n, cycle.data(), &prefix, used.data()).ok());
    bool prefixes_right = true;
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < n; ++j) {
            const std::int64_t i = cycle[static_cast<std::size_t>(r * n + j)];
            const std::int64_t copied = i == j ? width : std::clamp<std::int64_t>(used[static_cast<std::size_t>(r * n + i)], 0, width);
            for (std::int64_t b = 0; b < blocks; ++b)
                for (std::int64_t c = 0; c < width * column; ++c) {
                    const std::int64_t at = (r * n + j) * item + b * width * column + c;
                    const std::int64_t from = c < copied * column ? (r * n + i) * item + b * width * column + c : at;
                    prefixes_right = prefixes_right && cache[static_cast<std::size_t>(at)] == before[static_cast<std::size_t>(from)];
                }
        }
    EXPECT(prefixes_right);
    // A prefix that does not tile the item, or without used: refused, nothing written.
    const ItemPrefix wrong{blocks, width + 1, column};
    const auto unchanged = cache;
    EXPECT(reorder_in_place(cache_arrays, cache_bytes, 1, rows, n, cycle.data(), &wrong, used.data()).code ==
           StatusCode::bad_size);
    EXPECT(reorder_in_place(cache_arrays, cache_bytes, 1, rows, n, cycle.data(), &prefix, nullptr).code ==
           StatusCode::bad_size);
    EXPECT(cache == unchanged);

    // keep_survivors: survivors in their own slots, extra copies into the childless slots in order.
    std::vector<std::int64_t> ancestors = {0, 0, 0, 3, 3, 4, 2, 1, 1, 1};
    EXPECT(keep_survivors(ancestors.data(), 2, 5).ok());
    const std::vector<std::int64_t> arranged = {0, 0, 0, 3, 3, 1, 1, 2, 1, 4};
    EXPECT(ancestors == arranged);
    std::vector<std::int64_t> out_of_range = {0, 1, 2, 0, 5, 1};
    const auto kept = out_of_range;
    status = keep_survivors(out_of_range.data(), 2, 3);
    EXPECT(status.code == StatusCode::index_out_of_range && status.row == 1 && status.index == 1);
    EXPECT(out_of_range == kept);
}

void test_token_kernels() {
    // append_tokens: rows of capacity 3; row 1 inactive, row 2 stops at a stop id, row 3 at max_length 3.
    std::vector<std::int64_t> tokens(12, -1), lengths = {0, 1, 1, 2};
    std::vector<std::uint8_t> finished = {0, 0, 0, 0}, active = {1, 0, 1, 1}, still(4, 9);
    const std::vector<std::int64_t> fresh = {5, 6, 7, 8}, stop = {7};
    std::int64_t going = -1;
    EXPECT(append_tokens(tokens.data(), 4, 3, lengths.data(), finished.data(), fresh.data(), active.data(), stop.data(), 1, 3,
                         still.data(), &going).ok());
    EXPECT((lengths == std::vector<std::int64_t>{1, 1, 2, 3}) && tokens[0] == 5 && tokens[4] == -1 && tokens[7] == 7 &&
           tokens[11] == 8);
    EXPECT((finished == std::vector<std::uint8_t>{0, 0, 1, 1}) && (still == std::vector<std::uint8_t>{1, 0, 0, 0}) &&
           going == 1);
    // A full active row: reported with its length, nothing written.
    const auto tokens_before = tokens;
    std::vector<std::uint8_t> all = {1, 1, 1, 1};
    const Status full = append_tokens(tokens.data(), 4, 3, lengths.data(), finished.data(), fresh.data(), all.data(),
                                      stop.data(), 1, 3, still.data(), &going);
    EXPECT(full.code == StatusCode::index_out_of_range && full.row == 3 && full.index == 3 && tokens == tokens_before);

    // decode_inputs: positions count the mask's ones; a row that sits out is fed padding, masked.
    const std::vector<std::int64_t> mask = {0, 1, 1, 1, 1, 1};
    const std::vector<std::uint8_t> going_rows = {1, 0};
    std::vector<std::int64_t> input_ids(2), next_mask(8), positions(2);
    decode_inputs(mask.data(), 2, 3, going_rows.data(), fresh.data(), -1, input_ids.data(), next_mask.data(),
                  positions.data());
    EXPECT((input_ids == std::vector<std::int64_t>{5, -1}) && (positions == std::vector<std::int64_t>{2, 3}));
    EXPECT((next_mask == std::vector<std::int64_t>{0, 1, 1, 1, 1, 1, 1, 0}));
    // Right-padded: a row's length is its mask's nonzero count; the session's mask covers one column more,
    // the mask kept one more where the row was fed.
    const std::vector<std::int64_t> right_mask = {1, 1, 0, 1, 2, 1};
    std::vector<std::int64_t> feed_mask(8), kept_mask(8);
    decode_inputs_right_padded(right_mask.data(), 2, 3, going_rows.data(), fresh.data(), -1, input_ids.data(),
                               feed_mask.data(), kept_mask.data(), positions.data());
    EXPECT((input_ids == std::vector<std::int64_t>{5, -1}) && (positions == std::vector<std::int64_t>{2, 3}));
    EXPECT((feed_mask == std::vector<std::int64_t>{1, 1, 1, 0, 1, 1, 1, 1}));
    EXPECT((kept_mask == std::vector<std::int64_t>{1, 1, 1, 0, 1, 1, 1, 0}));

    // Prefixes: prompts {1} and {2, 3}, two particles each with capacity 2.
    const std::vector<std::int64_t> prompt_ids = {1, 2, 3}, offsets = {0, 1, 3};
    const std::vector<std::int64_t> generated = {10, 11, 12, 13, 14, 15, 16, 17}, generated_lengths = {2, 0, 1, 2};
    std::int64_t width = 0;
    EXPECT(prefix_width(offsets.data(), 2, 2, 2, generated_lengths.data(), nullptr, 4, &width).ok() && width == 4);
    std::vector<std::int64_t> ids(16), ones(16), last(4), position_ids(16);
    right_padded_prefixes(prompt_ids.data(), offsets.data(), 2, generated.data(), 2, generated_lengths.data(), nullptr, 4,
                          width, 0, ids.data(), ones.data(), last.data(), position_ids.data());
    EXPECT((ids == std::vector<std::int64_t>{1, 10, 11, 0, 1, 0, 0, 0, 2, 3, 14, 0, 2, 3, 16, 17}));
    EXPECT((last == std::vector<std::int64_t>{2, 0, 2, 3}) && ones[3] == 0 && ones[12 + 3] == 1);
    EXPECT((std::vector<std::int64_t>(position_ids.begin(), position_ids.begin() + 8) ==
            std::vector<std::int64_t>{0, 1, 2, 2, 0, 0, 0, 0}));
    const std::vector<std::int64_t> selected = {3, 4};
    Status status = prefix_width(offsets.data(), 2, 2, 2, generated_lengths.data(), selected.data(), 2, &width);
    EXPECT(status.code == StatusCode::index_out_of_range && status.row == 1 && status.index == 4);
    const std::vector<std::int64_t> too_long = {2, 0, 3, 2};
    status = prefix_width(offsets.data(), 2, 2, 2, too_long.data(), nullptr, 4, &width);
    EXPECT(status.code == StatusCode::index_out_of_range && status.row == 2);
    const std::vector<std::int64_t> descending = {0, 3, 1};
    EXPECT(prefix_width(descending.data(), 2, 2, 2, generated_lengths.data(), nullptr, 4, &width).code == StatusCode::bad_size);

    // read_log_values: logit, log_value, prob; NaN, +inf and out-of-range probabilities refused before writing.
    const std::vector<float> scores = {0.0f, 2.0f, -3.0f, 0.5f};
    std::vector<double> log_values(2, 42.0);
    const std::vector<std::int64_t> columns = {1, 0};
    EXPECT(read_log_values(scores.data(), 2, 2, columns.data(), ScoreKind::logit, log_values.data()).ok());
    EXPECT(std::abs(log_values[0] + std::log1p(std::exp(-2.0))) < 1e-15 &&
           std::abs(log_values[1] + std::log1p(std::exp(3.0))) < 1e-13);
    const std::vector<float> probabilities = {0.25f, 1.0f};
    EXPECT(read_log_values(probabilities.data(), 2, 1, nullptr, ScoreKind::prob, log_values.data()).ok());
    EXPECT(log_values[0] == std::log(0.25) && log_values[1] == 0.0);
    const std::vector<double> bad_scores = {0.5, std::nan(""), inf, 2.0};
    std::vector<double> untouched(2, 42.0);
    status = read_log_values(bad_scores.data(), 2, 2, nullptr, ScoreKind::logit, untouched.data());
    EXPECT(status.code == StatusCode::nan_weight && status.row == 0 && status.index == 1);
    status = read_log_values(bad_scores.data() + 1, 1, 2, nullptr, ScoreKind::log_value, untouched.data());
    EXPECT(status.code == StatusCode::positive_infinity && status.row == 0 && status.index == 1);
    status = read_log_values(bad_scores.data(), 4, 1, nullptr, ScoreKind::prob, untouched.data());
    EXPECT(status.code == StatusCode::nan_weight && status.row == 1);
    status = read_log_values(bad_scores.data() + 3, 1, 1, nullptr, ScoreKind::prob, untouched.data());
    EXPECT(status.code == StatusCode::outside_unit_interval && status.row == 0);
    const std::vector<std::int64_t> past_the_end = {0, 2};
    status = read_log_values(bad_scores.data(), 2, 2, past_the_end.data(), ScoreKind::logit, untouched.data());
    EXPECT(status.code == StatusCode::index_out_of_range && status.row == 1 && status.index == 2);
    EXPECT(untouched[0] == 42.0 && untouched[1] == 42.0);

    // smc_step with survivors_stay gives keep_survivors of the plain step; sample_logits skips inactive rows.
    std::vector<double> log_w(24), log_w_copy;
    for (std::size_t k = 0; k < log_w.size(); ++k) log_w[k] = std::sin(static_cast<double>(k)) * 3.0;
    log_w_copy = log_w;
    std::vector<std::int64_t> plain(24), staying(24), unique(3);
    std::vector<std::uint8_t> resampled(3);
    std::vector<double> log_mean_w(3), ess(3);
    EXPECT(smc_step(log_w.data(), 3, 8, 1.0, Scheme::multinomial, 11, false, plain.data(), resampled.data(),
                    log_mean_w.data(), ess.data(), unique.data()).ok());
    EXPECT(smc_step(log_w_copy.data(), 3, 8, 1.0, Scheme::multinomial, 11, true, staying.data(), resampled.data(),
                    log_mean_w.data(), ess.data(), unique.data()).ok());
    EXPECT(keep_survivors(plain.data(), 3, 8).ok() && plain == staying);
    // smc_reweight: potentials on live particles, then the step (survivors stay), then the log-Z bookkeeping.
    std::vector<double> w = {0.0, 0.0, -inf, 0.0}, v = {1.0, -inf, 2.0, 0.5}, v_prev = {0.0, 0.0, -inf, 0.0};
    const std::vector<std::uint8_t> live = {1, 1, 1, 0};
    std::vector<double> total = {std::log(2.0), std::log(2.0)}, z = {0.0, 0.0}, increment(2), row_ess(2);
    std::vector<std::uint8_t> gone = {0, 0}, resampled_rows(2);
    std::vector<std::int64_t> a(4), distinct(2);
    EXPECT(smc_reweight(w.data(), 2, 2, v.data(), v_prev.data(), live.data(), std::log(2.0), 0.0, Scheme::systematic, 3,
                        total.data(), z.data(), gone.data(), a.data(), resampled_rows.data(), row_ess.data(),
                        distinct.data(), increment.data()).ok());
    EXPECT(w[0] == 1.0 && w[1] == -inf && w[2] == -inf && w[3] == 0.0);  // row 1: -inf - -inf stays -inf
    EXPECT(v_prev[0] == 1.0 && v_prev[1] == -inf && v_prev[2] == 2.0 && v_prev[3] == 0.0);
    EXPECT(std::abs(increment[0] - (std::log(std::exp(1.0) + 0.0) - std::log(2.0))) < 1e-15);
    EXPECT(row_ess[1] == 1.0 && std::abs(z[1] - std::log(0.5)) < 1e-15 && !gone[0] && !gone[1]);
    std::vector<double> nan_v = {std::nan(""), 0.0, 0.0, 0.0}, w_before = w;
    const Status refused = smc_reweight(w.data(), 2, 2, nan_v.data(), v_prev.data(), live.data(), std::log(2.0), 0.0,
                                        Scheme::systematic, 3, total.data(), z.data(), gone.data(), a.data(),
                                        resampled_rows.data(), row_ess.data(), distinct.data(), increment.data());
    EXPECT(refused.code == StatusCode::nan_weight && refused.row == 0 && refused.index == 0 && w == w_before);
    // the increments' standard errors: sqrt(sum_i (W_i G_i / e^l - W_i)^2) with W the normalised weights before
    {
        std::vector<double> sw = {0.0, std::log(3.0), -inf, -inf, -inf, 0.0}, sv = {1.0, 0.0, 2.0, 0.5, 0.0, -inf};
        std::vector<double> sv_prev(6, 0.0), st = {std::log(4.0), 0.0}, sz(2), sinc(2), sess(2), se(2, -1.0);
        const std::vector<std::uint8_t> slive = {1, 1, 0, 0, 1, 1};
        std::vector<std::uint8_t> sgone(2), sres(2);
        std::vector<std::int64_t> sa(6), su(2);
        EXPECT(smc_reweight(sw.data(), 2, 3, sv.data(), sv_prev.data(), slive.data(), std::log(3.0), 0.0,
                            Scheme::systematic, 3, st.data(), sz.data(), sgone.data(), sa.data(), sres.data(),
                            sess.data(), su.data(), sinc.data(), se.data())
                   .ok());
        // row 0: W = (1, 3, 0) / 4 before, G = (e, 1, 1): after W G / e^l = (e, 3, 0) / (e + 3)
        const double l0 = std::log((std::exp(1.0) + 3.0) / 4.0), after0 = std::exp(1.0) + 3.0;
        const double want0 = std::sqrt(std::pow(std::exp(1.0) / after0 - 0.25, 2) + std::pow(3.0 / after0 - 0.75, 2));
        EXPECT(std::abs(sinc[0] - l0) < 1e-14 && std::abs(se[0] - want0) < 1e-14);
        // row 1: its one particle of weight > 0 gets G = 0: no reading
        EXPECT(sinc[1] == -inf && se[1] == inf);
        std::vector<double> zw(3, 0.0), zv(3, 1.0), zv_prev(3, 0.0), zt = {std::log(3.0)}, zz(1), zinc(1), zess(1);
        std::vector<double> zse = {-1.0};
        const std::vector<std::uint8_t> none_live(3, 0);
        std::vector<std::uint8_t> zgone(1), zres(1);
        std::vector<std::int64_t> za(3), zu(1);
        EXPECT(smc_reweight(zw.data(), 1, 3, zv.data(), zv_prev.data(), none_live.data(), std::log(3.0), 0.0,
                            Scheme::systematic, 3, zt.data(), zz.data(), zgone.data(), za.data(), zres.data(),
                            zess.data(), zu.data(), zinc.data(), zse.data())
                   .ok());
        EXPECT(zse[0] == 0.0);  // no live particle: no potential applied
    }
    // per-row settings: two runs' rows in one call (keys 5 and 9, counters from 0, their own schemes and
    // thresholds) step as each run's own call; a scheme code that is none when read is reported (input_changed)
    {
        const std::int64_t n = 6;
        std::vector<double> base(4 * n);
        for (std::size_t k = 0; k < base.size(); ++k) base[k] = std::sin(1.7 * static_cast<double>(k)) * 2.0;
        const std::vector<std::uint8_t> all_live(4 * n, 1);
        auto step = [&](std::vector<double>& w, std::int64_t rows, double threshold, Scheme scheme, std::uint64_t key,
                        const RowSettings& per_row, std::vector<std::int64_t>& out) {
            std::vector<double> v(w.size(), 0.5), prev(w.size(), 0.0), t(static_cast<std::size_t>(rows), 0.0),
                z(static_cast<std::size_t>(rows)), inc(static_cast<std::size_t>(rows)), e(static_cast<std::size_t>(rows));
            std::vector<std::uint8_t> g(static_cast<std::size_t>(rows)), r(static_cast<std::size_t>(rows));
            std::vector<std::int64_t> u(static_cast<std::size_t>(rows));
            out.assign(w.size(), -1);
            return smc_reweight(w.data(), rows, n, v.data(), prev.data(), all_live.data(), std::log(6.0), threshold,
                                scheme, key, t.data(), z.data(), g.data(), out.data(), r.data(), e.data(), u.data(),
                                inc.data(), nullptr, per_row);
        };
        std::vector<double> first(base.begin(), base.begin() + 2 * n), second(base.begin() + 2 * n, base.end());
        std::vector<std::int64_t> a_first, a_second, a_both;
        EXPECT(step(first, 2, 1.0, Scheme::multinomial, 5, {}, a_first).ok());
        EXPECT(step(second, 2, 0.9, Scheme::stratified, 9, {}, a_second).ok());
        const std::vector<std::uint64_t> keys = {5, 5, 9, 9}, counters = {0, 1, 0, 1};
        const std::vector<double> thresholds = {1.0, 1.0, 0.9, 0.9};
        std::vector<std::uint8_t> schemes = {0, 0, 1, 1};
        std::vector<double> both = base;
        EXPECT(step(both, 4, 0.0, Scheme::systematic, 77, {keys.data(), counters.data(), thresholds.data(),
                                                            schemes.data()}, a_both).ok());
        std::vector<std::int64_t> joined = a_first;
        joined.insert(joined.end(), a_second.begin(), a_second.end());
        std::vector<double> joined_w = first;
        joined_w.insert(joined_w.end(), second.begin(), second.end());
        EXPECT(a_both == joined && both == joined_w);
        schemes[3] = 9;  // not a scheme
        std::vector<double> refused_w = base;
        const Status bad = step(refused_w, 4, 0.0, Scheme::systematic, 77,
                                {keys.data(), counters.data(), thresholds.data(), schemes.data()}, a_both);
        EXPECT(bad.code == StatusCode::input_changed && bad.row == 3);
    }

    const std::vector<double> logits = {0.0, 1.0, std::nan(""), 0.0, 2.0, 1.0};
    const std::vector<std::uint8_t> draw_rows = {1, 0, 1};
    std::vector<std::int64_t> drawn(3, 7);
    std::vector<double> log_prob(3, 7.0);
    EXPECT(sample_logits(logits.data(), 3, 2, 1.0, 5, draw_rows.data(), drawn.data(), log_prob.data()).ok());
    EXPECT(drawn[1] == 0 && log_prob[1] == 0.0 && drawn[0] >= 0 && drawn[0] < 2 && log_prob[2] < 0.0);
    // per-row streams: rows of two runs in one call draw as each run's own call (keys 5 and 9, counters from 0)
    {
        std::mt19937_64 engine(3);
        std::normal_distribution<double> normal;
        std::vector<float> many(5 * 40);
        for (float& x : many) x = static_cast<float>(0.5 * normal(engine));  // near uniform: draws tell keys apart
        const std::vector<std::uint64_t> keys = {5, 5, 9, 9, 9}, counters = {0, 1, 0, 1, 2};
        std::vector<std::int64_t> together(5), first(2), second(3);
        std::vector<double> lp_together(5), lp_first(2), lp_second(3);
        EXPECT(sample_logits(many.data(), 5, 40, 0.8, 0, nullptr, together.data(), lp_together.data(), keys.data(),
                             counters.data())
                   .ok());
        EXPECT(sample_logits(many.data(), 2, 40, 0.8, 5, nullptr, first.data(), lp_first.data()).ok());
        EXPECT(sample_logits(many.data() + 2 * 40, 3, 40, 0.8, 9, nullptr, second.data(), lp_second.data()).ok());
        for (std::size_t r = 0; r < 2; ++r) EXPECT(together[r] == first[r] && lp_together[r] == lp_first[r]);
        for (std::size_t r = 0; r < 3; ++r)
            EXPECT(together[r + 2] == second[r] && lp_together[r + 2] == lp_second[r]);
        // pool_select likewise
        std::vector<double> pools(many.begin(), many.end());
        std::vector<std::int64_t> pooled(5), pooled_first(2), pooled_second(3);
        std::vector<double> lm(5), lm_first(2), lm_second(3);
        EXPECT(pool_select(pools.data(), 5, 40, 0, pooled.data(), lm.data(), keys.data(), counters.data()).ok());
        EXPECT(pool_select(pools.data(), 2, 40, 5, pooled_first.data(), lm_first.data()).ok());
        EXPECT(pool_select(pools.data() + 2 * 40, 3, 40, 9, pooled_second.data(), lm_second.data()).ok());
        for (std::size_t r = 0; r < 2; ++r) EXPECT(pooled[r] == pooled_first[r] && lm[r] == lm_first[r]);
        for (std::size_t r = 0; r < 3; ++r) EXPECT(pooled[r + 2] == pooled_second[r] && lm[r + 2] == lm_second[r]);
    }
}

// Items of no bytes and empty buffers: a pointer to no items may be null (an empty std::vector's data()), and
// nothing may then reach memcpy/memset (undefined for a null pointer even with a size of zero: UBSan reports it).
void test_null_pointers_with_no_bytes() {
    const std::int64_t rows = 2, n = 3;
    const std::vector<std::int64_t> a = {1, 1, 0, 2, 0, 1}, bad = {0, 3, 0, 0, 0, 0};
    std::uint8_t* none = nullptr;
    EXPECT(gather(none, rows, n, 0, a.data(), n, none).ok());  // in place
    std::vector<std::uint8_t> out;
    EXPECT(gather(none, rows, n, 0, a.data(), n, out.data()).ok());
    EXPECT(gather(none, rows, n, 0, bad.data(), n, none).code == StatusCode::index_out_of_range);
    std::uint8_t* arrays[] = {nullptr, nullptr};
    const std::int64_t item_bytes[] = {0, 0};
    EXPECT(reorder_in_place(arrays, item_bytes, 2, rows, n, a.data()).ok());
    const ItemPrefix prefixes[] = {ItemPrefix{}, ItemPrefix{2, 0, 4}};  // the second: blocks of no columns
    const std::vector<std::int64_t> used = {1, 2, 3, 0, 5, 1};
    EXPECT(reorder_in_place(arrays, item_bytes, 2, rows, n, a.data(), prefixes, used.data()).ok());
    // concatenate_padded: parts of items of no bytes, and of no columns
    const PaddedPart parts[] = {{nullptr, 2, 3, 1}, {nullptr, 1, 0, 0}};
    EXPECT(concatenate_padded(parts, 2, 2, 2, 0, none).ok());
    EXPECT(concatenate_padded(parts, 2, 2, 2, 0, none, true).ok());
    const std::vector<std::int64_t> row_used = {0, 1, 2};
    EXPECT(concatenate_padded(parts, 2, 2, 2, 0, none, true, row_used.data()).ok());
}

// Flags (live, active, still, finished) read as byte != 0: bytes 2, 128 and 255 act as 1.
void test_flags_of_any_byte_value() {
    auto as_ones = [](std::vector<std::uint8_t> flags) {
        for (auto& f : flags) f = f != 0 ? 1 : 0;
        return flags;
    };
    const std::vector<std::uint8_t> odd = {2, 0, 255, 128};
    // append_tokens: active and finished
    auto append = [](const std::vector<std::uint8_t>& active, std::vector<std::uint8_t> finished) {
        std::vector<std::int64_t> tokens(16, -1), lengths = {0, 1, 2, 3};
        const std::vector<std::int64_t> fresh = {5, 6, 7, 8}, stop = {7};
        std::vector<std::uint8_t> still(4, 9);
        std::int64_t going = -1;
        const Status status = append_tokens(tokens.data(), 4, 4, lengths.data(), finished.data(), fresh.data(),
                                            active.data(), stop.data(), 1, 4, still.data(), &going);
        for (auto& f : finished) f = f != 0 ? 1 : 0;
        return std::make_tuple(status.ok(), tokens, lengths, finished, still, going);
    };
    EXPECT(append(odd, {0, 3, 0, 200}) == append(as_ones(odd), {0, 1, 0, 1}));
    // decode_inputs and decode_inputs_right_padded: still
    const std::vector<std::int64_t> mask = {0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0}, fresh = {5, 6, 7, 8};
    auto decode = [&](const std::vector<std::uint8_t>& still) {
        std::vector<std::int64_t> ids(4), next(16), positions(4), ids_right(4), feed(16), next_right(16), positions_right(4);
        decode_inputs(mask.data(), 4, 3, still.data(), fresh.data(), -1, ids.data(), next.data(), positions.data());
        decode_inputs_right_padded(mask.data(), 4, 3, still.data(), fresh.data(), -1, ids_right.data(), feed.data(),
                                   next_right.data(), positions_right.data());
        return std::make_tuple(ids, next, positions, ids_right, feed, next_right, positions_right);
    };
    EXPECT(decode(odd) == decode(as_ones(odd)));
    // sample_logits: active
    const std::vector<double> logits = {0.1, 0.5, -1.0, 2.0, 0.0, 0.3, 1.0, -0.5, 0.2, 0.0, 0.0, 0.0};
    auto sample = [&](const std::vector<std::uint8_t>& active) {
        std::vector<std::int64_t> index(4, -1);
        std::vector<double> log_prob(4, 1.0);
        const Status status = sample_logits(logits.data(), 4, 3, 0.7, 99, active.data(), index.data(), log_prob.data());
        return std::make_tuple(status.ok(), index, log_prob);
    };
    EXPECT(sample(odd) == sample(as_ones(odd)));
    // smc_reweight: live (collapsed is only written)
    const std::vector<std::uint8_t> live_odd = {2, 0, 255, 1, 64, 0, 0, 0};
    auto reweight = [](const std::vector<std::uint8_t>& live) {
        std::vector<double> log_w = {0.1, -0.3, 0.7, 0.0, -1.0, 0.2, 0.4, 0.0}, log_v = {1.0, 0.5, -0.5, 0.3, 2.0, 0.1, 0.0, 0.2};
        std::vector<double> log_v_prev(8, 0.0), log_total(2), log_z(2, 0.0), ess(2), increment(2), se(2);
        for (int r = 0; r < 2; ++r) {
            double total = 0.0;
            for (int i = 0; i < 4; ++i) total += std::exp(log_w[static_cast<std::size_t>(r * 4 + i)]);
            log_total[static_cast<std::size_t>(r)] = std::log(total);
        }
        std::vector<std::uint8_t> collapsed(2, 0), resampled(2);
        std::vector<std::int64_t> ancestors(8), unique(2);
        const Status status = smc_reweight(log_w.data(), 2, 4, log_v.data(), log_v_prev.data(), live.data(), std::log(4.0),
                                           0.9, Scheme::systematic, 5, log_total.data(), log_z.data(), collapsed.data(),
                                           ancestors.data(), resampled.data(), ess.data(), unique.data(),
                                           increment.data(), se.data());
        return std::make_tuple(status.ok(), log_w, log_v_prev, log_total, log_z, collapsed, ancestors, resampled, ess,
                               unique, increment, se);
    };
    EXPECT(reweight(live_odd) == reweight(as_ones(live_odd)));
}

void test_random_sizes() {
    // Random shapes and values: kernels either succeed with valid output or report a status.
    std::mt19937_64 engine(17);
    for (int trial = 0; trial < 300; ++trial) {
        const std::int64_t rows = static_cast<std::int64_t>(engine() % 4);
        const std::int64_t n = 1 + static_cast<std::int64_t>(engine() % 50);
        const std::int64_t m = 1 + static_cast<std::int64_t>(engine() % 90);
        std::vector<float> logw(static_cast<std::size_t>(rows * n));
        for (auto& v : logw) {
            const auto pick = engine() % 20;
            v = pick == 0 ? -std::numeric_limits<float>::infinity()
                : pick == 1 && trial % 7 == 0 ? std::numeric_limits<float>::quiet_NaN()
                : static_cast<float>(static_cast<double>(engine() % 20001) - 10000.0);
        }
        std::vector<std::int64_t> a(static_cast<std::size_t>(rows * m));
        for (const Scheme scheme : schemes) {
            const Status status = resample(logw.data(), rows, n, scheme, m, engine(), a.data());
            if (status.ok()) {
                std::vector<double> wide(logw.begin(), logw.end());
                EXPECT(valid_ancestors(wide, rows, n, a, m));
            }
        }
        std::vector<std::int64_t> index(static_cast<std::size_t>(rows));
        std::vector<double> log_mean_w(static_cast<std::size_t>(rows));
        const Status status = pool_select(logw.data(), rows, n, engine(), index.data(), log_mean_w.data());
        if (status.ok())
            for (std::int64_t r = 0; r < rows; ++r)
                EXPECT(index[static_cast<std::size_t>(r)] >= 0 && index[static_cast<std::size_t>(r)] < n);
    }
}

}  // namespace


void test_refused_calls_write_nothing() {
    // smc_step: row 1 would be resampled (and reset), row 0 holds a NaN: refused before any reset.
    std::vector<double> log_w = {std::nan(""), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0};
    const std::vector<double> before = log_w;
    std::vector<std::int64_t> ancestors(10), unique(2);
    std::vector<std::uint8_t> resampled(2);
    std::vector<double> log_mean_w(2), ess(2);
    const Status status = smc_step(log_w.data(), 2, 5, 1.0, Scheme::systematic, 1, true, ancestors.data(),
                                   resampled.data(), log_mean_w.data(), ess.data(), unique.data());
    EXPECT(status.code == StatusCode::nan_weight && status.row == 0 && status.index == 0);
    EXPECT(std::memcmp(log_w.data(), before.data(), log_w.size() * sizeof(double)) == 0);
    // smc_reweight: log_v - log_v_prev overflows to +inf (and to NaN on a -inf log-weight).
    for (const double first : {0.0, -inf}) {
        std::vector<double> w = {first, 0.0}, v = {1e308, 0.0}, v_prev = {-1e308, 0.0};
        std::vector<double> total = {std::log(2.0)}, z = {0.0}, increment(1), e(1);
        std::vector<std::uint8_t> live = {1, 1}, collapsed = {0}, flags(1);
        std::vector<std::int64_t> a(2), u(1);
        const auto w0 = w, v_prev0 = v_prev;
        const Status refused = smc_reweight(w.data(), 1, 2, v.data(), v_prev.data(), live.data(), std::log(2.0), 0.5,
                                            Scheme::systematic, 1, total.data(), z.data(), collapsed.data(), a.data(),
                                            flags.data(), e.data(), u.data(), increment.data());
        EXPECT(refused.code == StatusCode::positive_infinity && refused.row == 0 && refused.index == 0);
        EXPECT(w == w0 && v_prev == v_prev0 && z[0] == 0.0 && total[0] == std::log(2.0));
    }
}

void test_sample_logits_exact() {
    // log p is (s_v - max s) - log(sum): [0, 1e15] gives exactly 0 (it gave +0.057 through log_mean_w).
    const std::vector<double> logits = {0.0, 1e15};
    std::vector<std::int64_t> drawn(1);
    std::vector<double> log_prob(1);
    EXPECT(sample_logits(logits.data(), 1, 2, 1.0, 3, nullptr, drawn.data(), log_prob.data()).ok());
    EXPECT(drawn[0] == 1 && log_prob[0] == 0.0 && !std::signbit(log_prob[0]));
    // p near 1: -log1p(the other terms), not log(1 + them) (which rounds to 0 below 1e-16).
    const std::vector<double> peaked = {0.0, 40.0, 1.0};
    EXPECT(sample_logits(peaked.data(), 1, 3, 1.0, 3, nullptr, drawn.data(), log_prob.data()).ok());
    const double rest = std::exp(-40.0) + std::exp(-39.0);
    EXPECT(drawn[0] == 1 && std::fabs(log_prob[0] + std::log1p(rest)) <= 1e-15 * rest);
    // Finite logits whose scores overflow (to +inf, or all to -inf): the same law from (x - max x) / T.
    const std::vector<double> huge = {1e300, -1e300, 1e300};
    const std::vector<double> tiny = {-1e300, -1e300};
    for (std::uint64_t key = 0; key < 20; ++key) {
        EXPECT(sample_logits(huge.data(), 1, 3, 1e-10, key, nullptr, drawn.data(), log_prob.data()).ok());
        EXPECT((drawn[0] == 0 || drawn[0] == 2) && std::fabs(log_prob[0] + std::log(2.0)) < 1e-15);
        EXPECT(sample_logits(tiny.data(), 1, 2, 1e-10, key, nullptr, drawn.data(), log_prob.data()).ok());
        EXPECT(std::fabs(log_prob[0] + std::log(2.0)) < 1e-15);
    }
    const std::vector<double> with_inf = {1e300, inf};
    const Status status = sample_logits(with_inf.data(), 1, 2, 1e-10, 1, nullptr, drawn.data(), log_prob.data());
    EXPECT(status.code == StatusCode::positive_infinity && status.index == 1);
}

// Calls `kernel` in a loop for `seconds` while another thread keeps storing each of `values` into *target
// (atomic stores: the kernels read indices with atomic loads, so ThreadSanitizer sees no data race while
// AddressSanitizer checks every access). Each call must succeed or report one of the allowed codes.
template <typename Kernel>
int race(std::int64_t* target, const std::vector<std::int64_t>& values, double seconds, Kernel kernel) {
    std::atomic<bool> stop{false};
    std::thread mutator([&] {
        while (!stop.load(std::memory_order_relaxed))
            for (const std::int64_t value : values) __atomic_store_n(target, value, __ATOMIC_RELAXED);
    });
    int calls = 0;
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < end) {
        const Status status = kernel();
        EXPECT(status.ok() || status.code == StatusCode::index_out_of_range || status.code == StatusCode::input_changed);
        ++calls;
    }
    stop = true;
    mutator.join();
    return calls;
}

void test_indices_rewritten_during_calls() {
    const std::int64_t n = 1 << 14;
    std::vector<double> x(static_cast<std::size_t>(n)), out(static_cast<std::size_t>(n));
    std::vector<std::int64_t> a(static_cast<std::size_t>(n), 0);
    const std::vector<std::int64_t> values = {std::int64_t{1} << 40, 0, -1, n - 1};
    auto* bytes = reinterpret_cast<std::uint8_t*>(x.data());
    EXPECT(race(&a[static_cast<std::size_t>(n - 1)], values, 0.1, [&] {
               return gather(bytes, 1, n, 8, a.data(), n, reinterpret_cast<std::uint8_t*>(out.data()));
           }) > 0);
    std::fill(a.begin(), a.end(), 0);
    EXPECT(race(&a[static_cast<std::size_t>(n / 2)], values, 0.1,
                [&] { return gather(bytes, 1, n, 8, a.data(), n, bytes); }) > 0);
    std::vector<std::uint8_t> large(static_cast<std::size_t>(64 * 256));
    std::vector<std::int64_t> b(64, 0);
    std::uint8_t* arrays[] = {large.data(), bytes};
    const std::int64_t item_bytes[] = {256, 8};
    EXPECT(race(&b[63], {1 << 30, 5, -7, 0}, 0.1, [&] { return reorder_in_place(arrays, item_bytes, 1, 1, 64, b.data()); }) > 0);
#if !defined(__SANITIZE_THREAD__)
    // keep_survivors and append_tokens write the very indices the other thread stores: a real write-write
    // race (ThreadSanitizer reports it, rightly), whose only requirement is memory safety (AddressSanitizer).
    std::fill(a.begin(), a.end(), 0);
    EXPECT(race(&a[7], values, 0.1, [&] { return keep_survivors(a.data(), 1, n); }) > 0);
    std::vector<std::int64_t> tokens(static_cast<std::size_t>(n * 4)), lengths(static_cast<std::size_t>(n)), ids(static_cast<std::size_t>(n));
    std::vector<std::uint8_t> finished(static_cast<std::size_t>(n)), active(static_cast<std::size_t>(n), 1), still(static_cast<std::size_t>(n));
    const std::int64_t stop_id = -1;
    std::int64_t num_still = 0;
    EXPECT(race(&lengths[static_cast<std::size_t>(n - 1)], {std::int64_t{1} << 40, 0, -1}, 0.1, [&] {
               std::fill(lengths.begin(), lengths.end() - 1, 0);
               return append_tokens(tokens.data(), n, 4, lengths.data(), finished.data(), ids.data(), active.data(),
                                    &stop_id, 1, 4, still.data(), &num_still);
           }) > 0);
#endif
    std::vector<std::int64_t> columns(static_cast<std::size_t>(n), 0);
    std::vector<double> log_values(static_cast<std::size_t>(n));
    EXPECT(race(&columns[static_cast<std::size_t>(n - 1)], {std::int64_t{1} << 40, 0, -1}, 0.1, [&] {
               return read_log_values(x.data(), n, 1, columns.data(), ScoreKind::log_value, log_values.data());
           }) > 0);
}

// Every part of a pool call runs exactly once, and before the call returns, whatever the part counts of
// the calls before it. More workers than cores, so that workers are preempted between reading one call
// and the next; calls alternate between part counts, so that a worker a call leaves out (index >= parts)
// may be preempted there while the next call, which needs it, is published. The functions and counters
// are kept for the whole test, so that a part run late or twice is counted rather than a crash.
void test_pool_runs_each_part_once() {
    constexpr int kCalls = 3000, kMaxParts = 8;
    const int part_counts[] = {2, kMaxParts, 3, 6};
    std::vector<std::array<std::atomic<int>, kMaxParts>> runs(kCalls);
    std::vector<std::function<void(int)>> functions(kCalls);
    std::vector<int> parts_of(kCalls, 0);
    int early = 0;
    for (int k = 0; k < kCalls; ++k) {
        const int parts = part_counts[k % 4];
        for (auto& count : runs[static_cast<std::size_t>(k)]) count.store(0);
        functions[static_cast<std::size_t>(k)] = [&runs, k](int t) {
            runs[static_cast<std::size_t>(k)][static_cast<std::size_t>(t)].fetch_add(1);
        };
        if (!run_on_pool(parts, functions[static_cast<std::size_t>(k)])) continue;
        parts_of[static_cast<std::size_t>(k)] = parts;
        for (int t = 0; t < parts; ++t)
            early += runs[static_cast<std::size_t>(k)][static_cast<std::size_t>(t)].load() != 1;
    }
    EXPECT(early == 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // time for any part run late
    int wrong = 0;
    for (int k = 0; k < kCalls; ++k)
        for (int t = 0; t < kMaxParts; ++t)
            wrong += runs[static_cast<std::size_t>(k)][static_cast<std::size_t>(t)].load() !=
                     (t < parts_of[static_cast<std::size_t>(k)] ? 1 : 0);
    EXPECT(wrong == 0);
    if (early || wrong) std::fprintf(stderr, "pool: %d parts unfinished at return, %d run other than once\n", early, wrong);
}

int main() {
    test_philox_known_answer();
    test_exponentials_from_uniforms();
    test_exp_accuracy();
    for (const int simd : {1, 0}) {  // the AVX-512 kernels (where the CPU has them), then the portable ones
        g_avx512_override = simd;
        test_log_normalize();
        test_resample_edges();
        test_systematic_floor_ceil_and_threads();
        test_systematic_chunk_gap_goes_to_a_positive_particle();
        test_pool_select_and_mh();
        test_smc_step();
        test_gather();
        test_concatenate_padded();
        test_reorder_in_place_and_keep_survivors();
        test_token_kernels();
        test_random_sizes();
        test_refused_calls_write_nothing();
        test_sample_logits_exact();
        test_null_pointers_with_no_bytes();
        test_flags_of_any_byte_value();
    }
    test_indices_rewritten_during_calls();
    test_pool_runs_each_part_once();
    g_avx512_override = -1;
    if (failures) {
        std::fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("tiltsmc core tests: all checks passed\n");
    return 0;
}
