// Host-side launch helpers: which thread layout a row length gets, the grid for it, error checks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "device_common.cuh"

namespace tiltsmc::cuda::detail {

using device::BlockGroup;
using device::WarpGroup;

// Rows per block when each warp takes a row.
constexpr int kWarpsPerBlock = 8;

// Where a group of each kind finds its row and its slice of a block's shared memory.
template <typename Group>
struct GroupLayout;
template <>
struct GroupLayout<WarpGroup> {
    static constexpr int kBlockThreads = 32 * kWarpsPerBlock;
    __device__ static std::int64_t row() {
        return static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
    }
    __device__ static int shared_base() { return static_cast<int>(threadIdx.x & ~31u); }
    static std::int64_t blocks(std::int64_t rows) { return (rows + kWarpsPerBlock - 1) / kWarpsPerBlock; }
};
template <int Threads>
struct GroupLayout<BlockGroup<Threads>> {
    static constexpr int kBlockThreads = Threads;
    __device__ static std::int64_t row() { return blockIdx.x; }
    __device__ static int shared_base() { return 0; }
    static std::int64_t blocks(std::int64_t rows) { return rows; }
};

enum class Layout { warp, block256, block1024, segments };

// A warp per row up to 1024 particles (thousands of small rows fill the GPU), a block of 256 threads up to
// 32768, then many blocks per row where the kernel has that form, else a block of 1024 threads.
inline Layout choose_layout(std::int64_t n, bool segments_available) {
    if (n <= 1024) return Layout::warp;
    if (n <= 32768) return Layout::block256;
    return segments_available ? Layout::segments : Layout::block1024;
}

// Calls launch(group, blocks, threads) for the group type of `layout` (not segments).
template <typename Launch>
void launch_rows(Layout layout, std::int64_t rows, Launch&& launch) {
    switch (layout) {
        case Layout::warp:
            launch(WarpGroup{}, GroupLayout<WarpGroup>::blocks(rows), GroupLayout<WarpGroup>::kBlockThreads);
            break;
        case Layout::block256:
            launch(BlockGroup<256>{}, rows, 256);
            break;
        default:
            launch(BlockGroup<1024>{}, rows, 1024);
            break;
    }
}

inline unsigned grid_size(std::int64_t blocks) {
    if (blocks > 0x7fffffff) throw std::length_error("tiltsmc cuda: too many rows or particles for one launch");
    return static_cast<unsigned>(blocks);
}

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Blocks of 256 threads for a grid-stride loop over `work` elements (at least one, at most 8192).
inline std::int64_t blocks_for(std::int64_t work) {
    return std::max<std::int64_t>(1, std::min<std::int64_t>((work + 255) / 256, 8192));
}

// Device scratch memory from the stream-ordered pool, given back on the same stream.
class Scratch {
public:
    Scratch(std::size_t bytes, cudaStream_t stream)
        : pointer_(bytes ? malloc_async(bytes, stream) : nullptr), stream_(stream) {}
    ~Scratch() {
        if (pointer_) cudaFreeAsync(pointer_, stream_);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    template <typename V>
    V* as() const { return static_cast<V*>(pointer_); }

private:
    void* pointer_;
    cudaStream_t stream_;
};

}  // namespace tiltsmc::cuda::detail
