// The thread count and a persistent pool of worker threads (started on first use, grown on demand).
#include <atomic>
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
                workers_.back().detach();  // never joined: they wait on the condition until exit
            }
            part_ = &part;
            parts_ = parts;
            pending_ = parts - 1;
            errors_.assign(static_cast<std::size_t>(parts), nullptr);
            ++generation_;
        }
        wake_.notify_all();
        try {
            part(0);
        } catch (...) {
            first_error = std::current_exception();
        }
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return pending_ == 0; });
        part_ = nullptr;
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
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            wake_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (index >= parts_) continue;
            const std::function<void(int)>* part = part_;
            lock.unlock();
            std::exception_ptr error;
            try {
                (*part)(index);
            } catch (...) {
                error = std::current_exception();
            }
            lock.lock();
            errors_[static_cast<std::size_t>(index)] = error;
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::mutex caller_mutex_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable done_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* part_ = nullptr;
    int parts_ = 0;
    int pending_ = 0;
    std::uint64_t generation_ = 0;
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
