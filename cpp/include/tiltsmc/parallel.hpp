// Static work splitting for large calls over a small persistent thread pool; small calls run inline.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <functional>
#include <vector>

#include "tiltsmc/kernels.hpp"

namespace tiltsmc {

// Below this many elements (or bytes / 16 for gather) of work a call stays on the calling thread.
constexpr std::int64_t kParallelThreshold = std::int64_t{1} << 16;

// Runs part(t) for t in [0, parts) at once on the calling thread and up to parts - 1 pool workers;
// returns false (running nothing) when the pool is unavailable: busy with another caller, or called
// from inside a pool worker. Exceptions from parts are rethrown on the calling thread.
bool run_on_pool(int parts, const std::function<void(int)>& part);

// Calls body(begin, end) on contiguous ranges covering [0, tasks): on the calling thread when the
// work is small, otherwise split over up to get_num_threads() threads. Bodies must write disjoint data.
template <typename Body>
void parallel_for(std::int64_t tasks, std::int64_t work, const Body& body) {
    const std::int64_t threads =
        std::min<std::int64_t>(get_num_threads(), std::max<std::int64_t>(tasks, 1));
    if (threads > 1 && work >= kParallelThreshold) {
        const bool ran = run_on_pool(static_cast<int>(threads), [&](int t) {
            const std::int64_t begin = tasks * t / threads, end = tasks * (t + 1) / threads;
            if (begin < end) body(begin, end);
        });
        if (ran) return;
    }
    if (tasks > 0) body(std::int64_t{0}, tasks);
}

}  // namespace tiltsmc
