#include "log_sink.h"

#include <atomic>
#include <cstdio>
#include <mutex>

#include "llama.h"
#include "mtmd-helper.h"

namespace llamabox {

namespace {

thread_local log_capture * t_capture = nullptr;
thread_local ggml_log_level t_last_level = GGML_LOG_LEVEL_INFO;

}  // namespace

struct log_sink {
    std::atomic<int> n_verbose{0};
    std::mutex       mtx_print;  // whole lines, not interleaved ones

    static log_sink & instance() {
        // Constructed on first use, destroyed at exit after unregistering (below).
        static log_sink sink;
        return sink;
    }

    ~log_sink() {
        llama_log_set(quiet, nullptr);
        mtmd_helper_log_set(quiet, nullptr);
    }

    static void callback(ggml_log_level level, const char * text, void * user_data) {
        static_cast<log_sink *>(user_data)->on_log(level, text);
    }

    // What llama.cpp calls once the sink is gone (at exit): errors only, no state.
    static void quiet(ggml_log_level level, const char * text, void *) {
        if (level >= GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
    }

    void on_log(ggml_log_level level, const char * text) {
        if (level == GGML_LOG_LEVEL_CONT) level = t_last_level;  // continues the previous line
        t_last_level = level;
        const bool error = level >= GGML_LOG_LEVEL_ERROR;
        if (error || n_verbose.load(std::memory_order_relaxed) > 0) {
            std::lock_guard<std::mutex> lk(mtx_print);
            std::fputs(text, stderr);
        }
        if (error && t_capture != nullptr && t_capture->errors_.size() < 4096) t_capture->errors_ += text;
    }
};

void log_sink_install() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_sink::callback, &log_sink::instance());
        mtmd_helper_log_set(log_sink::callback, &log_sink::instance());  // libmtmd and its clip.cpp
    });
}

bool log_sink_installed() {
    ggml_log_callback cb = nullptr;
    void * user_data = nullptr;
    llama_log_get(&cb, &user_data);
    return cb == log_sink::callback && user_data == &log_sink::instance();
}

log_verbose_guard::log_verbose_guard(bool verbose) : verbose_(verbose) {
    log_sink_install();
    if (verbose_) log_sink::instance().n_verbose++;
}

log_verbose_guard::~log_verbose_guard() {
    if (verbose_) log_sink::instance().n_verbose--;
}

log_capture::log_capture() : outer_(t_capture) {
    log_sink_install();
    t_capture = this;
}

log_capture::~log_capture() { t_capture = outer_; }

}  // namespace llamabox
