// Reordering particle state by ancestors, out of place or in place; joining batches of it.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tiltsmc/kernels.hpp"
#include "tiltsmc/parallel.hpp"
#include "tiltsmc/read_once.hpp"

namespace tiltsmc {
namespace {

// Items of at most this many bytes are gathered in place through a copy of the row: cheaper than
// finding which items must be saved, since every item is a register move.
constexpr std::int64_t kSmallItem = 64;

// reorder_in_place uses the thread pool from this many bytes copied (see there).
constexpr std::int64_t kReorderThreadsFrom = std::int64_t{32} << 20;

// target[j] = source[a[j]] for j < m, items of item_bytes bytes, source holding n items. Each a[j] is read
// once and checked where it is used (read_once.hpp): an index out of range is skipped and reported by
// returning its position (else -1). ItemBytes is std::integral_constant for the common sizes: a memcpy of
// a constant size is a single move (and safe for unaligned items), a call per item is not.
template <typename ItemBytes>
std::int64_t copy_items(const std::uint8_t* source, std::int64_t n, const std::int64_t* a, std::int64_t m,
                        ItemBytes item_bytes, std::uint8_t* target) {
    const auto bytes = static_cast<std::int64_t>(item_bytes);
    std::int64_t bad = -1;
    for (std::int64_t j = 0; j < m; ++j) {
        const std::int64_t i = read_once(a + j);
        if (!in_range(i, n)) {
            bad = j;
            continue;
        }
        std::memcpy(target + j * bytes, source + i * bytes, static_cast<std::size_t>(item_bytes));
    }
    return bad;
}

template <std::int64_t Bytes>
using Fixed = std::integral_constant<std::int64_t, Bytes>;

// The indices of copy_items checked where they are used, for items of no bytes: nothing is copied (the
// rows may be empty buffers, whose data() may be null, and memcpy from a null pointer is undefined even for
// zero bytes).
std::int64_t check_items(std::int64_t n, const std::int64_t* a, std::int64_t m) {
    std::int64_t bad = -1;
    for (std::int64_t j = 0; j < m; ++j)
        if (!in_range(read_once(a + j), n)) bad = j;
    return bad;
}

std::int64_t gather_items(const std::uint8_t* source, std::int64_t n, const std::int64_t* a, std::int64_t m,
                          std::int64_t item_bytes, std::uint8_t* target) {
    switch (item_bytes) {
        case 0: return check_items(n, a, m);
        case 1: return copy_items(source, n, a, m, Fixed<1>{}, target);
        case 2: return copy_items(source, n, a, m, Fixed<2>{}, target);
        case 4: return copy_items(source, n, a, m, Fixed<4>{}, target);
        case 8: return copy_items(source, n, a, m, Fixed<8>{}, target);
        case 16: return copy_items(source, n, a, m, Fixed<16>{}, target);
        default: return copy_items(source, n, a, m, item_bytes, target);
    }
}

// Scratch of the in-place reorders, one per thread.
struct ReorderScratch {
    std::vector<std::int64_t> ancestors;   // a row's ancestors, read once
    std::vector<std::int64_t> used;        // a row's columns used per item (an array with a prefix), read once
    std::vector<std::int64_t> saved_slot;  // per item: where its saved copy is, or -1
    std::vector<std::uint8_t> saved;       // saved items, or a copy of the whole row
};

// An item copied whole, or (prefix.blocks > 0) the first `used` columns of each of its blocks.
void copy_item(std::uint8_t* target, const std::uint8_t* source, std::int64_t item_bytes, const ItemPrefix& prefix,
               std::int64_t used) {
    if (prefix.blocks == 0) {
        if (item_bytes > 0) std::memcpy(target, source, static_cast<std::size_t>(item_bytes));  // never from null
        return;
    }
    const std::int64_t block_bytes = prefix.width * prefix.column_bytes;
    const auto bytes = static_cast<std::size_t>(used * prefix.column_bytes);
    if (bytes == 0) return;
    for (std::int64_t b = 0; b < prefix.blocks; ++b)
        std::memcpy(target + b * block_bytes, source + b * block_bytes, bytes);
}

// In place, large items: item j takes item a_j (with a prefix, the columns item a_j uses). Items that are
// both overwritten and read by another item are saved first; items whose ancestor is themselves are never
// touched, so a near-identity ancestry copies little. The row's ancestors (and the columns used) are read
// once into scratch (n indices beside n items of more than kSmallItem bytes) and checked there (clamped);
// returns the position of an ancestor out of range (nothing is written then), else -1.
std::int64_t gather_row_in_place(std::uint8_t* x, std::int64_t n, std::int64_t item_bytes, const std::int64_t* row,
                                 const ItemPrefix& prefix, const std::int64_t* used_row, ReorderScratch& scratch) {
    std::vector<std::int64_t>& a = scratch.ancestors;
    std::vector<std::int64_t>& used = scratch.used;
    std::vector<std::int64_t>& saved_slot = scratch.saved_slot;
    a.resize(static_cast<std::size_t>(n));
    for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t i = read_once(row + j);
        if (!in_range(i, n)) return j;
        a[static_cast<std::size_t>(j)] = i;
    }
    used.assign(static_cast<std::size_t>(n), prefix.width);
    if (prefix.blocks > 0)
        for (std::int64_t j = 0; j < n; ++j)
            used[static_cast<std::size_t>(j)] = std::clamp<std::int64_t>(read_once(used_row + j), 0, prefix.width);
    saved_slot.assign(static_cast<std::size_t>(n), -1);
    bool any_change = false;
    for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t i = a[static_cast<std::size_t>(j)];
        if (i != j) {
            saved_slot[static_cast<std::size_t>(i)] = 0;  // read by another item
            any_change = true;
        }
    }
    if (!any_change) return -1;
    std::int64_t num_saved = 0;
    for (std::int64_t j = 0; j < n; ++j) {
        std::int64_t& slot = saved_slot[static_cast<std::size_t>(j)];
        slot = (slot == 0 && a[static_cast<std::size_t>(j)] != j) ? num_saved++ : -1;
    }
    std::vector<std::uint8_t>& saved = scratch.saved;
    saved.resize(static_cast<std::size_t>(num_saved * item_bytes));
    for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t slot = saved_slot[static_cast<std::size_t>(j)];
        if (slot >= 0)
            copy_item(saved.data() + slot * item_bytes, x + j * item_bytes, item_bytes, prefix,
                      used[static_cast<std::size_t>(j)]);
    }
    for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t i = a[static_cast<std::size_t>(j)];
        if (i == j) continue;
        const std::int64_t slot = saved_slot[static_cast<std::size_t>(i)];
        const std::uint8_t* source = slot >= 0 ? saved.data() + slot * item_bytes : x + i * item_bytes;
        copy_item(x + j * item_bytes, source, item_bytes, prefix, used[static_cast<std::size_t>(i)]);
    }
    return -1;
}

