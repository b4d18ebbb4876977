#include <atomic>
#include <thread>

#include "tiltsmc/kernels.hpp"

namespace tiltsmc {
namespace {
std::atomic<int> g_num_threads{0};  // 0: the hardware's count
}  // namespace

void set_num_threads(int num_threads) { g_num_threads.store(num_threads < 1 ? 1 : num_threads); }

int get_num_threads() {
    const int chosen = g_num_threads.load();
    if (chosen > 0) return chosen;
    const unsigned hardware = std::thread::hardware_concurrency();
    return hardware == 0 ? 1 : static_cast<int>(hardware);
}

}  // namespace tiltsmc
