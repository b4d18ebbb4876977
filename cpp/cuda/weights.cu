// CUDA weight normalisation, pool selection and Metropolis-Hastings acceptance.
#include "launch.cuh"
#include "segments.cuh"

namespace tiltsmc::cuda {
namespace device {
namespace {

template <typename Group, typename T>
__global__ void __launch_bounds__(detail::GroupLayout<Group>::kBlockThreads)
    log_normalize_rows(const T* logw, std::int64_t rows, std::int64_t n, bool allow_zero_rows, T* normalised,
                       double* log_mean_w, double* ess, ErrorRecord* record) {
    const Group g;
    const std::int64_t row = detail::GroupLayout<Group>::row();
    if (row >= rows) return;
    const T* x = logw + row * n;
    const RowFigures f = row_figures(g, x, n, row, record, !allow_zero_rows);
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    if (f.state == row_bad || (f.state == row_zero && !allow_zero_rows)) {
        if (g.rank() == 0) {
            log_mean_w[row] = nan;
            ess[row] = nan;
        }
        return;
    }
    const bool zero = f.state == row_zero;
    const double log_sum = zero ? kInf : f.shift + log(f.sum);
    if (g.rank() == 0) {
        log_mean_w[row] = zero ? -kInf : log_sum - log(static_cast<double>(n));
        ess[row] = zero ? 0.0 : f.sum * f.sum / f.sum_squares;
    }
    if (normalised == nullptr) return;
    T* out = normalised + row * n;
    for (std::int64_t i = g.rank(); i < n; i += Group::kSize) out[i] = static_cast<T>(load(x, i) - log_sum);
}

template <typename Group, typename T>
__global__ void __launch_bounds__(detail::GroupLayout<Group>::kBlockThreads)
    pool_select_rows(const T* logw, std::int64_t rows, std::int64_t n, std::uint64_t key, std::int64_t* index,
                     double* log_mean_w, ErrorRecord* record) {
    const Group g;
    const std::int64_t row = detail::GroupLayout<Group>::row();
    if (row >= rows) return;
    const T* x = logw + row * n;
    const RowFigures f = row_figures(g, x, n, row, record, true);
    if (f.state != row_ok) return;
    // The CPU's walk: the first i < last_positive whose cumulative weight exceeds u * sum, else last_positive.
    const double target = philox_uniform_at(Philox4x32(key), static_cast<std::uint64_t>(row), 0) * f.sum;
    double carry = 0.0;
    std::int64_t found = kNoIndex;
    for (std::int64_t tile = 0; tile < f.last_positive; tile += Group::kSize) {
        const std::int64_t i = tile + g.rank();
        const double w = i < n ? exp_nonpositive(load(x, i) - f.shift) : 0.0;
        const double cumulative = cumulative_weight(g, w, carry);  // flat across zero weights
        found = g.reduce(i < f.last_positive && cumulative > target ? i : kNoIndex, Min());
        if (found != kNoIndex) break;
    }
    if (g.rank() == 0) {
        index[row] = found == kNoIndex ? f.last_positive : found;
        log_mean_w[row] = f.shift + log(f.sum) - log(static_cast<double>(n));
    }
}

__global__ void mh_accept_rows(const double* current, const double* proposed, std::int64_t rows, std::uint64_t key,
                               std::uint8_t* accept, ErrorRecord* record) {
    const Philox4x32 gen(key);
    for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; r < rows;
         r += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const double c = current[r], p = proposed[r];
        bool valid = true;
        const double values[2] = {c, p};
        for (int which = 0; which < 2 && valid; ++which) {
            if (isnan(values[which])) record_error(record, 2 * r + which, nan_weight), valid = false;
            else if (values[which] == kInf) record_error(record, 2 * r + which, positive_infinity), valid = false;
        }
        bool take = false;
        if (valid) {
            const double u = philox_uniform_at(gen, static_cast<std::uint64_t>(r), 0);
            if (c == -kInf) take = true;
            else if (p == -kInf) take = false;
            else take = p - c >= 0.0 || u < exp(p - c);
        }
        accept[r] = take ? 1 : 0;
    }
}

__global__ void probe_kernel() {}

}  // namespace
}  // namespace device