// Row x of n items reordered in place by a: small items without a prefix through a copy of the row, large
// ones (and any with a prefix, whose columns past the used ones stay as they were) moving only the items
// whose ancestor is another item. Returns the position of an ancestor out of range when used, else -1.
std::int64_t reorder_row(std::uint8_t* x, std::int64_t n, std::int64_t item_bytes, const std::int64_t* a,
                         const ItemPrefix& prefix, const std::int64_t* used_row, ReorderScratch& scratch) {
    if (item_bytes > kSmallItem || prefix.blocks > 0)
        return gather_row_in_place(x, n, item_bytes, a, prefix, used_row, scratch);
    scratch.saved.assign(x, x + n * item_bytes);
    return gather_items(scratch.saved.data(), n, a, n, item_bytes, x);
}

// Checks that every one of the rows x m ancestors lies in [0, n); counts in `moved` those that are not
// their own index (the items an in-place reorder copies).
Status check_ancestors(const std::int64_t* ancestors, std::int64_t rows, std::int64_t m, std::int64_t n,
                       std::int64_t* moved) {
    std::int64_t count = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t* a = ancestors + r * m;
        for (std::int64_t j = 0; j < m; ++j) {
            const std::int64_t i = read_once(a + j);
            if (!in_range(i, n)) return {StatusCode::index_out_of_range, r, j};
            count += i != j;
        }
    }
    *moved = count;
    return {};
}

