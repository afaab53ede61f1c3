// ggml's backends as loadable libraries (GGML_BACKEND_DL): the portable CPU wheel carries one
// libggml-cpu-<variant> per instruction set next to _core, and ggml loads the best one this CPU
// runs. In a static build (the default local build) every backend is linked in and these do
// nothing.
#pragma once

#include <string>

namespace llamabox {

// Loads the backend libraries from the directory of the library this code is in, once per
// process (the module's import calls it). Safe to call again.
void load_backends();

// Throws load_error saying where it looked when no CPU backend is registered (the libraries are
// missing, or none of the variants runs on this CPU).
void require_cpu_backend();

// The CPU variant in use ("haswell", "skylakex", ...), from the name of the library ggml
// loaded; empty in a static build.
std::string cpu_variant();

// The directory load_backends() looks in; empty in a static build.
std::string backend_dir();

}  // namespace llamabox
