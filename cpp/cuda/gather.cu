// CUDA gather: out[r, j] = x[r, ancestors[r, j]] for items of any byte size, out of place or in place.
// Ancestors are checked on the device first; the copy kernels read the error record and write nothing
// when it holds an error, so bad ancestors never cause a write, in bounds or out.
#include "launch.cuh"

namespace tiltsmc::cuda {
namespace device {
namespace {

__global__ void check_ancestors(const std::int64_t* ancestors, std::int64_t total, std::int64_t n,
                                ErrorRecord* record, std::uint8_t* read_by_other, std::int64_t m) {
    for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const std::int64_t a = ancestors[e];
        if (a < 0 || a >= n) {
            record_error(record, e, index_out_of_range);
        } else if (read_by_other != nullptr && a != e % m) {  // in place: mark items another item reads
            read_by_other[(e / m) * n + a] = 1;
        }
    }
}

// One `Unit` (1, 2, 4, 8 or 16 bytes) per thread and step; units_per_item units per item.
template <typename Unit>
__global__ void copy_items(const Unit* x, const std::int64_t* ancestors, std::int64_t rows, std::int64_t n,
                           std::int64_t m, std::int64_t units_per_item, Unit* out, const ErrorRecord* record) {
    if (!record_clear(record)) return;
    const std::int64_t total = rows * m * units_per_item;
    for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const std::int64_t item = e / units_per_item, unit = e - item * units_per_item;
        const std::int64_t row = item / m;
        out[e] = x[(row * n + ancestors[item]) * units_per_item + unit];
    }
}

// In place: item k is saved (to slot[k]) when another item reads it and it is itself overwritten.
__global__ void assign_slots(const std::int64_t* ancestors, std::int64_t total, std::int64_t n,
                             const std::uint8_t* read_by_other, std::int64_t* slot, unsigned long long* saved,
                             const ErrorRecord* record) {
    if (!record_clear(record)) return;
    for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const bool save = read_by_other[e] != 0 && ancestors[e] != e % n;
        slot[e] = save ? static_cast<std::int64_t>(atomicAdd(saved, 1ull)) : -1;
    }
}

template <typename Unit>
__global__ void save_items(const Unit* x, std::int64_t total_items, std::int64_t units_per_item,
                           const std::int64_t* slot, Unit* saved) {
    const std::int64_t total = total_items * units_per_item;
    for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const std::int64_t item = e / units_per_item;
        const std::int64_t s = slot[item];
        if (s >= 0) saved[s * units_per_item + (e - item * units_per_item)] = x[e];
    }
}

template <typename Unit>
__global__ void write_in_place(Unit* x, const std::int64_t* ancestors, std::int64_t total_items, std::int64_t n,
                               std::int64_t units_per_item, const std::int64_t* slot, const Unit* saved) {
    const std::int64_t total = total_items * units_per_item;
    for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const std::int64_t item = e / units_per_item, unit = e - item * units_per_item;
        const std::int64_t a = ancestors[item], j = item % n;
        if (a == j) continue;
        const std::int64_t source = item - j + a;
        const std::int64_t s = slot[source];
        x[e] = s >= 0 ? saved[s * units_per_item + unit] : x[source * units_per_item + unit];
    }
}

// Items of at least kBigItemUnits units: block (item, chunk) copies one chunk of one item, so the
// item and its ancestor are found once per block, and each thread has kChunkLoads loads in flight.
constexpr int kCopyThreads = 256;
constexpr int kChunkLoads = 4;
constexpr std::int64_t kChunkUnits = kCopyThreads * kChunkLoads;

struct ChunkPlace {
    std::int64_t item, begin, end;
};

__device__ inline ChunkPlace chunk_place(std::int64_t units_per_item, std::int64_t chunks_per_item) {
    const std::int64_t item = blockIdx.x / chunks_per_item;
    const std::int64_t begin = (blockIdx.x - item * chunks_per_item) * kChunkUnits;
    return {item, begin, begin + kChunkUnits < units_per_item ? begin + kChunkUnits : units_per_item};
}

template <typename Unit>
__device__ inline void copy_chunk(const Unit* __restrict__ source, Unit* __restrict__ target, std::int64_t begin,
                                  std::int64_t end) {
    Unit v[kChunkLoads];
#pragma unroll
    for (int k = 0; k < kChunkLoads; ++k) {
        const std::int64_t u = begin + k * kCopyThreads + threadIdx.x;
        if (u < end) v[k] = source[u];
    }
#pragma unroll
    for (int k = 0; k < kChunkLoads; ++k) {
        const std::int64_t u = begin + k * kCopyThreads + threadIdx.x;
        if (u < end) target[u] = v[k];
    }
}

