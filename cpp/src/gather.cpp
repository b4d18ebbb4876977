// Reordering particle state by ancestors, out of place or in place.
#include <algorithm>
#include <cstring>
#include <vector>

#include "tiltsmc/kernels.hpp"
#include "tiltsmc/parallel.hpp"

namespace tiltsmc {
namespace {

// Items of at most this many bytes are gathered in place through a copy of the row: cheaper than
// finding which items must be saved, since every item is a register move.
constexpr std::int64_t kSmallItem = 64;

// reorder_in_place uses the thread pool from this many bytes copied (see there).
constexpr std::int64_t kReorderThreadsFrom = std::int64_t{32} << 20;

// target[j] = source[a[j]] for j < m, items of item_bytes bytes. Fixed sizes for the common cases: a
// memcpy of a constant size is a single move (and safe for unaligned items), a call per item is not.
template <std::size_t Bytes>
void copy_items(const std::uint8_t* source, const std::int64_t* a, std::int64_t m, std::uint8_t* target) {
    for (std::int64_t j = 0; j < m; ++j)
        std::memcpy(target + j * static_cast<std::int64_t>(Bytes), source + a[j] * static_cast<std::int64_t>(Bytes),
                    Bytes);
}

void gather_items(const std::uint8_t* source, const std::int64_t* a, std::int64_t m, std::int64_t item_bytes,
                  std::uint8_t* target) {
    switch (item_bytes) {
        case 1: return copy_items<1>(source, a, m, target);
        case 2: return copy_items<2>(source, a, m, target);
        case 4: return copy_items<4>(source, a, m, target);
        case 8: return copy_items<8>(source, a, m, target);
        case 16: return copy_items<16>(source, a, m, target);
        default:
            for (std::int64_t j = 0; j < m; ++j)
                std::memcpy(target + j * item_bytes, source + a[j] * item_bytes, static_cast<std::size_t>(item_bytes));
    }
}

// In place, large items: item j takes item a_j. Items that are both overwritten and read by another
// item are saved first; items whose ancestor is themselves are never touched, so a near-identity
// ancestry copies little.
void gather_row_in_place(std::uint8_t* x, std::int64_t n, std::int64_t item_bytes, const std::int64_t* a,
                         std::vector<std::int64_t>& saved_slot, std::vector<std::uint8_t>& saved) {
    saved_slot.assign(static_cast<std::size_t>(n), -1);
    bool any_change = false;
    for (std::int64_t j = 0; j < n; ++j) {
        if (a[j] != j) {
            saved_slot[static_cast<std::size_t>(a[j])] = 0;  // read by another item
            any_change = true;
        }
    }
    if (!any_change) return;
    std::int64_t num_saved = 0;
    for (std::int64_t j = 0; j < n; ++j) {
        std::int64_t& slot = saved_slot[static_cast<std::size_t>(j)];
        slot = (slot == 0 && a[j] != j) ? num_saved++ : -1;
    }
    saved.resize(static_cast<std::size_t>(num_saved * item_bytes));
    for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t slot = saved_slot[static_cast<std::size_t>(j)];
        if (slot >= 0) std::memcpy(saved.data() + slot * item_bytes, x + j * item_bytes, item_bytes);
    }
    for (std::int64_t j = 0; j < n; ++j) {
        if (a[j] == j) continue;
        const std::int64_t slot = saved_slot[static_cast<std::size_t>(a[j])];
        const std::uint8_t* source = slot >= 0 ? saved.data() + slot * item_bytes : x + a[j] * item_bytes;
        std::memcpy(x + j * item_bytes, source, item_bytes);
    }
}

// Row x of n items reordered in place by a: small items through a copy of the row, large ones moving
// only the items whose ancestor is another item.
void reorder_row(std::uint8_t* x, std::int64_t n, std::int64_t item_bytes, const std::int64_t* a,
                 std::vector<std::int64_t>& saved_slot, std::vector<std::uint8_t>& saved) {
    if (item_bytes > kSmallItem) {
        gather_row_in_place(x, n, item_bytes, a, saved_slot, saved);
    } else {
        saved.assign(x, x + n * item_bytes);
        gather_items(saved.data(), a, n, item_bytes, x);
    }
}

// Checks that every one of the rows x m ancestors lies in [0, n); counts in `moved` those that are not
// their own index (the items an in-place reorder copies).
Status check_ancestors(const std::int64_t* ancestors, std::int64_t rows, std::int64_t m, std::int64_t n,
                       std::int64_t* moved) {
    std::int64_t count = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t* a = ancestors + r * m;
        for (std::int64_t j = 0; j < m; ++j) {
            if (a[j] < 0 || a[j] >= n) return {StatusCode::index_out_of_range, r, j};
            count += a[j] != j;
        }
    }
    *moved = count;
    return {};
}

}  // namespace

