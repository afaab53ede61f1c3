// One sink for llama.cpp's and ggml's log lines, for the whole process.
//
// llama_log_set is process-global: a sink owned by one engine would leave llama.cpp holding a
// dangling pointer once that engine is gone (or failed to load), while another engine still
// logs. So there is exactly one sink, registered on first use, that outlives every engine.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <string>

namespace llamabox {

// Registers the process-wide sink with llama.cpp (idempotent; any thread).
void log_sink_install();

// Whether llama.cpp's current log callback is the process-wide sink (for tests).
bool log_sink_installed();

// While an engine that asked for verbose logs lives, llama.cpp's info lines are printed too;
// errors are always printed.
class log_verbose_guard {
public:
    explicit log_verbose_guard(bool verbose);
    ~log_verbose_guard();
    log_verbose_guard(const log_verbose_guard &) = delete;
    log_verbose_guard & operator=(const log_verbose_guard &) = delete;

private:
    bool verbose_;
};

// Collects the error lines llama.cpp logs on this thread while the capture lives (a model load
// runs on the caller's thread), so a failed load can say why. Captures nest: the innermost wins.
class log_capture {
public:
    log_capture();
    ~log_capture();
    log_capture(const log_capture &) = delete;
    log_capture & operator=(const log_capture &) = delete;

    const std::string & errors() const { return errors_; }

private:
    friend struct log_sink;
    std::string   errors_;
    log_capture * outer_ = nullptr;
};

}  // namespace llamabox
