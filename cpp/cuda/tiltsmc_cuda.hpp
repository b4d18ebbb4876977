// The tiltsmc CUDA core: the kernels of tiltsmc/kernels.hpp on device pointers, enqueued on a stream.
//
// Contracts are those of the CPU kernels (same arguments, same Philox streams: row r of a call keyed k
// draws from stream (k, r) with the same counters per scheme), with two differences forced by the device:
// - Input errors (NaN, +inf, zero rows, out-of-range ancestors) are written to an error record in
//   device memory (see ErrorRecord below) instead of a returned Status; read it with read_error_record
//   after the launch. Kernels never read or write outside the ranges their sizes describe.
// - Sums are formed in a different order, so a uniform that falls within rounding of a cumulative-weight
//   boundary may pick the neighbouring ancestor. With exactly representable cumulative sums (weights
//   0 and 1, equal weights) the ancestors are identical to the CPU's.
// Functions return once the work is enqueued (in-place gather excepted, see below); CUDA runtime errors
// are thrown as CudaError naming the kernel. Scratch memory comes from the stream-ordered allocator.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "tiltsmc/kernels.hpp"

namespace tiltsmc::cuda {

// A CUDA runtime error, its message naming the kernel or call that failed.
class CudaError : public std::runtime_error {
public:
    CudaError(cudaError_t code, const std::string& where);
    cudaError_t code() const { return code_; }

private:
    cudaError_t code_;
};

// Throws CudaError unless code is cudaSuccess.
void check_cuda(cudaError_t code, const char* where);

// The error record: one 64-bit word in device memory, kNoError when the input was good, otherwise the
// smallest (position << 2 | ErrorCode) over all errors found, where position = row * width + index
// counts in row-major order (width: particles for weights, ancestors per row for gather, 2 for
// mh_accept). The smallest is the first error in row order, the one the CPU kernels report.
using ErrorRecord = unsigned long long;
constexpr ErrorRecord kNoError = ~0ull;
enum ErrorCode : unsigned { nan_weight = 0, positive_infinity = 1, zero_row = 2, index_out_of_range = 3 };

// An ErrorRecord set to kNoError, allocated on `stream` (free it with free_async on the same stream).
ErrorRecord* new_error_record(cudaStream_t stream);
// Waits for `stream` and returns the record's value (a CudaError if anything on the stream failed).
ErrorRecord read_error_record(const ErrorRecord* record, cudaStream_t stream, const char* kernel);
// The Status the CPU kernel would have returned for this record.
Status decode_error_record(ErrorRecord value, std::int64_t width);

void* malloc_async(std::size_t bytes, cudaStream_t stream);
void free_async(void* pointer, cudaStream_t stream);

// Kernels. `record` may be nullptr (errors are then not reported, but bad rows are still never used).

// As tiltsmc::log_normalize; normalised may be nullptr (log_mean_w and ess only).
template <typename T>
void log_normalize(const T* logw, std::int64_t rows, std::int64_t n, bool allow_zero_rows, T* normalised,
                   double* log_mean_w, double* ess, ErrorRecord* record, cudaStream_t stream);

// As tiltsmc::resample: m ancestors per row, ascending, int64.
template <typename T>
void resample(const T* logw, std::int64_t rows, std::int64_t n, Scheme scheme, std::int64_t m,
              std::uint64_t key, std::int64_t* ancestors, ErrorRecord* record, cudaStream_t stream);

// As tiltsmc::smc_step, in one launch per call (plus the scratch allocation for multinomial and
// residual). A row with a NaN or +inf log-weight is recorded, gets log_mean_w = ess = NaN, the identity
// and no reset, so that with record == nullptr bad input still shows in the outputs. With a record, every
// weight is checked first (one more launch) and a bad one anywhere leaves every row of log_w unwritten, as
// the CPU's refusal does (the outputs are then not written either).
template <typename T>
void smc_step(T* log_w, std::int64_t rows, std::int64_t n, double threshold, Scheme scheme, std::uint64_t key,
              std::int64_t* ancestors, std::uint8_t* resampled, double* log_mean_w, double* ess,
              std::int64_t* unique, ErrorRecord* record, cudaStream_t stream);

// As tiltsmc::pool_select.
template <typename T>
void pool_select(const T* logw, std::int64_t rows, std::int64_t n, std::uint64_t key, std::int64_t* index,
                 double* log_mean_w, ErrorRecord* record, cudaStream_t stream);

// As tiltsmc::mh_accept (errors at position 2 row + which, which = 0 current, 1 proposed).
void mh_accept(const double* log_z_current, const double* log_z_proposed, std::int64_t rows, std::uint64_t key,
               std::uint8_t* accept, ErrorRecord* record, cudaStream_t stream);

// As tiltsmc::gather. Every ancestor is checked on the device before anything is written: with a bad
// ancestor the record says where and out is left untouched. Out of place (out must not overlap x) it
// only enqueues. In place (in_place: out == x, m == n) it copies only the items whose ancestor is not
// themselves, saving first those that are also read by another item; sizing that buffer makes it wait
// for the stream once (record must not be nullptr there). The caller says which (in_place), as pointer
// equality cannot: arrays of no bytes may all have address 0.
void gather(const std::uint8_t* x, std::int64_t rows, std::int64_t n, std::int64_t item_bytes,
            const std::int64_t* ancestors, std::int64_t m, std::uint8_t* out, bool in_place, ErrorRecord* record,
            cudaStream_t stream);

// Whether the kernels can run: a driver, a device, and code for its architecture; if not, why.
struct Availability {
    bool usable = false;
    std::string reason;
    int device_count = 0;
    int runtime_version = 0;
    int driver_version = 0;
};
Availability probe();

// The device holding `pointer` (-1 for host memory not registered with CUDA).
int pointer_device(const void* pointer);
// The device of a stream (the current device for the default streams 0, 1 (legacy) and 2 (per thread)).
int stream_device(cudaStream_t stream);

}  // namespace tiltsmc::cuda