// The first (row, position) an in-place or out-of-place copy found out of range when it used it, kept
// by the threads of one call.
class ChangedIndex {
public:
    void report(std::int64_t row, std::int64_t position) {
        std::int64_t expected = -1;
        if (row_.compare_exchange_strong(expected, row)) position_.store(position);
    }
    Status status() const {
        const std::int64_t row = row_.load();
        if (row < 0) return {};
        return {StatusCode::input_changed, row, position_.load()};
    }

private:
    std::atomic<std::int64_t> row_{-1};
    std::atomic<std::int64_t> position_{-1};
};

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
    ChangedIndex changed;
    parallel_for(rows, work, [&](std::int64_t begin, std::int64_t end) {
        ReorderScratch scratch;
        for (std::int64_t r = begin; r < end; ++r) {
            const std::int64_t* a = ancestors + r * m;
            std::uint8_t* target = out + r * m * item_bytes;
            const std::int64_t bad = in_place ? reorder_row(target, n, item_bytes, a, ItemPrefix{}, nullptr, scratch)
                                              : gather_items(x + r * n * item_bytes, n, a, m, item_bytes, target);
            if (bad >= 0) changed.report(r, bad);
        }
    });
    return changed.status();
}

Status reorder_in_place(std::uint8_t* const* arrays, const std::int64_t* item_bytes, std::int64_t count,
                        std::int64_t rows, std::int64_t n, const std::int64_t* ancestors, const ItemPrefix* prefixes,
                        const std::int64_t* used) {
    if (rows < 0 || n < 1 || count < 0) return {StatusCode::bad_size, -1, -1};
    for (std::int64_t k = 0; prefixes != nullptr && k < count; ++k) {
        const ItemPrefix& p = prefixes[k];
        if (p.blocks == 0) continue;
        if (used == nullptr || p.blocks < 0 || p.width < 0 || p.column_bytes < 0 ||
            p.blocks * p.width * p.column_bytes != item_bytes[k])
            return {StatusCode::bad_size, -1, -1};
    }
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
    ChangedIndex changed;
    parallel_for(rows * count, work, [&](std::int64_t begin, std::int64_t end) {
        ReorderScratch scratch;
        for (std::int64_t t = begin; t < end; ++t) {
            const std::int64_t r = t / count, k = t % count;
            const ItemPrefix prefix = prefixes == nullptr ? ItemPrefix{} : prefixes[k];
            const std::int64_t bad = reorder_row(arrays[k] + r * n * item_bytes[k], n, item_bytes[k], ancestors + r * n,
                                                 prefix, prefix.blocks > 0 ? used + r * n : nullptr, scratch);
            if (bad >= 0) changed.report(r, bad);
        }
    });
    return changed.status();
}

