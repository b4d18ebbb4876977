// Reading caller memory that another thread may be writing while a kernel runs (the GIL is released).
//
// A kernel that checks an index and then uses it must use the very value it checked: read_once loads it
// exactly once (a relaxed atomic load, a plain move on x86 and ARM), so the compiler can neither re-load it
// between the check and the use nor merge the check into the use. Every index a kernel takes from caller
// memory (ancestors, lengths, columns, selections, flags that decide a write) is read this way and checked
// where it is used; values that are only copied (tokens, weights) are read normally.
#pragma once

#include <cstdint>

namespace tiltsmc {

template <typename T>
inline T read_once(const T* p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

// Row r's random stream: (keys[r], counters[r]) where a batch's rows belong to independent runs (each
// read once), else the call's (key, r).
struct RowStream {
    std::uint64_t key, counter;
};

inline RowStream row_stream(const std::uint64_t* keys, const std::uint64_t* counters, std::uint64_t key,
                            std::int64_t r) {
    return {keys ? read_once(keys + r) : key, counters ? read_once(counters + r) : static_cast<std::uint64_t>(r)};
}

// Whether index lies in [0, n) (one unsigned comparison).
inline bool in_range(std::int64_t index, std::int64_t n) {
    return static_cast<std::uint64_t>(index) < static_cast<std::uint64_t>(n);
}

}  // namespace tiltsmc
