#include <atomic>
#include <thread>

#include "tiltsmc/kernels.hpp"

namespace tiltsmc {
namespace {
std::atomic<int> g_num_threads{0};  // 0: the hardware's count
}  // namespace

void set_num_threads(int num_threads) { g_num_threads.store(num_threads < 0 ? 0 : num_threads); }

int get_num_threads() {
    const int chosen = g_num_threads.load(std::memory_order_relaxed);
    if (chosen > 0) return chosen;
    // hardware_concurrency() reads the CPU affinity from the OS (tens of microseconds): ask once.
    static const int hardware = [] {
        const unsigned count = std::thread::hardware_concurrency();
        return count == 0 ? 1 : static_cast<int>(count);
    }();
    return hardware;
}

}  // namespace tiltsmc