using detail::check_launch;
using detail::grid_size;

template <typename T>
void log_normalize(const T* logw, std::int64_t rows, std::int64_t n, bool allow_zero_rows, T* normalised,
                   double* log_mean_w, double* ess, ErrorRecord* record, cudaStream_t stream) {
    if (rows < 0 || n < 1) throw std::invalid_argument("log_normalize: bad sizes");
    if (rows == 0) return;
    const detail::Layout layout = detail::choose_layout(n, true);
    if (layout == detail::Layout::segments) {
        const detail::SegmentedRows segmented(logw, rows, n, allow_zero_rows, log_mean_w, ess, record, stream,
                                              "log_normalize");
        if (normalised != nullptr) {
            device::normalize_segments<T><<<grid_size(rows * segmented.segments), device::kSegmentThreads, 0, stream>>>(
                logw, n, segmented.segments, segmented.figures(), normalised);
            check_launch("tiltsmc::cuda::normalize_segments (log_normalize)");
        }
        return;
    }
    detail::launch_rows(layout, rows, [&](auto group, std::int64_t blocks, int threads) {
        using Group = decltype(group);
        device::log_normalize_rows<Group, T><<<grid_size(blocks), threads, 0, stream>>>(
            logw, rows, n, allow_zero_rows, normalised, log_mean_w, ess, record);
    });
    check_launch("tiltsmc::cuda::log_normalize_rows");
}

template <typename T>
void pool_select(const T* logw, std::int64_t rows, std::int64_t n, std::uint64_t key, std::int64_t* index,
                 double* log_mean_w, ErrorRecord* record, cudaStream_t stream) {
    if (rows < 0 || n < 1) throw std::invalid_argument("pool_select: bad sizes");
    if (rows == 0) return;
    detail::launch_rows(detail::choose_layout(n, false), rows, [&](auto group, std::int64_t blocks, int threads) {
        using Group = decltype(group);
        device::pool_select_rows<Group, T>
            <<<grid_size(blocks), threads, 0, stream>>>(logw, rows, n, key, index, log_mean_w, record);
    });
    check_launch("tiltsmc::cuda::pool_select_rows");
}

void mh_accept(const double* log_z_current, const double* log_z_proposed, std::int64_t rows, std::uint64_t key,
               std::uint8_t* accept, ErrorRecord* record, cudaStream_t stream) {
    if (rows < 0) throw std::invalid_argument("mh_accept: bad sizes");
    if (rows == 0) return;
    const std::int64_t blocks = std::min<std::int64_t>((rows + 255) / 256, 65536);
    device::mh_accept_rows<<<grid_size(blocks), 256, 0, stream>>>(log_z_current, log_z_proposed, rows, key, accept,
                                                                record);
    check_launch("tiltsmc::cuda::mh_accept_rows");
}

// Whether this module holds code the current device can run (an image for its architecture, or PTX the
// driver can compile for it).
cudaError_t kernel_image_status() {
    cudaFuncAttributes attributes;
    return cudaFuncGetAttributes(&attributes, device::probe_kernel);
}

template void log_normalize<float>(const float*, std::int64_t, std::int64_t, bool, float*, double*, double*,
                                   ErrorRecord*, cudaStream_t);
template void log_normalize<double>(const double*, std::int64_t, std::int64_t, bool, double*, double*, double*,
                                    ErrorRecord*, cudaStream_t);
template void pool_select<float>(const float*, std::int64_t, std::int64_t, std::uint64_t, std::int64_t*, double*,
                                 ErrorRecord*, cudaStream_t);
template void pool_select<double>(const double*, std::int64_t, std::int64_t, std::uint64_t, std::int64_t*,
                                  double*, ErrorRecord*, cudaStream_t);

}  // namespace tiltsmc::cuda
