// Device-side building blocks shared by the CUDA kernels: the CPU's exp, groups of threads that work on
// one row (a warp, or a whole block) with their reductions and scans, a row's weight figures, and the
// error record.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tiltsmc/philox_block.hpp"
#include "tiltsmc_cuda.hpp"

namespace tiltsmc::cuda::device {

constexpr double kInf = __builtin_huge_val();
constexpr std::int64_t kNoIndex = INT64_MAX;

__device__ inline void record_error(ErrorRecord* record, std::int64_t position, ErrorCode code) {
    if (record != nullptr)
        atomicMin(record, (static_cast<ErrorRecord>(position) << 2) | static_cast<ErrorRecord>(code));
}

// Whether no error has been recorded (by a check kernel launched before on the stream): kernels that write
// in place test it first and write nothing otherwise.
__device__ inline bool record_clear(const ErrorRecord* record) {
    return record == nullptr || *static_cast<const volatile ErrorRecord*>(record) == kNoError;
}

// exp(x) for x <= 0 (including -inf), the CPU's algorithm (row_weights.hpp) step for step, so that
// weights are the same numbers on both: x = k ln2 + r, a degree-13 Taylor polynomial, the scale 2^k
// built in the exponent bits; results below exp(-708) are flushed to zero.
__device__ inline double exp_nonpositive(double x) {
    const bool underflow = x < -708.0;
    const double clamped = underflow ? -708.0 : x;
    const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
    const double shifted = __fma_rn(clamped, 1.4426950408889634, shifter);
    const double k = shifted - shifter;
    const double r = __fma_rn(-k, 2.3190468138462996e-17, __fma_rn(-k, 0.6931471805599453, clamped));
    double p = 1.0 / 6227020800.0;
    p = __fma_rn(p, r, 1.0 / 479001600.0);
    p = __fma_rn(p, r, 1.0 / 39916800.0);
    p = __fma_rn(p, r, 1.0 / 3628800.0);
    p = __fma_rn(p, r, 1.0 / 362880.0);
    p = __fma_rn(p, r, 1.0 / 40320.0);
    p = __fma_rn(p, r, 1.0 / 5040.0);
    p = __fma_rn(p, r, 1.0 / 720.0);
    p = __fma_rn(p, r, 1.0 / 120.0);
    p = __fma_rn(p, r, 1.0 / 24.0);
    p = __fma_rn(p, r, 1.0 / 6.0);
    p = __fma_rn(p, r, 0.5);
    p = __fma_rn(p, r, 1.0);
    p = __fma_rn(p, r, 1.0);
    const long long exponent = (__double_as_longlong(shifted) - 0x4338000000000000LL) + 1023;
    return underflow ? 0.0 : p * __longlong_as_double(exponent << 52);
}

struct Sum {
    template <typename V>
    __device__ V operator()(V a, V b) const { return a + b; }
};
struct Max {
    template <typename V>
    __device__ V operator()(V a, V b) const { return a > b ? a : b; }
};
struct Min {
    template <typename V>
    __device__ V operator()(V a, V b) const { return a < b ? a : b; }
};

template <typename V, typename Op>
__device__ inline V warp_reduce(V v, Op op) {
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

template <typename V, typename Op>
__device__ inline V warp_inclusive_scan(V v, Op op, int lane) {
    for (int offset = 1; offset < 32; offset <<= 1) {
        const V other = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v = op(v, other);
    }
    return v;
}

// One warp per row (several rows per block): no shared memory, no block barriers.
struct WarpGroup {
    static constexpr int kSize = 32;
    __device__ int rank() const { return static_cast<int>(threadIdx.x & 31u); }
    __device__ void sync() const { __syncwarp(); }
    template <typename V, typename Op>
    __device__ V reduce(V v, Op op) const { return warp_reduce(v, op); }
    template <typename V, typename Op>
    __device__ V inclusive_scan(V v, Op op) const { return warp_inclusive_scan(v, op, rank()); }
    template <typename V>
    __device__ V last(V v) const { return __shfl_sync(0xffffffffu, v, 31); }  // the value of rank kSize - 1
};

// One block of Threads threads per row.
template <int Threads>
struct BlockGroup {
    static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps, at most 1024 threads");
    static constexpr int kSize = Threads;
    static constexpr int kWarps = Threads / 32;
    __device__ int rank() const { return static_cast<int>(threadIdx.x); }
    __device__ void sync() const { __syncthreads(); }

    template <typename V, typename Op>
    __device__ V reduce(V v, Op op) const {
        __shared__ V partial[kWarps];
        v = warp_reduce(v, op);
        if ((threadIdx.x & 31u) == 0) partial[threadIdx.x / 32] = v;
        __syncthreads();
        V result = partial[0];
        for (int w = 1; w < kWarps; ++w) result = op(result, partial[w]);
        __syncthreads();  // partial is reused by the next call
        return result;
    }

    template <typename V, typename Op>
    __device__ V inclusive_scan(V v, Op op) const {
        __shared__ V partial[kWarps];
        const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x / 32);
        v = warp_inclusive_scan(v, op, lane);
        if (lane == 31) partial[warp] = v;
        __syncthreads();
        for (int w = 0; w < warp; ++w) v = op(partial[w], v);
        __syncthreads();
        return v;
    }

    template <typename V>
    __device__ V last(V v) const {
        __shared__ V value;
        if (threadIdx.x == Threads - 1) value = v;
        __syncthreads();
        const V result = value;
        __syncthreads();
        return result;
    }
};

// A row's figures, as the CPU's RowWeights: shift = max, sums of w = exp(x - shift) and w^2, the last
// index whose weight is not flushed to zero.
enum RowState : int { row_ok = 0, row_bad = 1, row_zero = 2 };
struct RowFigures {
    double shift;
    double sum;
    double sum_squares;
    std::int64_t last_positive;
    int state;
};

template <typename T>
__device__ inline double load(const T* x, std::int64_t i) {
    return static_cast<double>(x[i]);
}

// The figures of row `row` (x[0, n)) computed by group g; a NaN or +inf is recorded at its first position,
// and a row of zero weights at its last when zero_row_is_error.
template <typename Group, typename T>
__device__ RowFigures row_figures(const Group& g, const T* x, std::int64_t n, std::int64_t row,
                                  ErrorRecord* record, bool zero_row_is_error) {
    RowFigures f{-kInf, 0.0, 0.0, -1, row_ok};
    double top = -kInf;
    std::int64_t bad = kNoIndex;
    for (std::int64_t i = g.rank(); i < n; i += Group::kSize) {
        const double v = load(x, i);
        if (!(v < kInf)) bad = bad < i ? bad : i;
        else top = v > top ? v : top;
    }
    bad = g.reduce(bad, Min());
    top = g.reduce(top, Max());
    if (bad != kNoIndex) {
        if (g.rank() == 0) record_error(record, row * n + bad, isnan(load(x, bad)) ? nan_weight : positive_infinity);
        f.state = row_bad;
        return f;
    }
    if (top == -kInf) {
        if (zero_row_is_error && g.rank() == 0) record_error(record, row * n + n - 1, zero_row);
        f.state = row_zero;
        return f;
    }
    double sum = 0.0, squares = 0.0;
    std::int64_t last = -1;
    for (std::int64_t i = g.rank(); i < n; i += Group::kSize) {
        const double d = load(x, i) - top;
        const double w = exp_nonpositive(d);
        sum += w;
        squares += w * w;
        if (d >= -708.0) last = i;
    }
    f.shift = top;
    f.sum = g.reduce(sum, Sum());
    f.sum_squares = g.reduce(squares, Sum());
    f.last_positive = g.reduce(last, Max());
    return f;
}

// Cumulative weights of the tile's particles (i = tile + rank): carry + inclusive sum of w, ascending and
// unchanged across zero weights; carry becomes the tile's last value.
template <typename Group>
__device__ inline double cumulative_weight(const Group& g, double w, double& carry) {
    double c = g.inclusive_scan(w, Sum()) + carry;
    c = w > 0.0 ? c : carry;
    c = g.inclusive_scan(c, Max());
    carry = g.last(c);
    return c;
}

// Number of systematic points (j + u) / m * total, j in [0, m), below cumulative weight c, as the CPU:
// clamp(ceil(c * m / total - u), 0, m).
__device__ inline std::int64_t points_below(double c, double scale, double u, std::int64_t m) {
    double x = __fma_rn(c, scale, -u);
    x = x > 0.0 ? x : 0.0;
    x = x < static_cast<double>(m) ? x : static_cast<double>(m);
    const double rounded = (x + 4503599627370496.0) - 4503599627370496.0;
    return static_cast<std::int64_t>(rounded) + (rounded < x ? 1 : 0);
}

// Number of stratified points (j + u_j) / m * total below cumulative weight c: the floor(x) strata wholly
// below x = c m / total, plus stratum k = floor(x) when u_k < x - k (u_k: draw k of the row's stream).
__device__ inline std::int64_t strata_below(double c, double scale, std::int64_t m, const Philox4x32& gen,
                                            std::uint64_t row) {
    double x = c * scale;
    x = x > 0.0 ? x : 0.0;
    x = x < static_cast<double>(m) ? x : static_cast<double>(m);
    const auto k = static_cast<std::int64_t>(x);
    if (k >= m) return m;
    return k + (philox_uniform_at(gen, row, static_cast<std::uint64_t>(k)) < x - static_cast<double>(k) ? 1 : 0);
}

// First index i in [0, last] with c[i] > p (c ascending), or last if there is none.
__device__ inline std::int64_t first_above(const double* c, std::int64_t last, double p) {
    std::int64_t lo = 0, hi = last;
    while (lo < hi) {
        const std::int64_t mid = lo + (hi - lo) / 2;
        if (c[mid] > p) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

// Number of entries of a[0, count) (ascending) that are <= value.
__device__ inline std::int64_t count_at_most(const std::int64_t* a, std::int64_t count, std::int64_t value) {
    std::int64_t lo = 0, hi = count;
    while (lo < hi) {
        const std::int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] <= value) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

}  // namespace tiltsmc::cuda::device
