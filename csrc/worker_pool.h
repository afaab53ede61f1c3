// Threads at a low scheduling priority for the slow parts of preparing a request (tokenizing a
// long prompt, turning a schema into a grammar, rendering a template): they yield the CPU to
// the decode threads that running streams wait on. They never touch Python objects, so a
// low-priority thread can never hold the GIL that the event loop waits for.
//
// Thread safety: post() and run() from any thread; constructor and destructor on the owning
// thread (the destructor runs the jobs still queued, then joins).
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace llamabox {

class worker_pool {
public:
    worker_pool(int n_threads, int nice);
    ~worker_pool();
    worker_pool(const worker_pool &) = delete;
    worker_pool & operator=(const worker_pool &) = delete;

    // Runs fn on a pool thread and waits for it; returns what it returns, rethrows what it throws.
    template <typename F>
    auto run(F && fn) -> std::invoke_result_t<F> {
        using R = std::invoke_result_t<F>;
        auto job = std::make_shared<std::packaged_task<R()>>(std::forward<F>(fn));
        std::future<R> done = job->get_future();
        post([job] { (*job)(); });
        return done.get();
    }

    void post(std::function<void()> job);  // runs job on a pool thread, later

private:
    void work(int nice);

    std::mutex                        mtx_;
    std::condition_variable           cv_;
    std::deque<std::function<void()>> jobs_;
    bool                              stopping_ = false;
    std::vector<std::thread>          threads_;
};

}  // namespace llamabox
