// ggml RPC: another machine's devices for the engine (llama.cpp's RPC backend, as LLaMA Box and
// GPUStack use it for multi-host), and a server that offers this machine's.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace llamabox {

// Registers each "host:port" RPC server's devices with ggml, once per process; the model then
// offloads layers to them like to GPUs (--n-gpu-layers). Throws load_error naming a server
// that cannot be reached: ggml's own client would abort the process.
void add_rpc_servers(const std::vector<std::string> & endpoints);

// Serves this machine's CPU on host:port to RPC clients, one at a time; returns only when the
// server cannot start or stops accepting (throws load_error when it cannot start).
void run_rpc_server(const std::string & host, int port, int n_threads, const std::string & cache_dir);

// True when every "host:port" accepts a TCP connection within `timeout_ms` (each tried once).
bool rpc_servers_reachable(const std::vector<std::string> & endpoints, int timeout_ms);

// A running engine's watch on its RPC servers. ggml's RPC client aborts the process when a
// server goes away mid-call: its dispatcher thread calls GGML_ABORT, which only a process-wide
// callback hears. While at least one watch is held, that thread is instead parked for good and
// every watch's `on_lost` is told why (on that thread), so the HTTP server can stay up, fail
// the requests in flight and say what is wrong. The thread that waited for the call (the
// engine's) never returns from llama_decode: the engine has to leave its contexts alone after
// this. Without a watch (while loading, say) the process stops as ggml intends, with a clear
// line on stderr.
class rpc_loss_watch {
public:
    explicit rpc_loss_watch(std::function<void(const std::string &)> on_lost);
    ~rpc_loss_watch();
    rpc_loss_watch(const rpc_loss_watch &) = delete;
    rpc_loss_watch & operator=(const rpc_loss_watch &) = delete;

private:
    uint64_t id_;
};

}  // namespace llamabox
