#include "worker_pool.h"

#if defined(__linux__)
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace llamabox {

namespace {

// Lowers the calling thread's priority (Linux: nice is per thread). Best effort.
void lower_priority(int nice) {
#if defined(__linux__)
    const auto tid = (id_t) syscall(SYS_gettid);
    (void) setpriority(PRIO_PROCESS, tid, nice);
#else
    (void) nice;
#endif
}

}  // namespace

worker_pool::worker_pool(int n_threads, int nice) {
    for (int i = 0; i < n_threads; ++i) threads_.emplace_back([this, nice] { work(nice); });
}

worker_pool::~worker_pool() {
    {
        std::lock_guard<std::mutex> lk(mtx_);
        stopping_ = true;
    }
    cv_.notify_all();
    for (auto & t : threads_) t.join();
}

void worker_pool::post(std::function<void()> job) {
    {
        std::lock_guard<std::mutex> lk(mtx_);
        jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
}

void worker_pool::work(int nice) {
    lower_priority(nice);
    while (true) {
        std::function<void()> job;
        {
            std::unique_lock<std::mutex> lk(mtx_);
            cv_.wait(lk, [&] { return stopping_ || !jobs_.empty(); });
            if (jobs_.empty()) return;  // stopping, and nothing left to run
            job = std::move(jobs_.front());
            jobs_.pop_front();
        }
        job();  // a packaged_task: whatever fn throws goes to its future
    }
}

}  // namespace llamabox