Status keep_survivors(std::int64_t* ancestors, std::int64_t rows, std::int64_t n) {
    if (rows < 0 || n < 1) return {StatusCode::bad_size, -1, -1};
    std::int64_t moved = 0;
    if (const Status status = check_ancestors(ancestors, rows, n, n, &moved); !status.ok()) return status;
    ChangedIndex changed;
    parallel_for(rows, rows * n, [&](std::int64_t begin, std::int64_t end) {
        std::vector<std::int64_t> children(static_cast<std::size_t>(n));
        for (std::int64_t r = begin; r < end; ++r) {
            std::int64_t* a = ancestors + r * n;
            std::fill(children.begin(), children.end(), 0);
            // Each ancestor read once and checked: the counts then add up to n whatever happens to `a`.
            bool counted = true;
            for (std::int64_t j = 0; j < n && counted; ++j) {
                const std::int64_t i = read_once(a + j);
                if (!in_range(i, n)) {
                    changed.report(r, j);
                    counted = false;
                } else {
                    ++children[static_cast<std::size_t>(i)];
                }
            }
            if (!counted) continue;
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
    return changed.status();
}

Status concatenate_padded(const PaddedPart* parts, std::int64_t count, std::int64_t blocks, std::int64_t width,
                          std::int64_t item_bytes, std::uint8_t* out, bool pad_end, const std::int64_t* used) {
    if (count < 0 || blocks < 0 || width < 0 || item_bytes < 0) return {StatusCode::bad_size, -1, -1};
    if (used != nullptr && !pad_end) return {StatusCode::bad_size, -1, -1};
    // first_row[k]: part k's first row in out; the parts are read once here, so that what the copies use
    // is what was checked
    std::vector<PaddedPart> checked(parts, parts + count);
    std::vector<std::int64_t> first_row(static_cast<std::size_t>(count) + 1, 0);
    for (std::int64_t k = 0; k < count; ++k) {
        const PaddedPart& part = checked[static_cast<std::size_t>(k)];
        if (part.rows < 0 || part.skip < 0 || part.skip > part.length || part.length - part.skip > width)
            return {StatusCode::bad_size, k, -1};
        first_row[static_cast<std::size_t>(k) + 1] = first_row[static_cast<std::size_t>(k)] + part.rows;
    }
    const std::int64_t rows = first_row.back();
    // each row's count, read once: what the copies use is what was checked
    std::vector<std::int64_t> row_used;
    if (used != nullptr) {
        row_used.resize(static_cast<std::size_t>(rows));
        for (std::int64_t r = 0; r < rows; ++r) {
            row_used[static_cast<std::size_t>(r)] = read_once(used + r);
            if (row_used[static_cast<std::size_t>(r)] < 0) return {StatusCode::bad_size, -1, r};
        }
    }
    const std::int64_t segment_bytes = width * item_bytes;
    // One task per segment, so that a batch of a few rows of many segments (one prompt's particles and
    // heads) still splits over threads. A second thread halved the join of 7.6 MB (8 arrays) on the 2-core VM.
    parallel_for(rows * blocks, rows * blocks * segment_bytes / 16, [&](std::int64_t begin, std::int64_t end) {
        std::int64_t k = static_cast<std::int64_t>(
            std::upper_bound(first_row.begin(), first_row.end(), begin / std::max<std::int64_t>(blocks, 1)) -
            first_row.begin()) - 1;
        for (std::int64_t t = begin; t < end; ++t) {
            const std::int64_t row = t / blocks;
            while (row >= first_row[static_cast<std::size_t>(k) + 1]) ++k;
            const PaddedPart& part = checked[static_cast<std::size_t>(k)];
            const std::int64_t local = (row - first_row[static_cast<std::size_t>(k)]) * blocks + t % blocks;
            std::uint8_t* target = out + t * segment_bytes;
            // Copies and fills of no bytes are skipped: a part or out without items may have a null data pointer.
            if (used != nullptr) {  // the row's own columns only; those after are left as they were
                const std::int64_t own = std::min(part.length - part.skip, row_used[static_cast<std::size_t>(row)]);
                if (own > 0 && item_bytes > 0)
                    std::memcpy(target, part.data + local * part.length * item_bytes,
                                static_cast<std::size_t>(own * item_bytes));
                continue;
            }
            const std::int64_t kept = part.length - part.skip, pad = width - kept;
            const std::int64_t zeros_at = pad_end ? kept : 0, kept_at = pad_end ? 0 : pad;
            const std::int64_t first = local * part.length + (pad_end ? 0 : part.skip);
            if (pad > 0 && item_bytes > 0)
                std::memset(target + zeros_at * item_bytes, 0, static_cast<std::size_t>(pad * item_bytes));
            if (kept > 0 && item_bytes > 0)
                std::memcpy(target + kept_at * item_bytes, part.data + first * item_bytes,
                            static_cast<std::size_t>(kept * item_bytes));
        }
    });
    return {};
}

}  // namespace tiltsmc
