// The CUDA core's runtime side: errors, the error record, stream-ordered memory, device queries.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <set>
#include <string>

#include "tiltsmc_cuda.hpp"

namespace tiltsmc::cuda {

cudaError_t kernel_image_status();  // weights.cu

namespace {

std::string describe(cudaError_t code, const std::string& where) {
    return "CUDA error in " + where + ": " + cudaGetErrorName(code) + " (" + cudaGetErrorString(code) + ")";
}

std::string version_text(int version) {
    return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

// Keeps freed blocks in the device's default pool (the default threshold 0 hands memory back to the
// driver at every synchronisation, which makes small stream-ordered allocations slow).
void keep_pool_memory(int device) {
    static std::mutex mutex;
    static std::set<int> done;
    std::lock_guard<std::mutex> lock(mutex);
    if (!done.insert(device).second) return;
    cudaMemPool_t pool;
    if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) {
        std::uint64_t threshold = std::numeric_limits<std::uint64_t>::max();
        cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
    }
    cudaGetLastError();  // a pool that cannot be tuned is not an error
}

}  // namespace

CudaError::CudaError(cudaError_t code, const std::string& where)
    : std::runtime_error(describe(code, where)), code_(code) {}

void check_cuda(cudaError_t code, const char* where) {
    if (code != cudaSuccess) {
        cudaGetLastError();  // clear a non-sticky error so that later calls are not blamed for it
        throw CudaError(code, where);
    }
}

void* malloc_async(std::size_t bytes, cudaStream_t stream) {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    keep_pool_memory(device);
    void* pointer = nullptr;
    check_cuda(cudaMallocAsync(&pointer, bytes, stream), "cudaMallocAsync");
    return pointer;
}

void free_async(void* pointer, cudaStream_t stream) {
    if (pointer) check_cuda(cudaFreeAsync(pointer, stream), "cudaFreeAsync");
}

ErrorRecord* new_error_record(cudaStream_t stream) {
    auto* record = static_cast<ErrorRecord*>(malloc_async(sizeof(ErrorRecord), stream));
    check_cuda(cudaMemsetAsync(record, 0xff, sizeof(ErrorRecord), stream), "cudaMemsetAsync (error record)");
    return record;
}

ErrorRecord read_error_record(const ErrorRecord* record, cudaStream_t stream, const char* kernel) {
    ErrorRecord value = kNoError;
    check_cuda(cudaMemcpyAsync(&value, record, sizeof value, cudaMemcpyDeviceToHost, stream), kernel);
    check_cuda(cudaStreamSynchronize(stream), kernel);
    return value;
}

Status decode_error_record(ErrorRecord value, std::int64_t width) {
    if (value == kNoError) return {};
    const auto position = static_cast<std::int64_t>(value >> 2);
    const std::int64_t row = width > 0 ? position / width : 0, index = width > 0 ? position % width : position;
    switch (static_cast<ErrorCode>(value & 3u)) {
        case nan_weight: return {StatusCode::nan_weight, row, index};
        case positive_infinity: return {StatusCode::positive_infinity, row, index};
        case zero_row: return {StatusCode::zero_row, row, -1};
        default: return {StatusCode::index_out_of_range, row, index};
    }
}

Availability probe() {
    Availability result;
    cudaRuntimeGetVersion(&result.runtime_version);
    const cudaError_t driver = cudaDriverGetVersion(&result.driver_version);
    cudaGetLastError();
    if (driver != cudaSuccess || result.driver_version == 0) {
        result.reason = "no CUDA driver found (libcuda.so is not installed or not loadable)";
        return result;
    }
    const cudaError_t count = cudaGetDeviceCount(&result.device_count);
    cudaGetLastError();
    if (count == cudaErrorInsufficientDriver) {
        result.reason = "the CUDA driver supports CUDA " + version_text(result.driver_version) +
                        ", older than the CUDA " + version_text(result.runtime_version) + " this module was built with";
        return result;
    }
    if (count != cudaSuccess || result.device_count == 0) {
        result.device_count = 0;
        result.reason = count == cudaSuccess ? std::string("no CUDA device found")
                                             : "no usable CUDA device: " + std::string(cudaGetErrorString(count));
        return result;
    }
    int current = 0;
    cudaGetDevice(&current);
    const cudaError_t image = kernel_image_status();
    cudaGetLastError();
    if (image != cudaSuccess) {
        cudaDeviceProp properties;
        std::string capability = "?";
        if (cudaGetDeviceProperties(&properties, current) == cudaSuccess)
            capability = std::to_string(properties.major) + "." + std::to_string(properties.minor);
        cudaGetLastError();
        result.reason = "this build has no code for device " + std::to_string(current) + " (compute capability " +
                        capability + "): " + cudaGetErrorString(image) +
                        "; rebuild with -C cmake.define.CMAKE_CUDA_ARCHITECTURES=native";
        return result;
    }
    result.usable = true;
    result.reason = std::to_string(result.device_count) + " CUDA device(s), driver " +
                    version_text(result.driver_version) + ", runtime " + version_text(result.runtime_version);
    return result;
}

int pointer_device(const void* pointer) {
    cudaPointerAttributes attributes;
    const cudaError_t code = cudaPointerGetAttributes(&attributes, pointer);
    if (code != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    if (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged) return attributes.device;
    return -1;
}

int stream_device(cudaStream_t stream) {
    int device = 0;
    const auto handle = reinterpret_cast<std::uintptr_t>(stream);
    if (handle == 0 || handle == 1 || handle == 2) {
        check_cuda(cudaGetDevice(&device), "cudaGetDevice");
        return device;
    }
    check_cuda(cudaStreamGetDevice(stream, &device), "cudaStreamGetDevice");
    return device;
}

}  // namespace tiltsmc::cuda
