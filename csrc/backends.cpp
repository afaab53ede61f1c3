#include "backends.h"

#include <mutex>

#ifdef _WIN32
#include <windows.h>
#else
#include <dlfcn.h>
#endif

#include "errors.h"
#include "ggml-backend.h"
#include "log_sink.h"

namespace llamabox {

namespace {

// The path of the shared library (or executable) that holds `addr`; empty if unknown.
std::string library_of(const void * addr) {
#ifdef _WIN32
    HMODULE mod = nullptr;
    if (!GetModuleHandleExA(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                            static_cast<LPCSTR>(addr), &mod)) {
        return {};
    }
    char path[MAX_PATH];
    const DWORD n = GetModuleFileNameA(mod, path, MAX_PATH);
    return n == 0 || n == MAX_PATH ? std::string() : std::string(path, n);
#else
    Dl_info info {};
    if (dladdr(addr, &info) == 0 || info.dli_fname == nullptr) return {};
    return info.dli_fname;
#endif
}

std::string dirname_of(const std::string & path) {
    const size_t sep = path.find_last_of("/\\");
    return sep == std::string::npos ? std::string(".") : path.substr(0, sep);
}

}  // namespace

std::string backend_dir() {
#ifdef GGML_BACKEND_DL
    static const std::string dir = dirname_of(library_of(reinterpret_cast<const void *>(&backend_dir)));
    return dir;
#else
    return {};
#endif
}

void load_backends() {
#ifdef GGML_BACKEND_DL
    static std::once_flag once;
    std::call_once(once, [] {
        log_sink_install();  // ggml reports each library it tries at info level: quiet unless verbose
        const std::string dir = backend_dir();
        ggml_backend_load_all_from_path(dir.empty() ? nullptr : dir.c_str());
    });
#endif
}

void require_cpu_backend() {
    load_backends();
    if (ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU) != nullptr) return;
    throw load_error("no ggml CPU backend is loaded: none of the libggml-cpu-* libraries in " + backend_dir() +
                     " could be loaded on this CPU (a broken install? reinstall llamabox)");
}

std::string cpu_variant() {
#ifdef GGML_BACKEND_DL
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("CPU");
    if (reg == nullptr) return {};
    // Any entry point the CPU library hands out lives in that library: its file names the variant.
    const void * fn = ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
    std::string name = fn != nullptr ? library_of(fn) : std::string();
    name = name.substr(name.find_last_of("/\\") + 1);  // libggml-cpu-haswell.so, ggml-cpu-haswell.dll
    const std::string stem = "ggml-cpu";
    const size_t at = name.find(stem);
    if (at == std::string::npos) return {};
    name = name.substr(at + stem.size());
    name = name.substr(0, name.find('.'));
    return name.empty() ? std::string("default") : name.substr(1);  // "-haswell" -> "haswell"
#else
    return {};
#endif
}

}  // namespace llamabox
