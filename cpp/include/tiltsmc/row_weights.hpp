// Shared row machinery: validation + max, exp(x - max) with its sums, over fixed-size chunks.
//
// Partial results are always formed per chunk of kChunk elements and combined in chunk order, so a
// row's figures (and hence every draw) are bit-identical whether its chunks run on one thread or many.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "tiltsmc/kernels.hpp"
#include "tiltsmc/parallel.hpp"
#include "tiltsmc/simd.hpp"


namespace tiltsmc {

constexpr std::int64_t kChunk = 8192;
constexpr double kInf = std::numeric_limits<double>::infinity();

// Eight doubles processed together (GCC/Clang vector extensions: one AVX-512 register, two AVX2 or
// four SSE2 registers, whatever the clone was compiled for).
typedef double Vec8 __attribute__((vector_size(64)));
typedef std::int64_t Mask8 __attribute__((vector_size(64)));
constexpr int kLanes = 8;

// The lanes of two 8-lane vectors a, b picked by index (0-7: a's, 8-15: b's). GCC before 12 has no
// __builtin_shufflevector; its __builtin_shuffle takes the indices as a vector.
#if defined(__clang__) || __GNUC__ >= 12
#define TILTSMC_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define TILTSMC_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, Mask8{__VA_ARGS__})
#endif

// The bits of `from` read as a `To` of the same size. A memcpy, not a reinterpret_cast: reading a Vec8
// through a Mask8 reference breaks the aliasing rules; compilers turn this into a register move.
template <typename To, typename From>
inline To same_bits(const From& from) {
    static_assert(sizeof(To) == sizeof(From), "same_bits: the two types differ in size");
    To to;
    std::memcpy(&to, &from, sizeof to);
    return to;
}

template <typename T>
__attribute__((always_inline)) inline Vec8 load8(const T* x) {
    if constexpr (std::is_same_v<T, double>) {
        Vec8 v;
        std::memcpy(&v, x, sizeof v);
        return v;
    } else {
        typedef T Narrow __attribute__((vector_size(kLanes * sizeof(T))));
        Narrow v;
        std::memcpy(&v, x, sizeof v);
        return __builtin_convertvector(v, Vec8);
    }
}

__attribute__((always_inline)) inline Vec8 splat(double value) { return Vec8{} + value; }

// exp(x) for x <= 0 (including -inf), lane by lane with no branches (the portable version; see
// exp_nonpositive_avx512 for the one the AVX-512 kernels use). Range reduction x = k ln2 + r,
// |r| <= ln2/2, then a degree-13 Taylor polynomial (truncation error below 1e-17 relative) and a scale
// by 2^k built in the exponent bits. Results below exp(-708) (about 3e-308) are flushed to zero: a
// weight that small relative to the row's largest is never drawn in practice.
__attribute__((always_inline)) inline Vec8 exp_nonpositive(Vec8 x) {
    const Vec8 floor_value = splat(-708.0);
    const Mask8 underflow = x < floor_value;
    const Vec8 clamped = underflow ? floor_value : x;
    const Vec8 shifter = splat(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer
    const Vec8 shifted = clamped * 1.4426950408889634 + shifter;
    const Vec8 k = shifted - shifter;
    // ln2 in two parts, the first with 32 significant bits so that k * 0.69314718036912382 is exact
    // (|k| <= 1022) and the subtraction too: accurate with or without fused multiply-adds.
    const Vec8 r = (clamped - k * 0.69314718036912382) - k * 1.9082149292705877e-10;
    Vec8 p = splat(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const Mask8 exponent = (same_bits<Mask8>(shifted) - std::int64_t{0x4338000000000000}) + 1023;
    const Mask8 scale_bits = exponent << 52;
    const Vec8 scaled = p * same_bits<Vec8>(scale_bits);
    return underflow ? splat(0.0) : scaled;
}

// -log(1 - u) for uniforms u in [0, 1), in place: Exp(1) draws. With 1 - u = 2^e m, m in
// [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) = 2 (s + s^3/3 + ...), s = (m - 1) / (m + 1), |s| < 0.172,
// summed to s^23 (truncation below 1e-19 relative); e ln 2 is added in two parts for accuracy.
TILTSMC_SIMD_CLONES inline void exponentials_from_uniforms(double* u, std::int64_t count) {
    std::int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes) {
        Vec8 y = splat(1.0) - load8(u + i);  // in (0, 1]: a normal number, at least 2^-53
        const Mask8 bits = same_bits<Mask8>(y);
        Mask8 exponent = ((bits >> 52) & 0x7FF) - 1023;
        const Mask8 mantissa_bits = (bits & std::int64_t{0x000FFFFFFFFFFFFF}) | std::int64_t{0x3FF0000000000000};
        Vec8 m = same_bits<Vec8>(mantissa_bits);
        const Mask8 high = m > 1.4142135623730951;
        m = high ? m * 0.5 : m;
        exponent -= high;  // high is -1 where true
        const Vec8 s = (m - 1.0) / (m + 1.0);
        const Vec8 z = s * s;
        Vec8 p = splat(2.0 / 23.0);
        p = p * z + 2.0 / 21.0;
        p = p * z + 2.0 / 19.0;
        p = p * z + 2.0 / 17.0;
        p = p * z + 2.0 / 15.0;
        p = p * z + 2.0 / 13.0;
        p = p * z + 2.0 / 11.0;
        p = p * z + 2.0 / 9.0;
        p = p * z + 2.0 / 7.0;
        p = p * z + 2.0 / 5.0;
        p = p * z + 2.0 / 3.0;
        p = p * z + 2.0;
        const Vec8 e = __builtin_convertvector(exponent, Vec8);
        const Vec8 log_y = e * 0.6931471805599453 + (s * p + e * 2.3190468138462996e-17);
        const Vec8 result = -log_y;
        std::memcpy(u + i, &result, sizeof result);
    }
    for (; i < count; ++i) u[i] = -std::log(1.0 - u[i]);
}

inline double exp_nonpositive(double x) {
    const Vec8 result = exp_nonpositive(splat(x));
    return result[0];
}

// Largest value of x[0, len) and whether any element is NaN or +inf.
template <typename T>
TILTSMC_SIMD_CLONES inline double chunk_max(const T* x, std::int64_t len, bool* bad) {
    Vec8 best = splat(-kInf);
    Mask8 finite_or_minus_inf = Mask8{} - 1;  // all lanes true
    std::int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
        const Vec8 v = load8(x + i);
        finite_or_minus_inf &= v < kInf;  // false for NaN and +inf
        best = v > best ? v : best;
    }
    double result = -kInf;
    bool any_bad = false;
    for (int k = 0; k < kLanes; ++k) {
        result = best[k] > result ? best[k] : result;
        any_bad |= finite_or_minus_inf[k] == 0;
    }
    for (; i < len; ++i) {
        const double v = static_cast<double>(x[i]);
        any_bad |= !(v < kInf);
        result = v > result ? v : result;
    }
    *bad = any_bad;
    return result;
}

// Sums of w_i = exp(x_i - shift) and of w_i^2 over x[0, len); with StoreWeights, also w itself
// (portable version; chunk_exp_sums below picks it or the AVX-512 one).
template <bool StoreWeights, typename T>
TILTSMC_SIMD_CLONES inline void chunk_exp_sums_portable(const T* x, std::int64_t len, double shift, double* w_out,
                                                        double* sum, double* sum_squares) {
    Vec8 acc = splat(0.0), acc2 = splat(0.0);
    std::int64_t i = 0;
    // Four independent vectors per iteration: the polynomial is a long dependency chain, so
    // interleaving chains keeps the vector units busy.
    Vec8 acc_b = splat(0.0), acc2_b = splat(0.0), acc_c = splat(0.0), acc2_c = splat(0.0);
    Vec8 acc_d = splat(0.0), acc2_d = splat(0.0);
    for (; i + 4 * kLanes <= len; i += 4 * kLanes) {
        const Vec8 w0 = exp_nonpositive(load8(x + i) - shift);
        const Vec8 w1 = exp_nonpositive(load8(x + i + kLanes) - shift);
        const Vec8 w2 = exp_nonpositive(load8(x + i + 2 * kLanes) - shift);
        const Vec8 w3 = exp_nonpositive(load8(x + i + 3 * kLanes) - shift);
        if constexpr (StoreWeights) {
            std::memcpy(w_out + i, &w0, sizeof w0);
            std::memcpy(w_out + i + kLanes, &w1, sizeof w1);
            std::memcpy(w_out + i + 2 * kLanes, &w2, sizeof w2);
            std::memcpy(w_out + i + 3 * kLanes, &w3, sizeof w3);
        }
        acc += w0;
        acc2 += w0 * w0;
        acc_b += w1;
        acc2_b += w1 * w1;
        acc_c += w2;
        acc2_c += w2 * w2;
        acc_d += w3;
        acc2_d += w3 * w3;
    }
    acc += (acc_b + acc_c) + acc_d;
    acc2 += (acc2_b + acc2_c) + acc2_d;
    for (; i + kLanes <= len; i += kLanes) {
        const Vec8 w = exp_nonpositive(load8(x + i) - shift);
        if constexpr (StoreWeights) std::memcpy(w_out + i, &w, sizeof w);
        acc += w;
        acc2 += w * w;
    }
    double s = 0, s2 = 0;
    for (int k = 0; k < kLanes; ++k) {
        s += acc[k];
        s2 += acc2[k];
    }
    for (; i < len; ++i) {
        const double w = exp_nonpositive(static_cast<double>(x[i]) - shift);
        if constexpr (StoreWeights) w_out[i] = w;
        s += w;
        s2 += w * w;
    }
    *sum = s;
    *sum_squares = s2;
}

#if TILTSMC_HAVE_AVX512_PATH
// 2^(j/16), j = 0..15, correctly rounded.
alignas(64) inline constexpr double kExp2Sixteenths[16] = {
    0x1.0000000000000p+0, 0x1.0b5586cf9890fp+0, 0x1.172b83c7d517bp+0, 0x1.2387a6e756238p+0,
    0x1.306fe0a31b715p+0, 0x1.3dea64c123422p+0, 0x1.4bfdad5362a27p+0, 0x1.5ab07dd485429p+0,
    0x1.6a09e667f3bcdp+0, 0x1.7a11473eb0187p+0, 0x1.8ace5422aa0dbp+0, 0x1.9c49182a3f090p+0,
    0x1.ae89f995ad3adp+0, 0x1.c199bdd85529cp+0, 0x1.d5818dcfba487p+0, 0x1.ea4afa2a490dap+0};

// exp(x) for x <= 0 (including -inf), eight lanes, AVX-512: x = (k/16) ln2 + r with |r| <= ln2/32,
// exp(x) = 2^floor(k/16) * T[k mod 16] * (1 + q(r)), q a degree-7 Taylor polynomial of e^r - 1
// (truncation below 2e-18 relative), T from a 16-entry table held in two registers (vpermt2pd), the
// power of two applied by vscalefpd. About half the operations of the degree-13 portable version, and
// within 1 ulp of the correctly rounded exp (tested against std::exp). Like the portable version,
// results below exp(-708) are flushed to zero.
TILTSMC_AVX512 inline __m512d exp_nonpositive_avx512(__m512d x, __m512d table_lo, __m512d table_hi) {
    const __mmask8 keep = _mm512_cmp_pd_mask(x, _mm512_set1_pd(-708.0), _CMP_GE_OQ);  // false for -inf
    const __m512d shifter = _mm512_set1_pd(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer
    const __m512d shifted = _mm512_fmadd_pd(x, _mm512_set1_pd(23.083120654223414), shifter);  // x * 16 / ln2
    const __m512d k = _mm512_sub_pd(shifted, shifter);
    __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.62e42fefa39efp-5), x);  // ln2/16, high part
    r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.abc9e3b39803fp-60), r);       // and the rest
    __m512d p = _mm512_set1_pd(1.0 / 5040.0);
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 720.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 120.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 24.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 6.0));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0.5));
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
    const __m512d expm1_r = _mm512_mul_pd(p, r);
    // The low four bits of the shifted value's mantissa are k mod 16: the table index.
    const __m512d t = _mm512_permutex2var_pd(table_lo, _mm512_castpd_si512(shifted), table_hi);
    const __m512d mantissa = _mm512_fmadd_pd(t, expm1_r, t);
    return _mm512_maskz_scalef_pd(keep, mantissa, _mm512_mul_pd(k, _mm512_set1_pd(0.0625)));  // * 2^floor(k/16)
}

