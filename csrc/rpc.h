// ggml RPC: another machine's devices for the engine (llama.cpp's RPC backend, as LLaMA Box and
// GPUStack use it for multi-host), and a server that offers this machine's.
#pragma once

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

}  // namespace llamabox