template <typename Unit>
__global__ void __launch_bounds__(kCopyThreads)
    copy_big_items(const Unit* x, const std::int64_t* ancestors, std::int64_t n, std::int64_t m,
                   std::int64_t units_per_item, std::int64_t chunks_per_item, Unit* out, const ErrorRecord* record) {
    if (!record_clear(record)) return;
    const ChunkPlace place = chunk_place(units_per_item, chunks_per_item);
    const std::int64_t row = place.item / m;
    copy_chunk(x + (row * n + ancestors[place.item]) * units_per_item, out + place.item * units_per_item, place.begin,
               place.end);
}

template <typename Unit>
__global__ void __launch_bounds__(kCopyThreads)
    save_big_items(const Unit* x, std::int64_t units_per_item, std::int64_t chunks_per_item, const std::int64_t* slot,
                   Unit* saved) {
    const ChunkPlace place = chunk_place(units_per_item, chunks_per_item);
    const std::int64_t s = slot[place.item];
    if (s < 0) return;
    copy_chunk(x + place.item * units_per_item, saved + s * units_per_item, place.begin, place.end);
}

template <typename Unit>
__global__ void __launch_bounds__(kCopyThreads)
    write_big_in_place(Unit* x, const std::int64_t* ancestors, std::int64_t n, std::int64_t units_per_item,
                       std::int64_t chunks_per_item, const std::int64_t* slot, const Unit* saved) {
    const ChunkPlace place = chunk_place(units_per_item, chunks_per_item);
    const std::int64_t a = ancestors[place.item], j = place.item % n;
    if (a == j) return;  // items that keep their own state are not touched
    const std::int64_t source = place.item - j + a;
    const std::int64_t s = slot[source];
    const Unit* from = s >= 0 ? saved + s * units_per_item : x + source * units_per_item;
    copy_chunk(from, x + place.item * units_per_item, place.begin, place.end);
}

}  // namespace
}  // namespace device

namespace {

using detail::blocks_for;
using detail::check_launch;
using detail::grid_size;

// Items of at least this many units take one block per chunk of kChunkUnits units.
constexpr std::int64_t kBigItemUnits = 256;

// The widest unit that divides the item size and the alignment of every pointer.
int unit_bytes(std::int64_t item_bytes, const void* a, const void* b) {
    const auto address = reinterpret_cast<std::uintptr_t>(a) | reinterpret_cast<std::uintptr_t>(b);
    for (int width : {16, 8, 4, 2}) {
        if (item_bytes % width == 0 && address % static_cast<std::uintptr_t>(width) == 0) return width;
    }
    return 1;
}

template <typename Launch>
void with_unit(int width, Launch&& launch) {
    switch (width) {
        case 16: launch(uint4{}); break;
        case 8: launch(std::uint64_t{}); break;
        case 4: launch(std::uint32_t{}); break;
        case 2: launch(std::uint16_t{}); break;
        default: launch(std::uint8_t{}); break;
    }
}

}  // namespace