Status gather(const std::uint8_t* x, std::int64_t rows, std::int64_t n, std::int64_t item_bytes,
              const std::int64_t* ancestors, std::int64_t m, std::uint8_t* out) {
    if (rows < 0 || n < 1 || m < 0 || item_bytes < 0) return {StatusCode::bad_size, -1, -1};
    const bool in_place = out == x;
    if (in_place && m != n) return {StatusCode::bad_size, -1, -1};
    std::int64_t moved = 0;  // items whose ancestor is another item
    if (const Status status = check_ancestors(ancestors, rows, m, n, &moved); !status.ok()) return status;
    // In place with large items only the moved items are copied (each at most twice, through the
    // saved copies): a near-identity reorder of a big cache is small work and stays on this thread.
    const std::int64_t copied = in_place && item_bytes > kSmallItem ? 2 * moved : rows * m;
    const std::int64_t work = rows * m + copied * std::max<std::int64_t>(item_bytes, 1) / 16;
    parallel_for(rows, work, [&](std::int64_t begin, std::int64_t end) {
        std::vector<std::int64_t> saved_slot;
        std::vector<std::uint8_t> saved;
        for (std::int64_t r = begin; r < end; ++r) {
            const std::int64_t* a = ancestors + r * m;
            std::uint8_t* target = out + r * m * item_bytes;
            if (in_place) {
                reorder_row(target, n, item_bytes, a, saved_slot, saved);
            } else {
                gather_items(x + r * n * item_bytes, a, m, item_bytes, target);
            }
        }
    });
    return {};
}

Status reorder_in_place(std::uint8_t* const* arrays, const std::int64_t* item_bytes, std::int64_t count,
                        std::int64_t rows, std::int64_t n, const std::int64_t* ancestors) {
    if (rows < 0 || n < 1 || count < 0) return {StatusCode::bad_size, -1, -1};
    std::int64_t moved = 0;  // items whose ancestor is another item
    if (const Status status = check_ancestors(ancestors, rows, n, n, &moved); !status.ok()) return status;
    if (moved == 0) return {};  // the identity: nothing moves in any array
    std::int64_t copied = 0;    // bytes, large items counted twice (through the saved copies)
    for (std::int64_t k = 0; k < count; ++k)
        copied += (item_bytes[k] > kSmallItem ? 2 * moved : rows * n) * std::max<std::int64_t>(item_bytes[k], 1);
    // One task per (row, array), row-major, so that threads share every array. On the 2-core VM a second
    // thread did not pay for its wake-up below tens of MiB (one core streams the copy near the memory
    // bandwidth: 1.6 MiB 146 -> 198 us with 2 threads in an ONNX step, 50 MiB 1.51 -> 1.43 ms).
    const std::int64_t work = copied >= kReorderThreadsFrom ? copied / 16 : 0;
    parallel_for(rows * count, work, [&](std::int64_t begin, std::int64_t end) {
        std::vector<std::int64_t> saved_slot;
        std::vector<std::uint8_t> saved;
        for (std::int64_t t = begin; t < end; ++t) {
            const std::int64_t r = t / count, k = t % count;
            reorder_row(arrays[k] + r * n * item_bytes[k], n, item_bytes[k], ancestors + r * n, saved_slot, saved);
        }
    });
    return {};
}

Status keep_survivors(std::int64_t* ancestors, std::int64_t rows, std::int64_t n) {
    if (rows < 0 || n < 1) return {StatusCode::bad_size, -1, -1};
    std::int64_t moved = 0;
    if (const Status status = check_ancestors(ancestors, rows, n, n, &moved); !status.ok()) return status;
    parallel_for(rows, rows * n, [&](std::int64_t begin, std::int64_t end) {
        std::vector<std::int64_t> children(static_cast<std::size_t>(n));
        for (std::int64_t r = begin; r < end; ++r) {
            std::int64_t* a = ancestors + r * n;
            std::fill(children.begin(), children.end(), 0);
            for (std::int64_t j = 0; j < n; ++j) ++children[static_cast<std::size_t>(a[j])];
            // The childless slots, in order, take the parents' extra copies, in order: there are as
            // many of each (the counts add up to n), so `parent` never passes n.
            std::int64_t parent = -1, extra = 0;
            for (std::int64_t i = 0; i < n; ++i) {
                if (children[static_cast<std::size_t>(i)] > 0) {
                    a[i] = i;
                    continue;
                }
                while (extra == 0) extra = std::max<std::int64_t>(children[static_cast<std::size_t>(++parent)] - 1, 0);
                a[i] = parent;
                --extra;
            }
        }
    });
    return {};
}

}  // namespace tiltsmc