template <typename T>
TILTSMC_AVX512 inline __m512d load8_avx512(const T* x) {
    if constexpr (std::is_same_v<T, double>) {
        return _mm512_loadu_pd(x);
    } else {
        return _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(x));  // (GCC 12 warns on the unmasked form)
    }
}

template <typename T>
TILTSMC_AVX512 inline __m512d load8_masked_avx512(const T* x, __mmask8 mask, double fill) {
    if constexpr (std::is_same_v<T, double>) {
        return _mm512_mask_loadu_pd(_mm512_set1_pd(fill), mask, x);
    } else {
        return _mm512_mask_cvtps_pd(_mm512_set1_pd(fill), mask, _mm256_maskz_loadu_ps(mask, x));
    }
}

// chunk_exp_sums with exp_nonpositive_avx512; the last partial vector is a masked load (as -inf).
template <bool StoreWeights, typename T>
TILTSMC_AVX512 inline void chunk_exp_sums_avx512(const T* x, std::int64_t len, double shift, double* w_out,
                                                 double* sum, double* sum_squares) {
    const __m512d lo = _mm512_load_pd(kExp2Sixteenths), hi = _mm512_load_pd(kExp2Sixteenths + 8);
    const __m512d s = _mm512_set1_pd(shift);
    __m512d acc[4], acc2[4];
    for (int q = 0; q < 4; ++q) acc[q] = acc2[q] = _mm512_setzero_pd();
    std::int64_t i = 0;
    for (; i + 4 * kLanes <= len; i += 4 * kLanes) {
        for (int q = 0; q < 4; ++q) {  // four independent chains keep the vector units busy
            const __m512d w = exp_nonpositive_avx512(_mm512_sub_pd(load8_avx512(x + i + q * kLanes), s), lo, hi);
            if constexpr (StoreWeights) _mm512_storeu_pd(w_out + i + q * kLanes, w);
            acc[q] = _mm512_add_pd(acc[q], w);
            acc2[q] = _mm512_fmadd_pd(w, w, acc2[q]);
        }
    }
    for (; i < len; i += kLanes) {
        const std::int64_t left = len - i;
        const __mmask8 mask = left >= kLanes ? __mmask8(0xFF) : static_cast<__mmask8>((1u << left) - 1u);
        const __m512d w = exp_nonpositive_avx512(_mm512_sub_pd(load8_masked_avx512(x + i, mask, -kInf), s), lo, hi);
        if constexpr (StoreWeights) _mm512_mask_storeu_pd(w_out + i, mask, w);
        acc[0] = _mm512_add_pd(acc[0], w);
        acc2[0] = _mm512_fmadd_pd(w, w, acc2[0]);
    }
    alignas(64) double lanes[kLanes], lanes2[kLanes];
    _mm512_store_pd(lanes, _mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
    _mm512_store_pd(lanes2, _mm512_add_pd(_mm512_add_pd(acc2[0], acc2[1]), _mm512_add_pd(acc2[2], acc2[3])));
    double total = 0, total2 = 0;
    for (int k = 0; k < kLanes; ++k) {
        total += lanes[k];
        total2 += lanes2[k];
    }
    *sum = total;
    *sum_squares = total2;
}

// Eight lanes of exp_nonpositive_avx512 from scalars (tests).
TILTSMC_AVX512 inline void exp_nonpositive_avx512_array(const double* x, double* out) {
    const __m512d lo = _mm512_load_pd(kExp2Sixteenths), hi = _mm512_load_pd(kExp2Sixteenths + 8);
    _mm512_storeu_pd(out, exp_nonpositive_avx512(_mm512_loadu_pd(x), lo, hi));
}
#endif

// Sums of w_i = exp(x_i - shift) and of w_i^2 over x[0, len); with StoreWeights, also w itself. The
// AVX-512 version where the CPU has it, else the portable one (results differ in the last bits of a
// weight between the two, never between thread counts).
template <bool StoreWeights, typename T>
inline void chunk_exp_sums(const T* x, std::int64_t len, double shift, double* w_out, double* sum,
                           double* sum_squares) {
#if TILTSMC_HAVE_AVX512_PATH
    if (use_avx512()) return chunk_exp_sums_avx512<StoreWeights>(x, len, shift, w_out, sum, sum_squares);
#endif
    chunk_exp_sums_portable<StoreWeights>(x, len, shift, w_out, sum, sum_squares);
}

// Position of the first NaN or +inf in x[0, len) (slow path, after chunk_max reported one); none found
// there any more means another thread rewrote x meanwhile: input_changed.
template <typename T>
Status locate_bad(const T* x, std::int64_t len, std::int64_t row) {
    for (std::int64_t i = 0; i < len; ++i) {
        const double v = static_cast<double>(x[i]);
        if (std::isnan(v)) return {StatusCode::nan_weight, row, i};
        if (!(v < kInf)) return {StatusCode::positive_infinity, row, i};
    }
    return {StatusCode::input_changed, row, -1};
}

// The figures of one row that every kernel needs: shift = max, sums of w = exp(x - shift), and the
// cumulative sum of w at each chunk's start (chunk_offset[c]), its last positive weight's index.
struct RowWeights {
    Status status;
    double shift = -kInf;
    double sum = 0;
    double sum_squares = 0;
    std::int64_t last_positive = -1;
    std::vector<double> chunk_offset;  // size chunks + 1
};

// Computes the RowWeights of x[0, n) into rw (whose buffers are reused: no allocation per row once
// warm). When w is given it receives exp(x - shift) for every element. With split = true the chunks
// are spread over threads (for one long row); the figures are identical either way.
template <typename T>
void row_weights(const T* x, std::int64_t n, std::int64_t row, double* w, bool split, RowWeights& rw) {
    rw.status = Status{};
    rw.shift = -kInf;
    rw.sum = rw.sum_squares = 0.0;
    rw.last_positive = -1;
    const std::int64_t chunks = (n + kChunk - 1) / kChunk;
    if (chunks == 1) {
        // One chunk (rows of up to kChunk): its figures directly, without the per-chunk scratch and its
        // thread-local lookups. The same arithmetic as below: there the one chunk's sums are rescaled by
        // exp(0) = 1 and added to 0.
        bool bad = false;
        rw.shift = chunk_max(x, n, &bad);
        if (bad) {
            rw.status = locate_bad(x, n, row);
            return;
        }
        if (rw.shift == -kInf) {
            rw.status = {StatusCode::zero_row, row, -1};
            return;
        }
        if (w)
            chunk_exp_sums<true>(x, n, rw.shift, w, &rw.sum, &rw.sum_squares);
        else
            chunk_exp_sums<false>(x, n, rw.shift, nullptr, &rw.sum, &rw.sum_squares);
        rw.chunk_offset.assign(2, 0.0);
        rw.chunk_offset[1] = rw.sum;
    } else {
        // Per-thread scratch, bound to references here: lambdas run on worker threads must reach this
        // thread's buffers, not their own thread_local instances.
        static thread_local std::vector<double> scratch_maxes, scratch_sums, scratch_squares;
        static thread_local std::vector<unsigned char> scratch_bad;
        std::vector<double>& maxes = scratch_maxes;
        std::vector<double>& sums = scratch_sums;
        std::vector<double>& squares = scratch_squares;
        std::vector<unsigned char>& bad = scratch_bad;
        maxes.resize(static_cast<std::size_t>(chunks));
        bad.resize(static_cast<std::size_t>(chunks));
        auto for_chunks = [&](auto&& body) {
            if (split) {
                parallel_for(chunks, n, [&](std::int64_t begin, std::int64_t end) {
                    for (std::int64_t c = begin; c < end; ++c) body(c);
                });
            } else {
                for (std::int64_t c = 0; c < chunks; ++c) body(c);
            }
        };
        sums.resize(static_cast<std::size_t>(chunks));
        squares.resize(static_cast<std::size_t>(chunks));
        // Without w (no weights to store), one pass: each chunk's sums are taken against its own maximum
        // while the chunk is still in cache, and rescaled to the row's maximum below.
        const bool fused = w == nullptr;
        for_chunks([&](std::int64_t c) {
            bool b = false;
            const std::int64_t begin = c * kChunk, len = std::min(kChunk, n - begin);
            const double chunk_shift = chunk_max(x + begin, len, &b);
            maxes[static_cast<std::size_t>(c)] = chunk_shift;
            bad[static_cast<std::size_t>(c)] = b;
            if (fused && !b && chunk_shift > -kInf)
                chunk_exp_sums<false>(x + begin, len, chunk_shift, nullptr, &sums[static_cast<std::size_t>(c)],
                                      &squares[static_cast<std::size_t>(c)]);
        });
        for (std::int64_t c = 0; c < chunks; ++c) {
            if (bad[static_cast<std::size_t>(c)]) {
                const std::int64_t begin = c * kChunk;
                rw.status = locate_bad(x + begin, std::min(kChunk, n - begin), row);
                if (rw.status.index >= 0) rw.status.index += begin;
                return;
            }
            rw.shift = std::max(rw.shift, maxes[static_cast<std::size_t>(c)]);
        }
        if (rw.shift == -kInf) {
            rw.status = {StatusCode::zero_row, row, -1};
            return;
        }
        if (fused) {
            for (std::int64_t c = 0; c < chunks; ++c) {
                const double chunk_shift = maxes[static_cast<std::size_t>(c)];
                const double rescale = chunk_shift > -kInf ? std::exp(chunk_shift - rw.shift) : 0.0;
                sums[static_cast<std::size_t>(c)] = chunk_shift > -kInf ? sums[static_cast<std::size_t>(c)] * rescale : 0.0;
                squares[static_cast<std::size_t>(c)] =
                    chunk_shift > -kInf ? squares[static_cast<std::size_t>(c)] * rescale * rescale : 0.0;
            }
        } else {
            for_chunks([&](std::int64_t c) {
                const std::int64_t begin = c * kChunk, len = std::min(kChunk, n - begin);
                chunk_exp_sums<true>(x + begin, len, rw.shift, w + begin, &sums[static_cast<std::size_t>(c)],
                                     &squares[static_cast<std::size_t>(c)]);
            });
        }
        rw.chunk_offset.assign(static_cast<std::size_t>(chunks + 1), 0.0);
        for (std::int64_t c = 0; c < chunks; ++c) {
            rw.chunk_offset[static_cast<std::size_t>(c + 1)] = rw.chunk_offset[static_cast<std::size_t>(c)] +
                                                               sums[static_cast<std::size_t>(c)];
            rw.sum_squares += squares[static_cast<std::size_t>(c)];
        }
        rw.sum = rw.chunk_offset[static_cast<std::size_t>(chunks)];
    }
    // The maximum has weight exp(0) = 1, so a positive weight exists; find the last one.
    for (std::int64_t i = n - 1; i >= 0; --i) {
        if (static_cast<double>(x[i]) - rw.shift >= -708.0) {
            rw.last_positive = i;
            break;
        }
    }
    // x is read in several passes: where another thread rewrote it meanwhile the figures can disagree (no
    // positive weight left, a sum that is not a positive number), and no draw could use them.
    if (rw.last_positive < 0 || !(rw.sum >= 1.0 && rw.sum < kInf)) rw.status = {StatusCode::input_changed, row, -1};
}

}  // namespace tiltsmc