void gather(const std::uint8_t* x, std::int64_t rows, std::int64_t n, std::int64_t item_bytes,
            const std::int64_t* ancestors, std::int64_t m, std::uint8_t* out, bool in_place, ErrorRecord* record,
            cudaStream_t stream) {
    if (rows < 0 || n < 1 || m < 0 || item_bytes < 0) throw std::invalid_argument("gather: bad sizes");
    if (in_place && out != x) throw std::invalid_argument("gather: in place needs out == x");
    if (in_place && m != n) throw std::invalid_argument("gather: in place needs as many ancestors as particles");
    const std::int64_t items = rows * m;
    if (items == 0) return;
    if (!in_place && out == x && item_bytes > 0) throw std::invalid_argument("gather: out of place, out is x");
    const int width = unit_bytes(item_bytes, x, out);
    const std::int64_t units_per_item = item_bytes / width;
    if (!in_place) {
        device::check_ancestors<<<grid_size(blocks_for(items)), 256, 0, stream>>>(ancestors, items, n, record,
                                                                                  nullptr, m);
        check_launch("tiltsmc::cuda::check_ancestors (gather)");
        if (units_per_item == 0) return;
        with_unit(width, [&](auto unit) {
            using Unit = decltype(unit);
            const auto* source = reinterpret_cast<const Unit*>(x);
            auto* target = reinterpret_cast<Unit*>(out);
            if (units_per_item >= kBigItemUnits) {
                const std::int64_t chunks = (units_per_item + device::kChunkUnits - 1) / device::kChunkUnits;
                device::copy_big_items<Unit><<<grid_size(items * chunks), device::kCopyThreads, 0, stream>>>(
                    source, ancestors, n, m, units_per_item, chunks, target, record);
            } else {
                device::copy_items<Unit><<<grid_size(blocks_for(items * units_per_item)), 256, 0, stream>>>(
                    source, ancestors, rows, n, m, units_per_item, target, record);
            }
        });
        check_launch("tiltsmc::cuda::copy_items (gather)");
        return;
    }
    if (record == nullptr) throw std::invalid_argument("gather: in place needs an error record");
    detail::Scratch read_by_other(static_cast<std::size_t>(items), stream);
    detail::Scratch slot(sizeof(std::int64_t) * items, stream);
    detail::Scratch saved_count(sizeof(unsigned long long), stream);
    check_cuda(cudaMemsetAsync(read_by_other.as<void>(), 0, static_cast<std::size_t>(items), stream),
               "cudaMemsetAsync (gather)");
    check_cuda(cudaMemsetAsync(saved_count.as<void>(), 0, sizeof(unsigned long long), stream),
               "cudaMemsetAsync (gather)");
    device::check_ancestors<<<grid_size(blocks_for(items)), 256, 0, stream>>>(ancestors, items, n, record,
                                                                              read_by_other.as<std::uint8_t>(), m);
    check_launch("tiltsmc::cuda::check_ancestors (gather in place)");
    device::assign_slots<<<grid_size(blocks_for(items)), 256, 0, stream>>>(
        ancestors, items, n, read_by_other.as<std::uint8_t>(), slot.as<std::int64_t>(),
        saved_count.as<unsigned long long>(), record);
    check_launch("tiltsmc::cuda::assign_slots (gather in place)");
    unsigned long long host[2] = {0, 0};
    check_cuda(cudaMemcpyAsync(&host[0], record, sizeof(ErrorRecord), cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync (gather in place)");
    check_cuda(cudaMemcpyAsync(&host[1], saved_count.as<void>(), sizeof(unsigned long long), cudaMemcpyDeviceToHost,
                               stream),
               "cudaMemcpyAsync (gather in place)");
    check_cuda(cudaStreamSynchronize(stream), "tiltsmc::cuda::check_ancestors (gather in place)");
    if (host[0] != kNoError || units_per_item == 0) return;  // bad ancestors: nothing written
    detail::Scratch saved(static_cast<std::size_t>(host[1]) * static_cast<std::size_t>(item_bytes), stream);
    with_unit(width, [&](auto unit) {
        using Unit = decltype(unit);
        auto* data = reinterpret_cast<Unit*>(out);
        if (units_per_item >= kBigItemUnits) {
            const std::int64_t chunks = (units_per_item + device::kChunkUnits - 1) / device::kChunkUnits;
            const unsigned grid = grid_size(items * chunks);
            if (host[1] > 0) {
                device::save_big_items<Unit><<<grid, device::kCopyThreads, 0, stream>>>(
                    data, units_per_item, chunks, slot.as<std::int64_t>(), saved.as<Unit>());
                check_launch("tiltsmc::cuda::save_big_items (gather in place)");
            }
            device::write_big_in_place<Unit><<<grid, device::kCopyThreads, 0, stream>>>(
                data, ancestors, n, units_per_item, chunks, slot.as<std::int64_t>(), saved.as<Unit>());
            return;
        }
        if (host[1] > 0) {
            device::save_items<Unit><<<grid_size(blocks_for(items * units_per_item)), 256, 0, stream>>>(
                data, items, units_per_item, slot.as<std::int64_t>(), saved.as<Unit>());
            check_launch("tiltsmc::cuda::save_items (gather in place)");
        }
        device::write_in_place<Unit><<<grid_size(blocks_for(items * units_per_item)), 256, 0, stream>>>(
            data, ancestors, items, n, units_per_item, slot.as<std::int64_t>(), saved.as<Unit>());
    });
    check_launch("tiltsmc::cuda::write_in_place (gather in place)");
}

}  // namespace tiltsmc::cuda
