#include "rpc.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <thread>
#include <utility>

#include "errors.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "ggml-rpc.h"

namespace llamabox {

namespace {

// "host:port" or "[v6]:port" -> host, port; false if it is neither.
bool split_endpoint(const std::string & ep, std::string & host, std::string & port) {
    const size_t colon = ep.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == ep.size()) return false;
    host = ep.substr(0, colon);
    port = ep.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    return port.find_first_not_of("0123456789") == std::string::npos;
}

// Why a TCP connection to the endpoint fails within `timeout_ms`; empty if it succeeds.
std::string connect_error(const std::string & host, const std::string & port, int timeout_ms) {
    addrinfo hints {};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * res = nullptr;
    const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
    if (rc != 0) return gai_strerror(rc);
    std::string why = "no address";
    for (addrinfo * ai = res; ai != nullptr; ai = ai->ai_next) {
        const int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            why = std::strerror(errno);
            continue;
        }
        const int flags = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
        int err = connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 ? 0 : errno;
        if (err == EINPROGRESS) {
            pollfd p {fd, POLLOUT, 0};
            const int n = poll(&p, 1, timeout_ms);
            socklen_t len = sizeof(err);
            if (n == 0) {
                err = ETIMEDOUT;
            } else if (n < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
                err = errno;
            }
        }
        close(fd);
        if (err == 0) {
            freeaddrinfo(res);
            return {};
        }
        why = std::strerror(err);
    }
    freeaddrinfo(res);
    return why;
}

// The watches of running engines. ggml's abort callback is one plain function per process
// with no user data, so this registry is process-wide too (the one such state in llamabox).
struct loss_registry {
    std::mutex mtx;
    uint64_t   next_id = 1;
    std::vector<std::pair<uint64_t, std::function<void(const std::string &)>>> watches;
};

loss_registry & registry() {
    static loss_registry r;
    return r;
}

// ggml's RPC client aborts in its dispatcher thread (RPC_STATUS_ASSERT in ggml-rpc.cpp) when a
// server goes away mid-call; no frame between here and that thread's start can be unwound.
// With a watch held, the thread tells the watches and sleeps for good: the call it was making
// never completes, so nothing touches the lost server again. Any other abort (or an RPC one with
// nobody watching) says what happened, without the debugger backtrace ggml would print, and
// returns to ggml's abort().
void on_ggml_abort(const char * message) {
    const bool from_rpc = std::strstr(message, "ggml-rpc") != nullptr || std::strstr(message, "RPC server") != nullptr;
    if (from_rpc) {
        loss_registry & r = registry();
        std::unique_lock<std::mutex> lk(r.mtx);
        if (!r.watches.empty()) {
            // "/path/ggml-rpc.cpp:566: Remote RPC server crashed ..." -> what follows the location
            std::string why = message;
            if (const size_t at = why.find(".cpp:"); at != std::string::npos) {
                if (const size_t sep = why.find(": ", at + 5); sep != std::string::npos) why = why.substr(sep + 2);
            }
            std::fprintf(stderr,
                         "llamabox: error: %s\nllamabox: a ggml RPC server (--rpc) went away or broke the protocol; "
                         "ggml's RPC client cannot recover from that: the requests in flight fail, /health reports "
                         "the error, and this server must be restarted to generate again\n",
                         message);
            std::fflush(stderr);
            for (const auto & w : r.watches) w.second(why);
            lk.unlock();
            for (;;) std::this_thread::sleep_for(std::chrono::hours(24));
        }
    }
    std::fprintf(stderr, "llamabox: fatal: %s\n", message);
    if (from_rpc) {
        std::fprintf(stderr, "llamabox: a ggml RPC server (--rpc) went away or broke the protocol; ggml's RPC "
                             "client cannot recover from that, so this server stops\n");
    }
    std::fflush(stderr);
}

// One of ggml-rpc's entry points, through its registry: the same in a static build and in one
// whose backends are loadable libraries (GGML_BACKEND_DL), where nothing links to them.
template <typename Fn> Fn * rpc_fn(const char * name) {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    void * fn = reg != nullptr ? ggml_backend_reg_get_proc_address(reg, name) : nullptr;
    if (fn == nullptr) throw load_error(std::string("this build has no ggml RPC backend (") + name + ")");
    return reinterpret_cast<Fn *>(fn);
}

}  // namespace

void add_rpc_servers(const std::vector<std::string> & endpoints) {
    for (const auto & ep : endpoints) {
        std::string host, port;
        if (!split_endpoint(ep, host, port)) {
            throw load_error("--rpc takes host:port servers, not '" + ep + "'");
        }
        const std::string name = "RPC[" + ep + "]";
        if (ggml_backend_reg_by_name(name.c_str()) != nullptr) continue;  // this process has it
        const std::string why = connect_error(host, port, 5000);
        if (!why.empty()) throw load_error("cannot connect to the RPC server " + ep + ": " + why);
        ggml_backend_reg_t reg = rpc_fn<decltype(ggml_backend_rpc_add_server)>("ggml_backend_rpc_add_server")(ep.c_str());
        if (reg == nullptr) throw load_error("the RPC server " + ep + " offers no device");
        ggml_backend_register(reg);
        ggml_set_abort_callback(on_ggml_abort);
    }
}

bool rpc_servers_reachable(const std::vector<std::string> & endpoints, int timeout_ms) {
    for (const auto & ep : endpoints) {
        std::string host, port;
        if (!split_endpoint(ep, host, port) || !connect_error(host, port, timeout_ms).empty()) return false;
    }
    return true;
}

rpc_loss_watch::rpc_loss_watch(std::function<void(const std::string &)> on_lost) {
    loss_registry & r = registry();
    std::lock_guard<std::mutex> lk(r.mtx);
    id_ = r.next_id++;
    r.watches.emplace_back(id_, std::move(on_lost));
    ggml_set_abort_callback(on_ggml_abort);
}

rpc_loss_watch::~rpc_loss_watch() {
    loss_registry & r = registry();
    std::lock_guard<std::mutex> lk(r.mtx);
    r.watches.erase(std::remove_if(r.watches.begin(), r.watches.end(), [&](const auto & w) { return w.first == id_; }),
                    r.watches.end());
}

void run_rpc_server(const std::string & host, int port, int n_threads, const std::string & cache_dir) {
    if (port <= 0 || port > 65535) throw load_error("the RPC server's port must be in 1..65535");
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu == nullptr) throw load_error("this build has no CPU device to serve");
    const std::string ep = host + ":" + std::to_string(port);
    rpc_fn<decltype(ggml_backend_rpc_start_server)>("ggml_backend_rpc_start_server")(ep.c_str(), cache_dir.empty() ? nullptr : cache_dir.c_str(),
                                  (size_t) std::max(1, n_threads), 1, &cpu);
}

}  // namespace llamabox
