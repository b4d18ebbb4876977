// The thread count and a persistent pool of worker threads (started on first use, grown on demand).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "tiltsmc/parallel.hpp"

namespace tiltsmc {
namespace {

std::atomic<int> g_num_threads{0};  // 0: the hardware's count
thread_local bool t_in_worker = false;

// Waking a sleeping thread costs tens of microseconds on a virtual machine (a futex wake-up is an
// interrupt to a halted virtual CPU), as much as a whole 2^20-element pass. So workers spin briefly after
// a job, waiting for the next one (the passes of one kernel, and back-to-back calls, then start at once),
// and the caller spins briefly while they finish. Both spins are short because tiltsmc shares the cores
// with a model runtime between its calls: with 200 us / 2 ms spins, tiltsmc's share of an SMC step on the
// ONNX fixtures (bench_models.py, 2-core VM) doubled (5% -> 11%); 50 us / 20 us keep the kernels' figures
// of the long spins (bench_core.py) and the step's figures of no spinning.
constexpr auto kWorkerSpin = std::chrono::microseconds(50);
constexpr auto kCallerSpin = std::chrono::microseconds(20);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
}

// Spins until done() or for about `limit`; true if done() was seen.
template <typename Done, typename Duration>
bool spin_until(const Done& done, Duration limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
        for (int k = 0; k < 64; ++k) {
            if (done()) return true;
            cpu_relax();
        }
        if (std::chrono::steady_clock::now() >= deadline) return done();
    }
}

class Pool {
public:
    // Runs part(0) here and part(1..parts-1) on workers; false if another caller holds the pool.
    bool run(int parts, const std::function<void(int)>& part) {
        std::unique_lock<std::mutex> caller(caller_mutex_, std::try_to_lock);
        if (!caller.owns_lock()) return false;
        std::exception_ptr first_error;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            while (static_cast<int>(workers_.size()) < parts - 1) {
                const int index = static_cast<int>(workers_.size()) + 1;
                workers_.emplace_back([this, index] { work(index); });
                workers_.back().detach();  // never joined: they wait for work until exit
            }
            part_ = &part;
            parts_ = parts;
            errors_.assign(static_cast<std::size_t>(parts), nullptr);
            pending_.store(parts - 1, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        try {
            part(0);
        } catch (...) {
            first_error = std::current_exception();
        }
        auto finished = [this] { return pending_.load(std::memory_order_acquire) == 0; };
        if (!spin_until(finished, kCallerSpin)) {
            std::unique_lock<std::mutex> lock(mutex_);
            done_.wait(lock, finished);
        }
        std::unique_lock<std::mutex> lock(mutex_);
        part_ = nullptr;  // no worker may start a part of this call any more
        parts_ = 0;
        for (auto& error : errors_)
            if (error && !first_error) first_error = error;
        lock.unlock();
        if (first_error) std::rethrow_exception(first_error);
        return true;
    }

private:
    void work(int index) {
        t_in_worker = true;
        std::uint64_t seen = 0;
        for (;;) {
            auto published = [&] { return generation_.load(std::memory_order_acquire) != seen; };
            if (!spin_until(published, kWorkerSpin)) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, published);
            }
            // The generation, its parts and its function, read together under the mutex (run publishes and
            // retires them under it): read one by one, they could belong to two calls, and a worker run a
            // part of the newer call twice (once as its own, once for the older generation), or call a
            // retired function. The part is run once for the generation seen; a call that needs this worker
            // cannot end, so cannot be replaced, before the worker has seen it.
            const std::function<void(int)>* part = nullptr;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                seen = generation_.load(std::memory_order_relaxed);
                if (index < parts_) part = part_;
            }
            if (part == nullptr) continue;
            std::exception_ptr error;
            try {
                (*part)(index);
            } catch (...) {
                error = std::current_exception();
            }
            errors_[static_cast<std::size_t>(index)] = error;
            if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                // The caller may be about to sleep: take the mutex so the notification cannot fall
                // between its check and its wait.
                { std::lock_guard<std::mutex> lock(mutex_); }
                done_.notify_one();
            }
        }
    }

    std::mutex caller_mutex_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable done_;
    std::vector<std::thread> workers_;
    // The current call: its function and number of parts (nullptr and 0 between calls), and its generation,
    // all written under mutex_; generation_ is also read without it, by workers spinning for a new call.
    const std::function<void(int)>* part_ = nullptr;
    int parts_ = 0;
    std::atomic<int> pending_{0};
    std::atomic<std::uint64_t> generation_{0};
    std::vector<std::exception_ptr> errors_;
};

// Deliberately leaked: destroying it at exit would race with detached workers still waiting on it.
Pool* g_pool = nullptr;
std::mutex g_pool_mutex;

#if defined(__unix__) || defined(__APPLE__)
// A forked child (e.g. Python multiprocessing) inherits the pool but not its threads: start afresh.
void forget_pool_in_child() {
    new (&g_pool_mutex) std::mutex();
    g_pool = nullptr;
}
#endif

Pool& pool() {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (!g_pool) {
#if defined(__unix__) || defined(__APPLE__)
        static const bool registered = [] { return pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0; }();
        (void)registered;
#endif
        g_pool = new Pool();
    }
    return *g_pool;
}

}  // namespace

bool run_on_pool(int parts, const std::function<void(int)>& part) {
    if (parts <= 1 || t_in_worker) return false;
    return pool().run(parts, part);
}

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
