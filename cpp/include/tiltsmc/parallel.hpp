// Static work splitting over std::thread for large calls; small calls run inline (no thread start-up).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "tiltsmc/kernels.hpp"

namespace tiltsmc {

// Below this many elements (or bytes for gather) of work a call stays on the calling thread.
constexpr std::int64_t kParallelThreshold = std::int64_t{1} << 16;

// Calls body(begin, end) on contiguous ranges covering [0, tasks): on the calling thread when the
// work is small, otherwise split over up to get_num_threads() threads. Bodies must write disjoint data.
template <typename Body>
void parallel_for(std::int64_t tasks, std::int64_t work, const Body& body) {
    const std::int64_t threads =
        std::min<std::int64_t>(get_num_threads(), std::max<std::int64_t>(tasks, 1));
    if (threads <= 1 || work < kParallelThreshold) {
        if (tasks > 0) body(std::int64_t{0}, tasks);
        return;
    }
    std::vector<std::thread> workers;
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(threads));
    workers.reserve(static_cast<std::size_t>(threads - 1));
    auto run = [&](std::int64_t t) {
        const std::int64_t begin = tasks * t / threads, end = tasks * (t + 1) / threads;
        try {
            if (begin < end) body(begin, end);
        } catch (...) {
            errors[static_cast<std::size_t>(t)] = std::current_exception();
        }
    };
    for (std::int64_t t = 1; t < threads; ++t) workers.emplace_back(run, t);
    run(0);
    for (auto& worker : workers) worker.join();
    for (auto& error : errors)
        if (error) std::rethrow_exception(error);
}

}  // namespace tiltsmc
